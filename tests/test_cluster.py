"""A three-node OpenBao Raft cluster behind the OpenBao backend: reads and writes through any
node, and failover when the active node is SIGKILLed (tests/cluster.py)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from secretfs.backends.openbao import OpenBaoBackend
from secretfs.errors import SecretfsError
from secretfs.model import Label
from tests.cluster import Cluster, cluster  # noqa: F401  (the fixture)
from tests.helpers import eventually
from tests.openbao import requires_openbao

T = TypeVar("T")

pytestmark = [requires_openbao]

ELECTION_BOUND = 20.0  # seconds for a new active node after the old one is SIGKILLed


_seen: list[str] = []


def _try(call: Callable[[], T]) -> T | None:
    """*call*'s result, or None (the error noted in _seen) on a backend error."""
    try:
        return call()
    except SecretfsError as error:
        _seen.append(str(error))
        return None


def backend(cluster: Cluster, addresses: list[str]) -> OpenBaoBackend:  # noqa: F811
    return OpenBaoBackend(addresses, token=cluster.root_token, timeout=5)


def test_cluster_forms_and_every_node_serves(cluster: Cluster) -> None:  # noqa: F811
    servers = cluster.raft_servers()
    assert sorted(server["node_id"] for server in servers) == ["node-0", "node-1", "node-2"]
    assert all(server["voter"] for server in servers)
    leader = cluster.leader()
    healths = [node.health() for node in cluster.nodes]
    assert healths.count(200) == 1 and healths[leader] == 200
    assert sorted(h for i, h in enumerate(healths) if i != leader) == [429, 429]  # standbys

    # raw KV: written on the leader, read through each node (standbys forward to the active)
    value = "v-" + secrets.token_hex(8)
    cluster.api("POST", "secret/data/raw", {"data": {"value": value}}, node=leader)
    # OpenBao 2.x standbys are "read-enabled": they answer reads from their own Raft copy
    # (not forwarded), so a read right after a write may briefly miss it (404) on a standby.
    for index in range(3):
        def read(index: int = index) -> dict | None:
            response = cluster.api("GET", "secret/data/raw", node=index, check=False)
            return response.json()["data"]["data"] if response.status_code == 200 else None
        assert eventually(read, timeout=5) == {"value": value}

    # the backend, all three addresses
    everywhere = backend(cluster, cluster.addresses)
    secret = b"pw-" + secrets.token_hex(8).encode()
    try:
        assert everywhere.write_version("db", secret) == 1
        assert everywhere.read_value("db", 1) == secret
    finally:
        everywhere.close()

    # A backend pointed only at a standby: writes are forwarded to the active node, and this
    # process reads its own writes at once — the standby's copy may lag by a few milliseconds,
    # but each request carries the newest X-Vault-Index seen, so a lagging standby forwards.
    standby = next(i for i in range(3) if i != leader)
    only_standby = backend(cluster, [cluster.addresses[standby]])
    try:
        assert eventually(lambda: _try(lambda: only_standby.read_value("db", 1)),
                          timeout=5) == secret  # another process's write: eventually
        for round_ in range(20):
            value = secrets.token_bytes(12)
            version = only_standby.write_version("db", value)
            assert version == round_ + 2
            assert only_standby.read_value("db", version) == value  # at once
            labels = only_standby.read_metadata("db").labels
            assert labels[Label.CURRENT] == version and labels[Label.PREVIOUS] == version - 1
    finally:
        only_standby.close()


def test_leader_sigkill_fails_over(cluster: Cluster) -> None:  # noqa: F811
    leader = cluster.leader()
    order = [cluster.addresses[leader]] + [a for i, a in enumerate(cluster.addresses)
                                           if i != leader]
    client = backend(cluster, order)  # the leader first
    secret = b"before-" + secrets.token_hex(8).encode()
    try:
        assert client.write_version("db", secret) == 1
        assert client.read_value("db", 1) == secret

        killed = time.monotonic()
        cluster.kill(leader)
        # the first read after the kill: the dead first address is skipped
        assert client.read_value("db", 1) == secret
        first_read = time.monotonic() - killed

        new_leader = cluster.wait_for_leader(exclude=[leader], timeout=ELECTION_BOUND)
        election = time.monotonic() - killed
        assert new_leader != leader

        started = time.monotonic()
        written = eventually(lambda: _try(lambda: client.write_version("db", b"after")),
                             timeout=ELECTION_BOUND, interval=0.2)
        write_after = time.monotonic() - started
        assert written == 2, f"no write through the backend within {ELECTION_BOUND}s: {_seen}"
        assert client.read_value("db", 2) == b"after"
        assert client.read_value("db", 1) == secret
        print(f"\nfailover: first read {first_read:.2f}s after SIGKILL, "
              f"new leader node-{new_leader} after {election:.2f}s, "
              f"first write {write_after:.2f}s after that; refused meanwhile: {_seen}")

        # the killed node comes back, rejoins and sees the write made while it was down
        cluster.restart(leader)
        cluster.wait_for_voters()
        # (it reads locally, so it may lag a moment while it catches up)
        def caught_up() -> bool:
            body = cluster.api("GET", "secret/data/db", node=leader, check=False).json()
            return (body.get("data") or {}).get("data", {}).get("value") == "after"
        assert eventually(caught_up, timeout=10)
    finally:
        client.close()




def test_a_frozen_leader_costs_a_read_at_most_one_request_timeout(
        cluster: Cluster) -> None:  # noqa: F811
    """SIGSTOP of the active node (a hung VM, not a dead one: connections open, nothing
    answers). Every read still returns within the request timeout — through a standby, from
    its own copy when no node can answer at this process's Raft index — and writes resume
    once a new leader is elected."""
    import signal

    leader = cluster.leader()
    order = [cluster.addresses[leader]] + [a for i, a in enumerate(cluster.addresses)
                                           if i != leader]
    timeout = 3.0
    writer = OpenBaoBackend(order, token=cluster.root_token, timeout=timeout)  # has an index
    reader = OpenBaoBackend(list(reversed(order)), token=cluster.root_token, timeout=timeout)
    process = cluster.nodes[leader]._process
    assert process is not None
    try:
        value = secrets.token_bytes(12)
        writer.write_version("db", value)
        assert eventually(lambda: _try(lambda: reader.read_value("db", 1)) == value)
        process.send_signal(signal.SIGSTOP)
        timings = []
        for client in (writer, reader, writer, reader):
            started = time.monotonic()
            assert client.read_value("db", 1) == value
            timings.append(time.monotonic() - started)
        assert max(timings) <= timeout + 0.3, timings
        new_leader = cluster.wait_for_leader(exclude=[leader], timeout=ELECTION_BOUND)
        written = eventually(lambda: _try(lambda: writer.write_version("db", b"after")),
                             timeout=ELECTION_BOUND, interval=0.2)
        assert written == 2, _seen
        print(f"\nfrozen leader: reads took {', '.join(f'{t:.2f}s' for t in timings)}; "
              f"node-{new_leader} active; a write went through")
    finally:
        process.send_signal(signal.SIGCONT)
        writer.close()
        reader.close()
