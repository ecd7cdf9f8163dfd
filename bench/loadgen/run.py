"""Scenarios: worker processes (asyncio + uvloop) driven by a coordinator
that samples the server's /proc figures at the phase boundaries.

Every worker owns a disjoint slice of the users; the coordinator tells all
of them when to start (a CLOCK_MONOTONIC instant, shared by all processes,
which is also what message bodies carry, so latency is measured across
processes). Every loop is bounded in count and in time.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
import re
import time
import traceback
from typing import Any

from . import proc
from .stats import ms, percentile
from .xmpp import Conn, ScramCache, XMPPError, client_ssl_context, login

# Deliveries carry ">t<send time, monotonic ns></": a chat <body> or a
# presence <status>. One regex scan per read finds them all.
MARK_RE = re.compile(rb">t(\d{6,20})</")
ERROR_TYPE_RE = re.compile(rb"type=['\"]error['\"]")
SUBSCRIBE_RE = re.compile(rb"<presence\b[^>]*>")
FROM_RE = re.compile(rb"from=['\"]([^'\"/]+)")
ROSTER_RE = re.compile(
    rb"<iq[^>]*id=['\"]roster1['\"][^>]*/>|<iq[^>]*id=['\"]roster1['\"].*?</iq>", re.S)
BOTH_RE = re.compile(rb"subscription=['\"]both['\"]")
PHASE_TIMEOUT = 120.0  # no phase of any scenario may take longer
# ... except the joins of one large room, whose cost grows with the square
# of its size (every newcomer sees everyone, everyone sees the newcomer).
MAX_JOIN_PHASE = 600.0
# muc: the self-presence (status 110) that ends a join, or the error instead.
SELF_PRESENCE_RE = re.compile(rb"code=['\"]110['\"]")
CREATED_RE = re.compile(rb"code=['\"]201['\"]")
MUC_NS = "http://jabber.org/protocol/muc"


# ----------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------

def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is in the bench extra
        return asyncio.new_event_loop()


class Worker:
    def __init__(self, spec: dict[str, Any], index: int, pipe: Any) -> None:
        self.spec = spec
        self.index = index
        self.nprocs = spec["procs"]
        self.pipe = pipe
        self.loop = _new_loop()
        asyncio.set_event_loop(self.loop)
        self.cache = ScramCache(spec.get("scram_entries"))
        self.ssl_ctx = client_ssl_context()
        self.conns: dict[int, Conn] = {}
        self.errors: list[str] = []
        self.n_errors = 0
        self.tls_info = ""
        # Deliveries: send time and receive time (monotonic ns).
        self.sent_ts = array.array("q")
        self.recv_ts = array.array("q")
        self.error_stanzas = 0
        self.last_rx = 0

    # -- helpers --
    def user(self, n: int) -> str:
        return self.spec["user"] % n

    def password(self, n: int) -> str:
        return self.spec["password"] % n

    def _error(self, exc: BaseException) -> None:
        self.n_errors += 1
        if len(self.errors) < 5:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    async def _login(self, n: int, presence: bool = True) -> Conn:
        s = self.spec
        conn = await login(
            s["host"], s["port"], s["domain"], self.user(n), self.password(n),
            tls=s["tls"], mechanism=s["mechanism"], resource=s.get("resource", "r"),
            presence=presence, sm=bool(s.get("sm_every")), ssl_ctx=self.ssl_ctx,
            scram_cache=self.cache,
            timeout=s.get("login_timeout", 30.0),
        )
        if conn.tls_info:
            self.tls_info = conn.tls_info
        return conn

    async def login_all(self, users: list[int], presence: bool) -> None:
        """Log in `users` (held open), `concurrency` at a time."""
        sem = asyncio.Semaphore(max(1, self.spec["concurrency"] // self.nprocs))

        async def one(n: int) -> None:
            async with sem:
                try:
                    self.conns[n] = await self._login(n, presence)
                except (TimeoutError, XMPPError, OSError) as exc:
                    self._error(exc)

        await asyncio.wait_for(asyncio.gather(*(one(n) for n in users)), PHASE_TIMEOUT)

    def make_receiver(self):  # type: ignore[no-untyped-def]
        sent_append = self.sent_ts.append
        recv_append = self.recv_ts.append
        finditer = MARK_RE.finditer
        mono = time.monotonic_ns
        tail = b""

        def on_data(data: bytes) -> None:
            nonlocal tail
            if tail:
                data = tail + data
            now = mono()
            last = 0
            for m in finditer(data):
                sent_append(int(m.group(1)))
                recv_append(now)
                last = m.end()
            if last:
                self.last_rx = now
            if b"error" in data:
                self.error_stanzas += len(ERROR_TYPE_RE.findall(data, last))
            tail = data[max(last, len(data) - 64):]

        return on_data

    def reply(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload.update(
            index=self.index, cpu=proc.own_cpu(), errors=self.errors, n_errors=self.n_errors,
            tls=self.tls_info, scram_new=self.cache.new, error_stanzas=self.error_stanzas,
        )
        self.pipe.send(payload)
        msg = self.pipe.recv()
        return msg

    def close_all(self) -> None:
        for c in self.conns.values():
            c.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))

    # -- scenarios --
    def run(self) -> None:
        getattr(self, "scenario_" + self.spec["scenario"])()

    def scenario_login(self) -> None:
        s = self.spec
        go = self.reply({"ready": True})
        cpu0 = proc.own_cpu()
        lat = array.array("q")
        count = s["count"]
        users = s["users"]
        mine = list(range(self.index, count, self.nprocs))
        deadline = time.monotonic() + s["duration"]
        pos = 0

        async def task() -> None:
            nonlocal pos
            while pos < len(mine) and time.monotonic() < deadline:
                k = mine[pos]
                pos += 1
                n = k % users + 1
                t = time.monotonic_ns()
                try:
                    conn = await self._login(n, presence=True)
                except (TimeoutError, XMPPError, OSError) as exc:
                    self._error(exc)
                    continue
                lat.append(time.monotonic_ns() - t)
                conn.close()

        async def main() -> None:
            while time.monotonic_ns() < go["t0"]:
                await asyncio.sleep(0.001)
            conc = max(1, s["concurrency"] // self.nprocs)
            await asyncio.wait_for(asyncio.gather(*(task() for _ in range(conc))),
                                   s["duration"] + 35)

        t_start = time.monotonic_ns()
        self.loop.run_until_complete(main())
        t_end = time.monotonic_ns()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.reply({"lat": lat.tobytes(), "t_start": t_start, "t_end": t_end,
                    "cpu_run": proc.own_cpu() - cpu0})

    def scenario_idle(self) -> None:
        s = self.spec
        mine = list(range(1 + self.index, s["sessions"] + 1, self.nprocs))
        self.loop.run_until_complete(self.login_all(mine, presence=True))
        for c in self.conns.values():
            c.hot(lambda data: None)
        self.reply({"ready": True, "held": len(self.conns)})
        self.close_all()

    def _traffic(self, senders: list[tuple[Conn, bytes, bytes]], go: dict[str, Any]) -> dict:
        """Send marked stanzas at the scheduled rates, then drain."""
        steps = go["steps"]  # [(rate for all procs, seconds)]
        t0 = go["t0"]
        share = 1.0 / self.nprocs
        sent_per_step: list[int] = []
        cpu0 = proc.own_cpu()

        every = int(self.spec.get("sm_every") or 0)
        request = b"<r xmlns='urn:xmpp:sm:3'/>"

        async def main() -> None:
            rr = 0
            n_s = len(senders)
            mono = time.monotonic_ns
            while mono() < t0:
                await asyncio.sleep(0.001)
            start = t0
            for rate, seconds in steps:
                end = start + int(seconds * 1e9)
                rate_ns = rate * share / 1e9
                sent = 0
                while True:
                    now = mono()
                    if now >= end:
                        break
                    due = int((now - start) * rate_ns) - sent
                    if due > 0 and n_s:
                        stamp = str(now).encode()
                        for _ in range(due):
                            conn, pre, post = senders[rr]
                            rr = rr + 1 if rr + 1 < n_s else 0
                            conn.send(pre + stamp + post)
                            if every:
                                conn.sent_stanzas += 1
                                if conn.sent_stanzas % every == 0:
                                    conn.send(request)
                        sent += due
                    await asyncio.sleep(0.002)
                sent_per_step.append(sent)
                start = end
            # Drain: until nothing arrived for 300 ms, at most `drain` s.
            until = mono() + int(go["drain"] * 1e9)
            self.last_rx = mono()
            while mono() < until and mono() - self.last_rx < 300_000_000:
                await asyncio.sleep(0.02)

        self.loop.run_until_complete(asyncio.wait_for(main(), PHASE_TIMEOUT))
        return {"sent_per_step": sent_per_step, "sent_ts": self.sent_ts.tobytes(),
                "recv_ts": self.recv_ts.tobytes(), "cpu_run": proc.own_cpu() - cpu0}

    def scenario_chat(self) -> None:
        s = self.spec
        d = s["domain"]
        res = s.get("resource", "r")
        pairs = list(range(self.index, s["pairs"], self.nprocs))
        users = [n for p in pairs for n in (2 * p + 1, 2 * p + 2)]
        self.loop.run_until_complete(self.login_all(users, presence=s.get("presence", True)))
        senders = []
        for p in pairs:
            a, b = 2 * p + 1, 2 * p + 2
            for x, y in ((a, b), (b, a)):
                if x in self.conns and y in self.conns:
                    pre = (f"<message to='{self.user(y)}@{d}/{res}' type='chat'><body>t"
                           ).encode()
                    senders.append((self.conns[x], pre, b"</body></message>"))
        for c in self.conns.values():
            c.hot(self.discard)
        self.loop.run_until_complete(self.quiet(0.5, 10.0))  # the logins' presence echo
        for c in self.conns.values():
            c.hot(self.make_receiver())
        go = self.reply({"ready": True, "held": len(self.conns), "senders": len(senders)})
        out = self._traffic(senders, go)
        self.reply(out)
        self.close_all()

    # -- presence --
    def contacts(self, n: int) -> list[int]:
        """A ring: each user's R nearest neighbours (R/2 each side)."""
        total, half = self.spec["users"], self.spec["contacts"] // 2
        out = []
        for k in range(1, half + 1):
            for m in (n + k, n - k):
                out.append((m - 1) % total + 1)
        return [m for m in dict.fromkeys(out) if m != n]

    async def roster_sizes(self) -> list[int]:
        async def one(conn: Conn) -> int:
            conn.on_data = None
            conn.buf = b""
            conn.send(b"<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
            try:
                m = await conn.expect(ROSTER_RE, 10.0, fail=False)
            except XMPPError:
                return -1
            return len(BOTH_RE.findall(m.group(0)))

        sizes = await asyncio.gather(*(one(c) for c in self.conns.values()))
        for c in self.conns.values():
            c.hot(self.discard)
        return list(sizes)

    def discard(self, data: bytes) -> None:
        self.last_rx = time.monotonic_ns()

    async def quiet(self, gap: float, limit: float) -> None:
        """Until nothing arrived for `gap` s (at most `limit` s)."""
        end = time.monotonic_ns() + int(limit * 1e9)
        self.last_rx = time.monotonic_ns()
        while time.monotonic_ns() < end and time.monotonic_ns() - self.last_rx < gap * 1e9:
            await asyncio.sleep(0.05)

    async def subscribe_all(self, seconds: float) -> None:
        """Everyone asks its contacts for a subscription (RFC 6121 §3) and
        approves what it is asked; then, half-way, everyone also approves
        all its contacts unasked, which settles requests left pending by an
        earlier, interrupted setup (servers do not deliver those again)."""
        d = self.spec["domain"]

        def responder(conn: Conn):  # type: ignore[no-untyped-def]
            def on_data(data: bytes) -> None:
                for m in SUBSCRIBE_RE.finditer(data):
                    tag = m.group(0)
                    if b"'subscribe'" in tag or b'"subscribe"' in tag:
                        f = FROM_RE.search(tag)
                        if f:
                            conn.send(b"<presence type='subscribed' to='" + f.group(1) + b"'/>")
            return on_data

        for c in self.conns.values():
            c.hot(responder(c))
        for kind in ("subscribe", "subscribed"):
            for n, c in self.conns.items():
                for m in self.contacts(n):
                    c.send(f"<presence type='{kind}' to='{self.user(m)}@{d}'/>".encode())
                await asyncio.sleep(0)
            await asyncio.sleep(seconds / 2)

    def scenario_presence(self) -> None:
        s = self.spec
        mine = list(range(1 + self.index, s["users"] + 1, self.nprocs))
        self.loop.run_until_complete(self.login_all(mine, presence=True))
        for c in self.conns.values():
            c.hot(self.discard)
        # Let the initial-presence storm (probes, broadcasts) pass.
        self.loop.run_until_complete(self.quiet(0.5, 15.0))
        sizes = self.loop.run_until_complete(self.roster_sizes())
        msg = self.reply({"ready": True, "held": len(self.conns), "rosters": sizes})
        while msg.get("setup"):
            self.loop.run_until_complete(self.subscribe_all(msg["setup"]))
            self.loop.run_until_complete(self.quiet(0.5, 15.0))
            sizes = self.loop.run_until_complete(self.roster_sizes())
            msg = self.reply({"ready": True, "held": len(self.conns), "rosters": sizes})
        self.loop.run_until_complete(self.quiet(0.5, 15.0))
        senders = [(c, b"<presence><show>away</show><status>t", b"</status></presence>")
                   for c in self.conns.values()]
        for c in self.conns.values():
            c.hot(self.make_receiver())
        out = self._traffic(senders, msg)
        self.reply(out)
        self.close_all()


    # -- muc --
    def room_of(self, n: int) -> str:
        s = self.spec
        return f"bench{(n - 1) % s['rooms']}@{s['muc_service']}.{s['domain']}"

    async def join_all(self, users: list[int], lat: array.array) -> None:  # type: ignore[type-arg]
        """`users` enter their rooms, `concurrency` at a time; join latency
        = until the self-presence (status 110). A room's creator (201)
        accepts the default configuration (an instant room, XEP-0045
        §10.1.2), as clients do, before anyone else is sent in."""
        sem = asyncio.Semaphore(max(1, self.spec["concurrency"] // self.nprocs))

        async def one(n: int, conn: Conn) -> None:
            async with sem:
                conn.buf = b""
                room = self.room_of(n)
                t = time.monotonic_ns()
                conn.send(f"<presence to='{room}/n{n}'><x xmlns='{MUC_NS}'>"
                          "<history maxstanzas='0'/></x></presence>".encode())
                try:
                    m = await conn.expect(SELF_PRESENCE_RE, self.join_timeout())
                    lat.append(time.monotonic_ns() - t)
                    text = m.string  # the self-presence around the match: created?
                    start = max(0, text.rfind(b"<presence", 0, m.start()))
                    end = text.find(b"</presence>", m.end())
                    if CREATED_RE.search(text, start, end if end >= 0 else len(text)):
                        conn.send(f"<iq type='set' id='cfg{n}' to='{room}'><query xmlns="
                                  f"'{MUC_NS}#owner'><x xmlns='jabber:x:data' type='submit'/>"
                                  "</query></iq>".encode())
                        await conn.expect(re.compile(rf"id=['\"]cfg{n}['\"]".encode()), 30.0)
                except XMPPError as exc:
                    self._error(exc)

        await asyncio.wait_for(asyncio.gather(*(one(n, self.conns[n]) for n in users
                                                if n in self.conns)), self.join_timeout())

    def join_timeout(self) -> float:
        return min(MAX_JOIN_PHASE, float(self.spec.get("join_timeout", PHASE_TIMEOUT)))

    def scenario_muc(self) -> None:
        s = self.spec
        mine = list(range(1 + self.index, s["rooms"] * s["occupants"] + 1, self.nprocs))
        self.loop.run_until_complete(self.login_all(mine, presence=True))
        for c in self.conns.values():
            c.hot(self.discard)
        self.loop.run_until_complete(self.quiet(0.3, 10.0))
        for c in self.conns.values():
            c.on_data = None
        join_lat = array.array("q")
        # The rooms' creators first (users 1..R, one per room); every
        # worker waits for the others' rooms before the rest go in.
        creators = [n for n in self.conns if n <= s["rooms"]]
        self.loop.run_until_complete(self.join_all(creators, join_lat))
        self.reply({"created": len(creators)})
        t_join = time.monotonic_ns()
        self.loop.run_until_complete(self.join_all(
            [n for n in self.conns if n > s["rooms"]], join_lat))
        join_s = (time.monotonic_ns() - t_join) / 1e9
        for c in self.conns.values():
            c.hot(self.discard)
        # The presence of every later joiner to every earlier one: let it pass.
        self.loop.run_until_complete(self.quiet(0.5, 30.0))
        senders = [(c, f"<message to='{self.room_of(n)}' type='groupchat'><body>t".encode(),
                    b"</body></message>") for n, c in self.conns.items()]
        for c in self.conns.values():
            c.hot(self.make_receiver())
        go = self.reply({"ready": True, "held": len(self.conns), "senders": len(senders),
                         "join_lat": join_lat.tobytes(), "join_s": join_s})
        out = self._traffic(senders, go)
        self.reply(out)
        self.close_all()


def _worker_main(spec: dict[str, Any], index: int, pipe: Any) -> None:
    proc.raise_nofile()
    try:
        Worker(spec, index, pipe).run()
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        try:
            pipe.send({"fatal": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------
# coordinator side
# ----------------------------------------------------------------------------

class Pool:
    def __init__(self, spec: dict[str, Any]) -> None:
        ctx = mp.get_context("fork")
        self.spec = spec
        self.pipes = []
        self.procs = []
        for i in range(spec["procs"]):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(spec, i, b), daemon=True)
            p.start()
            self.pipes.append(a)
            self.procs.append(p)
        self.scram_new: dict[str, str] = {}
        self.tls = ""

    def gather(self, timeout: float = PHASE_TIMEOUT) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError("a load worker did not answer in time")
            msg = pipe.recv()
            if "fatal" in msg:
                self.stop()
                raise RuntimeError("load worker failed: " + msg["fatal"])
            self.scram_new.update(msg.get("scram_new") or {})
            self.tls = self.tls or msg.get("tls", "")
            out.append(msg)
        return out

    def send(self, msg: dict[str, Any]) -> None:
        for pipe in self.pipes:
            pipe.send(msg)

    def stop(self) -> None:
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


def _errors(replies: list[dict[str, Any]]) -> tuple[int, list[str]]:
    n = sum(r["n_errors"] for r in replies)
    sample = [e for r in replies for e in r["errors"]][:5]
    return n, sample


def _sleep_until(t_ns: int) -> None:
    d = (t_ns - time.monotonic_ns()) / 1e9
    if d > 0:
        time.sleep(d)


def run_login(spec: dict[str, Any], server: proc.ServerProcs) -> dict[str, Any]:
    pool = Pool(spec)
    pool.gather()
    t0 = time.monotonic_ns() + 200_000_000
    pool.send({"t0": t0})
    _sleep_until(t0)
    cpu0, own0 = server.cpu(), proc.own_cpu()
    res = pool.gather(spec["duration"] + 60)
    cpu1 = server.cpu()
    pool.send({"close": True})
    pool.stop()
    lat = array.array("q")
    for r in res:
        lat.frombytes(r["lat"])
    t_end = max(r["t_end"] for r in res)
    wall = (t_end - t0) / 1e9
    lats = sorted(lat)
    n_err, errs = _errors(res)
    ok = len(lats)
    return {
        "logins": ok, "errors": n_err, "error_sample": errs, "seconds": round(wall, 3),
        "logins_per_s": round(ok / wall, 1) if wall > 0 else None,
        "p50_ms": ms(percentile(lats, 0.5)), "p99_ms": ms(percentile(lats, 0.99)),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "server_cpu_ms_per_login": round((cpu1 - cpu0) * 1000 / ok, 3) if ok else None,
        "gen_cpu_s": round(sum(r["cpu_run"] for r in res) + proc.own_cpu() - own0, 2),
        "tls": pool.tls or "none", "_scram_new": pool.scram_new,
    }


def run_idle(spec: dict[str, Any], server: proc.ServerProcs) -> dict[str, Any]:
    rss0 = server.rss()
    cpu0 = server.cpu()
    pool = Pool(spec)
    res = pool.gather()
    time.sleep(spec.get("settle", 1.0))
    rss1 = server.rss()
    cpu1 = server.cpu()
    held = sum(r["held"] for r in res)
    pool.send({"close": True})
    pool.stop()
    n_err, errs = _errors(res)
    return {
        "sessions": held, "errors": n_err, "error_sample": errs,
        "server_pids": server.pids(),
        "rss_before_mib": round(rss0 / 2**20, 1), "rss_after_mib": round(rss1 / 2**20, 1),
        "kib_per_session": round((rss1 - rss0) / 1024 / held, 1) if held else None,
        "server_cpu_s_login": round(cpu1 - cpu0, 2),
        "gen_cpu_s": round(sum(r["cpu"] for r in res), 2),
        "tls": pool.tls or "none", "_scram_new": pool.scram_new,
    }


def _traffic_figures(spec: dict[str, Any], go: dict[str, Any], res: list[dict[str, Any]],
                     cpu_marks: list[float], per_delivery: int) -> dict[str, Any]:
    """Per step: offered, sent, delivered (by send time), latency, CPU."""
    sent_ts = array.array("q")
    recv_ts = array.array("q")
    for r in res:
        sent_ts.frombytes(r["sent_ts"])
        recv_ts.frombytes(r["recv_ts"])
    pairs = sorted(zip(sent_ts, recv_ts, strict=True))
    steps_out = []
    start = go["t0"]
    i = 0
    for k, (rate, seconds) in enumerate(go["steps"]):
        end = start + int(seconds * 1e9)
        lats = []
        while i < len(pairs) and pairs[i][0] < end:
            if pairs[i][0] >= start:
                lats.append(pairs[i][1] - pairs[i][0])
            i += 1
        lats.sort()
        sent = sum(r["sent_per_step"][k] for r in res)
        delivered = len(lats)
        cpu = cpu_marks[k + 1] - cpu_marks[k]
        steps_out.append({
            "offered_per_s": rate, "sent_per_s": round(sent / seconds, 1),
            "delivered": delivered, "delivered_per_s": round(delivered / seconds, 1),
            "expected": sent * per_delivery,
            "p50_ms": ms(percentile(lats, 0.5)), "p99_ms": ms(percentile(lats, 0.99)),
            "p999_ms": ms(percentile(lats, 0.999)), "max_ms": ms(lats[-1] if lats else None),
            "server_cpu_s": round(cpu, 2),
            "cpu_s_per_1000": round(cpu * 1000 / delivered, 4) if delivered else None,
        })
        start = end
    return {"steps": steps_out}


def _kept_up(step: dict[str, Any], max_p99_ms: float) -> bool:
    return (step["delivered"] >= 0.99 * step["expected"] > 0
            and step["sent_per_s"] >= 0.95 * step["offered_per_s"]
            and (step["p99_ms"] or 1e9) <= max_p99_ms)


def run_traffic(spec: dict[str, Any], server: proc.ServerProcs,
                on_start: Any = None) -> dict[str, Any]:
    """chat and presence: fixed rate (steps of one), or a rising ramp."""
    pool = Pool(spec)
    res = pool.gather()
    if spec["scenario"] == "muc":  # every room created: the others may enter
        pool.send({"join": True})
        res = pool.gather(min(MAX_JOIN_PHASE, spec.get("join_timeout", PHASE_TIMEOUT)) + 60)
    setup = None
    if spec["scenario"] == "presence":
        sizes = [x for r in res for x in r["rosters"]]
        want = min(spec["contacts"] // 2 * 2, spec["users"] - 1)
        rounds = 0
        while sizes and min(sizes) < want and rounds < spec.get("setup_rounds", 0):
            setup = setup or {"rosters_before_min": min(sizes)}
            rounds += 1
            pool.send({"setup": spec["setup_seconds"]})
            res = pool.gather()
            sizes = [x for r in res for x in r["rosters"]]
            setup["rounds"] = rounds
        roster_min = min(sizes) if sizes else 0
        per_delivery = max(0, roster_min)
        setup = {**(setup or {}), "roster_min": roster_min, "roster_wanted": want}
    elif spec["scenario"] == "muc":
        per_delivery = spec["occupants"]  # every occupant, the sender too, gets each message
        join_lat = array.array("q")
        for r in res:
            join_lat.frombytes(r["join_lat"])
        lats = sorted(join_lat)
        setup = {"joined": len(lats), "join_phase_s": round(max(r["join_s"] for r in res), 2),
                 "join_p50_ms": ms(percentile(lats, 0.5)),
                 "join_p99_ms": ms(percentile(lats, 0.99))}
    else:
        per_delivery = 1
    held = sum(r["held"] for r in res)
    n_err, errs = _errors(res)
    steps = spec["steps"]
    t0 = time.monotonic_ns() + 300_000_000
    go = {"t0": t0, "steps": steps, "drain": spec.get("drain", 2.0)}
    pool.send(go)
    if on_start is not None:
        on_start(t0, sum(s for _, s in steps))
    own0 = proc.own_cpu()
    marks = []
    boundary = t0
    for _, seconds in [(0, 0.0), *steps]:
        boundary += int(seconds * 1e9)
        _sleep_until(boundary)
        marks.append(server.cpu())
    res = pool.gather(sum(s for _, s in steps) + 60)
    marks[-1] = server.cpu()  # the last step's window includes the drain
    pool.send({"close": True})
    pool.stop()
    out = _traffic_figures(spec, go, res, marks, per_delivery)
    total_delivered = sum(s["delivered"] for s in out["steps"])
    total_cpu = marks[-1] - marks[0]
    max_p99 = spec.get("max_p99_ms", 100.0)
    kept = [s for s in out["steps"] if _kept_up(s, max_p99)]
    knee = max(kept, key=lambda s: s["delivered_per_s"]) if kept else None
    out.update({
        "sessions": held, "errors": n_err, "error_sample": errs,
        "error_stanzas": sum(r["error_stanzas"] for r in res),
        "senders": sum(r.get("senders", 0) for r in res) or held,
        "delivered": total_delivered,
        "server_cpu_s": round(total_cpu, 2),
        "cpu_s_per_1000": round(total_cpu * 1000 / total_delivered, 4) if total_delivered else None,
        "knee_delivered_per_s": knee["delivered_per_s"] if knee else None,
        "max_delivered_per_s": max((s["delivered_per_s"] for s in out["steps"]), default=None),
        "gen_cpu_s": round(sum(r["cpu_run"] for r in res) + proc.own_cpu() - own0, 2),
        "gen_cpu_share": None,
        "tls": pool.tls or "none", "_scram_new": pool.scram_new,
    })
    secs = sum(s for _, s in steps)
    out["gen_cpu_share"] = round(out["gen_cpu_s"] / secs, 2) if secs else None
    if setup is not None and spec["scenario"] == "muc":
        out["muc"] = setup
        out["deliveries_per_message"] = per_delivery
    elif setup is not None:
        out["roster"] = setup
        out["deliveries_per_change"] = per_delivery
    return out


SCENARIOS = {"login": run_login, "idle": run_idle, "chat": run_traffic, "presence": run_traffic,
             "muc": run_traffic}


def run(spec: dict[str, Any], server: proc.ServerProcs, on_start: Any = None) -> dict[str, Any]:
    """One scenario; `on_start(t0_ns, seconds)` is called as traffic starts
    (chat, presence), e.g. to attach a profiler to the server."""
    if on_start is not None:
        return run_traffic(spec, server, on_start)
    return SCENARIOS[spec["scenario"]](spec, server)
