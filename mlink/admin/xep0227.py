"""Moving users in and out: XEP-0227 (portable import/export), `mlink import`
and `mlink export`.

Why XEP-0227: it is what the servers administrators leave write. Prosody's
`prosody-migrator` (its `xep0227` storage) writes one file per user,
`<user>@<host>.xml`; ejabberd's `export_piefxis` writes a file per host.
Both are `<server-data xmlns='urn:xmpp:pie:0'>` documents of `<host>` and
`<user>` elements, so `mlink import` takes a file or a directory of them.

What moves, per user:
- credentials: a clear `password` attribute (derived and hashed as
  `mlink user import` does), else `<scram-credentials
  xmlns='urn:xmpp:pie:0#scram'>` (Prosody 0.12), stored as they are as RFC
  5803 `authPassword` values, so the old password keeps working without
  anyone knowing it. The hash is told by the key length, not only the
  `mechanism` label: Prosody's migrator labels SCRAM-SHA-256 keys
  "SCRAM-SHA-1" (it never reads the server's `password_hash`).
- the roster (`jabber:iq:roster` items: name, groups, subscription, ask,
  approved) and pending inbound requests (`<presence type='subscribe'>`);
- the vCard (vcard-temp), through the profile fields it maps to;
- private XML (XEP-0049) and offline messages (`<offline-messages>`).
Other elements (PEP, archives, rooms) are reported and skipped; a later
feature plugs in by adding a `Section` to `SECTIONS`.

An import is checked whole before anything is written: a problem anywhere
is one line, `file:line: problem`, and nothing changes. The accounts are
then written in one directory write and the stored data in one SQLite
transaction. It adds and updates, never deletes, and what is already there
is left alone (same credentials, same roster item, the same offline
message), so importing the same file twice changes nothing the second time.

An export reads the directory and one snapshot of the store while the
server runs. It writes SCRAM secrets (mlink keeps no clear password) for
both hashes; Prosody reads the SCRAM-SHA-1 one (its default), so accounts
moved back log in with their passwords there too. `--per-user` writes
Prosody's layout, one file per user, which is what its migrator reads.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from mlink.directory.core import ImportCounts, ImportedAccount, PortDirectory
from mlink.jid import InvalidJID, parse_jid
from mlink.modules.private import key_of
from mlink.sasl.secrets import HASHES, ScramSecret
from mlink.store.model import SUBSCRIPTION_STATES, RosterItem
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.config_model import Config
    from mlink.directory.base import Directory
    from mlink.store import Store

PIE_NS = "urn:xmpp:pie:0"
SCRAM_NS = "urn:xmpp:pie:0#scram"
CLIENT_NS = "jabber:client"
ROSTER_NS = "jabber:iq:roster"
PRIVATE_NS = "jabber:iq:private"
VCARD_NS = "vcard-temp"
XINCLUDE = "{http://www.w3.org/2001/XInclude}include"

# An export bigger than this is refused before it is parsed: the whole
# tree is held in memory while it is checked (roughly ten times the file).
MAX_FILE_BYTES = 256 * 1024 * 1024
# Files taken from one directory (Prosody writes one per user).
MAX_DIRECTORY_FILES = 200_000
# One stanza, vCard or private element, serialised: photos and bookmarks
# are far smaller; more is a damaged or hostile file.
MAX_ELEMENT_BYTES = 4 * 1024 * 1024
# SCRAM iteration counts outside this range are refused: below RFC 5802's
# 4096 nothing real stores them (Prosody: 10000, ejabberd: 4096), above it
# every login would cost seconds.
MIN_ITERATIONS, MAX_ITERATIONS = 1024, 1_000_000
# How a hash is told apart when the label lies (see the module docstring).
KEY_BYTES = {20: "SCRAM-SHA-1", 32: "SCRAM-SHA-256"}


class MigrationError(Exception):
    """A file that cannot be imported: `str()` is `file:line: problem`."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        where = str(path) if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {' '.join(problem.split())}")


class StoreVersionError(Exception):
    """The store is of another schema version than this mlink's (not a
    problem of the files: exit status 1, not 2)."""


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


# -- what a file holds ------------------------------------------------------------


@dataclass
class UserData:
    """One `<user>` of a file, checked and ready to write."""

    jid: str
    where: str  # file:line, for messages
    password: str | None = None
    secrets: list[ScramSecret] = field(default_factory=list)
    roster: list[RosterItem] = field(default_factory=list)
    pending: list[tuple[str, bytes]] = field(default_factory=list)  # (contact, stanza)
    vcard: ET.Element | None = None
    private: dict[str, bytes] = field(default_factory=dict)
    offline: list[bytes] = field(default_factory=list)
    # What sections added through `SECTIONS` keep, by section name.
    extra: dict[str, list[object]] = field(default_factory=dict)


@dataclass
class ImportPlan:
    """Everything a set of files holds, keyed by user (a user met twice is
    an error), and what was skipped (element name -> count)."""

    users: dict[str, UserData] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    read_files: set[Path] = field(default_factory=set)


class _Lines:
    """A parser target that builds the tree and records each element's
    line (read from expat at its start tag)."""

    def __init__(self) -> None:
        self._builder = ET.TreeBuilder()
        self.lines: dict[int, int] = {}
        self.parser: DefusedXMLParser | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> ET.Element:
        elem = self._builder.start(tag, attrib)
        if self.parser is not None:
            self.lines[id(elem)] = self.parser.parser.CurrentLineNumber
        return elem

    def end(self, tag: str) -> ET.Element:
        return self._builder.end(tag)

    def data(self, data: str) -> None:
        self._builder.data(data)

    def close(self) -> ET.Element:
        return self._builder.close()


def _parse(path: Path) -> tuple[ET.Element, dict[int, int]]:
    """The file's tree, with DTDs, entities and external references refused
    (no entity expansion at all) and its size bounded."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise MigrationError(path, None, f"{size} bytes: larger than the {MAX_FILE_BYTES} "
                                             "an import reads (split it per host or user)")
        data = path.read_bytes()
    except OSError as exc:
        raise MigrationError(path, None, f"cannot read: {exc.strerror}") from None
    target = _Lines()
    parser = DefusedXMLParser(target=target, forbid_dtd=True, forbid_entities=True,
                              forbid_external=True)
    target.parser = parser
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as exc:
        line = exc.position[0] if exc.position else None
        message = re.sub(r":\s*line \d+, column \d+$", "", str(exc))
        raise MigrationError(path, line, f"XML syntax error: {message}") from None
    except DefusedXmlException as exc:
        what = type(exc).__name__
        reasons = {
            "DTDForbidden": "a DOCTYPE declaration (refused: XEP-0227 files have none, and "
                            "entity expansion is a denial of service)",
            "EntitiesForbidden": "an entity declaration (refused: no entity is expanded)",
            "ExternalReferenceForbidden": "an external reference (refused: nothing is fetched)",
        }
        raise MigrationError(path, parser.parser.CurrentLineNumber,
                             f"forbidden XML construct: {reasons.get(what, what)}") from None
    return root, target.lines


@dataclass
class _Context:
    path: Path
    lines: dict[int, int]
    domains: frozenset[str]
    plan: ImportPlan

    def line(self, elem: ET.Element) -> int | None:
        return self.lines.get(id(elem))

    def fail(self, elem: ET.Element | None, problem: str) -> MigrationError:
        return MigrationError(self.path, None if elem is None else self.line(elem), problem)

    def where(self, elem: ET.Element) -> str:
        line = self.line(elem)
        return f"{self.path}:{line}" if line else str(self.path)


# -- sections of a <user>: one parser and writer per kind of data -------------------


@dataclass(frozen=True)
class Section:
    """A kind of per-user data and how it moves. The built-in ones only
    `parse` (their rows are written by `_write_store` and exported by
    `_user_element`); rooms and archives plug in here once mlink has them,
    with all three:

    - `parse(ctx, user, elem)` checks an element of a `<user>` and keeps
      what it needs in `user.extra[name]` (MigrationError for a bad one);
    - `write(conn, user)`, inside the import's one store transaction,
      writes it, returning how many rows it wrote (0 when all was there);
    - `export(conn)`, inside the export's one read transaction, returns
      the elements to add to each user's `<user>`, by bare JID.
    """

    name: str
    tags: tuple[str, ...]
    parse: Callable[[_Context, UserData, ET.Element], None]
    write: Callable[[sqlite3.Connection, UserData], int] | None = None
    export: Callable[[sqlite3.Connection], dict[str, list[ET.Element]]] | None = None


def _bare(ctx: _Context, elem: ET.Element, text: str | None, what: str) -> str:
    if not text:
        raise ctx.fail(elem, f"{what}: missing JID")
    try:
        jid = parse_jid(text.strip())
    except InvalidJID as exc:
        raise ctx.fail(elem, f"{what}: invalid JID {text!r}: {exc}") from None
    return str(jid.bare)


def _parse_roster(ctx: _Context, user: UserData, query: ET.Element) -> None:
    seen: set[str] = set()
    for item in query:
        if item.tag != _q(ROSTER_NS, "item"):
            raise ctx.fail(item, f"unexpected <{_local(item.tag)}> in the roster")
        jid = _bare(ctx, item, item.get("jid"), "roster item")
        if jid == user.jid:
            continue  # a self-contact (Prosody drops them on export too)
        if jid in seen:
            raise ctx.fail(item, f"roster item {jid} given twice")
        seen.add(jid)
        subscription = item.get("subscription", "none")
        if subscription not in SUBSCRIPTION_STATES:
            raise ctx.fail(item, f"roster item {jid}: subscription {subscription!r} is not "
                                 f"one of {', '.join(sorted(SUBSCRIPTION_STATES))}")
        ask = item.get("ask")
        if ask not in (None, "subscribe", "unsubscribe"):
            raise ctx.fail(item, f"roster item {jid}: ask {ask!r} is not 'subscribe'")
        groups = [(g.text or "").strip() for g in item.findall(_q(ROSTER_NS, "group"))]
        user.roster.append(RosterItem(
            jid=jid, name=item.get("name") or None, groups=tuple(g for g in groups if g),
            subscription=subscription, ask=ask == "subscribe",
            approved=item.get("approved") in ("true", "1")))


def _client_stanza(elem: ET.Element) -> ET.Element:
    """A copy of a stanza with the file's namespace (or none) replaced by
    jabber:client throughout, as a c2s stream would have it: writers put
    stanzas in the document's default namespace (Prosody's pending
    `<presence>` lands in urn:xmpp:pie:0); payloads keep theirs."""
    tag = elem.tag
    if tag.startswith(f"{{{PIE_NS}}}"):
        tag = _q(CLIENT_NS, tag.partition("}")[2])
    elif not tag.startswith("{"):
        tag = _q(CLIENT_NS, tag)
    copy = ET.Element(tag, dict(elem.attrib))
    copy.text = elem.text
    for child in elem:
        sub = _client_stanza(child)
        sub.tail = child.tail
        copy.append(sub)
    copy.tail = None
    return copy


def _bounded(ctx: _Context, elem: ET.Element, data: bytes, what: str) -> bytes:
    if len(data) > MAX_ELEMENT_BYTES:
        raise ctx.fail(elem, f"{what} of {len(data)} bytes: more than {MAX_ELEMENT_BYTES}")
    return data


def _parse_pending(ctx: _Context, user: UserData, presence: ET.Element) -> None:
    if presence.get("type") != "subscribe":
        ctx.plan.skipped[f"presence type={presence.get('type')}"] += 1
        return
    contact = _bare(ctx, presence, presence.get("from"), "subscription request")
    stanza = _client_stanza(presence)
    stanza.set("to", user.jid)
    user.pending.append((contact, _bounded(ctx, presence, serialize(stanza, ""),
                                           "subscription request")))


def _parse_vcard(ctx: _Context, user: UserData, vcard: ET.Element) -> None:
    if user.vcard is not None:
        raise ctx.fail(vcard, "a second vCard for the same user")
    _bounded(ctx, vcard, serialize(vcard, ""), "vCard")
    photo = vcard.findtext(f"{_q(VCARD_NS, 'PHOTO')}/{_q(VCARD_NS, 'BINVAL')}")
    if photo is not None:
        try:
            base64.b64decode("".join(photo.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ctx.fail(vcard, "vCard PHOTO/BINVAL is not valid base64") from None
    user.vcard = vcard


def _parse_private(ctx: _Context, user: UserData, query: ET.Element) -> None:
    for child in query:
        key = key_of(child)
        if key is None:
            raise ctx.fail(child, f"private XML <{_local(child.tag)}> has no namespace or a "
                                  "reserved jabber: one (XEP-0049 §3)")
        user.private[key] = _bounded(ctx, child, serialize(child, ""), "private XML")


STANZA_ID_NS = "urn:xmpp:sid:0"


def _parse_offline(ctx: _Context, user: UserData, box: ET.Element) -> None:
    for message in box:
        if _local(message.tag) != "message" or message.tag.partition("}")[0][1:] not in (
                CLIENT_NS, PIE_NS, ""):
            raise ctx.fail(message, f"unexpected <{_local(message.tag)}> in offline-messages")
        stanza = _client_stanza(message)
        # The old server's archive ids (XEP-0359 stanza-id by the user or
        # the domain) name entries this server's archive does not have:
        # left out, as a forged one would be.
        for old_id in stanza.findall(f"{{{STANZA_ID_NS}}}stanza-id"):
            if old_id.get("by", "").lower() in (user.jid, user.jid.partition("@")[2]):
                stanza.remove(old_id)
        user.offline.append(_bounded(ctx, message, serialize(stanza, ""), "offline message"))


def _parse_scram(ctx: _Context, user: UserData, elem: ET.Element) -> None:
    def field_of(name: str) -> str:
        text = elem.findtext(_q(SCRAM_NS, name))
        if text is None or not text.strip():
            raise ctx.fail(elem, f"scram-credentials without <{name}>")
        return text.strip()

    def b64(name: str) -> bytes:
        try:
            return base64.b64decode(field_of(name), validate=True)
        except (binascii.Error, ValueError):
            raise ctx.fail(elem, f"scram-credentials <{name}> is not base64") from None

    label = elem.get("mechanism", "")
    try:
        iterations = int(field_of("iter-count"))
    except ValueError:
        raise ctx.fail(elem, "scram-credentials <iter-count> is not a number") from None
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ctx.fail(elem, f"scram-credentials iteration count {iterations} outside "
                             f"{MIN_ITERATIONS}..{MAX_ITERATIONS}")
    salt, stored, server = b64("salt"), b64("stored-key"), b64("server-key")
    if len(stored) not in KEY_BYTES:
        # ejabberd 23.01's export_piefxis base64-encodes the base64 text it
        # stores, for the keys and the salt alike: decode all three again.
        try:
            salt, stored, server = (base64.b64decode(v, validate=True)
                                    for v in (salt, stored, server))
        except (binascii.Error, ValueError):
            pass  # not that: reported as the wrong key length below
    mechanism = KEY_BYTES.get(len(stored))
    if mechanism is None or len(server) != len(stored) or label not in HASHES:
        raise ctx.fail(elem, f"scram-credentials {label!r} with {len(stored)}-byte keys: "
                             "only SCRAM-SHA-1 and SCRAM-SHA-256 are supported")
    if any(s.mechanism == mechanism for s in user.secrets):
        raise ctx.fail(elem, f"a second {mechanism} credential for the same user")
    user.secrets.append(ScramSecret(mechanism, iterations, salt, stored, server))


SECTIONS: tuple[Section, ...] = (
    Section("scram", (_q(SCRAM_NS, "scram-credentials"),), _parse_scram),
    Section("roster", (_q(ROSTER_NS, "query"),), _parse_roster),
    Section("pending", (_q(CLIENT_NS, "presence"), _q(PIE_NS, "presence")), _parse_pending),
    Section("vcard", (_q(VCARD_NS, "vCard"),), _parse_vcard),
    Section("private", (_q(PRIVATE_NS, "query"),), _parse_private),
    Section("offline", (_q(PIE_NS, "offline-messages"),), _parse_offline),
)


def _section_for(tag: str) -> Section | None:
    """Looked up at each use, so a section added to SECTIONS (by a feature
    module, or a test) takes part without anything else to update."""
    return next((section for section in SECTIONS if tag in section.tags), None)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _read_file(path: Path, domains: frozenset[str], plan: ImportPlan,
               host_only: bool = False) -> None:
    """One file: `<server-data>` (Prosody, and ejabberd's index file), or
    a `<host>` (the per-host files ejabberd's index includes)."""
    plan.read_files.add(path.resolve())
    root, lines = _parse(path)
    ctx = _Context(path, lines, domains, plan)
    if root.tag == _q(PIE_NS, "host"):
        _read_host(ctx, root)
        return
    if host_only or root.tag != _q(PIE_NS, "server-data"):
        expected = "<host>" if host_only else f"<server-data xmlns='{PIE_NS}'>"
        raise ctx.fail(root, f"not a XEP-0227 file: the root is <{_local(root.tag)}>, "
                             f"not {expected}")
    for host in root:
        if host.tag == XINCLUDE:
            _include(ctx, host)
        elif host.tag == _q(PIE_NS, "host"):
            _read_host(ctx, host)
        else:
            raise ctx.fail(host, f"unexpected <{_local(host.tag)}> in <server-data>")


def _include(ctx: _Context, elem: ET.Element) -> None:
    """ejabberd's `export_piefxis` index: `<xi:include href='..._host.xml'/>`,
    a file beside it. Only a plain file name is followed (no path, no
    URL: an import reads nothing the administrator did not point it at)."""
    href = elem.get("href") or ""
    if not href or "/" in href or "\\" in href or href.startswith(".") or ":" in href:
        raise ctx.fail(elem, f"xi:include of {href!r}: only a file name beside this file "
                             "is followed")
    target = ctx.path.parent / href
    if target.resolve() in ctx.plan.read_files:
        return  # a directory import read it already
    if not target.is_file():
        raise ctx.fail(elem, f"xi:include of {href!r}: no such file beside this one")
    _read_file(target, ctx.domains, ctx.plan, host_only=True)


def _read_host(ctx: _Context, host: ET.Element) -> None:
    domain = (host.get("jid") or "").strip().lower()
    if not domain:
        raise ctx.fail(host, "<host> without a jid")
    if domain not in ctx.domains:
        raise ctx.fail(host, f"host {domain} is not a domain this server serves "
                             f"({', '.join(sorted(ctx.domains))})")
    for elem in host:
        if elem.tag != _q(PIE_NS, "user"):
            ctx.plan.skipped[_local(elem.tag)] += 1  # host data: rooms, pubsub
            continue
        _read_user(ctx, domain, elem)


def _read_user(ctx: _Context, domain: str, elem: ET.Element) -> None:
    name = elem.get("name")
    if not name:
        raise ctx.fail(elem, "<user> without a name")
    jid = _bare(ctx, elem, f"{name}@{domain}", "user")
    if jid in ctx.plan.users:
        raise ctx.fail(elem, f"user {jid} given twice (also at {ctx.plan.users[jid].where})")
    user = UserData(jid, ctx.where(elem), password=elem.get("password"))
    if user.password == "":
        raise ctx.fail(elem, f"user {jid}: empty password")
    for child in elem:
        section = _section_for(child.tag)
        if section is None:
            ctx.plan.skipped[_local(child.tag)] += 1
            continue
        section.parse(ctx, user, child)
    if user.password is None and not user.secrets:
        raise ctx.fail(elem, f"user {jid} has neither a password nor SCRAM credentials")
    if user.password is not None and user.secrets:
        user.secrets = []  # the password derives fresh secrets for both hashes
    ctx.plan.users[jid] = user


def _files(path: Path) -> list[Path]:
    """`path` itself, or the *.xml files of a directory (Prosody's layout)."""
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise MigrationError(path, None, f"cannot read: {exc.strerror}") from None
    for entry in entries:
        if entry.suffix == ".xml" and entry.is_file():
            found.append(entry)
            if len(found) > MAX_DIRECTORY_FILES:
                raise MigrationError(path, None, f"more than {MAX_DIRECTORY_FILES} files")
    if not found:
        raise MigrationError(path, None, "no *.xml files in this directory")
    return found


def read_plan(path: Path, domains: frozenset[str]) -> ImportPlan:
    """Parse and check every file; MigrationError at the first problem."""
    plan = ImportPlan()
    for file in _files(path):
        if file.resolve() not in plan.read_files:  # not included by an index read before
            _read_file(file, domains, plan)
    return plan


# -- writing an import --------------------------------------------------------------


@dataclass
class ImportSummary:
    accounts: ImportCounts
    roster_items: int = 0
    pending: int = 0
    private: int = 0
    offline: int = 0
    vcards: int = 0
    other: int = 0  # rows written by sections added to SECTIONS
    warnings: list[str] = field(default_factory=list)

    def line(self, skipped: Counter[str]) -> str:
        a = self.accounts
        text = (f"imported {a.added + a.updated + a.unchanged} accounts ({a.added} new, "
                f"{a.updated} updated, {a.unchanged} unchanged); written: "
                f"{self.roster_items} roster items, {self.pending} subscription requests, "
                f"{self.vcards} vCards, {self.private} private XML elements, "
                f"{self.offline} offline messages")
        if self.other:
            text += f", {self.other} other items"
        if skipped:
            text += "; skipped: " + ", ".join(f"{n} <{tag}>" for tag, n in
                                              sorted(skipped.items()))
        return text


def _write_store(conn: sqlite3.Connection, users: list[UserData],
                 summary: ImportSummary) -> None:
    """One write transaction (the caller's): rosters, requests, private XML,
    offline messages; only what is not there yet, so a second import of
    the same file writes nothing."""
    from mlink.store.sqlite import bump_roster_version

    for user in users:
        current = {
            row[0]: row for row in conn.execute(
                "SELECT jid, name, group_names, subscription, ask, approved FROM roster_item "
                "WHERE user = ?", (user.jid,))}
        changed = False
        for item in user.roster:
            row = (item.jid, item.name, _groups_json(item.groups), item.subscription,
                   int(item.ask), int(item.approved))
            if current.get(item.jid) == row:
                continue
            conn.execute("INSERT OR REPLACE INTO roster_item (user, jid, name, group_names, "
                         "subscription, ask, approved) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (user.jid, *row))
            summary.roster_items += 1
            changed = True
        if changed:
            bump_roster_version(conn, user.jid)
        for contact, stanza in user.pending:
            cur = conn.execute("INSERT OR IGNORE INTO subscription_request (user, contact, "
                               "stanza) VALUES (?, ?, ?)", (user.jid, contact, stanza))
            summary.pending += cur.rowcount
        for key, value in user.private.items():
            row = conn.execute("SELECT value FROM module_kv WHERE module = 'private' AND "
                               "store = 'xml' AND user = ? AND item_key = ?",
                               (user.jid, key)).fetchone()
            if row is None or bytes(row[0]) != value:
                conn.execute("INSERT OR REPLACE INTO module_kv (module, store, user, item_key, "
                             "value) VALUES ('private', 'xml', ?, ?, ?)", (user.jid, key, value))
                summary.private += 1
        # The same message twice in the file is kept twice; one already
        # stored (an earlier import) is not stored again.
        stored = Counter(bytes(row[0]) for row in conn.execute(
            "SELECT stanza FROM offline_message WHERE user = ?", (user.jid,)))
        for stanza in user.offline:
            if stored[stanza] > 0:
                stored[stanza] -= 1
                continue
            conn.execute("INSERT INTO offline_message (user, stanza) VALUES (?, ?)",
                         (user.jid, stanza))
            summary.offline += 1
        for section in SECTIONS:
            if section.write is not None and section.name in user.extra:
                summary.other += section.write(conn, user)


def _groups_json(groups: tuple[str, ...]) -> str:
    """As the store writes them (`Store.roster_put`)."""
    return json.dumps(list(groups), ensure_ascii=False)


async def import_plan(config: Config, directory: Directory, store: Store,
                      plan: ImportPlan) -> ImportSummary:
    """Write a checked plan: accounts, then stored data, then vCards."""
    if not isinstance(directory, PortDirectory):
        raise MigrationError(config.path or "mlink", None, "this directory cannot import accounts")
    users = list(plan.users.values())
    accounts = [ImportedAccount(u.jid, u.password, tuple(u.secrets)) for u in users]
    summary = ImportSummary(await directory.import_accounts(accounts))
    await store.write(lambda conn: _write_store(conn, users, summary))
    await _import_vcards(config, directory, store, users, summary)
    return summary


async def _import_vcards(config: Config, directory: Directory, store: Store,
                         users: list[UserData], summary: ImportSummary) -> None:
    """Each vCard's values go to the profile fields they map to and that
    users may set (`update` and `local` policies); fields owned by the
    directory or fixed by the configuration keep their values. A field
    the profile cannot take (a photo over the limit) is a warning: the
    account and everything else are imported already."""
    from mlink.modules.vcard import parse_vcard
    from mlink.profile.model import ProfileError, ProfileService

    with_vcard = [u for u in users if u.vcard is not None]
    if not with_vcard:
        return
    service = ProfileService(_ProfileHost(config, directory, store))
    writable = {n for n, spec in service.fields.items() if spec.policy in ("update", "local")}
    for user in with_vcard:
        assert user.vcard is not None
        try:
            values = parse_vcard(user.vcard, service.fields)
            changes = {n: v for n, v in values.items() if n in writable and v}
            if changes and await service.update(user.jid, changes):
                summary.vcards += 1
        except ProfileError as exc:
            summary.warnings.append(f"{user.where}: warning: vCard of {user.jid} not "
                                    f"imported: {exc.text}")


class _ProfileHost:
    """The ProfileService's view of the server, for a command-line run."""

    def __init__(self, config: Config, directory: Directory, store: Store) -> None:
        self._config, self._directory, self._store = config, directory, store

    @property
    def config(self) -> Config:
        return self._config

    @property
    def directory(self) -> Directory:
        return self._directory

    @property
    def store(self) -> Store:
        return self._store

    def changed(self, user: str, what: str) -> None:
        """A running server rereads profiles within its cache lifetime."""


# -- export -------------------------------------------------------------------------


@dataclass
class _StoreSnapshot:
    rosters: dict[str, list[RosterItem]] = field(default_factory=dict)
    pending: dict[str, list[bytes]] = field(default_factory=dict)
    private: dict[str, list[bytes]] = field(default_factory=dict)
    offline: dict[str, list[bytes]] = field(default_factory=dict)
    extra: dict[str, list[ET.Element]] = field(default_factory=dict)  # from SECTIONS


def _read_store(conn: sqlite3.Connection) -> _StoreSnapshot:
    """Everything an export takes from the store, in one read transaction
    (the caller's): one consistent moment even while the server writes."""
    snap = _StoreSnapshot()
    for user, jid, name, groups, sub, ask, approved in conn.execute(
            "SELECT user, jid, name, group_names, subscription, ask, approved "
            "FROM roster_item ORDER BY user, jid"):
        snap.rosters.setdefault(user, []).append(RosterItem(
            jid, name, tuple(json.loads(groups)), sub, bool(ask), bool(approved)))
    for user, stanza in conn.execute("SELECT user, stanza FROM subscription_request ORDER BY id"):
        snap.pending.setdefault(user, []).append(bytes(stanza))
    for user, value in conn.execute("SELECT user, value FROM module_kv WHERE module = "
                                    "'private' AND store = 'xml' ORDER BY user, item_key"):
        snap.private.setdefault(user, []).append(bytes(value))
    for user, stanza in conn.execute("SELECT user, stanza FROM offline_message ORDER BY id"):
        snap.offline.setdefault(user, []).append(bytes(stanza))
    for section in SECTIONS:
        if section.export is not None:
            for user, elements in section.export(conn).items():
                snap.extra.setdefault(user, []).extend(elements)
    return snap


def _scram_element(secret: ScramSecret) -> ET.Element:
    elem = ET.Element(_q(SCRAM_NS, "scram-credentials"), {"mechanism": secret.mechanism})
    b64 = base64.b64encode
    # Prosody's reader order: server-key, stored-key, iter-count, salt.
    for name, text in (("server-key", b64(secret.server_key).decode()),
                       ("stored-key", b64(secret.stored_key).decode()),
                       ("iter-count", str(secret.iterations)),
                       ("salt", b64(secret.salt).decode())):
        ET.SubElement(elem, _q(SCRAM_NS, name)).text = text
    return elem


def _user_element(jid: str, secrets: list[ScramSecret], snap: _StoreSnapshot,
                  vcard: ET.Element | None) -> ET.Element:
    local = jid.rpartition("@")[0]
    user = ET.Element(_q(PIE_NS, "user"), {"name": local})
    # SCRAM-SHA-1 first: Prosody (its default hash) reads the first match.
    for secret in sorted(secrets, key=lambda s: s.mechanism != "SCRAM-SHA-1"):
        user.append(_scram_element(secret))
    items = snap.rosters.get(jid, [])
    if items:
        query = ET.SubElement(user, _q(ROSTER_NS, "query"))
        for item in items:
            attrs = {"jid": item.jid, "subscription": item.subscription}
            if item.name:
                attrs["name"] = item.name
            if item.ask:
                attrs["ask"] = "subscribe"
            if item.approved:
                attrs["approved"] = "true"
            elem = ET.SubElement(query, _q(ROSTER_NS, "item"), attrs)
            for group in item.groups:
                ET.SubElement(elem, _q(ROSTER_NS, "group")).text = group
    for data in snap.pending.get(jid, []):
        user.append(ET.fromstring(data))
    if vcard is not None and len(vcard):
        user.append(vcard)
    private = snap.private.get(jid, [])
    if private:
        query = ET.SubElement(user, _q(PRIVATE_NS, "query"))
        for data in private:
            query.append(ET.fromstring(data))
    offline = snap.offline.get(jid, [])
    if offline:
        box = ET.SubElement(user, _q(PIE_NS, "offline-messages"))
        for data in offline:
            box.append(ET.fromstring(data))
    user.extend(snap.extra.get(jid, []))
    return user


@dataclass
class ExportSummary:
    users: int = 0
    without_credentials: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


async def export(config: Config, directory: Directory, store: Store | None,
                 target: Path, per_user: bool) -> ExportSummary:
    """Write every account of the configured domains and its data to
    `target` (one file, or with `per_user` a directory of
    `<user>@<host>.xml` files); each file is written to a temp file and
    renamed, so a reader never sees half of one."""
    from mlink.modules.vcard import build_vcard
    from mlink.profile.model import ProfileError, ProfileService

    if not isinstance(directory, PortDirectory):
        raise MigrationError(config.path or "mlink", None, "this directory cannot export accounts")
    credentials = await directory.scram_credentials()
    snap = await store.read(_read_store) if store is not None else _StoreSnapshot()
    service = ProfileService(_ProfileHost(config, directory, store)) if store else None
    summary = ExportSummary()
    hosts: dict[str, list[ET.Element]] = {}
    for jid in sorted(credentials):
        domain = jid.rpartition("@")[2].lower()
        if domain not in config.domains:
            continue
        vcard = None
        if service is not None:
            try:
                vcard = build_vcard(await service.get(jid), service.fields)
            except ProfileError:
                vcard = None
        if not credentials[jid]:
            summary.without_credentials.append(jid)
        hosts.setdefault(domain, []).append(_user_element(jid, credentials[jid], snap, vcard))
        summary.users += 1
    if per_user:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        for domain, users in hosts.items():
            for user in users:
                path = target / f"{user.get('name')}@{domain}.xml"
                _write_document(path, {domain: [user]})
                summary.files.append(path)
    else:
        _write_document(target, hosts)
        summary.files.append(target)
    return summary


def _write_document(path: Path, hosts: dict[str, list[ET.Element]]) -> None:
    """A `<server-data>` document, owner-only (it holds password hashes)."""
    root = ET.Element(_q(PIE_NS, "server-data"))
    for domain, users in hosts.items():
        host = ET.SubElement(root, _q(PIE_NS, "host"), {"jid": domain})
        host.extend(users)
    data = b"<?xml version='1.0' encoding='UTF-8'?>\n" + serialize(root, "") + b"\n"
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- the commands ---------------------------------------------------------------------


def _store_version(db: Path) -> int:
    """The schema version of an existing store, read without writing."""
    conn = _connect_read_only(db)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _connect_read_only(db: Path) -> sqlite3.Connection:
    """A connection that cannot write (SQLite `mode=ro`, `query_only`):
    an export must never create, migrate or change the live store."""
    from mlink.store.sqlite import BUSY_TIMEOUT_MS

    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)  # one worker thread at a time (Store)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _check_store_version(db: Path) -> None:
    """Refuse a store of another schema version: opening it here would
    migrate it under a server still running the older mlink (or could not
    read a newer one)."""
    from mlink.store import SCHEMA_VERSION

    try:
        found = _store_version(db)
    except sqlite3.Error as exc:
        raise StoreVersionError(f"{db}: cannot read the store: {exc}") from None
    if found != SCHEMA_VERSION:
        raise StoreVersionError(f"{db}: store schema version {found}, but this mlink has "
                                f"version {SCHEMA_VERSION}: run it with the mlink the server "
                                "runs (a server start migrates the store)")


async def run_import(config: Config, path: Path) -> tuple[ImportSummary, ImportPlan]:
    """`mlink import PATH`: check every file, then write (see the module
    docstring). MigrationError before anything is written."""
    from mlink.directory import open_directory
    from mlink.store import DEFAULT_FILENAME, Store

    plan = read_plan(path, frozenset(d.lower() for d in config.domains))
    db = config.data_dir / DEFAULT_FILENAME
    if db.exists():
        _check_store_version(db)
    directory = open_directory(config.directory)
    try:
        async with await Store.open(db) as store:
            return await import_plan(config, directory, store, plan), plan
    finally:
        await directory.aclose()


async def run_export(config: Config, target: Path, per_user: bool) -> ExportSummary:
    """`mlink export TARGET`: the store is read through read-only
    connections, only if the server (or an import) created it; a setup
    that never ran has accounts only."""
    from mlink.directory import open_directory
    from mlink.store import DEFAULT_FILENAME, Store

    db = config.data_dir / DEFAULT_FILENAME
    directory = open_directory(config.directory)
    try:
        if not db.exists():
            return await export(config, directory, None, target, per_user)
        _check_store_version(db)
        try:
            writer = _connect_read_only(db)  # never writes: Store's second connection
            try:
                reader = _connect_read_only(db)
            except BaseException:
                writer.close()
                raise
        except sqlite3.Error as exc:
            raise StoreVersionError(f"{db}: cannot read the store: {exc}") from None
        async with Store(db, writer, reader) as store:
            return await export(config, directory, store, target, per_user)
    finally:
        await directory.aclose()
