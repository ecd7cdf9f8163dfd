"""`<components>` in mlink.xml: what loads, and the one-line errors for what
cannot work (a short secret, a served domain, a name twice, a missing file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlink.config import ConfigError, load_config
from mlink.config_model import DEFAULT_COMPONENT_PORT

HEAD = ('<mlink><domain>localhost</domain><listen type="c2s" port="0"/>'
        '<tls required="false"/>')
GOOD_SECRET = "0123456789abcdef"


def load(tmp_path: Path, components: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "mlink.xml"
    path.write_text(f"{HEAD}\n{components}\n</mlink>")
    return load_config(path)


def error(tmp_path: Path, components: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, components)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_defaults_and_a_secret_file(tmp_path: Path) -> None:
    assert load(tmp_path, "").components.components == ()
    (tmp_path / "push-secret").write_text(GOOD_SECRET + "\n")
    cfg = load(tmp_path, '<components><component name="Push.Localhost." '
                         'secret-file="push-secret"/></components>').components
    assert (cfg.port, cfg.address) == (DEFAULT_COMPONENT_PORT, "127.0.0.1")
    (component,) = cfg.components
    assert component.name == "push.localhost" and component.secret == GOOD_SECRET


@pytest.mark.parametrize("components, words", [
    ('<component name="p.localhost" secret="short"/>', "at least 16 characters"),
    ('<component name="p.localhost"/>', "at least 16 characters"),
    (f'<component name="localhost" secret="{GOOD_SECRET}"/>', "is a served <domain>"),
    (f'<component secret="{GOOD_SECRET}"/>', "needs a 'name'"),
    (f'<component name="p.localhost" secret="{GOOD_SECRET}"/>'
     f'<component name="P.localhost" secret="{GOOD_SECRET}"/>', "given twice"),
    (f'<component name="p.localhost" secret="{GOOD_SECRET}" secret-file="x"/>', "not both"),
    ('<component name="p.localhost" secret-file="missing"/>', "does not exist"),
    (f'<component name="a b" secret="{GOOD_SECRET}"/>', "name"),
])
def test_bad_components(tmp_path: Path, components: str, words: str) -> None:
    text = error(tmp_path, f"<components>{components}</components>")
    assert ":2:" in text and words in text, text


def test_bad_port(tmp_path: Path) -> None:
    assert "port" in error(tmp_path, '<components port="70000"/>')


@pytest.mark.parametrize("modules, name, served_by", [
    ("", "conference.localhost", "muc"),
    ('<modules><module name="muc"><prefix>chat</prefix></module></modules>',
     "chat.localhost", "muc"),
    ('<modules><module name="muc"><hosts>rooms.localhost</hosts></module></modules>',
     "rooms.localhost", "muc"),
    ('<modules><module name="http_upload"/></modules>', "upload.localhost", "http_upload"),
])
def test_a_component_on_a_module_subdomain_is_refused(
        tmp_path: Path, modules: str, name: str, served_by: str) -> None:
    """The server could only find the clash when the module sets up (a
    traceback from `mlink serve` after `mlink check` said valid)."""
    text = error(tmp_path, f'<components>\n<component name="{name}" secret="{GOOD_SECRET}"/>'
                           f"\n</components>{modules}")
    assert ":3:" in text and f"{name!r} is served by module {served_by!r}" in text, text


def test_a_component_next_to_module_subdomains_loads(tmp_path: Path) -> None:
    # With the muc module off, its subdomain is free for a component.
    cfg = load(tmp_path, f'<components><component name="conference.localhost" '
                         f'secret="{GOOD_SECRET}"/></components>'
                         '<modules><module name="muc" enabled="false"/></modules>')
    assert [c.name for c in cfg.components.components] == ["conference.localhost"]
    cfg = load(tmp_path, f'<components><component name="upload.localhost" '
                         f'secret="{GOOD_SECRET}"/></components>')
    assert [c.name for c in cfg.components.components] == ["upload.localhost"]
