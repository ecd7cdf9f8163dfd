"""`mlink serve`: start N shard processes, restart the ones that die, stop
them all on SIGTERM/SIGINT, reload the configuration on SIGHUP, and answer
`mlink status` and `mlink reload`.

The supervisor holds no sessions and never touches client traffic: every
shard binds every listener itself (SO_REUSEPORT), so a supervisor bug
cannot stall clients, and the supervisor stays small enough to trust.
`--shards 1` runs exactly this path with one shard process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from mlink import __version__
from mlink.config_model import Config
from mlink.shard.control import ControlError, LineChannel
from mlink.shard.fdlimit import raise_nofile_limit
from mlink.util.logsetup import ReopeningFileHandler

log = logging.getLogger(__name__)

# Restart delays for a shard that dies: the first restart is quick (a
# one-off crash costs half a second of that shard's capacity), then the
# delay doubles so a shard that crashes at start (bad disk, broken
# directory) is logged every 30 s instead of spinning a core.
RESTART_INITIAL = 0.5
RESTART_MAX = 30.0
# A shard up this long is healthy again: its next crash restarts quickly.
STABLE_UPTIME = 60.0
# After SIGTERM, shards get this long to end their streams and finish
# durable writes (Server.SHUTDOWN_GRACE is 5 s, plus closing the store);
# then they are killed, so a stop always ends.
STOP_TIMEOUT = 20.0
# How long a shard has to answer a stats request: it answers from its own
# loop, so a shard that takes longer is stuck, and status says so rather
# than hang.
STATS_TIMEOUT = 2.0
# The shard and bus counters go to the log this often, so a deployment
# without `mlink status` in its monitoring still has the figures.
STATUS_LOG_INTERVAL = 60.0
# The control socket's name in the data directory.
CONTROL_SOCKET = "mlink.control"
# `mlink status` waits this long for the supervisor's answer (it asks every
# shard, each bounded by STATS_TIMEOUT).
STATUS_CLIENT_TIMEOUT = 10.0
# sockaddr_un holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# How long each shard has to re-read the file and apply it: a few
# milliseconds of parsing and a certificate load; a shard slower than this
# is stuck, and the reload reports it rather than hang.
RELOAD_TIMEOUT = 10.0
# A client of the control socket sends its request line within this time;
# one that sends nothing (an older `mlink status`) gets the status.
REQUEST_TIMEOUT = 2.0
# The longest request line a control client may send.
MAX_REQUEST_BYTES = 4096


def default_shards(config: Config) -> int:
    """One shard per CPU core, except that a listener on port 0 (a free
    port picked by the kernel, as tests use) cannot be shared: each shard
    would get another port. Such a configuration runs one shard."""
    if any(lc.port == 0 for lc in config.listeners):
        return 1
    return os.cpu_count() or 1


def check_shards(config: Config, shards: int) -> None:
    """ValueError when `shards` cannot serve `config`."""
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, not {shards}")
    if shards > 1 and any(lc.port == 0 for lc in config.listeners):
        raise ValueError("several shards need fixed listener ports: port 0 would give each "
                         "shard a different one")


def check_ports_free(config: Config) -> None:
    """OSError when a listener's port is taken by another process.

    Shards bind with SO_REUSEPORT, which the kernel also grants to another
    program of the same user already holding the port with it (another
    mlink, say): both would then get a share of the connections, silently.
    A plain bind, without SO_REUSEPORT, fails on any such holder."""
    wanted = [(lc.address, lc.port, f"{lc.kind} listener") for lc in config.listeners]
    if config.console.enabled:
        wanted.append((config.console.address, config.console.port, "console"))
    _probe_ports(wanted)


def check_new_listeners(old: Config, new: Config, shards: int) -> None:
    """ValueError or OSError (one line) when a reload from `old` to `new`
    adds a listener the shards could not all share: port 0 with several
    shards, or a port another process holds (see check_ports_free). Ports
    the shards hold already are not probed: they would seem taken."""
    check_shards(new, shards)
    held = {lc.port for lc in old.listeners}
    _probe_ports([(lc.address, lc.port, f"{lc.kind} listener") for lc in new.listeners
                  if lc not in old.listeners and lc.port not in held])


def _probe_ports(wanted: list[tuple[str, int, str]]) -> None:
    for address, port, what in wanted:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as exc:
                # Named as it is: a port held is not an address this host
                # lacks, nor a privileged port.
                problem = "is in use" if exc.errno in (errno.EADDRINUSE, None) \
                    else f"cannot be bound: {exc.strerror or exc}"
                raise OSError(exc.errno, f"port {port} on {address} {problem} "
                              f"({what})") from None


def control_path(config: Config) -> Path:
    return config.data_dir / CONTROL_SOCKET


@dataclass(eq=False)
class ShardState:
    index: int
    process: trio.Process | None = None
    started: float = 0.0
    restarts: int = 0
    ready: bool = False
    # True once this shard has been ready at least once: a shard that
    # never got that far failed to start, and restarting will not help.
    ever_ready: bool = False
    control: LineChannel | None = None
    stats: dict[str, Any] | None = None
    stats_lock: trio.Lock = field(default_factory=trio.Lock)
    stats_reply: trio.Event = field(default_factory=trio.Event)
    reload_result: dict[str, Any] | None = None
    reload_reply: trio.Event = field(default_factory=trio.Event)
    # One query (sessions, kick) at a time per shard, and its answer.
    query_lock: trio.Lock = field(default_factory=trio.Lock)
    query_result: dict[str, Any] | None = None
    query_reply: trio.Event = field(default_factory=trio.Event)


class Supervisor:
    def __init__(self, config_path: Path, config: Config, shards: int) -> None:
        self.config_path = config_path
        # The configuration in force; replaced by each accepted reload.
        self.config = config
        # The one the shards started with (what restart-only settings still
        # are), and the last reload refused (shown by status and the console).
        self.started_config = config
        self.last_reload_error: str | None = None
        # Fixed at start: a reload that moves the data directory needs a
        # restart, and the socket to remove at exit is the one we made.
        self.control_socket = control_path(config)
        self._reload_lock = trio.Lock()
        self.shards = [ShardState(i) for i in range(shards)]
        self.bus_dir: Path | None = None
        self.started = time.monotonic()
        self.stopping = False
        self.failed = False
        self._stop_event = trio.Event()
        self._all_ready_logged = False
        self._services: trio.Nursery | None = None

    # -- running ------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise until stopped; 0 after a requested stop, 1 when the
        shards could not start."""
        self.bus_dir = Path(tempfile.mkdtemp(prefix="mlink-bus-"))  # mode 0700
        listener = await _listen_control(self.control_socket)
        try:
            async with trio.open_nursery() as services:
                self._services = services
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                               signal.SIGHUP, signal.SIGUSR1) as signals:
                    services.start_soon(self._watch_signals, signals)
                    services.start_soon(self._serve_status, listener)
                    services.start_soon(self._log_status_periodically)
                    if self.config.configuration.source == "directory":
                        # Settings held in the directory apply live: a
                        # change there is a reload (mlink.config_directory).
                        from mlink.config_directory import watch_configuration

                        services.start_soon(watch_configuration, self.config, self.reload)
                    if self.config.console.enabled:
                        # Imported only here: the web stack stays out of
                        # shards and of servers without a console.
                        from mlink.console import serve_console

                        await services.start(serve_console, self)
                    log.info("starting %d shard(s)", len(self.shards))
                    async with trio.open_nursery() as shard_tasks:
                        for state in self.shards:
                            shard_tasks.start_soon(self._supervise, state)
                services.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            _unlink(self.control_socket)
            shutil.rmtree(self.bus_dir, ignore_errors=True)
        log.info("stopped")
        return 1 if self.failed else 0

    def stop(self) -> None:
        """Ask every shard to stop (SIGTERM); kill the ones still running
        after STOP_TIMEOUT."""
        if self.stopping:
            return
        self.stopping = True
        self._stop_event.set()
        for state in self.shards:
            if state.process is not None and state.process.returncode is None:
                state.process.send_signal(signal.SIGTERM)
        if self._services is not None:
            self._services.start_soon(self._kill_after_timeout)

    async def _kill_after_timeout(self) -> None:
        await trio.sleep(STOP_TIMEOUT)
        for state in self.shards:
            if state.process is not None and state.process.returncode is None:
                log.warning("shard %d (pid %d) did not stop in %.0f s; killing it",
                            state.index, state.process.pid, STOP_TIMEOUT)
                state.process.kill()

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                # logrotate moved the log file: reopen ours, and the shards'.
                for handler in logging.getLogger().handlers:
                    if isinstance(handler, ReopeningFileHandler):
                        handler.request_reopen()
                for state in self.shards:
                    if state.process is not None and state.process.returncode is None:
                        state.process.send_signal(signal.SIGUSR1)
                log.info("received SIGUSR1; log file reopened")
                continue
            if signum == signal.SIGHUP:
                if not self.stopping and self._services is not None:
                    log.info("received SIGHUP; reloading %s", self.config_path)
                    self._services.start_soon(self.reload)
                continue
            if not self.stopping:
                log.info("received %s; stopping %d shard(s)", signal.Signals(signum).name,
                         len(self.shards))
            self.stop()

    def _command(self, state: ShardState, control_fd: int) -> list[str]:
        assert self.bus_dir is not None
        return [
            # -P: a folder named "mlink" in the working directory must not
            # shadow the installed package (Python 3.11+).
            sys.executable, "-P", "-m", "mlink.shard.worker",
            "--index", str(state.index), "--shards", str(len(self.shards)),
            "--bus-dir", str(self.bus_dir), "--config", str(self.config_path),
            "--control-fd", str(control_fd),
        ]

    async def _supervise(self, state: ShardState) -> None:
        """Run shard `state.index` until the supervisor stops, restarting
        it with backoff whenever it dies."""
        delay = RESTART_INITIAL
        while not self.stopping:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                process = await trio.lowlevel.open_process(
                    self._command(state, theirs.fileno()),
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            state.process, state.started, state.ready = process, time.monotonic(), False
            state.control = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            log.info("shard %d started (pid %d)", state.index, process.pid)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_control, state, state.control)
                    await process.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    await state.control.aclose()
                state.control, state.ready = None, False
            uptime = time.monotonic() - state.started
            log.info("shard %d (pid %d) exited with %s after %.1f s", state.index, process.pid,
                     _describe_status(process.returncode), uptime)
            if self.stopping:
                return
            if not state.ever_ready:
                log.error("shard %d failed to start; stopping", state.index)
                self.failed = True
                self.stop()
                return
            if uptime >= STABLE_UPTIME:
                delay = RESTART_INITIAL
            state.restarts += 1
            if delay >= RESTART_MAX:
                log.warning("shard %d is crash-looping; restart #%d in %.1f s",
                            state.index, state.restarts, delay)
            else:
                log.info("restarting shard %d in %.1f s (restart #%d)",
                         state.index, delay, state.restarts)
            with trio.move_on_after(delay):
                await self._stop_event.wait()
            delay = min(delay * 2, RESTART_MAX)

    async def _read_control(self, state: ShardState, control: LineChannel) -> None:
        try:
            while (message := await control.receive()) is not None:
                op = message.get("op")
                if op == "ready":
                    state.ready = state.ever_ready = True
                    log.info("shard %d ready (pid %d)", state.index, message.get("pid", 0))
                    if not self._all_ready_logged and all(s.ready for s in self.shards):
                        self._all_ready_logged = True
                        log.info("all %d shard(s) ready", len(self.shards))
                elif op == "stats":
                    state.stats = message
                    state.stats_reply.set()
                elif op == "reloaded":
                    state.reload_result = message
                    state.reload_reply.set()
                elif op in ("sessions", "kicked"):
                    state.query_result = message
                    state.query_reply.set()
        except (ControlError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            log.warning("shard %d control channel failed: %s", state.index, exc)

    # -- reload -------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration file and have every shard apply it.

        The supervisor reads it first, so a bad file is refused once, with
        its one-line error, and no shard is asked. Settings that need a
        restart are logged here, once, not by every shard. The answer is
        what `mlink reload` prints: `ok`, `error`, `restart` (names)."""
        from mlink.config import ConfigError
        from mlink.reload import load_checked_async, restart_needed

        async with self._reload_lock:
            try:
                new = await load_checked_async(self.config_path)
            except ConfigError as exc:
                log.error("configuration reload refused: %s", exc)
                self.last_reload_error = str(exc)
                return {"ok": False, "error": str(exc)}
            try:
                check_new_listeners(self.config, new, len(self.shards))
            except (OSError, ValueError) as exc:
                error = f"{self._config_source()}: {exc.strerror or exc}" \
                    if isinstance(exc, OSError) else f"{self._config_source()}: {exc}"
                log.error("configuration reload refused: %s", error)
                self.last_reload_error = error
                return {"ok": False, "error": error}
            results: dict[int, dict[str, Any] | None] = {}

            async def ask(state: ShardState) -> None:
                results[state.index] = await self._shard_reload(state)

            async with trio.open_nursery() as nursery:
                for state in self.shards:
                    nursery.start_soon(ask, state)
            errors = [(i, r.get("error", "no answer") if r else "no answer")
                      for i, r in sorted(results.items()) if r is None or not r.get("ok")]
            applied = len(self.shards) - len(errors)
            for index, error in errors:
                log.error("shard %d did not apply the reload: %s", index, error)
            if applied == 0 and self.shards:
                self.last_reload_error = errors[0][1]
                return {"ok": False, "error": errors[0][1]}
            restart = restart_needed(self.config, new)
            for name in restart:
                log.warning("%s changed in %s: needs a restart to apply", name,
                            self._config_source())
            if new.log_level != self.config.log_level:
                logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
            self.config = new
            self.last_reload_error = None
            log.info("configuration reloaded by %d of %d shard(s)", applied, len(self.shards))
            # What happened to the listeners, as the first shard that
            # applied the file says (they all do the same).
            listeners: list[str] = next((r.get("listeners", []) for _, r in sorted(results.items())
                              if r and r.get("ok") and not r.get("down")), [])
            answer: dict[str, Any] = {"ok": not errors, "restart": restart,
                                      "listeners": listeners}
            if errors:
                answer["error"] = "; ".join(f"shard {i}: {e}" for i, e in errors)
            return answer

    def _config_source(self) -> str:
        """Where the settings are read: the file, or the directory entry."""
        source = self.config.configuration
        return f"the directory entry {source.entry}" if source.source == "directory" \
            else str(self.config_path)

    async def _shard_reload(self, state: ShardState) -> dict[str, Any] | None:
        """One shard's reload answer; None when it is down or stuck. A
        shard that is down reads the file when it restarts anyway."""
        async with state.stats_lock:
            control = state.control
            if control is None or not state.ready:
                return {"ok": True, "down": True}
            state.reload_reply = trio.Event()
            state.reload_result = None
            with trio.move_on_after(RELOAD_TIMEOUT):
                try:
                    await control.send({"op": "reload"})
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return None
                await state.reload_reply.wait()
            return state.reload_result

    # -- status -------------------------------------------------------------------

    async def _shard_stats(self, state: ShardState) -> dict[str, Any] | None:
        """Fresh counters from one shard, or None if it is down or stuck."""
        async with state.stats_lock:
            control = state.control
            if control is None or not state.ready:
                return None
            state.stats_reply = trio.Event()
            state.stats = None
            with trio.move_on_after(STATS_TIMEOUT):
                try:
                    await control.send({"op": "stats"})
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return None
                await state.stats_reply.wait()
            return state.stats

    async def _ask_shard(self, state: ShardState, request: dict[str, Any]
                         ) -> dict[str, Any] | None:
        """One shard's answer to a query op (`sessions`, `kick`), or None
        if it is down or does not answer within STATS_TIMEOUT."""
        async with state.query_lock:
            control = state.control
            if control is None or not state.ready:
                return None
            state.query_reply = trio.Event()
            state.query_result = None
            with trio.move_on_after(STATS_TIMEOUT):
                try:
                    await control.send(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return None
                await state.query_reply.wait()
            return state.query_result

    async def ask_every_shard(self, request: dict[str, Any]) -> dict[int, dict[str, Any] | None]:
        replies: dict[int, dict[str, Any] | None] = {}

        async def ask(state: ShardState) -> None:
            replies[state.index] = await self._ask_shard(state, request)

        async with trio.open_nursery() as nursery:
            for state in self.shards:
                nursery.start_soon(ask, state)
        return replies

    async def sessions(self, user: str | None) -> dict[str, Any]:
        """Every bound session on every shard (of `user` when given)."""
        replies = await self.ask_every_shard({"op": "sessions", "user": user})
        found = [{**one, "shard": index} for index, reply in sorted(replies.items())
                 if reply is not None for one in reply.get("sessions", [])]
        missing = [index for index, reply in sorted(replies.items()) if reply is None]
        return {"ok": True, "sessions": found, "unanswered": missing}

    async def kick(self, jid: str, text: str) -> dict[str, Any]:
        """End `jid`'s sessions (a full JID: that one) on every shard."""
        replies = await self.ask_every_shard({"op": "kick", "jid": jid, "text": text})
        ended = sorted(e for reply in replies.values() if reply is not None
                       for e in reply.get("ended", []))
        missing = [index for index, reply in sorted(replies.items()) if reply is None]
        return {"ok": True, "ended": ended, "unanswered": missing}

    async def status(self) -> dict[str, Any]:
        """The whole server's state, as `mlink status` prints it."""
        replies: dict[int, dict[str, Any] | None] = {}

        async def ask(state: ShardState) -> None:
            replies[state.index] = await self._shard_stats(state)

        async with trio.open_nursery() as nursery:
            for state in self.shards:
                nursery.start_soon(ask, state)
        now = time.monotonic()
        shards = []
        for state in self.shards:
            alive = state.process is not None and state.process.returncode is None
            shards.append({
                "index": state.index,
                "pid": state.process.pid if alive and state.process else None,
                "state": "ready" if state.ready else ("starting" if alive else "down"),
                "uptime": now - state.started if alive else 0.0,
                "restarts": state.restarts,
                "stats": replies.get(state.index),
            })
        from mlink.reload import restart_needed

        return {"pid": os.getpid(), "uptime": now - self.started, "shards": shards,
                "version": __version__,
                "configuration": {"source": self._config_source(),
                                  "restart_needed": restart_needed(self.started_config,
                                                                   self.config),
                                  "reload_refused": self.last_reload_error}}

    async def _serve_status(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._answer_status, stream)

    async def _answer_status(self, stream: trio.SocketStream) -> None:
        """One request per connection: a line `{"op": "reload"}` or
        `{"op": "status"}`; nothing within REQUEST_TIMEOUT means status."""
        async with stream:
            try:
                request = await _read_request(stream)
                if request.get("op") == "reload":
                    reply = await self.reload()
                elif request.get("op") == "end-user" and isinstance(request.get("jid"), str):
                    reply = self.end_user(request["jid"], str(request.get("text", "")),
                                          removed=request.get("removed") is True)
                elif request.get("op") == "sessions":
                    user = request.get("user")
                    reply = await self.sessions(user if isinstance(user, str) else None)
                elif request.get("op") == "kick" and isinstance(request.get("jid"), str):
                    reply = await self.kick(request["jid"], str(request.get("text", "")))
                else:
                    reply = await self.status()
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, OSError):
                pass  # the client went away; nothing to tell

    def end_user(self, jid: str, text: str, removed: bool = False) -> dict[str, Any]:
        """End `jid`'s sessions on every shard (the account was deleted or
        disabled); each shard ends its own. Sent without waiting for the
        shards: a shard that is down has no sessions to end. `removed`:
        the account was deleted, and each shard fires `account/removed`
        (an LDAP change feed cannot see the deletion)."""
        sent = 0
        services = self._services
        for state in self.shards:
            control = state.control
            if control is not None and services is not None:
                services.start_soon(control.send, {"op": "end-user", "jid": jid,
                                                         "text": text, "removed": removed})
                sent += 1
        log.info("ending the sessions of %s on %d shard(s): %s", jid, sent, text)
        return {"ok": True, "shards": sent}

    def invalidate(self, user: str, what: str) -> None:
        """Have every shard drop its cached `what` ("profile") of `user`,
        which the console changed; sent without waiting, like end_user."""
        services = self._services
        for state in self.shards:
            control = state.control
            if control is not None and services is not None:
                services.start_soon(control.send, {"op": "invalidate", "user": user,
                                                   "what": what})

    async def _log_status_periodically(self) -> None:
        """The status table in the log, at DEBUG: useful when chasing a
        problem, noise in an INFO log (`mlink status` shows it on demand)."""
        while True:
            await trio.sleep(STATUS_LOG_INTERVAL)
            if not log.isEnabledFor(logging.DEBUG):
                continue
            for line in format_status(await self.status()).splitlines():
                log.debug("status: %s", line)


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    """The client's request line, or {} when it sends none in time."""
    buffer = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\n" not in buffer and len(buffer) <= MAX_REQUEST_BYTES:
            chunk = await stream.receive_some(MAX_REQUEST_BYTES)
            if not chunk:
                break
            buffer += chunk
    try:
        request = json.loads(buffer.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {}
    return request if isinstance(request, dict) else {}


def _describe_status(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


async def _listen_control(path: Path) -> trio.SocketListener:
    """The control socket, 0600: status shows session counts and pids,
    which only the server's own user should see. A socket left by a
    supervisor that died is replaced; one that answers means a server is
    already running on this data directory, which must not start twice."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise OSError(f"control socket path too long for a Unix socket: {path}")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            _unlink(path)
        else:
            raise OSError(f"a server is already running on this data directory ({path})")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return trio.SocketListener(sock)


def run_supervisor(config_path: Path, config: Config, shards: int) -> int:
    """Block running the supervisor; its exit status. The shards it starts
    inherit the raised file-descriptor limit."""
    raise_nofile_limit()
    return trio.run(Supervisor(config_path, config, shards).run)


# -- `mlink status` -----------------------------------------------------------------


def query_status(config: Config) -> dict[str, Any]:
    """Ask the running supervisor for its status; OSError when none runs."""
    return _request(control_path(config), {"op": "status"}, STATUS_CLIENT_TIMEOUT)


def request_status(data_dir: Path) -> dict[str, Any]:
    """`query_status` for the server running on `data_dir` (found without
    reading the whole configuration, which may be what is broken)."""
    return _request(data_dir / CONTROL_SOCKET, {"op": "status"}, STATUS_CLIENT_TIMEOUT)


def request_end_user(data_dir: Path, jid: str, text: str,
                     removed: bool = False) -> dict[str, Any]:
    """Ask the supervisor running on `data_dir` to end `jid`'s sessions on
    every shard (and, `removed`, to tell modules the account is gone).
    OSError when none runs."""
    return _request(data_dir / CONTROL_SOCKET,
                    {"op": "end-user", "jid": jid, "text": text, "removed": removed},
                    STATUS_CLIENT_TIMEOUT)


def request_sessions(data_dir: Path, user: str | None = None) -> dict[str, Any]:
    """The running server's sessions (`mlink session list`)."""
    return _request(data_dir / CONTROL_SOCKET, {"op": "sessions", "user": user},
                    STATUS_CLIENT_TIMEOUT)


def request_kick(data_dir: Path, jid: str, text: str) -> dict[str, Any]:
    """End sessions on the running server (`mlink session kick`)."""
    return _request(data_dir / CONTROL_SOCKET, {"op": "kick", "jid": jid, "text": text},
                    STATUS_CLIENT_TIMEOUT)


def request_reload(data_dir: Path) -> dict[str, Any]:
    """Ask the supervisor running on `data_dir` to reload its configuration
    file; its answer (`ok`, `error`, `restart`). OSError when none runs."""
    # Every shard gets RELOAD_TIMEOUT, in parallel; allow for the file read.
    return _request(data_dir / CONTROL_SOCKET, {"op": "reload"}, RELOAD_TIMEOUT * 2)


def _request(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(f"no server is running (no control socket at {path})") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise OSError(f"{path}: the server sent an unreadable answer") from None
    return reply


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(status: dict[str, Any]) -> str:
    """The status as people read it: one line per shard, one per bus link."""
    shards = status["shards"]
    sessions = sum((s["stats"] or {}).get("sessions", 0) for s in shards)
    version = status.get("version")
    lines = [
        (f"mlink {version}, " if version else "")
        + f"supervisor pid {status['pid']}, up {_duration(status['uptime'])}, "
        f"{len(shards)} shard(s), {sessions} session(s)",
        f"{'shard':>5} {'pid':>8} {'state':<8} {'uptime':>8} {'restarts':>8} "
        f"{'conns':>7} {'sessions':>8} {'stalls':>6} {'longest':>8}",
    ]
    configuration = status.get("configuration") or {}
    if configuration.get("restart_needed"):
        lines.insert(1, f"configuration ({configuration['source']}): changed, needs a restart: "
                        + ", ".join(configuration["restart_needed"]))
    if configuration.get("reload_refused"):
        lines.insert(1, f"last configuration change refused: {configuration['reload_refused']}")
    # The listeners, once when every shard has the same (as after a reload
    # they all applied), else per shard.
    listenings = {tuple(st["listeners"]) for s in shards
                  if (st := s["stats"]) and "listeners" in st}
    if len(listenings) == 1:
        lines.insert(1, "listening: " + (", ".join(next(iter(listenings))) or "nothing"))
    for s in shards:
        stats = s["stats"] or {}
        loop = stats.get("loop") or {}
        longest = f"{loop['longest_ms']:.0f}ms" if loop.get("stalls") else "-"
        lines.append(
            f"{s['index']:>5} {s['pid'] or '-':>8} {s['state']:<8} {_duration(s['uptime']):>8} "
            f"{s['restarts']:>8} {stats.get('connections', '-'):>7} "
            f"{stats.get('sessions', '-'):>8} {loop.get('stalls', '-'):>6} {longest:>8}"
        )
        if len(listenings) > 1:
            lines.append("      listening: " + (", ".join(stats.get("listeners") or ()) or "-"))
        if loop.get("cause"):
            lines.append(f"      longest stall in: {loop['cause']}")
        caches = stats.get("caches") or {}
        if caches:
            lines.append("      caches: " + ", ".join(
                f"{name} {size[0]}/{size[1]}" for name, size in sorted(caches.items())))
    links = [(s["index"], stats) for s in shards if (stats := s["stats"])]
    for index, stats in links:
        limits = stats.get("limits") or {}
        if any(limits.values()):
            lines.append(
                f"  shard {index} limits: {limits.get('refused', 0)} connection(s) refused, "
                f"{limits.get('penalised_addresses', 0)} address(es) and "
                f"{limits.get('penalised_accounts', 0)} account(s) with authentication "
                "failures on record")
    if any(stats["bus"] for _, stats in links):
        lines.append("bus links (from->to: frames/bytes out, frames/bytes in, mean batch, "
                     "drops full/down, connects):")
        for index, stats in links:
            up = set(stats.get("peers_up", []))
            for peer, c in sorted(stats["bus"].items(), key=lambda kv: int(kv[0])):
                batch = f"{c['frames_out'] / c['writes']:.1f}" if c["writes"] else "-"
                lines.append(
                    f"  {index}->{peer}: {c['frames_out']}/{c['bytes_out']} out, "
                    f"{c['frames_in']}/{c['bytes_in']} in, batch {batch}, "
                    f"drops {c['drops_full']}/{c['drops_down']}, connects {c['connects']}"
                    f"{'' if int(peer) in up else ', DOWN'}"
                )
    return "\n".join(lines)
