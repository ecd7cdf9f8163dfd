"""One XEP-0313 query against an archive log: parsing, paging, answering.

Why a file of its own: a user's archive (`mlink.modules.mam`) and a room's
(`mlink.modules.muc.archive`) answer the same protocol over the same
`ArchiveStore`; only who may ask, what `with` means and how a result is
addressed differ. Everything here is the common part (`urn:xmpp:mam:2` and
`urn:xmpp:mam:2#extended`, XEP-0313 v1.1):

- the query form: `with`, `start`, `end` (XEP-0082 times), `before-id`,
  `after-id`, `ids`; an unknown field is `feature-not-implemented`;
- XEP-0059 paging: `max` (bounded), `after`, `before` (empty: the last
  page), `<flip-page/>` (the page sent newest first, the same items);
- every id named (RSM or form) must be in the archive: `item-not-found`;
- the `<fin>`: `complete='true'` when the page reaches the end of the
  result set in its direction; RSM `first` (with its `index`), `last` and
  `count`, counted in the index (`ArchiveStore.count`), never by reading
  the stored messages;
- the metadata query (first and last id and time of the archive).
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

from mlink.jid import JID, InvalidJID, parse_jid
from mlink.store.module_store import ArchivedItem, ArchiveStore
from mlink.xml.serialize import CLIENT_NS

MAM_NS = "urn:xmpp:mam:2"
EXTENDED_NS = "urn:xmpp:mam:2#extended"
RSM_NS = "http://jabber.org/protocol/rsm"
DATA_NS = "jabber:x:data"
XDATA_VALIDATE_NS = "http://jabber.org/protocol/xdata-validate"
FORWARD_NS = "urn:xmpp:forward:0"
DELAY_NS = "urn:xmpp:delay"
MESSAGE = f"{{{CLIENT_NS}}}message"
# Results per page when the client asks for none (XEP-0313 leaves it to
# the server; Prosody uses 20..50) ...
DEFAULT_PAGE = 50
# ... and at most: a page is written to one session in one go (paced), so
# it must stay far below the output bound and the store's MAX_ARCHIVE_PAGE.
MAX_PAGE = 250
# Ids one `ids` field may name: a page's worth (each is one index lookup).
MAX_IDS = MAX_PAGE
# Longest `queryid` accepted: it is echoed in every result, so a long one
# multiplies a page's size (250 results of a 100 KB id would be 25 MB);
# clients use a UUID (36).
MAX_QUERYID_CHARS = 256
# Store reads one query may make to fill a page through a filter the index
# cannot apply (a full JID, a room nick): bounds the work of a query whose
# filter matches nothing in a large archive.
MAX_FILTER_READS = 20


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def stamp(at: float) -> str:
    """XEP-0082 date-time, UTC, milliseconds."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str) -> float:
    """A XEP-0082 date-time as a POSIX time; ValueError when it is not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("a time zone is required")
    return parsed.timestamp()


class QueryError(Exception):
    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(slots=True)
class Query:
    with_jid: JID | None = None
    start: float | None = None
    end: float | None = None
    limit: int = DEFAULT_PAGE
    after: int | None = None  # RSM <after>
    before: int | None = None  # RSM <before>
    last_page: bool = False  # an empty <before/>
    after_id: int | None = None  # form after-id (a bound, not a direction)
    before_id: int | None = None  # form before-id
    ids: list[int] | None = None
    flip: bool = False

    def anchors(self) -> list[int]:
        """The ids the query pages or bounds by: each must be in the archive
        (the `ids` list is checked by fetching it)."""
        return [i for i in (self.after, self.before, self.after_id, self.before_id)
                if i is not None]


def parse_query(query: ET.Element) -> Query:
    """The filters and paging of a `<query/>`; QueryError when malformed."""
    q = Query()
    if len(query.get("queryid", "")) > MAX_QUERYID_CHARS:
        raise QueryError("bad-request", f"a queryid has at most {MAX_QUERYID_CHARS} characters")
    form = query.find(_q(DATA_NS, "x"))
    if form is not None:
        for fld in form.findall(_q(DATA_NS, "field")):
            var = fld.get("var", "")
            values = [(v.text or "").strip() for v in fld.findall(_q(DATA_NS, "value"))]
            value = values[0] if values else ""
            try:
                if var == "FORM_TYPE":
                    if value != MAM_NS:
                        raise QueryError("bad-request", f"FORM_TYPE must be {MAM_NS}")
                elif var == "with":
                    q.with_jid = parse_jid(value)
                elif var == "start":
                    q.start = parse_time(value)
                elif var == "end":
                    q.end = parse_time(value)
                elif var == "after-id":
                    q.after_id = item_id(value)
                elif var == "before-id":
                    q.before_id = item_id(value)
                elif var == "ids":
                    if len(values) > MAX_IDS:
                        raise QueryError("policy-violation", f"at most {MAX_IDS} ids")
                    q.ids = [item_id(v) for v in values]
                else:
                    # XEP-0313 §4.1.1: a field the server does not know.
                    raise QueryError("feature-not-implemented", f"unsupported field {var!r}")
            except (InvalidJID, ValueError) as exc:
                raise QueryError("bad-request", f"field {var}: {exc}") from None
    rsm = query.find(_q(RSM_NS, "set"))
    if rsm is not None:
        if rsm.find(_q(RSM_NS, "index")) is not None:
            raise QueryError("feature-not-implemented", "paging by index is not supported")
        text = rsm.findtext(_q(RSM_NS, "max"))
        if text is not None:
            if not text.strip().isdigit():
                raise QueryError("bad-request", "max must be a number")
            q.limit = min(int(text), MAX_PAGE)
        after = rsm.find(_q(RSM_NS, "after"))
        before = rsm.find(_q(RSM_NS, "before"))
        if after is not None:
            q.after = item_id(after.text)
        if before is not None:
            if (before.text or "").strip():
                q.before = item_id(before.text)
            else:
                q.last_page = True
    q.flip = query.find(_q(MAM_NS, "flip-page")) is not None
    return q


def item_id(text: str | None) -> int:
    """An archive id as given by a client; ids are decimal numbers here, so
    anything else cannot be in the archive (XEP-0313: item-not-found)."""
    value = (text or "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise QueryError("item-not-found", f"no archived item {value!r}")
    return int(value)


@dataclass(slots=True)
class Page:
    """What a query found: `items` oldest first (the order to send them
    in is `sent`), whether the result set ends with them, and the RSM
    count and index of the first item when they could be counted."""

    items: list[ArchivedItem] = field(default_factory=list)
    complete: bool = True
    count: int | None = None
    index: int | None = None
    flip: bool = False

    @property
    def sent(self) -> list[ArchivedItem]:
        return self.items[::-1] if self.flip else self.items


async def run_query(archive: ArchiveStore, key: str, q: Query, *,
                    with_index: str | None = None,
                    accept: Callable[[ArchivedItem], bool] | None = None) -> Page:
    """Run `q` on `key`'s log. `with_index` filters in the index (the
    stored peer); `accept`, when given, filters what the index returns (a
    full JID, a nick): the page is then filled by reading on, at most
    MAX_FILTER_READS times, and the count is left out (it would need every
    stored message read)."""
    for anchor in q.anchors():
        if await archive.get(key, anchor) is None:
            raise QueryError("item-not-found", f"no archived item {anchor}")
    if q.ids is not None:
        listed = await archive.get_many(key, q.ids)  # one read for the list
        if len(listed) != len(set(q.ids)):
            found_ids = {item.id for item in listed}
            missing = next(i for i in q.ids if i not in found_ids)
            raise QueryError("item-not-found", f"no archived item {missing}")
        items = [item for item in listed if accept is None or accept(item)]
        return Page(items, True, None if accept else len(items), None if accept else 0, q.flip)
    # The result set: the filters and the form's id bounds; RSM pages in it.
    lower = max((i for i in (q.after_id, q.after) if i is not None), default=None)
    upper = min((i for i in (q.before_id, q.before) if i is not None), default=None)
    newest_first = q.before is not None or q.last_page
    want = q.limit + 1  # one more than asked: whether the page reaches the end
    found: list[ArchivedItem] = []
    cursor_lower, cursor_upper = lower, upper
    for _ in range(MAX_FILTER_READS if accept is not None else 1):
        batch = await archive.page(key, before=cursor_upper, after=cursor_lower,
                                   with_jid=with_index, start=q.start, end=q.end,
                                   limit=want, newest_first=newest_first)
        found += [item for item in batch if accept is None or accept(item)]
        if len(batch) < want or len(found) >= want:
            break
        if newest_first:
            cursor_upper = batch[-1].id
        else:
            cursor_lower = batch[-1].id
    complete = len(found) <= q.limit
    found = found[:q.limit]
    if newest_first:
        found.reverse()
    page = Page(found, complete, flip=q.flip)
    if accept is None:
        page.count = await archive.count(key, before=q.before_id, after=q.after_id,
                                         with_jid=with_index, start=q.start, end=q.end)
        if found:
            page.index = await archive.count(key, before=found[0].id, after=q.after_id,
                                             with_jid=with_index, start=q.start, end=q.end)
    return page


def fin(page: Page) -> ET.Element:
    """The `<fin/>` that closes the results (XEP-0313 §4.3, XEP-0059)."""
    element = ET.Element(_q(MAM_NS, "fin"))
    if page.complete:
        element.set("complete", "true")
    rsm = ET.SubElement(element, _q(RSM_NS, "set"))
    if page.items:
        first = ET.SubElement(rsm, _q(RSM_NS, "first"))
        first.text = str(page.items[0].id)
        if page.index is not None:
            first.set("index", str(page.index))
        ET.SubElement(rsm, _q(RSM_NS, "last")).text = str(page.items[-1].id)
    if page.count is not None:
        ET.SubElement(rsm, _q(RSM_NS, "count")).text = str(page.count)
    return element


def result_message(to: JID, archive_jid: str, queryid: str | None, item: ArchivedItem,
                   forwarded_message: ET.Element | None) -> ET.Element:
    """One result (XEP-0313 §4.2): the archived message, forwarded with
    the time it was archived, from the archive's JID."""
    message = ET.Element(MESSAGE, {"to": str(to), "from": archive_jid})
    attrs = {"id": str(item.id)}
    if queryid is not None:
        attrs["queryid"] = queryid
    result = ET.SubElement(message, _q(MAM_NS, "result"), attrs)
    forwarded = ET.SubElement(result, _q(FORWARD_NS, "forwarded"))
    ET.SubElement(forwarded, _q(DELAY_NS, "delay"), {"stamp": stamp(item.at)})
    if forwarded_message is not None:
        forwarded.append(forwarded_message)
    return message


def query_form() -> ET.Element:
    """XEP-0313 §4.1.1: the fields a query form may use."""
    query = ET.Element(_q(MAM_NS, "query"))
    x = ET.SubElement(query, _q(DATA_NS, "x"), {"type": "form"})
    form_type = ET.SubElement(x, _q(DATA_NS, "field"), {"var": "FORM_TYPE", "type": "hidden"})
    ET.SubElement(form_type, _q(DATA_NS, "value")).text = MAM_NS
    for var, kind in (("with", "jid-single"), ("start", "text-single"),
                      ("end", "text-single"), ("before-id", "text-single"),
                      ("after-id", "text-single"), ("ids", "list-multi")):
        fld = ET.SubElement(x, _q(DATA_NS, "field"), {"var": var, "type": kind})
        if var == "ids":
            # §4.1.1: an open list (the ids are the client's to name).
            validate = ET.SubElement(fld, _q(XDATA_VALIDATE_NS, "validate"),
                                     {"datatype": "xs:string"})
            ET.SubElement(validate, _q(XDATA_VALIDATE_NS, "open"))
    return query


async def metadata(archive: ArchiveStore, key: str) -> ET.Element:
    """XEP-0313 §5: the first and last item of the archive (an empty
    `<metadata/>` when there is none)."""
    element = ET.Element(_q(MAM_NS, "metadata"))
    found = await archive.bounds(key)
    if found is not None:
        for tag, (item_id_, at) in zip(("start", "end"), found, strict=True):
            ET.SubElement(element, _q(MAM_NS, tag), {"id": str(item_id_),
                                                     "timestamp": stamp(at)})
    return element


def is_mam_request(stanza: ET.Element) -> bool:
    """Whether an iq's payload is one of this protocol's."""
    return len(stanza) == 1 and stanza[0].tag.startswith("{" + MAM_NS + "}")
