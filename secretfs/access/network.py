"""The network a caller is in: the addresses of its network namespace.

A FUSE request carries no peer address, so an ``ip_range`` condition looks at where the calling
process sits: the addresses configured in its network namespace (a container's, or the host's).
They are read from ``/proc/PID/net`` — the kernel's view *from that process's namespace* — with
no extra privilege and no need to enter the namespace. Loopback and link-local addresses say
nothing about where a process is, so they are left out.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PROC = Path("/proc")
CACHE_SECONDS = 5.0  # addresses can change (DHCP, container restarts): re-read this often


def _ipv4_local(fib_trie: str) -> set[ipaddress.IPv4Address]:
    """The LOCAL /32 entries of /proc/PID/net/fib_trie: the namespace's own IPv4 addresses."""
    found: set[ipaddress.IPv4Address] = set()
    candidate = None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            candidate = text[3:].strip()
        elif candidate and text.startswith("/32") and text.endswith("LOCAL"):
            found.add(ipaddress.IPv4Address(candidate))
    return found


def _ipv6(if_inet6: str) -> set[ipaddress.IPv6Address]:
    """The addresses of /proc/PID/net/if_inet6 (one per line: 32 hex digits first)."""
    return {ipaddress.IPv6Address(int(line.split()[0], 16))
            for line in if_inet6.splitlines() if line.strip()}


def namespace_addresses(pid: int, proc: Path = PROC) -> tuple[IPAddress, ...]:
    """The addresses of *pid*'s network namespace, without loopback and link-local ones.

    Empty when the process is gone or /proc cannot be read (an ip_range condition then fails).
    """
    addresses: set[IPAddress] = set()
    for name, parse in (("fib_trie", _ipv4_local), ("if_inet6", _ipv6)):
        try:
            text = (proc / str(pid) / "net" / name).read_text()
        except OSError:
            continue
        addresses |= parse(text)
    kept = (a for a in addresses if not (a.is_loopback or a.is_link_local))
    return tuple(sorted(kept, key=lambda a: (a.version, int(a))))


class AddressCache:
    """namespace_addresses per network namespace (many processes share one), briefly cached."""

    def __init__(self, *, proc: Path = PROC, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._proc = proc
        self._clock = clock
        self._by_namespace: dict[int, tuple[float, tuple[IPAddress, ...]]] = {}

    def addresses(self, pid: int) -> tuple[IPAddress, ...]:
        try:
            namespace = os.stat(self._proc / str(pid) / "ns" / "net").st_ino
        except OSError:
            return ()
        now = self._clock()
        cached = self._by_namespace.get(namespace)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        found = namespace_addresses(pid, self._proc)
        if len(self._by_namespace) > 1024:
            self._by_namespace.clear()
        self._by_namespace[namespace] = (now, found)
        return found
