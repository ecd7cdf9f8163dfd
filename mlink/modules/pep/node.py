"""A PEP node's configuration and its items, without I/O (XEP-0060, as
XEP-0163 narrows it for personal eventing).

A node belongs to one account (its bare JID); only the owner publishes,
retracts, configures and deletes. Who may read, and who is notified, is
the node's access model (XEP-0060 §4.5):
- `presence` (the default): the owner and the contacts subscribed to the
  owner's presence (subscription `from` or `both`);
- `open`: anyone (OMEMO device lists and bundles use it);
- `roster`: taken as `presence` here (roster groups are not offered);
- `whitelist`: the owner only (XEP-0223 private storage, XEP-0402
  bookmarks: no affiliations are offered, so nobody else is on the list).
Notifications go, whatever the model, only to those who may read and whose
client announced `<node>+notify` (XEP-0163 §4.3, filtered notifications).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

PUBSUB_NS = "http://jabber.org/protocol/pubsub"
OWNER_NS = "http://jabber.org/protocol/pubsub#owner"
EVENT_NS = "http://jabber.org/protocol/pubsub#event"
ERRORS_NS = "http://jabber.org/protocol/pubsub#errors"
DATA_NS = "jabber:x:data"
NODE_CONFIG_FORM = "http://jabber.org/protocol/pubsub#node_config"
PUBLISH_OPTIONS_FORM = "http://jabber.org/protocol/pubsub#publish-options"

ACCESS_MODELS = ("presence", "open", "roster", "whitelist")
# XEP-0060 §4.5: a personal node keeps the latest item unless told more;
# XEP-0402 bookmarks ask for "max". "max" is this many: a node holding more
# items than this is a store, not an event stream, and each item costs a
# row read whenever the node is.
DEFAULT_MAX_ITEMS = 1
MAX_ITEMS_LIMIT = 256
# Nodes one account may hold: OMEMO alone makes one per device bundle.
MAX_NODES_PER_USER = 128
# Longest node name and item id accepted (they are keys in the store).
MAX_NAME_CHARS = 256


class PubSubError(Exception):
    """A request refused: the RFC 6120 condition, a text, and XEP-0060's
    application condition (an element name in pubsub#errors), if any."""

    def __init__(self, condition: str, text: str = "", app: str | None = None,
                 feature: str | None = None) -> None:
        super().__init__(text or condition)
        self.condition, self.text, self.app, self.feature = condition, text, app, feature


@dataclass(frozen=True, slots=True)
class NodeConfig:
    access_model: str = "presence"
    max_items: int = DEFAULT_MAX_ITEMS
    # XEP-0060 `persist_items`: PEP items are kept in the store either way;
    # false means only the latest item is kept, as max_items 1.
    persist_items: bool = True
    send_last_published_item: str = "on_sub_and_presence"

    def to_form(self, form_type: str = NODE_CONFIG_FORM) -> ET.Element:
        form = ET.Element(f"{{{DATA_NS}}}x", {"type": "form"})
        _field(form, "FORM_TYPE", form_type, "hidden")
        _field(form, "pubsub#access_model", self.access_model, "list-single",
               options=ACCESS_MODELS)
        _field(form, "pubsub#max_items", str(self.max_items), "text-single")
        _field(form, "pubsub#persist_items", "1" if self.persist_items else "0", "boolean")
        _field(form, "pubsub#send_last_published_item", self.send_last_published_item,
               "list-single", options=("never", "on_sub", "on_sub_and_presence"))
        return form

    def with_form(self, form: ET.Element) -> NodeConfig:
        """This configuration changed by a submitted data form (node
        configuration or publish-options); PubSubError for a value or
        field this service does not offer."""
        values = form_values(form)
        config = self
        for var, value in values.items():
            if var == "FORM_TYPE":
                continue
            if var == "pubsub#access_model":
                if value not in ACCESS_MODELS:
                    raise PubSubError("not-acceptable", f"unsupported access model {value!r}")
                config = replace(config, access_model=value)
            elif var == "pubsub#max_items":
                config = replace(config, max_items=parse_max_items(value))
            elif var == "pubsub#persist_items":
                config = replace(config, persist_items=value in ("1", "true"))
            elif var == "pubsub#send_last_published_item":
                if value not in ("never", "on_sub", "on_sub_and_presence"):
                    raise PubSubError("not-acceptable", f"unsupported value {value!r} for {var}")
                config = replace(config, send_last_published_item=value)
            elif var.startswith("pubsub#"):
                # Options this service does not offer: refused by name, so a
                # client that depends on one knows (XEP-0060 §8.2.5.3).
                raise PubSubError("not-acceptable", f"unsupported node option {var}")
        return config

    def kept(self) -> int:
        """How many items the node keeps."""
        return self.max_items if self.persist_items else 1

    def matches(self, options: ET.Element) -> bool:
        """Whether publish-options are met by this existing node
        (XEP-0060 §7.1.5: preconditions)."""
        try:
            wanted = self.with_form(options)
        except PubSubError:
            return False
        values = form_values(options)
        return all(getattr(wanted, name) == getattr(self, name) for name in (
            "access_model", "max_items", "persist_items", "send_last_published_item")
            if f"pubsub#{name}" in values)

    def encode(self) -> bytes:
        return (f"{self.access_model}\n{self.max_items}\n{int(self.persist_items)}\n"
                f"{self.send_last_published_item}").encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeConfig:
        access, max_items, persist, send_last = data.decode().split("\n")
        return cls(access, int(max_items), persist == "1", send_last)


def parse_max_items(value: str) -> int:
    if value == "max":
        return MAX_ITEMS_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_ITEMS_LIMIT:
        raise PubSubError("not-acceptable",
                          f"pubsub#max_items must be 1..{MAX_ITEMS_LIMIT} or max, not {value!r}")
    return int(value)


def form_values(form: ET.Element) -> dict[str, str]:
    """The first value of each field of a submitted data form."""
    values: dict[str, str] = {}
    for field in form.findall(f"{{{DATA_NS}}}field"):
        var = field.get("var")
        if var:
            values[var] = (field.findtext(f"{{{DATA_NS}}}value") or "").strip()
    return values


def _field(form: ET.Element, var: str, value: str, kind: str,
           options: tuple[str, ...] = ()) -> None:
    field = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": var, "type": kind})
    ET.SubElement(field, f"{{{DATA_NS}}}value").text = value
    for option in options:
        ET.SubElement(ET.SubElement(field, f"{{{DATA_NS}}}option"),
                      f"{{{DATA_NS}}}value").text = option


def may_read(config: NodeConfig, is_owner: bool, subscribed: bool) -> bool:
    """Whether a requester may read (and be notified of) the node: the
    owner always; `subscribed` is the owner's roster saying the requester
    receives the owner's presence (`from`/`both`)."""
    if is_owner or config.access_model == "open":
        return True
    if config.access_model in ("presence", "roster"):
        return subscribed
    return False


def refusal(config: NodeConfig) -> PubSubError:
    """The XEP-0060 §6.5.9 error for a requester `may_read` refused."""
    if config.access_model in ("presence", "roster"):
        return PubSubError("not-authorized", "only contacts subscribed to the owner's presence",
                           "presence-subscription-required")
    return PubSubError("not-allowed", "only the owner may read this node", "closed-node")


def check_name(what: str, value: str | None) -> str:
    if not value:
        raise PubSubError("bad-request", f"a {what} is required", "nodeid-required"
                          if what == "node" else "item-required")
    if len(value) > MAX_NAME_CHARS or "\0" in value:
        raise PubSubError("not-acceptable", f"the {what} name is too long")
    return value
