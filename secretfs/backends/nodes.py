"""The nodes of a replicated OpenBao (or Vault) cluster, seen from one client: whom to ask next.

A host lists every node's address (``secrets_manager.backend.address``); the backend asks one
node at a time, in the order :meth:`Nodes.order` gives:

- **sticky**: the node that answered last comes first, so a host's requests stay on one node and
  its kept-alive connection while that node answers;
- then the other nodes that are up, in the configured order (a host lists its nearest first);
- then the nodes that are **down** — ones that could not be reached, or answered as sealed —
  which are health-checked by a background thread (``GET /v1/sys/health``, after 0.5 s, backing
  off to 30 s, jittered) until they answer as active or standby again. They stay in the order,
  last, so when every node is down each is still tried, and the end of a full outage is noticed
  by the next request rather than by the next health check.

How a single request uses this order (its timeout budget, standby redirects, read-your-writes)
is the backend's business (backends/openbao.py); this module is about nodes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("secretfs.backends")

FIRST_CHECK = 0.5  # seconds from a failure to the first health check
LAST_CHECK = 30.0  # the longest wait between two health checks of a down node
CHECK_TIMEOUT = 2.0  # one health check's own timeout

# GET /v1/sys/health answers with the node's role as the status code
ROLES = {200: "active", 429: "standby", 472: "dr-secondary", 473: "performance-standby",
         501: "uninitialized", 503: "sealed"}
SERVING = frozenset({"active", "standby", "performance-standby"})


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What a node's health endpoint said: its role, or "unreachable" (and why)."""

    address: str
    role: str  # a value of ROLES, "unreachable", or "http-<status>" for anything else
    detail: str = ""
    version: str = ""  # the server's version, as its health endpoint reports it

    @property
    def serving(self) -> bool:
        return self.role in SERVING


HealthCheck = Callable[[str, float], NodeStatus]  # (address, timeout) → status


@dataclass(eq=False)
class Node:
    address: str
    down: bool = False
    problem: str = ""  # why it is down (no value, no token: transport errors and statuses)
    failed_checks: int = 0
    next_check: float = 0.0


class Nodes:
    """The cluster's nodes and which of them are down; thread-safe."""

    def __init__(self, addresses: Sequence[str], health: HealthCheck, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = [Node(address) for address in addresses]
        self._health = health
        self._clock = clock
        self._preferred = self.nodes[0]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._checker: threading.Thread | None = None
        self._closed = False

    def order(self) -> list[Node]:
        """The nodes to try for one request, in turn (see the module docstring)."""
        with self._lock:
            up = [node for node in self.nodes if not node.down]
            if self._preferred in up:
                up.remove(self._preferred)
                up.insert(0, self._preferred)
            return up + [node for node in self.nodes if node.down]

    def find(self, url: str) -> Node | None:
        """The node *url* is on, if it is one of ours."""
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        return next((node for node in self.nodes if node.address == origin), None)

    def answered(self, node: Node) -> None:
        """*node* served a request: ask it first from now on."""
        with self._lock:
            self._preferred = node
            if node.down:
                self._up(node)

    def failed(self, node: Node, problem: str) -> None:
        """*node* could not be reached or cannot serve: skip it until a health check passes."""
        with self._lock:
            if node.down or self._closed:
                return
            node.down, node.problem, node.failed_checks = True, problem, 0
            node.next_check = self._clock() + FIRST_CHECK
            # (info, not warning: a one-shot command shows no log, only its own outcome; the
            # daemon logs info, and "backend unavailable" as a warning once no node answers)
            log.info("OpenBao node %s is down (%s); health-checking it in the background",
                     node.address, problem)
            if self._checker is None:
                self._checker = threading.Thread(target=self._check_down_nodes, daemon=True,
                                                 name="secretfs-node-health")
                self._checker.start()
            self._wake.notify()

    def close(self) -> None:
        """Stop health checking (a check under way finishes on its own, within its timeout)."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    def states(self) -> list[dict[str, object]]:
        """Each node as this client last found it (no request): address, up or down and why,
        and whether it is the one asked first."""
        with self._lock:
            return [{"address": node.address, "state": "down" if node.down else "up",
                     "problem": node.problem, "preferred": node is self._preferred}
                    for node in self.nodes]

    def status(self, timeout: float = CHECK_TIMEOUT) -> list[NodeStatus]:
        """Every node's role, asked now and at once (for ``secretfs doctor``): answers within
        *timeout* however many nodes do not."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(lambda node: self._health(node.address, timeout), self.nodes))

    # -- the health checker --------------------------------------------------------------------

    def _up(self, node: Node) -> None:
        node.down, node.problem = False, ""
        log.info("OpenBao node %s answers again", node.address)

    def _check_down_nodes(self) -> None:
        """The background thread: health-check down nodes when due; end when none is down."""
        while True:
            with self._lock:
                while True:
                    down = [node for node in self.nodes if node.down]
                    if self._closed or not down:
                        self._checker = None
                        return
                    due = min(down, key=lambda node: node.next_check)
                    wait = due.next_check - self._clock()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
            status = self._health(due.address, CHECK_TIMEOUT)
            with self._lock:
                if not due.down:
                    continue  # a request got through to it meanwhile
                if status.serving:
                    self._up(due)
                    continue
                due.failed_checks += 1
                due.problem = status.detail or status.role
                delay = min(FIRST_CHECK * 2 ** due.failed_checks, LAST_CHECK)
                due.next_check = self._clock() + delay * random.uniform(0.8, 1.2)
