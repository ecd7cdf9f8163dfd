"""`/metrics`: the supervisor's status (every shard's counters, asked fresh
through the `stats` control op) as OpenMetrics, written by prometheus_client.

Counters come from the shards' own monotonically increasing figures; a
shard that restarted starts from zero again, which Prometheus' `rate()`
treats as a counter reset. A shard that does not answer is `mlink_shard_up
0` and contributes no other sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "render_metrics"]


class _StatusCollector:
    """A one-shot collector over one status snapshot."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        uptime = GaugeMetricFamily("mlink_uptime_seconds", "Seconds since the server started.")
        uptime.add_metric([], float(status.get("uptime", 0.0)))
        yield uptime
        up = GaugeMetricFamily("mlink_shard_up", "1 when the shard answered, else 0.",
                               labels=["shard"])
        restarts = CounterMetricFamily("mlink_shard_restarts", "Restarts of the shard process.",
                                       labels=["shard"])
        sessions = GaugeMetricFamily("mlink_sessions", "Bound client sessions.",
                                     labels=["shard"])
        connections = GaugeMetricFamily("mlink_connections", "Open client connections.",
                                        labels=["shard"])
        logins = CounterMetricFamily("mlink_logins", "SASL authentications by outcome.",
                                     labels=["shard", "mechanism", "outcome"])
        stanzas = CounterMetricFamily("mlink_stanzas", "Stanzas from and to clients.",
                                      labels=["shard", "direction", "kind"])
        frames = CounterMetricFamily("mlink_bus_frames", "Frames over the shard bus.",
                                     labels=["shard", "peer", "direction"])
        bus_bytes = CounterMetricFamily("mlink_bus_bytes", "Bytes over the shard bus.",
                                        labels=["shard", "peer", "direction"])
        drops = CounterMetricFamily("mlink_bus_drops", "Bus frames dropped (queue full, peer "
                                    "down).", labels=["shard", "peer", "reason"])
        refused = CounterMetricFamily("mlink_connections_refused",
                                      "Connections refused by the abuse limits.",
                                      labels=["shard"])
        stalls = CounterMetricFamily("mlink_loop_stalls", "Event-loop stalls over 100 ms.",
                                     labels=["shard"])
        directory = SummaryMetricFamily(
            "mlink_directory_request_seconds", "Directory requests on the login path (count "
            "and total seconds).", labels=["shard", "operation"])
        directory_errors = CounterMetricFamily(
            "mlink_directory_errors", "Directory requests that failed: directory unreachable.",
            labels=["shard", "operation"])
        for shard in status.get("shards", []):
            index = str(shard["index"])
            stats = shard.get("stats")
            up.add_metric([index], 1.0 if stats else 0.0)
            restarts.add_metric([index], float(shard.get("restarts", 0)))
            if not stats:
                continue
            sessions.add_metric([index], float(stats.get("sessions", 0)))
            connections.add_metric([index], float(stats.get("connections", 0)))
            refused.add_metric([index], float((stats.get("limits") or {}).get("refused", 0)))
            stalls.add_metric([index], float((stats.get("loop") or {}).get("stalls", 0)))
            traffic = stats.get("traffic") or {}
            for outcome, key in (("ok", "logins_ok"), ("failed", "logins_failed")):
                for mechanism, count in sorted((traffic.get(key) or {}).items()):
                    logins.add_metric([index, mechanism, outcome], float(count))
            for direction in ("in", "out"):
                for kind, count in sorted((traffic.get(f"stanzas_{direction}") or {}).items()):
                    stanzas.add_metric([index, direction, kind], float(count))
            for operation, figures in sorted((traffic.get("directory") or {}).items()):
                directory.add_metric([index, operation], int(figures.get("requests", 0)),
                                     float(figures.get("seconds", 0.0)))
                directory_errors.add_metric([index, operation], float(figures.get("errors", 0)))
            for peer, link in sorted((stats.get("bus") or {}).items()):
                for direction in ("in", "out"):
                    frames.add_metric([index, peer, direction],
                                      float(link.get(f"frames_{direction}", 0)))
                    bus_bytes.add_metric([index, peer, direction],
                                         float(link.get(f"bytes_{direction}", 0)))
                drops.add_metric([index, peer, "full"], float(link.get("drops_full", 0)))
                drops.add_metric([index, peer, "down"], float(link.get("drops_down", 0)))
        yield from (up, restarts, sessions, connections, refused, stalls, logins, stanzas,
                    directory, directory_errors, frames, bus_bytes, drops)


def render_metrics(status: dict[str, Any]) -> bytes:
    """OpenMetrics text for one `Supervisor.status()` snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)  # type: ignore[no-untyped-call,no-any-return]
