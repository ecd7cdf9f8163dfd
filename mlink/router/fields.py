"""Per-session fields that modules declare, replicated across shards.

The core's `SessionInfo` knows only what RFC 6120/6121 routing needs (the
JID, presence, priority, roster interest). A module that keeps state per
session (whether the session asked for copies of its user's messages, a
counter of a stream extension) declares a `SessionField`; values live in
`SessionInfo.fields`. A field declared with a codec travels with the
session's announcement to the other shards, so a module there sees the same
value; the bus frames carry opaque (name, bytes) pairs and name no
extension.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from mlink.router.sessions import SessionInfo

T = TypeVar("T")
# A field's replicated value must stay small: it is sent with every change
# of the session's announcement to every shard. Names are "module:field".
MAX_FIELD_NAME_BYTES = 255
MAX_FIELD_VALUE_BYTES = 4096


class FieldCodec(Protocol[T]):
    def encode(self, value: T) -> bytes: ...
    def decode(self, data: bytes) -> T: ...


class SessionField(Generic[T]):
    """One declared per-session value; `get`/`set` on a `SessionInfo`."""

    __slots__ = ("name", "default", "codec")

    def __init__(self, name: str, default: T, codec: FieldCodec[T] | None) -> None:
        self.name = name
        self.default = default
        self.codec = codec

    def get(self, info: SessionInfo) -> T:
        return info.fields.get(self.name, self.default)  # type: ignore[no-any-return]

    def set(self, info: SessionInfo, value: T) -> None:
        if value == self.default:
            info.fields.pop(self.name, None)
        else:
            info.fields[self.name] = value


class FieldRegistry:
    """Every declared field by name; encodes and decodes the replicated ones."""

    def __init__(self) -> None:
        self._fields: dict[str, SessionField[Any]] = {}

    def declare(self, name: str, default: T, codec: FieldCodec[T] | None) -> SessionField[T]:
        if len(name.encode()) > MAX_FIELD_NAME_BYTES:
            raise ValueError(f"session field name too long: {name!r}")
        existing = self._fields.get(name)
        if existing is not None:
            # Modules are set up once per server; a second server in the
            # same process (tests) declares the same fields again.
            return existing
        declared: SessionField[T] = SessionField(name, default, codec)
        self._fields[name] = declared
        return declared

    def encode(self, info: SessionInfo) -> list[tuple[str, bytes]]:
        """The replicated fields of `info` that differ from their default."""
        out: list[tuple[str, bytes]] = []
        for name, value in info.fields.items():
            declared = self._fields.get(name)
            if declared is None or declared.codec is None:
                continue
            data = declared.codec.encode(value)
            if len(data) > MAX_FIELD_VALUE_BYTES:
                raise ValueError(f"session field {name} encodes to {len(data)} bytes")
            out.append((name, data))
        return out

    def decode(self, pairs: Iterable[tuple[str, bytes]]) -> dict[str, Any]:
        """Field values from another shard; names this shard does not know
        (a module it does not run) are left out."""
        out: dict[str, Any] = {}
        for name, data in pairs:
            declared = self._fields.get(name)
            if declared is not None and declared.codec is not None:
                out[name] = declared.codec.decode(data)
        return out


# One registry per process: fields are declared by module code, and every
# shard process runs the same modules.
field_registry = FieldRegistry()
