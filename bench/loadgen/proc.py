"""What /proc says about a server (CPU seconds, resident memory) and about
the generator itself. Linux only."""

from __future__ import annotations

import os
import resource
import socket

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except FileNotFoundError:
            continue
    return inodes


def pids_on_port(port: int) -> list[int]:
    """The processes holding a listening socket on `port` (needs the right
    to read their /proc/PID/fd: same user or root)."""
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port)}
    found = []
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") in wanted:
                        found.append(int(entry))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(found)


def with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them (shards, helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of all threads of `pids`, in seconds (10 ms resolution)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14, 15 of stat(5)
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def own_cpu() -> float:
    """This process's user+system CPU seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def require_loopback(host: str) -> None:
    """The generator only ever loads the local machine."""
    import ipaddress

    for info in socket.getaddrinfo(host, None):
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_loopback:
            raise SystemExit(f"refusing non-loopback target {host} ({addr})")


class ServerProcs:
    """The server's processes: given pids (plus descendants) or whoever
    listens on the port."""

    def __init__(self, pids: list[int] | None, port: int) -> None:
        self.given = list(pids or [])
        self.port = port

    def pids(self) -> list[int]:
        base = self.given or pids_on_port(self.port)
        return with_descendants(base) if base else []

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())
