"""`bench/xmppload SCENARIO ...`: one scenario against one running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import proc, run
from .stats import table

MAX_SECONDS = 120.0  # no run goes on longer than this
DEFAULT_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "mlink-bench-scram.json")


def ramp(start: float, factor: float, steps: int, seconds: float) -> list[tuple[float, float]]:
    return [(round(start * factor**k), seconds) for k in range(steps)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xmppload",
        description="XMPP load generator (asyncio + uvloop). Loopback targets only; "
                    "TLS certificates are not verified.")
    p.add_argument("scenario", choices=sorted(run.SCENARIOS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--domain", default="localhost")
    p.add_argument("--user", default="u%d", help="user name pattern, %%d = 1..N")
    p.add_argument("--password", default="pw%d", help="password pattern, %%d = 1..N")
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--concurrency", type=int, default=50,
                   help="logins in flight at once (all processes)")
    p.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                   help="STARTTLS before SASL (default on)")
    p.add_argument("--mechanism", default="PLAIN",
                   choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1"])
    p.add_argument("--server-pid", type=int, action="append",
                   help="server process(es); default: whoever listens on --port")
    p.add_argument("--json", help="write the figures as JSON to this file ('-' = stdout)")
    p.add_argument("--scram-cache", default=str(DEFAULT_CACHE),
                   help="file caching SCRAM salted passwords ('' = none)")
    g = p.add_argument_group("login")
    g.add_argument("--count", type=int, default=1000, help="logins to perform")
    g.add_argument("--users", type=int, default=1000, help="user accounts to use (1..N)")
    g.add_argument("--duration", type=float, default=20.0, help="upper bound, seconds")
    g = p.add_argument_group("idle")
    g.add_argument("--sessions", type=int, default=1000)
    g = p.add_argument_group("chat / presence")
    g.add_argument("--pairs", type=int, default=500)
    g.add_argument("--rate", type=float, default=1000.0,
                   help="offered stanzas/s (chat: messages; presence: changes)")
    g.add_argument("--seconds", type=float, default=5.0, help="length of each step")
    g.add_argument("--ramp", type=int, default=0,
                   help="after the fixed-rate step, N steps of rising rate")
    g.add_argument("--ramp-start", type=float, default=2000.0)
    g.add_argument("--ramp-factor", type=float, default=1.5)
    g.add_argument("--max-p99-ms", type=float, default=100.0,
                   help="a step whose p99 exceeds this has fallen behind")
    g.add_argument("--sm-every", type=int, default=0,
                   help="chat: enable XEP-0198 and send <r/> after every N messages "
                        "(answering the server's requests); 0: no stream management")
    g.add_argument("--contacts", type=int, default=20, help="presence: roster size R (even)")
    g.add_argument("--setup-seconds", type=float, default=4.0,
                   help="presence: length of one round of roster set-up (subscribe/subscribed)")
    g.add_argument("--setup-rounds", type=int, default=3,
                   help="presence: set-up rounds at most while rosters are incomplete (0: none)")
    g = p.add_argument_group("muc")
    g.add_argument("--rooms", type=int, default=10, help="rooms R")
    g.add_argument("--occupants", type=int, default=20,
                   help="occupants O per room (users 1..R*O, each posting at --rate/(R*O))")
    g.add_argument("--muc-service", default="conference",
                   help="the service's label: rooms are bench<k>@<label>.<domain>")
    return p


def build_spec(a: argparse.Namespace) -> dict[str, Any]:
    steps = [(a.rate, a.seconds)] + (ramp(a.ramp_start, a.ramp_factor, a.ramp, a.seconds)
                                     if a.ramp else [])
    if sum(s for _, s in steps) > MAX_SECONDS:
        raise SystemExit(f"a run is bounded to {MAX_SECONDS:.0f} s")
    if a.rooms * a.occupants > 100_000:
        raise SystemExit("rooms x occupants is bounded to 1e5")
    if a.count > 1_000_000 or a.sessions > 100_000 or a.pairs > 50_000:
        raise SystemExit("counts are bounded (logins 1e6, sessions 1e5, pairs 5e4)")
    spec = {
        "scenario": a.scenario, "host": a.host, "port": a.port, "domain": a.domain,
        "user": a.user, "password": a.password, "procs": max(1, a.procs),
        "concurrency": max(a.concurrency, a.procs), "tls": a.tls, "mechanism": a.mechanism,
        "count": a.count, "users": a.users, "duration": min(a.duration, MAX_SECONDS),
        "sessions": a.sessions, "pairs": a.pairs, "steps": steps,
        "max_p99_ms": a.max_p99_ms, "contacts": a.contacts, "setup_seconds": a.setup_seconds,
        "setup_rounds": a.setup_rounds, "rooms": a.rooms, "occupants": a.occupants,
        "muc_service": a.muc_service, "sm_every": max(0, a.sm_every),
    }
    return spec


def load_cache(path: str) -> dict[str, str]:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def save_cache(path: str, entries: dict[str, str], new: dict[str, str]) -> None:
    if not path or not new:
        return
    entries.update(new)
    # Bounded: the newest 200k entries.
    items = list(entries.items())[-200_000:]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(items)))


def execute(spec: dict[str, Any], server: proc.ServerProcs, cache_path: str) -> dict[str, Any]:
    """Run one scenario, keeping the SCRAM cache up to date."""
    entries = load_cache(cache_path)
    spec = {**spec, "scram_entries": entries}
    result = run.run(spec, server)
    save_cache(cache_path, entries, result.pop("_scram_new", {}))
    return result


def render(scenario: str, r: dict[str, Any]) -> str:
    if scenario == "login":
        return table(
            ["logins", "errors", "logins/s", "p50 ms", "p99 ms", "srv CPU ms/login",
             "gen CPU s", "tls"],
            [[r["logins"], r["errors"], r["logins_per_s"], r["p50_ms"], r["p99_ms"],
              r["server_cpu_ms_per_login"], r["gen_cpu_s"], r["tls"]]])
    if scenario == "idle":
        return table(
            ["sessions", "errors", "RSS before MiB", "RSS after MiB", "KiB/session",
             "gen CPU s", "tls"],
            [[r["sessions"], r["errors"], r["rss_before_mib"], r["rss_after_mib"],
              r["kib_per_session"], r["gen_cpu_s"], r["tls"]]])
    rows = [[s["offered_per_s"], s["sent_per_s"], s["delivered_per_s"], s["p50_ms"],
             s["p99_ms"], s["p999_ms"], s["server_cpu_s"], s["cpu_s_per_1000"]]
            for s in r["steps"]]
    head = (f"sessions {r['sessions']}, errors {r['errors']}, error stanzas "
            f"{r['error_stanzas']}, generator CPU {r['gen_cpu_s']} s "
            f"({r['gen_cpu_share']} core), tls {r['tls']}")
    if "roster" in r:
        head += f"\nroster: {r['roster']}"
    if "muc" in r:
        head += (f"\njoins: {r['muc']}; each message reaches {r['deliveries_per_message']} "
                 "occupants (delivered/s counts deliveries)")
    unit = {"chat": "msgs", "muc": "msgs"}.get(scenario, "changes")
    return head + "\n" + table(
        [f"offered {unit}/s", "sent/s", "delivered/s", "p50 ms", "p99 ms", "p99.9 ms",
         "srv CPU s", "CPU s/1000"], rows) + (
        f"\nknee (kept up, p99 under limit): {r['knee_delivered_per_s']} delivered/s")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    proc.require_loopback(a.host)
    proc.raise_nofile()
    server = proc.ServerProcs(a.server_pid, a.port)
    if not server.pids():
        print(f"note: no server process found for port {a.port}; server figures will be 0",
              file=sys.stderr)
    spec = build_spec(a)
    result = execute(spec, server, a.scram_cache)
    result = {"scenario": a.scenario, "spec": {k: v for k, v in spec.items()}, **result}
    print(render(a.scenario, result))
    text = json.dumps(result, indent=1)
    if a.json == "-":
        print(text)
    elif a.json:
        Path(a.json).write_text(text + "\n")
    return 0
