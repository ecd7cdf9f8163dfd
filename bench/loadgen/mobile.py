"""`python -m loadgen.mobile`: what the issue-16 modules cost on the chat
scenario (500 pairs, 1:1 to full JIDs over plain TCP).

Variants, each on a freshly started `mlink serve` (default sharding) of the
same setup, alternating order per rep:

- `base`: `mam` disabled (the chat scenario as before issue 16);
- `mam`: the default modules (every message archived twice: sender and
  recipient, durably, before delivery);
- `mam+sm`: the default modules, and every client enables XEP-0198, sends
  `<r/>` after every 5 messages and answers the server's requests.

Prints per variant the median over reps of CPU-s per 1000 delivered
messages and p99 latency at each offered rate. Needs a quiet machine: the
figures are meaningless while other work competes for the cores (check
`uptime` before and after).

    cd bench && /work/main/.venv/bin/python -m loadgen.mobile [--reps 3]
        [--rates 1000,3000] [--seconds 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import run
from .servers import Mlink
from .stats import table

PORT = 25322
MAM_OFF = ('<modules><module name="mam" enabled="false"/></modules>\n  <data ')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rates", default="1000,3000")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="mlink-mobile-") if not a.workdir else None
    workdir = Path(a.workdir or tmp.name)  # type: ignore[union-attr]
    users = [(f"u{i}", f"pw{i}") for i in range(1, 2 * a.pairs + 1)]
    server = Mlink(workdir, PORT)
    print(f"setting up in {workdir}...", file=sys.stderr)
    server.setup(users, None)
    with_mam = server.config.read_text()
    without_mam = with_mam.replace("<data ", MAM_OFF, 1)
    cache = server.scram_entries(users)
    rates = [float(r) for r in a.rates.split(",")]
    variants = {"base": (without_mam, 0), "mam": (with_mam, 0), "mam+sm": (with_mam, 5)}
    figures: dict[str, list[list[dict[str, Any]]]] = {v: [] for v in variants}
    try:
        for rep in range(a.reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                config, sm_every = variants[name]
                server.config.write_text(config)
                server.start()
                spec = {"scenario": "chat", "host": "127.0.0.1", "port": PORT,
                        "domain": server.domain, "user": "u%d", "password": "pw%d",
                        "procs": 1, "concurrency": 50, "tls": False, "mechanism": "PLAIN",
                        "pairs": a.pairs, "steps": [(r, a.seconds) for r in rates],
                        "max_p99_ms": 100.0, "drain": 2.0, "sm_every": sm_every,
                        "scram_entries": cache}
                try:
                    result = run.run(spec, server.procs())
                finally:
                    server.stop()
                steps = result.get("steps", [])
                figures[name].append(steps)
                print(f"rep {rep} {name}: " + ", ".join(
                    f"{s['offered_per_s']}/s: {s['cpu_s_per_1000']} CPU-s/1000, "
                    f"p99 {s['p99_ms']} ms, delivered {s['delivered_per_s']}/s"
                    for s in steps) + f"; errors {result.get('errors')}", file=sys.stderr)
    finally:
        server.config.write_text(with_mam)
        if tmp is not None:
            tmp.cleanup()
    rows = []
    for name, reps in figures.items():
        for i, rate in enumerate(rates):
            # A failed run (logins refused, nothing delivered) has no figures.
            got = [r[i] for r in reps if len(r) > i and r[i]["cpu_s_per_1000"] is not None]
            if not got:
                rows.append([name, int(rate), "failed", "-", "-"])
                continue
            rows.append([name, int(rate),
                         round(statistics.median(s["delivered_per_s"] for s in got)),
                         round(statistics.median(s["cpu_s_per_1000"] for s in got), 3),
                         round(statistics.median(s["p99_ms"] for s in got), 1)])
    print(table(["variant", "offered/s", "delivered/s", "CPU-s/1000", "p99 ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
