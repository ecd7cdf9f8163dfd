"""`bench/compare`: the same scenarios against mlink and Prosody, back to
back, alternating which server goes first, each server freshly restarted
before every scenario run (and the other one stopped), repeated; prints
per scenario each server's median and the ratio mlink/Prosody."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import proc, run
from .servers import Mlink, Prosody, Server, ensure_prosody, supports_shards, use_revision
from .stats import table

MLINK_PORT = 25222   # mlink: c2s 25222, tls 25223, websocket 25224
PROSODY_PORT = 26222

# A fixed rate (the reference load: 1000 msgs/s over 500 pairs), then a
# rising rate until delivery falls behind.
CHAT_STEPS = [(1000, 5.0)] + [(r, 2.0) for r in (2000, 3000, 4500, 6750, 10000, 15000)]


def scenarios(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name -> spec overrides; every run also gets the target fields."""
    u = a.users
    if a.smoke:
        return {
            "login-scram-tls": dict(scenario="login", tls=True, mechanism="SCRAM-SHA-256",
                                    count=50, users=u, concurrency=10, duration=10.0),
            "login-plain-tcp": dict(scenario="login", tls=False, mechanism="PLAIN",
                                    count=50, users=u, concurrency=10, duration=10.0),
            "idle": dict(scenario="idle", tls=True, mechanism="PLAIN", sessions=u,
                         concurrency=20),
            "chat": dict(scenario="chat", tls=False, mechanism="PLAIN", pairs=u // 2,
                         concurrency=20, steps=[(200, 2.0)], drain=2.0),
            "presence": dict(scenario="presence", tls=False, mechanism="PLAIN", user="r%d",
                             password="rpw%d", users=a.presence_users, contacts=4,
                             concurrency=20, steps=[(40, 2.0)], setup_seconds=2.0,
                             setup_rounds=0, drain=2.0),
            "muc": dict(scenario="muc", tls=False, mechanism="PLAIN", rooms=2, occupants=10,
                        muc_service="conference", concurrency=20, steps=[(20, 2.0)],
                        drain=2.0),
        }
    return {
        "login-scram-tls": dict(scenario="login", tls=True, mechanism="SCRAM-SHA-256",
                                count=a.logins, users=u, concurrency=20, duration=30.0),
        "login-plain-tcp": dict(scenario="login", tls=False, mechanism="PLAIN",
                                count=a.logins, users=u, concurrency=20, duration=30.0),
        "idle": dict(scenario="idle", tls=True, mechanism="PLAIN", sessions=u,
                     concurrency=50),
        "chat": dict(scenario="chat", tls=False, mechanism="PLAIN", pairs=min(500, u // 2),
                     concurrency=50, steps=CHAT_STEPS, max_p99_ms=100.0, drain=2.0),
        "presence": dict(scenario="presence", tls=False, mechanism="PLAIN", user="r%d",
                         password="rpw%d", users=a.presence_users, contacts=20,
                         concurrency=50, steps=[(200, 5.0)], setup_seconds=4.0,
                         setup_rounds=0, drain=2.0),
        # R rooms x O occupants, every occupant posting: 100 msgs/s reach
        # 2000 occupants/s, the order of the presence scenario's deliveries.
        "muc": dict(scenario="muc", tls=False, mechanism="PLAIN", rooms=a.muc_rooms,
                    occupants=a.muc_occupants, muc_service="conference", concurrency=50,
                    steps=[(a.muc_rate, 5.0)], drain=2.0),
        # One large room: the join of 1000 occupants, then 5 msgs/s to all.
        "muc-large": dict(scenario="muc", tls=False, mechanism="PLAIN", rooms=1,
                          occupants=min(1000, u), muc_service="conference", concurrency=50,
                          steps=[(5, 5.0)], join_timeout=500.0,
                          drain=3.0),
    }


def metrics(name: str, r: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """The figures compared, each with the better direction."""
    if r.get("failed"):
        return {}
    if name.startswith("login"):
        return {"logins/s": (r["logins_per_s"] if not r["errors"] else None, "higher"),
                "p99 login ms": (r["p99_ms"], "lower"),
                "server CPU ms/login": (r["server_cpu_ms_per_login"], "lower")}
    if name == "idle":
        return {"KiB/session": (r["kib_per_session"] if not r["errors"] else None, "lower")}
    first = r["steps"][0]
    if name == "chat":
        knee = r["knee_delivered_per_s"]
        half = None
        if knee:
            below = [s for s in r["steps"] if s["delivered_per_s"] <= 0.6 * knee]
            half = below[-1]["p99_ms"] if below else None
        rate = f"@{first['offered_per_s']:.0f}/s"
        return {f"CPU-s/1000 msgs {rate}": (first["cpu_s_per_1000"], "lower"),
                f"p99 ms {rate}": (first["p99_ms"], "lower"),
                "knee delivered msgs/s": (knee, "higher"),
                "p99 ms @~half knee": (half, "lower")}
    ok = first["delivered"] > 0
    if "muc" in r:
        return {"CPU-s/1000 deliveries": (first["cpu_s_per_1000"] if ok else None, "lower"),
                "deliveries/s": (first["delivered_per_s"] if ok else None, "higher"),
                "p99 ms": (first["p99_ms"] if ok else None, "lower"),
                "join phase s": (r["muc"]["join_phase_s"], "lower"),
                "join p99 ms": (r["muc"]["join_p99_ms"], "lower")}
    return {"CPU-s/1000 deliveries": (first["cpu_s_per_1000"] if ok else None, "lower"),
            "deliveries/s": (first["delivered_per_s"] if ok else None, "higher"),
            "p99 ms": (first["p99_ms"] if ok else None, "lower")}


def machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/compare", description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--scenarios", default="login-scram-tls,login-plain-tcp,idle,chat,presence")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--logins", type=int, default=1000, help="logins per login run")
    p.add_argument("--presence-users", type=int, default=200)
    p.add_argument("--muc-rooms", type=int, default=10, help="muc: rooms")
    p.add_argument("--muc-occupants", type=int, default=20, help="muc: occupants per room")
    p.add_argument("--muc-rate", type=float, default=100.0,
                   help="muc: groupchat messages/s over all occupants")
    p.add_argument("--mlink-shards", default="",
                   help="also run mlink with --shards N for each N in this list (e.g. 1,2)")
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--mlink-rev", default="",
                   help="run mlink as of this git revision (exported into the work dir) "
                        "instead of the work tree, e.g. HEAD")
    p.add_argument("--workdir", help="keep the servers' setup here (default: a temp dir)")
    p.add_argument("--json", default="", help="write every run's figures here")
    p.add_argument("--markdown", default="", help="write the ratio table here (markdown)")
    p.add_argument("--no-prosody", action="store_true", help="mlink only")
    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run: mlink only, small and short, once; exits 1 unless "
                        "every scenario logged in and delivered")
    p.add_argument("--profile", default="",
                   help="afterwards, profile mlink with py-spy in chat and presence runs "
                        "and write raw stacks and summaries into this directory")
    a = p.parse_args(argv)
    if a.smoke:
        a.no_prosody, a.reps, a.users, a.presence_users = True, 1, 40, 20
    proc.raise_nofile()
    t_begin = time.monotonic()

    chosen = [s for s in a.scenarios.split(",") if s]
    specs = scenarios(a)
    for s in chosen:
        if s not in specs:
            raise SystemExit(f"unknown scenario {s}; known: {', '.join(specs)}")

    tmp = tempfile.TemporaryDirectory(prefix="mlink-bench-") if not a.workdir else None
    workdir = Path(a.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    users = [(f"u{i}", f"pw{i}") for i in range(1, a.users + 1)]
    users += [(f"r{i}", f"rpw{i}") for i in range(1, a.presence_users + 1)]

    servers: list[Server] = []
    if a.mlink_rev:
        print(f"mlink from git revision {use_revision(a.mlink_rev, workdir)}", file=sys.stderr)
    mlink = Mlink(workdir, MLINK_PORT)
    print(f"setting up in {workdir} ({len(users)} users on each server)...", file=sys.stderr)
    mlink.setup(users, None)
    servers.append(mlink)
    shard_list = [int(x) for x in a.mlink_shards.split(",") if x]
    if shard_list and not supports_shards():
        print("note: this mlink has no --shards; running the default server only",
              file=sys.stderr)
        shard_list = []
    for n in shard_list:
        servers.append(Mlink(workdir, MLINK_PORT, shards=n))
    prosody = None
    if not a.no_prosody:
        ensure_prosody()
        prosody = Prosody(workdir, PROSODY_PORT)
        prosody.setup(users, mlink.cert())  # the same certificate on both
        servers.append(prosody)
    cache: dict[str, str] = {}
    cache.update(mlink.scram_entries(users))
    if prosody is not None:
        cache.update(prosody.scram_entries(users))

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    tls_seen: dict[str, str] = {}
    prepared: dict[str, Any] = {}
    try:
        if "presence" in chosen:
            # Rosters are built once, through the protocol, before any timed
            # run (they persist in both servers' stores across restarts).
            for server in [mlink] + ([prosody] if prosody is not None else []):
                for other in servers:
                    other.stop()
                server.start()
                spec = {"host": "127.0.0.1", "port": server.port, "domain": server.domain,
                        "procs": a.procs, "scram_entries": cache,
                        **specs["presence"], "steps": [(50, 1.0)], "setup_rounds": 4}
                try:
                    r = run.run(spec, server.procs())
                    prepared[server.name] = r.get("roster")
                except Exception as exc:  # noqa: BLE001
                    prepared[server.name] = f"failed: {exc}"[:300]
                print(f"[{time.monotonic() - t_begin:5.0f}s] presence rosters on "
                      f"{server.name}: {prepared[server.name]}", file=sys.stderr)
                server.stop()
        for name in chosen:
            results[name] = {s.name: [] for s in servers}
            for rep in range(a.reps):
                order = servers if rep % 2 == 0 else list(reversed(servers))
                for server in order:
                    for other in servers:
                        other.stop()
                    server.start()
                    spec = {"host": "127.0.0.1", "port": server.port, "domain": server.domain,
                            "user": "u%d", "password": "pw%d", "procs": a.procs,
                            "scram_entries": cache, **specs[name]}
                    t = time.monotonic()
                    try:
                        r = run.run(spec, server.procs())
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        r = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
                    r.pop("_scram_new", None)
                    if r.get("tls", "none") != "none":
                        tls_seen[server.name] = r["tls"]
                    r["wall_s"] = round(time.monotonic() - t, 1)
                    results[name][server.name].append(r)
                    brief = {k: v for k, v in metrics(name, r).items()}
                    print(f"[{time.monotonic() - t_begin:5.0f}s] {name} rep {rep + 1} "
                          f"{server.name}: " + (r.get("failed") or ", ".join(
                              f"{k} {v[0]}" for k, v in brief.items())), file=sys.stderr)
                    server.stop()
        if a.profile:
            from .profile import profile

            pdir = Path(a.profile)
            pdir.mkdir(parents=True, exist_ok=True)
            for other in servers:
                other.stop()
            for name, override in (("chat", {"steps": [(3000, 6.0)]}),
                                   ("presence", {"steps": [(200, 6.0)]})):
                if name not in chosen:
                    continue
                spec = {"host": "127.0.0.1", "port": mlink.port, "domain": mlink.domain,
                        "user": "u%d", "password": "pw%d", "procs": a.procs,
                        "scram_entries": cache, **specs[name], **override}
                text = profile(mlink, spec, pdir / f"{name}.raw")
                (pdir / f"{name}.txt").write_text(text + "\n")
                print(f"\n== mlink profile, {name} ==\n{text}")
    finally:
        for s in servers:
            s.stop()

    rows = []
    for name in chosen:
        per: dict[str, dict[str, float | None]] = {}
        keys: dict[str, str] = {}
        for sname, runs in results[name].items():
            vals: dict[str, list[float]] = {}
            for r in runs:
                for k, (v, better) in metrics(name, r).items():
                    keys[k] = better
                    if v is not None:
                        vals.setdefault(k, []).append(v)
            per[sname] = {k: (statistics.median(vals[k]) if vals.get(k) else None)
                          for k in keys}
        for k, better in keys.items():
            row: list[Any] = [name, f"{k} ({better} is better)"]
            for s in servers:
                row.append(per[s.name].get(k))
            if prosody is not None:
                pv = per[prosody.name].get(k)
                for s in servers:
                    if s is prosody:
                        continue
                    mv = per[s.name].get(k)
                    row.append(round(mv / pv, 2) if mv is not None and pv else None)
            rows.append(row)
    headers = ["scenario", "figure (median of reps)"] + [s.name for s in servers]
    if prosody is not None:
        headers += [f"{s.name}/prosody" for s in servers if s is not prosody]
    out = table(headers, rows)
    versions = ", ".join(s.version() for s in servers if hasattr(s, "version"))
    info = {
        "machine": machine(), "versions": versions, "tls": tls_seen, "reps": a.reps,
        "command": "bench/compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.monotonic() - t_begin, 1), "generator_procs": a.procs,
        "presence_rosters": prepared,
    }
    print()
    print(out)
    print(f"\nmachine: {info['machine']}\nservers: {versions}\nTLS (negotiated): {tls_seen}"
          f"\nwall time: {info['wall_s']} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    if a.markdown:
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        from .stats import fmt

        md += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
        Path(a.markdown).write_text("\n".join(md) + "\n")
    if tmp is not None:
        tmp.cleanup()
    failed = [f"{n}: {r.get('failed') or 'errors ' + str(r.get('errors'))}"
              for n in chosen for runs in results[n].values() for r in runs
              if r.get("failed") or r.get("errors")
              or ("steps" in r and not r["steps"][0]["delivered"])
              or (n.startswith("login") and not r.get("logins"))]
    if a.smoke:
        print("smoke: " + ("FAILED " + "; ".join(failed) if failed else "every scenario delivered"))
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
