"""Write mlink's XML configuration file (reading it is `mlink.config`).

The text is commented for a human reader and loads back (`load_config`) to
an equal `Config`. The format is described in docs/configuration.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from mlink.config_model import Config, ProfilesConfig, RostersConfig

__all__ = ["render_config", "write_config"]


def _rel(path: Path, base: Path) -> str:
    """`path` relative to the config directory when inside it, so a setup
    directory can be moved or copied as a whole; absolute otherwise."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base)).as_posix() or "."
    except ValueError:
        return str(path)


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_config(cfg: Config, base_dir: Path) -> str:
    """The configuration file text for `cfg`, commented for a human reader.

    Paths are written relative to `base_dir` (where the file will live) when
    they lie inside it. Loading the result gives back an equal `Config`.
    """
    q = quoteattr
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<!-- mlink configuration. Every element and attribute is described in",
        "     docs/configuration.md. Relative paths are taken from this file's",
        "     directory. Unknown elements or attributes are errors. -->",
        "<mlink>",
        "  <!-- The XMPP domains served: users are user@domain. One or more. -->",
    ]
    out += [f"  <domain>{escape(domain)}</domain>" for domain in cfg.domains]
    out += [
        "",
        "  <!-- Where clients connect. type: c2s = XMPP with STARTTLS (RFC 6120),",
        "       tls = direct TLS (XEP-0368), websocket = XMPP over WebSocket",
        "       (RFC 7395) on plain HTTP, websocket-tls = the same on HTTPS (wss://).",
        "       port 0 picks a free port. -->",
    ]
    for listener in cfg.listeners:
        out.append(
            f'  <listen type={q(listener.kind)} port="{listener.port}"'
            f" address={q(listener.address)}/>"
        )
    tls_attrs = ""
    if cfg.tls.certificate is not None:
        tls_attrs += f" certificate={q(_rel(cfg.tls.certificate, base_dir))}"
    if cfg.tls.key is not None:
        tls_attrs += f" key={q(_rel(cfg.tls.key, base_dir))}"
    out += [
        "",
        '  <!-- Certificate and private key (PEM). required="true": clients must',
        "       start TLS before they may authenticate (RFC 6120 5.3.1). -->",
        f'  <tls{tls_attrs} required="{"true" if cfg.tls.required else "false"}"/>',
        "",
        "  <!-- Where users and their credentials live. -->",
        f"  <directory backend={q(cfg.directory.backend)}>",
    ]
    if cfg.directory.backend == "embedded":
        emb = cfg.directory.embedded
        out += [
            "    <!-- An LDIF file holding the users and their credentials. -->",
            f"    <embedded file={q(_rel(emb.file, base_dir))} base={q(emb.base_dn)}/>",
            "  </directory>",
            "  <!-- To use an LDAP server instead:",
            '  <directory backend="ldap">',
            '    <ldap base="dc=example,dc=com" bind-dn="cn=mlink,dc=example,dc=com"',
            '          bind-password-file="ldap-password" users="ou=People,dc=example,dc=com"',
            '          jid-attribute="mail" filter="(objectClass=inetOrgPerson)"',
            '          scram-attribute="authPassword" pool-size="8" timeout="5">',
            "      <server>ldap://127.0.0.1:389</server>",
            "    </ldap>",
            "  </directory>",
            "  -->",
        ]
    else:
        ldap = cfg.directory.ldap
        attrs = [f"base={q(ldap.base_dn)}"]
        if ldap.bind_dn:
            attrs.append(f"bind-dn={q(ldap.bind_dn)}")
        if ldap.bind_password:
            attrs.append(f"bind-password={q(ldap.bind_password)}")
        attrs += [
            f"users={q(ldap.users_dn or 'ou=People,' + ldap.base_dn)}",
            f"jid-attribute={q(ldap.jid_attribute)}",
            f"filter={q(ldap.user_filter)}",
            f"scram-attribute={q(ldap.scram_attribute)}",
            f'pool-size="{ldap.pool_size}"',
            f'timeout="{_fmt_number(ldap.timeout)}"',
        ]
        out.append("    <ldap " + ("\n          ".join(attrs)) + ">")
        out.append("      <!-- Tried in order until one answers. -->")
        out += [f"      <server>{escape(url)}</server>" for url in ldap.servers]
        out += ["    </ldap>", "  </directory>"]
    lim = cfg.limits
    out += [
        "",
        "  <!-- Per-connection protection: largest stanza in bytes, deepest",
        "       element nesting, seconds allowed to authenticate; messages kept",
        "       per offline user. -->",
        f'  <limits stanza-bytes="{lim.max_stanza_bytes}" depth="{lim.max_depth}"'
        f' auth-timeout="{_fmt_number(lim.auth_timeout)}"'
        f' offline-limit="{lim.max_offline_messages}"/>',
    ]
    out += _render_websocket(cfg)
    out += _render_profiles(cfg)
    out += _render_rosters(cfg)
    out += [
        "",
        "  <!-- Where the server keeps its state (rosters, offline messages). -->",
        f"  <data dir={q(_rel(cfg.data_dir, base_dir))}/>",
        "",
        "  <!-- debug, info, warning, error or critical. -->",
        f"  <log level={q(cfg.log_level)}/>",
        "</mlink>",
        "",
    ]
    return "\n".join(out)


def _render_websocket(cfg: Config) -> list[str]:
    """The <websocket> element when anything is set; otherwise a commented
    example, so the options are discoverable from the file itself."""
    ws = cfg.websocket
    out = [
        "",
        "  <!-- XMPP over WebSocket: allowed page origins (none listed: all),",
        "       reverse proxies whose plain ws:// counts as encrypted, and an",
        "       optional see-other-uri redirecting every stream (RFC 7395). -->",
    ]
    if not (ws.origins or ws.trusted_proxies or ws.see_other_uri):
        return out + [
            "  <!--",
            '  <websocket see-other-uri="wss://other.example.org/xmpp-websocket">',
            "    <origin>https://chat.example.org</origin>",
            "    <trusted-proxy>10.0.0.1</trusted-proxy>",
            "  </websocket>",
            "  -->",
        ]
    attrs = f" see-other-uri={quoteattr(ws.see_other_uri)}" if ws.see_other_uri else ""
    out.append(f"  <websocket{attrs}>")
    out += [f"    <origin>{escape(origin)}</origin>" for origin in ws.origins]
    out += [f"    <trusted-proxy>{escape(proxy)}</trusted-proxy>" for proxy in ws.trusted_proxies]
    out.append("  </websocket>")
    return out


def _render_profiles(cfg: Config) -> list[str]:
    """<profiles> when fields are set or limits changed; otherwise a
    commented example (docs/directory.md explains the policies)."""
    pr = cfg.profiles
    default = ProfilesConfig()
    out = [
        "",
        "  <!-- Profiles (vCard, XEP-0154, avatars): per field, who owns it.",
        "       directory = read from the directory, clients may not change it;",
        "       update = read from it, client changes written back to it;",
        "       static = one value for everyone; local = kept by mlink. -->",
    ]
    if not pr.fields and (pr.cache_seconds, pr.max_photo_bytes) == (
        default.cache_seconds, default.max_photo_bytes
    ):
        return out + [
            "  <!--",
            '  <profiles cache-seconds="60" max-photo-bytes="196608">',
            '    <field name="display_name" policy="directory"/>',
            '    <field name="mobile" policy="update" attribute="mobile"/>',
            '    <field name="org_name" policy="static" value="Example Corp"/>',
            '    <field name="nickname" policy="local"/>',
            "  </profiles>",
            "  -->",
        ]
    out.append(
        f'  <profiles cache-seconds="{_fmt_number(pr.cache_seconds)}"'
        f' max-photo-bytes="{pr.max_photo_bytes}">'
    )
    for f in pr.fields:
        attrs = f"name={quoteattr(f.name)} policy={quoteattr(f.policy)}"
        if f.attribute is not None:
            attrs += f" attribute={quoteattr(f.attribute)}"
        if f.value is not None:
            attrs += f" value={quoteattr(f.value)}"
        out.append(f"    <field {attrs}/>")
    out.append("  </profiles>")
    return out


def _render_rosters(cfg: Config) -> list[str]:
    """<rosters> when anything is set; otherwise a commented example."""
    ro = cfg.rosters
    default = RostersConfig()
    out = [
        "",
        "  <!-- Rosters from the directory: members of each group see each other;",
        "       static-attribute keeps personal rosters in the users' entries. -->",
    ]
    if not ro.groups and ro.static_attribute is None and (
        ro.refresh_seconds == default.refresh_seconds
    ):
        return out + [
            "  <!--",
            '  <rosters refresh-seconds="300" static-attribute="mlinkRosterItem">',
            '    <group dn="cn=sales,ou=Groups,dc=example,dc=com"/>',
            '    <group filter="(objectClass=groupOfNames)" name-attribute="description"/>',
            "  </rosters>",
            "  -->",
        ]
    attrs = f' refresh-seconds="{_fmt_number(ro.refresh_seconds)}"'
    if ro.static_attribute is not None:
        attrs += f" static-attribute={quoteattr(ro.static_attribute)}"
    out.append(f"  <rosters{attrs}>")
    for g in ro.groups:
        parts = []
        if g.dn is not None:
            parts.append(f"dn={quoteattr(g.dn)}")
        if g.filter is not None:
            parts.append(f"filter={quoteattr(g.filter)}")
        if g.base is not None:
            parts.append(f"base={quoteattr(g.base)}")
        if g.name is not None:
            parts.append(f"name={quoteattr(g.name)}")
        elif g.name_attribute != "cn":
            parts.append(f"name-attribute={quoteattr(g.name_attribute)}")
        out.append(f"    <group {' '.join(parts)}/>")
    out.append("  </rosters>")
    return out


def write_config(cfg: Config, path: Path, *, overwrite: bool = False) -> None:
    """Write `cfg` to `path` in the documented format.

    Refuses (FileExistsError) to replace an existing file unless
    `overwrite`, using exclusive creation so two `mlink init` runs cannot
    clobber each other. A file holding an LDAP password is made
    owner-only.
    """
    path = Path(path)
    text = render_config(cfg, path.parent)
    has_secret = cfg.directory.backend == "ldap" and bool(cfg.directory.ldap.bind_password)
    mode = 0o600 if has_secret else 0o644
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
