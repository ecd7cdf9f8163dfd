"""How long PRECIS-heavy JIDs keep a shard busy (issue 12, item 4).

    /work/main/.venv/bin/python bench/jid_stall.py [--rev REV] [--sizes 4,9,18,64]
        [--patterns katakana-resource,...] [--no-server] [--reps 3]

Figures per hostile input (a JID of SIZE KiB in UTF-8, built so that the
old PRECIS context-rule and Punycode code paths are quadratic), each the
median of --reps runs:

- prepare ms: one `parse_jid` call in this process (the answer is always
  "invalid"; what matters is how long it takes to say so);
- stall ms: the same text sent as the `to` of an unauthenticated stream
  header to a one-shard `mlink serve`, while a logged-in client on that
  shard sends pings back to back; the longest ping round trip seen between
  sending the header and the server's stream error is the longest time the
  shard's event loop was not serving its users (the baseline round trip,
  printed too, is well under a millisecond);
- error ms: how long the stream error took to reach the sender.

A "4" size is the largest part preparation still works on (4,092 octets:
anything longer is refused on its length), so it is the real worst case
after the fix. `--rev main` runs the figures on an exported revision
instead of this work tree (the "before" figures). Target: under 50 ms.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "bench.local"
USER, PASSWORD = "prober", "prober-pw"
# A loopback reply that takes longer than this means the server is wedged.
READ_TIMEOUT = 900.0
KIB = 1024
SASL_CAP = 4096  # mlink.sasl.plain.MAX_PLAIN_MESSAGE, scram.MAX_SCRAM_MESSAGE
HAN = "\u4e00"  # a Han character: makes every KATAKANA MIDDLE DOT legal (RFC 5892 A.7)


def _repeat(char: str, size: int, fixed: int) -> str:
    """`char` repeated to make the JID about `size` octets with `fixed` more."""
    return char * max(1, (size - fixed) // len(char.encode()))


def _distinct_cjk(size: int) -> str:
    """Distinct CJK ideographs: Punycode's cost grows with distinct code points."""
    return "".join(chr(0x4E00 + i % 20000) for i in range(size // 3))


def _idn_labels(size: int) -> str:
    """Many short labels of distinct ideographs, each one that IDNA accepts
    (17 ideographs: a 59-octet ACE label), so the codec does every label."""
    labels, total, k = [], 0, 0
    while total + 52 <= size:
        labels.append("".join(chr(0x4E00 + 17 * k + i) for i in range(17)))
        total, k = total + 52, k + 1
    return ".".join(labels)


# name -> builder(size in octets) -> JID text
PATTERNS: dict[str, Callable[[int], str]] = {
    # U+30FB ... U+4E00 as resourcepart: A.7 rescans the string per dot.
    "katakana-resource": lambda n: f"{DOMAIN}/" + _repeat("\u30fb", n, 20) + HAN,
    # The same as localpart (UsernameCaseMapped; also the SASL user name path).
    "katakana-localpart": lambda n: _repeat("\u30fb", n, 20) + HAN + f"@{DOMAIN}",
    # U+0664 ARABIC-INDIC DIGIT FOUR as resourcepart: A.8 rescans per digit.
    "arabic-indic-resource": lambda n: f"{DOMAIN}/" + _repeat("\u0664", n, 12),
    # U+06F4 EXTENDED ARABIC-INDIC DIGIT FOUR as localpart: A.9 per digit.
    "ext-arabic-localpart": lambda n: _repeat("\u06f4", n, 12) + f"@{DOMAIN}",
    # BEH ZWNJ BEH ...: A.1 copies the string on both sides of every ZWNJ.
    "zwnj-resource": lambda n: f"{DOMAIN}/" + _repeat("\u0628\u200c", n, 12),
    # Distinct ideographs as domainpart: IDNA2003 Punycode is quadratic.
    "cjk-domain": _distinct_cjk,
    # Valid labels up to the size: the slowest domain left under the bound.
    "idn-labels-domain": _idn_labels,
}


# -- prepare time, in this process --------------------------------------------------


def prepare_ms(text: str) -> tuple[float, str]:
    from mlink.jid import InvalidJID, parse_jid

    started = time.perf_counter()
    try:
        parse_jid(text)
        outcome = "valid"
    except InvalidJID:
        outcome = "invalid"
    return (time.perf_counter() - started) * 1000, outcome


def sasl_user_ms(text: str) -> tuple[float, str]:
    """SASLprep then localpart preparation, as a SASL PLAIN or SCRAM user
    name gets them (both mechanisms refuse messages over 4,096 octets)."""
    from mlink.jid import InvalidJID, prep_localpart
    from mlink.sasl.saslprep import SASLprepError, saslprep

    started = time.perf_counter()
    try:
        prep_localpart(saslprep(text, allow_unassigned=True))
        outcome = "valid"
    except (InvalidJID, SASLprepError):
        outcome = "invalid"
    return (time.perf_counter() - started) * 1000, outcome


# -- a server and two raw clients ------------------------------------------------------


def _header(to: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{to}' version='1.0'>"
    ).encode()


class Raw:
    """A blocking plain-TCP XMPP client: just enough to log in and ping."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def until(self, pattern: bytes) -> bytes:
        regex = re.compile(pattern, re.S)
        while not (m := regex.search(self.buf)):
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before {pattern!r}: {self.buf[-300:]!r}")
            self.buf += data
        out, self.buf = self.buf[: m.end()], self.buf[m.end():]
        return out

    def login(self) -> None:
        self.sock.sendall(_header(DOMAIN))
        self.until(rb"</stream:features>")
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        self.sock.sendall(
            f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"
            .encode())
        self.until(rb"<success[^>]*(/>|</success>)")
        self.sock.sendall(_header(DOMAIN))
        self.until(rb"</stream:features>")
        self.sock.sendall(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:"
                          b"xmpp-bind'><resource>probe</resource></bind></iq>")
        self.until(rb"</iq>")

    def ping_ms(self, n: int) -> float:
        started = time.perf_counter()
        self.sock.sendall(f"<iq type='get' id='p{n}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/>"
                          "</iq>".encode())
        self.until(rb"<iq [^>]*id='p%d'[^>]*(/>|</iq>)" % n)
        return (time.perf_counter() - started) * 1000


class Prober(threading.Thread):
    """Pings back to back; records every round trip with its start time."""

    def __init__(self, client: Raw) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.recorded = threading.Condition()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            started = time.perf_counter()
            ms = self.client.ping_ms(n)
            with self.recorded:
                self.samples.append((started, ms))
                self.recorded.notify_all()
            n += 1

    def worst_ms(self, since: float, until: float) -> float:
        """The longest round trip that overlapped [since, until]. Waits for
        a ping sent after `until`: the one in flight during a stall is only
        recorded when its answer comes, which may be after `until`."""
        with self.recorded:
            self.recorded.wait_for(lambda: self.samples[-1][0] > until, timeout=READ_TIMEOUT)
            return max((ms for start, ms in self.samples
                        if start <= until and start + ms / 1000 >= since), default=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlink_server(src: Path) -> Iterator[int]:
    """`mlink init` + one user + `mlink serve --shards 1`, running `src`'s
    mlink package; yields the c2s port."""
    env = {"PYTHONPATH": str(src)}
    work = Path(tempfile.mkdtemp(prefix="jid-stall-"))
    setup = work / "setup"
    port = _free_port()
    ports = [str(port), str(_free_port()), str(_free_port())]

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "mlink.admin.cli", *args], check=True,
                       capture_output=True, env=env, cwd=work)

    cli("init", str(setup), "--domain", DOMAIN, "--c2s-port", ports[0],
        "--tls-port", ports[1], "--ws-port", ports[2])
    config = setup / "mlink.xml"
    text = config.read_text().replace('required="true"', 'required="false"')
    config.write_text(re.sub(r'<log level="\w+"/>', '<log level="warning"/>', text))
    (work / "users.txt").write_text(f"{USER}@{DOMAIN} {PASSWORD}\n")
    cli("user", "import", str(work / "users.txt"), "--config", str(config))
    # Its own process group: a shard still busy preparing a JID when we stop
    # is killed with the supervisor.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlink.admin.cli", "serve", "--config", str(config),
         "--shards", "1"],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlink serve did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def stall_ms(port: int, prober: Prober, text: str) -> tuple[float, float, str]:
    """Send `text` as a stream `to`: the worst ping round trip meanwhile,
    how long the stream error took to come, and its condition."""
    attacker = Raw(port)
    started = time.perf_counter()
    attacker.sock.sendall(_header(text))
    reply = attacker.until(rb"</stream:stream>")
    ended = time.perf_counter()
    attacker.sock.close()
    m = re.search(rb"<stream:error><([a-z-]+)", reply)
    condition = m.group(1).decode() if m else "no error"
    return prober.worst_ms(started, ended), (ended - started) * 1000, condition


# -- main ------------------------------------------------------------------------------


def export_revision(rev: str, dest: Path) -> str:
    """`rev`'s mlink/ package into `dest`; returns the short commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                            check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "mlink"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="measure this git revision's mlink (default: work tree)")
    ap.add_argument("--sizes", default="4,9,18,64", help="KiB, comma separated")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--no-server", action="store_true", help="prepare times only")
    ap.add_argument("--reps", type=int, default=3,
                    help="runs per input; the medians are printed (the machine is shared)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    patterns = args.patterns.split(",")

    src = ROOT
    label = "work tree"
    with tempfile.TemporaryDirectory() as tmp:
        if args.rev:
            src = Path(tmp)
            label = export_revision(args.rev, src)
        sys.path.insert(0, str(src))
        print(f"mlink: {label}; Python {sys.version.split()[0]}")
        with contextlib.ExitStack() as stack:
            prober: Prober | None = None
            port = 0
            if not args.no_server:
                port = stack.enter_context(mlink_server(src))
                probe = Raw(port)
                probe.login()
                base = sorted(probe.ping_ms(-i) for i in range(1, 201))
                print(f"ping round trip, idle: median {base[100]:.2f} ms, max {base[-1]:.2f} ms")
                prober = Prober(probe)
                prober.start()
            print(f"{'input':24} {'KiB':>4} {'prepare ms':>11} {'stall ms':>9} "
                  f"{'error ms':>9}  server says")
            for name in patterns:
                for size in sizes:
                    text = PATTERNS[name](size * KIB)
                    runs = [prepare_ms(text) for _ in range(args.reps)]
                    ms, outcome = statistics.median(r[0] for r in runs), runs[0][1]
                    stall, reply, said = ("", "", "")
                    if prober is not None:
                        served = [stall_ms(port, prober, text) for _ in range(args.reps)]
                        stall = f"{statistics.median(r[0] for r in served):.1f}"
                        reply = f"{statistics.median(r[1] for r in served):.1f}"
                        said = "/".join(sorted({r[2] for r in served}))
                    print(f"{name:24} {size:>4} {ms:>11.1f} {stall:>9} {reply:>9}  "
                          f"{said or outcome}", flush=True)
            # SASL user names: at most the 4,096-octet message cap.
            for name, char in (("sasl-user katakana", "\u30fb"), ("sasl-user arabic", "\u0664")):
                text = char * (SASL_CAP // len(char.encode()) - 1) + HAN
                runs = [sasl_user_ms(text) for _ in range(args.reps)]
                ms = statistics.median(r[0] for r in runs)
                print(f"{name:24} {4:>4} {ms:>11.1f} {'':>9} {'':>9}  {runs[0][1]}", flush=True)
            if prober is not None:
                prober.stop.set()
                prober.join()


if __name__ == "__main__":
    main()
