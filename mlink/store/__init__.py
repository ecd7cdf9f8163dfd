"""Durable storage of RFC 6121 IM data: rosters, pending subscription
requests, offline messages, blocking lists, private XML, last activity.

The default (and so far only) backend is SQLite in WAL mode, one file in the
data directory shared by every shard process; see `mlink.store.sqlite`.
"""

from mlink.store.model import RosterItem, SchemaTooNewError, StoreError
from mlink.store.schema import SCHEMA_VERSION
from mlink.store.sqlite import DEFAULT_FILENAME, Store

__all__ = [
    "DEFAULT_FILENAME",
    "SCHEMA_VERSION",
    "RosterItem",
    "SchemaTooNewError",
    "Store",
    "StoreError",
]
