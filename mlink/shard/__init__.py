"""Sharding: N shard processes, each a whole server with its own Trio
loop, joined by a bus of length-prefixed frames (see docs/sharding.md).

`frames` is the wire format (sans-IO), `bus` the transport-agnostic bus
and its Unix socket mesh, `supervisor` what `mlink serve` runs, `worker`
one shard process.
"""
