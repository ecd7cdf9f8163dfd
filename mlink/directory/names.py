"""Names both directory layouts share: DN and filter escaping, the bare-JID
check, and the object classes of a user entry."""

from __future__ import annotations

from mlink.directory.base import DirectoryError

USER_OBJECT_CLASSES = ["top", "person", "organizationalPerson", "inetOrgPerson", "mlinkUser"]
MLINK_CLASS = "mlinkUser"


def escape_filter_value(value: str) -> str:
    """Escape an assertion value for a search filter (RFC 4515 §3).

    (bonsai.escape_filter_exp writes NUL as `\\0`, which is not valid.)
    """
    out = []
    for ch in value:
        if ch in "\\*()\0":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_dn_value(value: str) -> str:
    """Escape an attribute value for a DN string (RFC 4514 §2.4). A '#'
    is escaped wherever it is (RFC 4514 requires it only first, and allows
    it anywhere): libldap's DN parser, under bonsai, refuses a bare '#'
    inside a value, and RFC 7622 localparts may hold one."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '\\"+,;<=>#':
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        elif (i == 0 and ch == " ") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def check_bare_jid(jid: str) -> None:
    """DirectoryError unless `jid` looks like a bare user JID (local@domain)."""
    if not jid or "@" not in jid or "/" in jid:
        raise DirectoryError(f"not a bare user JID: {jid!r}")


# Attributes that hold credentials. They change through set_password only
# and are never handed out as profile data: a profile field mapped to one by
# mistake must not publish a password hash in vCards or let a client write
# one (see user_attributes/modify_user).
CREDENTIAL_ATTRIBUTES = frozenset({"userpassword", "authpassword"})
# Attributes of the mlink schema (conf/mlink-schema.ldif): setting one on an
# entry without the mlinkUser class adds the class in the same modify.
MLINK_ATTRIBUTES = frozenset({"authpassword", "mlinkrosteritem"})
# Where roster groups live unless a <group base=...> says otherwise.
GROUPS_RDN = "ou=Groups"

def _unescape_dn_value(raw: str) -> str:
    """Decode RFC 4514 escapes (`\\,` and `\\2C`) of one attribute value.

    Hex escapes are collected as bytes first, since a non-ASCII character
    is written as several of them (`\\C3\\A9`)."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            pair = raw[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += raw[i + 1].encode("utf-8")
            i += 2
            continue
        out += ch.encode("utf-8")
        i += 1
    return out.decode("utf-8", "replace")


def _split_unescaped(text: str, separators: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch in separators:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def normalize_dn(dn: str) -> str:
    """A comparison key for a DN (RFC 4514 string), so that a `member` value
    written by another tool (`CN=Alice, ou=People,...`, `\\2C` escapes,
    multi-valued RDNs in any order) matches the DN the server returns for
    the entry. Attribute types and values are compared without case and with
    runs of spaces collapsed, as caseIgnoreMatch does; that is right for the
    naming attributes in use (cn, uid, mail, ou, dc) though not for a
    case-exact one. Never raises: text that is no DN keys as itself, folded.
    """
    text = dn.strip()
    if not text:
        return ""
    if not any(c in text for c in '\\+"#;'):
        # The common case, cheap: a 5,000-member group normalises 5,000 DNs.
        rdns = []
        for rdn in text.split(","):
            name, sep, value = rdn.partition("=")
            if not sep:
                return " ".join(text.lower().split())
            value = escape_dn_value(" ".join(value.lower().split()))
            rdns.append(f"{name.strip().lower()}={value}")
        return ",".join(rdns)
    rdns = []
    for rdn in _split_unescaped(text, ",;"):
        avas = []
        for ava in _split_unescaped(rdn, "+"):
            name, sep, raw = ava.partition("=")
            if not sep:
                return " ".join(text.lower().split())
            raw = raw.strip()
            if raw.startswith("#"):  # a BER hex string: compare as given
                value = raw.lower()
            else:
                value = escape_dn_value(" ".join(_unescape_dn_value(raw).lower().split()))
            avas.append(f"{name.strip().lower()}={value}")
        rdns.append("+".join(sorted(avas)))
    return ",".join(rdns)


def rdn_value(dn: str) -> str:
    """The value of the first RDN (`sales` for `cn=sales,ou=Groups,...`), a
    group's name of last resort."""
    first = _split_unescaped(dn.strip(), ",")[0]
    first = _split_unescaped(first, "+")[0]
    return _unescape_dn_value(first.partition("=")[2].strip())


def parent_dn(dn: str) -> str:
    """The DN of `dn`'s parent, as written ("" at the top)."""
    return ",".join(part.strip() for part in _split_unescaped(dn.strip(), ",")[1:])


def is_under(dn_key: str, base_key: str) -> bool:
    """True when normalised `dn_key` is `base_key` or below it (subtree)."""
    return dn_key == base_key or dn_key.endswith("," + base_key)


def parent_key(dn_key: str) -> str:
    """The normalised DN of the parent of normalised `dn_key` ("" at the top)."""
    rdns = _split_unescaped(dn_key, ",")
    return ",".join(rdns[1:])
