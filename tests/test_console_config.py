"""`<console>` in the configuration and `mlink init --console-admin`, and
the console's metrics rendering (no server, no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlink.admin.setup import SetupError, init_setup
from mlink.config import ConfigError, load_config
from mlink.console.metrics import render_metrics

BASE = """<mlink><domain>example.com</domain><domain>example.org</domain>
<listen type="c2s" port="0"/>{tls}
{console}</mlink>"""


def write(tmp_path: Path, console: str, tls: bool = True) -> Path:
    tls_text = ""
    if tls:
        for name in ("cert.pem", "key.pem"):
            (tmp_path / name).write_text("x")
        tls_text = '<tls certificate="cert.pem" key="key.pem"/>'
    else:
        tls_text = '<tls required="false"/>'
    path = tmp_path / "mlink.xml"
    path.write_text(BASE.format(tls=tls_text, console=console))
    return path


def test_console_is_off_unless_configured(tmp_path):
    assert not load_config(write(tmp_path, "")).console.enabled


def test_console_settings(tmp_path):
    config = load_config(write(tmp_path, (
        '<console port="0"><admin group="cn=admins,ou=Groups,dc=example,dc=com"/>'
        '<admin jid="o@example.org" domain="example.org"/>'
        "<metrics-client>10.0.0.0/8</metrics-client></console>")))
    console = config.console
    assert console.enabled and console.address == "127.0.0.1" and console.port == 0
    assert [(a.group, a.jid, a.domain) for a in console.admins] == [
        ("cn=admins,ou=Groups,dc=example,dc=com", None, None),
        (None, "o@example.org", "example.org")]
    assert console.metrics_clients == ("10.0.0.0/8",)


@pytest.mark.parametrize("console, tls, error", [
    ("<console/>", False, "<console> serves HTTPS with the <tls> certificate"),
    ('<console><admin jid="a@example.com" group="cn=x"/></console>', True,
     "either 'group'"),
    ("<console><admin/></console>", True, "either 'group'"),
    ('<console><admin jid="example.com"/></console>', True, "must be a bare JID"),
    ('<console><admin jid="a@example.net" domain="example.net"/></console>', True,
     "is not a served <domain>"),
    ('<console idle-minutes="0"/>', True, "idle-minutes"),
])
def test_bad_console_settings_are_refused(tmp_path, console, tls, error):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, console, tls))
    assert error in str(info.value)


def test_a_console_port_in_use_is_reported_before_start(tmp_path):
    import socket

    from mlink.shard.supervisor import check_ports_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(write(tmp_path, f'<console port="{port}"/>'))
        with pytest.raises(OSError, match=rf"port {port} on 127.0.0.1 is in use \(console\)"):
            check_ports_free(config)


def test_init_enables_the_console_on_loopback(tmp_path):
    config = load_config(init_setup(tmp_path / "setup", domain="example.com",
                                    console_admin="admin@example.com", console_port=0))
    assert config.console.enabled and config.console.address == "127.0.0.1"
    assert [a.jid for a in config.console.admins] == ["admin@example.com"]
    assert not load_config(init_setup(tmp_path / "plain")).console.enabled
    with pytest.raises(SetupError, match="must be a user of example.com"):
        init_setup(tmp_path / "bad", domain="example.com", console_admin="x@example.org")


def test_metrics_of_a_status_snapshot():
    status = {"uptime": 12.5, "shards": [
        {"index": 0, "restarts": 1, "stats": {
            "sessions": 3, "connections": 4, "limits": {"refused": 2}, "loop": {"stalls": 0},
            "traffic": {"logins_ok": {"SCRAM-SHA-256": 5}, "logins_failed": {"PLAIN": 1},
                        "stanzas_in": {"message": 7}, "stanzas_out": {"message": 9},
                        "directory": {"scram-login": {"requests": 4, "seconds": 0.5,
                                                      "errors": 1}}},
            "bus": {"1": {"frames_in": 10, "frames_out": 11, "bytes_in": 100,
                          "bytes_out": 110, "drops_full": 0, "drops_down": 2}}}},
        {"index": 1, "restarts": 0, "stats": None}]}
    text = render_metrics(status).decode()
    for line in (
        'mlink_shard_up{shard="0"} 1.0', 'mlink_shard_up{shard="1"} 0.0',
        'mlink_sessions{shard="0"} 3.0',
        'mlink_logins_total{mechanism="SCRAM-SHA-256",outcome="ok",shard="0"} 5.0',
        'mlink_logins_total{mechanism="PLAIN",outcome="failed",shard="0"} 1.0',
        'mlink_stanzas_total{direction="out",kind="message",shard="0"} 9.0',
        'mlink_bus_frames_total{direction="out",peer="1",shard="0"} 11.0',
        'mlink_bus_drops_total{peer="1",reason="down",shard="0"} 2.0',
        'mlink_shard_restarts_total{shard="0"} 1.0',
        'mlink_directory_request_seconds_count{operation="scram-login",shard="0"} 4.0',
        'mlink_directory_request_seconds_sum{operation="scram-login",shard="0"} 0.5',
        'mlink_directory_errors_total{operation="scram-login",shard="0"} 1.0',
    ):
        assert line in text.splitlines(), line
    assert 'mlink_sessions{shard="1"}' not in text
    assert text.endswith("# EOF\n")
