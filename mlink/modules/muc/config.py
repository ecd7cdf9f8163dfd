"""A room's configuration (XEP-0045 §10.2, the `muc#roomconfig` form).

`RoomConfig` is immutable: a change makes a new one, so a form refused half
way (or a bad directory entry) leaves the room's configuration as it was.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

DATA_NS = "jabber:x:data"
ROOMCONFIG_FORM_TYPE = "http://jabber.org/protocol/muc#roomconfig"
ROOMINFO_FORM_TYPE = "http://jabber.org/protocol/muc#roominfo"
WHOIS_VALUES = ("moderators", "anyone")
ALLOW_PM_VALUES = ("anyone", "participants", "moderators", "none")
# Room names, descriptions and the like are short text; longer is refused
# rather than stored and echoed to every occupant.
MAX_TEXT_CHARS = 1024
# A room's own occupant limit and history length, at most (the service's
# limits, from its options, may be lower and then apply).
MAX_ROOM_USERS = 100_000
MAX_ROOM_HISTORY = 1000
# The form field of the directory group whose members are the room's
# members (mlink's own; XEP-0045 has none). A DN.
MEMBER_GROUP_FIELD = "x-mlink#member_group"


class ConfigError(ValueError):
    """A value the configuration cannot take; `condition` is the XEP-0045
    error for the form that gave it."""

    def __init__(self, message: str, condition: str = "bad-request") -> None:
        super().__init__(message)
        self.condition = condition


@dataclass(frozen=True, slots=True)
class RoomConfig:
    name: str = ""
    description: str = ""
    persistent: bool = False
    public: bool = True
    members_only: bool = False
    moderated: bool = False
    password_protected: bool = False
    password: str = ""
    whois: str = "moderators"  # who sees real JIDs: semi-anonymous by default
    max_users: int = 0  # 0: the service's limit only
    change_subject: bool = False  # whether participants may change the subject
    allow_invites: bool = False  # whether participants may invite to members-only rooms
    allow_pm: str = "anyone"
    history_length: int = 20
    logging: bool = False  # announced with status 170; no public log is kept
    archive: bool = True  # XEP-0313: messages and subject changes archived
    member_group: str = ""

    @property
    def non_anonymous(self) -> bool:
        return self.whois == "anyone"

    @property
    def needs_password(self) -> bool:
        return self.password_protected and bool(self.password)

    def replace(self, **changes: Any) -> RoomConfig:
        """A copy with `changes`, checked."""
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        """Raise `ConfigError` for a value outside the allowed ones."""
        for text in (self.name, self.description, self.password, self.member_group):
            if len(text) > MAX_TEXT_CHARS:
                raise ConfigError("a text value is too long", "not-acceptable")
        if self.whois not in WHOIS_VALUES:
            raise ConfigError(f"whois must be one of {', '.join(WHOIS_VALUES)}")
        if self.allow_pm not in ALLOW_PM_VALUES:
            raise ConfigError(f"allowpm must be one of {', '.join(ALLOW_PM_VALUES)}")
        if not 0 <= self.max_users <= MAX_ROOM_USERS:
            raise ConfigError(f"maxusers must be from 0 to {MAX_ROOM_USERS}")
        if not 0 <= self.history_length <= MAX_ROOM_HISTORY:
            raise ConfigError(f"historylength must be from 0 to {MAX_ROOM_HISTORY}")
        if self.password_protected and not self.password:
            raise ConfigError("a password-protected room needs a password", "not-acceptable")


# var -> (attribute, field type, label). Order is the form's order.
FIELDS: dict[str, tuple[str, str, str]] = {
    "muc#roomconfig_roomname": ("name", "text-single", "Name"),
    "muc#roomconfig_roomdesc": ("description", "text-single", "Description"),
    "muc#roomconfig_persistentroom": ("persistent", "boolean", "Persistent (kept when empty)"),
    "muc#roomconfig_publicroom": ("public", "boolean", "Listed in the room directory"),
    "muc#roomconfig_membersonly": ("members_only", "boolean", "Members only"),
    "muc#roomconfig_moderatedroom": ("moderated", "boolean", "Moderated"),
    "muc#roomconfig_passwordprotectedroom": ("password_protected", "boolean",
                                             "Password required to enter"),
    "muc#roomconfig_roomsecret": ("password", "text-private", "Password"),
    "muc#roomconfig_whois": ("whois", "list-single", "Who may discover real JIDs"),
    "muc#roomconfig_maxusers": ("max_users", "text-single", "Maximum occupants (0: no limit)"),
    "muc#roomconfig_changesubject": ("change_subject", "boolean",
                                     "Participants may change the subject"),
    "muc#roomconfig_allowinvites": ("allow_invites", "boolean", "Participants may invite"),
    "muc#roomconfig_allowpm": ("allow_pm", "list-single", "Who may send private messages"),
    "muc#roomconfig_historylength": ("history_length", "text-single",
                                     "Messages of history kept"),
    "muc#roomconfig_enablelogging": ("logging", "boolean", "Announce that the room is logged"),
    "muc#roomconfig_enablearchiving": ("archive", "boolean",
                                       "Archive messages (members may read them back, XEP-0313)"),
    MEMBER_GROUP_FIELD: ("member_group", "text-single",
                         "Directory group (DN) whose members are the room's members"),
}
_OPTIONS = {"muc#roomconfig_whois": WHOIS_VALUES, "muc#roomconfig_allowpm": ALLOW_PM_VALUES}
# Other servers' names for a field, accepted in a submitted form: ejabberd
# calls the archiving switch `mam` (Prosody `muc#roomconfig_enablearchiving`).
ALIASES = {"mam": "muc#roomconfig_enablearchiving"}
_TRUE, _FALSE = ("1", "true"), ("0", "false")


def _x(tag: str) -> str:
    return f"{{{DATA_NS}}}{tag}"


def config_form(config: RoomConfig) -> ET.Element:
    """The form an owner fills (§10.2), holding the current values."""
    form = ET.Element(_x("x"), {"type": "form"})
    ET.SubElement(form, _x("title")).text = "Room configuration"
    hidden = ET.SubElement(form, _x("field"), {"var": "FORM_TYPE", "type": "hidden"})
    ET.SubElement(hidden, _x("value")).text = ROOMCONFIG_FORM_TYPE
    for var, (attr, kind, label) in FIELDS.items():
        field = ET.SubElement(form, _x("field"), {"var": var, "type": kind, "label": label})
        value = getattr(config, attr)
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        ET.SubElement(field, _x("value")).text = text
        for option in _OPTIONS.get(var, ()):
            opt = ET.SubElement(field, _x("option"), {"label": option})
            ET.SubElement(opt, _x("value")).text = option
    return form


def apply_form(config: RoomConfig, form: ET.Element) -> RoomConfig:
    """The configuration a submitted form (§10.2) makes of `config`. An
    unknown field or a bad value raises `ConfigError`: nothing changes."""
    changes: dict[str, Any] = {}
    for field in form.iter(_x("field")):
        var = field.get("var", "")
        var = ALIASES.get(var, var)
        if var == "FORM_TYPE":
            continue
        if var not in FIELDS:
            raise ConfigError(f"unknown configuration field {var!r}")
        attr, kind, _ = FIELDS[var]
        values = [v.text or "" for v in field.findall(_x("value"))]
        text = values[0].strip() if values else ""
        current = getattr(config, attr)
        if isinstance(current, bool):
            if text.lower() in _TRUE:
                changes[attr] = True
            elif text.lower() in _FALSE or text == "":
                changes[attr] = False
            else:
                raise ConfigError(f"{var} must be a boolean")
        elif isinstance(current, int):
            if text in ("", "none"):
                changes[attr] = 0
            elif text.isdigit():
                changes[attr] = int(text)
            else:
                raise ConfigError(f"{var} must be a whole number")
        else:
            changes[attr] = values[0] if kind == "text-private" and values else text
    return config.replace(**changes)


def changed_fields(old: RoomConfig, new: RoomConfig) -> list[str]:
    """The attributes that differ (for the status codes of §10.2.1)."""
    return [f.name for f in dataclasses.fields(RoomConfig)
            if getattr(old, f.name) != getattr(new, f.name)]
