"""Sample the server with py-spy while a scenario's traffic runs, and say
which functions the samples land in (self and inclusive), with file:line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import run
from .servers import ROOT, Server
from .stats import table


def py_spy() -> str | None:
    venv = ROOT / ".venv" / "bin" / "py-spy"
    if venv.exists():
        return str(venv)
    return shutil.which("py-spy")


def _func(frame: str) -> tuple[str, str]:
    """("name (file:line)") -> ("name (file)", "line")."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return f"{name} ({path})", line


def summarise(raw: Path, top: int = 15) -> tuple[str, list[dict[str, Any]]]:
    """From py-spy's raw (collapsed) output: the top functions by self time
    (with their hottest line), and mlink's functions by inclusive time."""
    own: Counter[str] = Counter()
    own_line: Counter[tuple[str, str]] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # py-spy puts the process names first when sampling several.
        frames = [_func(f) for f in stack.split(";") if " (" in f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        fn, ln = frames[-1]
        own[fn] += n
        own_line[(fn, ln)] += n
        for f in {f for f, _ in frames}:
            incl[f] += n
    if not total:
        return "no samples", []
    rows = []
    for fn, n in own.most_common(top):
        hot = max((k for k in own_line if k[0] == fn), key=lambda k: own_line[k])
        name, _, path = fn.partition(" (")
        rows.append({"function": f"{name} ({path.rstrip(')')}:{hot[1]})",
                     "self_pct": round(100 * n / total, 1),
                     "incl_pct": round(100 * incl[fn] / total, 1)})
    text = "top functions by self time (hottest line shown):\n" + table(
        ["function (file:line)", "self %", "inclusive %"],
        [[r["function"], r["self_pct"], r["incl_pct"]] for r in rows])
    inclusive = [(f, n) for f, n in incl.most_common() if "(mlink/" in f][:top]
    text += "\n\nmlink functions by inclusive time:\n" + table(
        ["function (file)", "inclusive %", "self %"],
        [[f, round(100 * n / total, 1), round(100 * own[f] / total, 1)] for f, n in inclusive])
    return text + f"\n({total} samples of a busy thread)", rows


def profile(server: Server, spec: dict[str, Any], out: Path, rate_hz: int = 250) -> str:
    """Run `spec` against `server` (restarted) with py-spy attached during
    the traffic phase only; returns the summary."""
    spy = py_spy()
    if spy is None:
        return "py-spy not installed (.venv/bin/pip install py-spy)"
    server.restart()
    procs = server.procs()
    holder: dict[str, Any] = {}

    def attach(t0: int, seconds: float) -> None:
        delay = max(0.0, (t0 - time.monotonic_ns()) / 1e9)
        time.sleep(delay)
        holder["p"] = subprocess.Popen(
            [spy, "record", "--pid", str(procs.given[0]), "--subprocesses", "--nonblocking",
             "--rate", str(rate_hz), "--duration", str(max(1, int(seconds))), "--format", "raw",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        result = run.run(spec, procs, on_start=attach)
        p = holder.get("p")
        if p is not None:
            _, err = p.communicate(timeout=60)
            if p.returncode:
                return f"py-spy failed: {err.decode()[-300:]}"
    finally:
        server.stop()
    if not out.exists():
        return "py-spy wrote nothing"
    text, _ = summarise(out)
    first = result["steps"][0]
    head = (f"{spec['scenario']} at {first['offered_per_s']}/s offered: delivered "
            f"{first['delivered_per_s']}/s, CPU-s/1000 {first['cpu_s_per_1000']} "
            f"(py-spy attached at {rate_hz} Hz, so CPU figures here are not the benchmark's)")
    return head + "\n" + text


if __name__ == "__main__":  # summarise an existing raw profile
    print(summarise(Path(sys.argv[1]))[0])
