"""A throw-away three-node OpenBao cluster (Raft storage) for failover tests and benchmarks.

``running_cluster(workdir)`` starts three ``bao server`` processes (not ``-dev``) on 127.0.0.1,
each with its own HCL config (``node-N/config.hcl``), Raft data folder and log
(``node-N/server.log``); every node's ``retry_join`` names all three API addresses. Then it

1. initialises node 0 (``PUT /v1/sys/init``, one key share) and unseals it,
2. waits until node 0 is the active node, enables KV v2 at ``secret/`` and lowers autopilot's
   server stabilization time (so followers become voters in ~1 s instead of 10 s),
3. unseals nodes 1 and 2 (with a Shamir seal the unseal key is what lets a follower answer the
   leader's join challenge: they join via ``retry_join`` and unseal),
4. waits until the Raft configuration lists three voters.

Every step has a deadline; a failure names the step and each node's log file. ``finally``
always SIGKILLs all nodes. The root token and unseal key are kept on the ``Cluster`` object and
never printed (they are not in any error message either).

``Cluster`` offers per-node ``start``/``stop`` (SIGTERM)/``kill`` (SIGKILL)/``restart`` (start
and unseal, it rejoins from its Raft data), ``leader()`` and ``wait_for_leader(exclude=…)``;
for the whole cluster ``stop_all`` (SIGTERM each) and ``restart_all`` (start, unseal each, wait
for a leader).
Use the ``cluster`` fixture (``from tests.cluster import cluster``); tests skip when no ``bao``
binary is found.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.helpers import free_port
from tests.openbao import clean_env, find_bao

T = TypeVar("T")

NODES = 3
START_TIMEOUT = 30.0  # one node's API answering
STEP_TIMEOUT = 30.0  # init, unseal/join, voters, leader election

CONFIG = """\
ui = false
disable_mlock = true
api_addr = "http://127.0.0.1:{api}"
cluster_addr = "https://127.0.0.1:{cluster}"
cluster_name = "secretfs-test"
log_level = "info"

storage "raft" {{
  path = "{data}"
  node_id = "{node_id}"
  performance_multiplier = 1
{joins}
}}

listener "tcp" {{
  address = "127.0.0.1:{api}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}
"""


class ClusterError(RuntimeError):
    pass


class Node:
    """One ``bao server`` process of the cluster."""

    def __init__(self, binary: str, index: int, workdir: Path) -> None:
        self.binary = binary
        self.index = index
        self.node_id = f"node-{index}"
        self.workdir = workdir / self.node_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "raft"
        self.data.mkdir(exist_ok=True)
        self.config = self.workdir / "config.hcl"
        self.log = self.workdir / "server.log"
        self.api_port = free_port()
        self.cluster_port = free_port()
        self.address = f"http://127.0.0.1:{self.api_port}"
        self._process: subprocess.Popen[bytes] | None = None

    def write_config(self, peers: Iterable[str]) -> None:
        joins = "\n".join(
            f'  retry_join {{\n    leader_api_addr = "{peer}"\n  }}' for peer in peers
        )
        self.config.write_text(CONFIG.format(
            api=self.api_port, cluster=self.cluster_port, data=self.data, node_id=self.node_id,
            joins=joins,
        ))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process and wait until its API answers (sealed is fine)."""
        if self.running:
            return
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "server", f"-config={self.config}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**clean_env(), "HOME": str(self.workdir)}, cwd=self.workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ClusterError(f"{self.node_id} exited early; see {self.log}")
            try:
                httpx.get(f"{self.address}/v1/sys/seal-status", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise ClusterError(f"{self.node_id} did not answer within {START_TIMEOUT}s; "
                           f"see {self.log}")

    def _end(self, sig: int) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash (SIGKILL)."""
        self._end(signal.SIGKILL)

    def api(self, method: str, path: str, json: Mapping[str, Any] | None = None, *,
            token: str | None = None, timeout: float = 5) -> httpx.Response:
        headers = {"X-Vault-Token": token} if token else {}
        return httpx.request(method, f"{self.address}/v1/{path.lstrip('/')}", json=json,
                             headers=headers, timeout=timeout)

    def health(self) -> int | None:
        """/v1/sys/health's status: 200 active, 429 standby, 503 sealed, 501 not initialised;
        None when it does not answer."""
        if not self.running:
            return None
        try:
            return self.api("GET", "sys/health", timeout=2).status_code
        except httpx.TransportError:
            return None


class Cluster:
    """Three Raft nodes; ``addresses[i]`` is node i's API address."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes = [Node(binary, index, workdir) for index in range(NODES)]
        for node in self.nodes:
            node.write_config(self.addresses)
        self.root_token = ""
        self.unseal_key = ""

    def __repr__(self) -> str:  # never shows the token or key
        return f"Cluster({', '.join(self.addresses)})"

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def logs(self) -> str:
        return ", ".join(str(node.log) for node in self.nodes)

    def _wait(self, what: str, check: Callable[[], T | None],
              timeout: float = STEP_TIMEOUT, interval: float = 0.1) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check()
            except httpx.TransportError:
                result = None
            if result is not None and result is not False:
                return result
            if time.monotonic() > deadline:
                raise ClusterError(f"{what}: not done within {timeout}s; see {self.logs}")
            time.sleep(interval)

    # -- forming -------------------------------------------------------------------------------

    def form(self) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        response = first.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1},
                             timeout=30)
        if response.status_code != 200:
            raise ClusterError(f"init of {first.node_id}: HTTP {response.status_code}; "
                               f"see {first.log}")
        body = response.json()
        self.root_token = body["root_token"]
        self.unseal_key = body["keys_base64"][0]
        self.unseal(0)
        self._wait("node-0 becoming active", lambda: first.health() == 200)
        self.api("POST", "sys/storage/raft/autopilot/configuration",
                 {"server_stabilization_time": "1s", "cleanup_dead_servers": False})
        self.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        with ThreadPoolExecutor(NODES - 1) as pool:  # the followers join in parallel
            for done in [pool.submit(self.unseal, index) for index in range(1, NODES)]:
                done.result()
        self.wait_for_voters()

    def unseal(self, index: int, timeout: float = STEP_TIMEOUT) -> None:
        """Give node *index* the unseal key (again while it is still joining) until unsealed."""
        node = self.nodes[index]

        def unsealed() -> bool:
            status = node.api("GET", "sys/seal-status").json()
            if not status.get("sealed", True):
                return True
            # a follower that has not joined yet answers an error and joins meanwhile
            node.api("PUT", "sys/unseal", {"key": self.unseal_key}, timeout=15)
            return False

        self._wait(f"unsealing {node.node_id}", unsealed, timeout, interval=0.2)

    def wait_for_voters(self, count: int = NODES, timeout: float = STEP_TIMEOUT) -> list[dict]:
        """Wait until the Raft configuration lists *count* servers, all voters."""
        def voters() -> list[dict] | None:
            servers = self.raft_servers()
            if len(servers) == count and all(server.get("voter") for server in servers):
                return servers
            return None

        return self._wait(f"{count} raft voters", voters, timeout)

    # -- requests ------------------------------------------------------------------------------

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    def api(self, method: str, path: str, json: Mapping[str, Any] | None = None, *,
            node: int | None = None, check: bool = True) -> httpx.Response:
        """A root request to node *node*, else to the active node (path without ``/v1/``)."""
        target = self.nodes[self.leader() if node is None else node]
        response = target.api(method, path, json, token=self.root_token, timeout=15)
        if check and response.status_code >= 400:
            raise ClusterError(f"{method} {path} on {target.node_id}: "
                               f"HTTP {response.status_code}; see {target.log}")
        return response

    def raft_servers(self) -> list[dict]:
        response = self.api("GET", "sys/storage/raft/configuration")
        return response.json()["data"]["config"]["servers"]

    def leader(self) -> int:
        """The index of the active node (per GET /v1/sys/leader); ClusterError when none."""
        for node in self.live():
            try:
                body = node.api("GET", "sys/leader", timeout=2).json()
            except (httpx.TransportError, ValueError):
                continue
            if body.get("is_self") and node.health() == 200:
                return node.index
        raise ClusterError(f"no active node; see {self.logs}")

    def wait_for_leader(self, exclude: Iterable[int] = (), timeout: float = STEP_TIMEOUT) -> int:
        """Wait until an active node other than those in *exclude* exists; its index."""
        excluded = set(exclude)

        def found() -> int | None:
            try:
                index = self.leader()
            except ClusterError:
                return None
            return None if index in excluded else index

        return self._wait(f"a leader other than {sorted(excluded)}", found, timeout,
                          interval=0.05)

    # -- per node ------------------------------------------------------------------------------

    def start(self, index: int) -> None:
        self.nodes[index].start()

    def stop(self, index: int) -> None:
        self.nodes[index].stop()

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start node *index* again (after stop/kill) and unseal it; it rejoins from its data."""
        self.nodes[index].kill()
        self.nodes[index].start()
        self.unseal(index)

    def kill_all(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()

    def stop_all(self) -> None:
        """A clean shutdown (SIGTERM) of every node at once: the whole cluster is down."""
        with ThreadPoolExecutor(NODES) as pool:
            for done in [pool.submit(node.stop) for node in self.nodes]:
                done.result()

    def restart_all(self, timeout: float = STEP_TIMEOUT) -> int:
        """Start every node again (after stop_all/kill), unseal each (in parallel: Raft needs a
        quorum of unsealed nodes to elect) and wait for an active node; its index."""
        for node in self.nodes:
            node.kill()  # (a no-op for a stopped node)
            node.start()
        with ThreadPoolExecutor(NODES) as pool:
            for done in [pool.submit(self.unseal, index, timeout) for index in range(NODES)]:
                done.result()
        return self.wait_for_leader(timeout=timeout)


@contextlib.contextmanager
def running_cluster(workdir: Path) -> Iterator[Cluster]:
    """A formed three-node cluster (KV v2 at ``secret/``); all nodes are killed afterwards."""
    binary = find_bao()
    if binary is None:
        pytest.skip("no bao binary")
    cluster = Cluster(binary, workdir)
    try:
        cluster.form()
        yield cluster
    finally:
        cluster.kill_all()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh cluster per test."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    with running_cluster(workdir) as formed:
        yield formed
