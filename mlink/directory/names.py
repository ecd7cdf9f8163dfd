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
    """Escape an attribute value for a DN string (RFC 4514 §2.4)."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '\\"+,;<=>':
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        elif (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def check_bare_jid(jid: str) -> None:
    """DirectoryError unless `jid` looks like a bare user JID (local@domain)."""
    if not jid or "@" not in jid or "/" in jid:
        raise DirectoryError(f"not a bare user JID: {jid!r}")
