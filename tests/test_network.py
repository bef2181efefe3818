"""The addresses of a caller's network namespace, as an ip_range condition sees them."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time

import pytest

from secretfs.access.network import AddressCache, _ipv4_local, _ipv6, namespace_addresses

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 10.1.2.0/24 2 0 2
           |-- 10.1.2.0
              /24 link UNICAST
           |-- 10.1.2.3
              /32 host LOCAL
        |-- 10.1.2.255
           /32 link BROADCAST
"""


def test_parsing_proc_net() -> None:
    assert _ipv4_local(FIB_TRIE) == {ipaddress.IPv4Address("127.0.0.1"),
                                     ipaddress.IPv4Address("10.1.2.3")}
    assert _ipv6("fd000000000000000000000000000002 04 40 00 82     eth0\n") == {
        ipaddress.IPv6Address("fd00::2")}


def test_this_process_has_no_loopback_in_its_answer() -> None:
    found = namespace_addresses(os.getpid())
    assert all(not a.is_loopback and not a.is_link_local for a in found)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("ip") is None, reason="needs root, unshare and ip")
def test_a_process_in_its_own_network_namespace() -> None:
    script = ("ip link add veth0 type veth peer name veth1 && "
              "ip addr add 10.1.2.3/24 dev veth0 && ip link set veth0 up && "
              "ip link set veth1 up && ip link set lo up && exec sleep 20")
    child = subprocess.Popen(["unshare", "--net", "sh", "-c", script])
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        found: tuple = ()
        while time.monotonic() < deadline:  # until the child is in its namespace, set up
            moved = os.stat(f"/proc/{child.pid}/ns/net").st_ino != ours
            found = namespace_addresses(child.pid) if moved else ()
            if found:
                break
            time.sleep(0.05)
        assert found == (ipaddress.IPv4Address("10.1.2.3"),)
        assert ipaddress.IPv4Address("10.1.2.3") not in namespace_addresses(os.getpid())
        cache = AddressCache()
        assert cache.addresses(child.pid) == found
    finally:
        child.kill()
        child.wait()
    assert AddressCache().addresses(child.pid) == ()  # gone: no address, so no match
