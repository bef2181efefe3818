"""Which node of a cluster a client asks (secretfs/backends/nodes.py): sticky, down nodes last
and health-checked in the background until they serve again."""

from __future__ import annotations

import threading
import time

from secretfs.backends.nodes import FIRST_CHECK, Nodes, NodeStatus
from tests.helpers import eventually

A, B, C = "http://a:8200", "http://b:8200", "http://c:8200"


class Health:
    """A health endpoint per address whose answer the test sets; counts the checks."""

    def __init__(self) -> None:
        self.roles = {A: "active", B: "standby", C: "standby"}
        self.checks: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, address: str, timeout: float) -> NodeStatus:
        with self.lock:
            self.checks.append(address)
        return NodeStatus(address, self.roles[address])


def addresses(nodes: Nodes) -> list[str]:
    return [node.address for node in nodes.order()]


def test_the_node_that_answered_last_is_asked_first() -> None:
    nodes = Nodes([A, B, C], Health())
    assert addresses(nodes) == [A, B, C]
    nodes.answered(nodes.nodes[2])
    assert addresses(nodes) == [C, A, B]  # sticky; the rest in the configured order
    assert nodes.find("http://b:8200/v1/secret/data/x?version=1") is nodes.nodes[1]
    assert nodes.find("http://elsewhere:8200/v1/x") is None


def test_a_down_node_goes_last_and_a_health_check_brings_it_back() -> None:
    health = Health()
    health.roles[A] = "unreachable"
    nodes = Nodes([A, B, C], health)
    try:
        nodes.failed(nodes.nodes[0], "cannot connect")
        assert addresses(nodes) == [B, C, A]  # still tried, after the others
        assert nodes.nodes[0].problem == "cannot connect"
        time.sleep(FIRST_CHECK * 2)
        assert health.checks.count(A) >= 1 and nodes.nodes[0].down  # checked, still down
        health.roles[A] = "standby"  # it serves again
        assert eventually(lambda: not nodes.nodes[0].down, timeout=5)
        assert addresses(nodes) == [A, B, C]
        assert set(health.checks) == {A}  # only the down node was checked
    finally:
        nodes.close()


def test_checks_back_off_and_stop_when_closed() -> None:
    health = Health()
    health.roles[B] = "sealed"  # a sealed node does not serve: it stays down
    nodes = Nodes([A, B], health)
    nodes.failed(nodes.nodes[1], "HTTP 503")
    time.sleep(2.2)  # checks at ~0.5 s, ~1.5 s (backing off), the next not before ~3.5 s
    assert 1 <= len(health.checks) <= 3, health.checks
    assert nodes.nodes[1].failed_checks >= 1 and nodes.nodes[1].problem == "sealed"
    nodes.close()
    checked = len(health.checks)
    time.sleep(1.5)
    assert len(health.checks) == checked  # no check after close
    assert not any(thread.name == "secretfs-node-health" and thread.is_alive()
                   for thread in threading.enumerate())


def test_a_request_getting_through_ends_the_outage_without_waiting_for_a_check() -> None:
    health = Health()
    health.roles[A] = "unreachable"
    nodes = Nodes([A, B], health)
    try:
        nodes.failed(nodes.nodes[0], "cannot connect")
        nodes.failed(nodes.nodes[1], "cannot connect")
        assert addresses(nodes) == [A, B]  # all down: each still tried, in order
        nodes.answered(nodes.nodes[1])
        assert not nodes.nodes[1].down and addresses(nodes) == [B, A]
    finally:
        nodes.close()


def test_status_asks_every_node() -> None:
    health = Health()
    health.roles[C] = "unreachable"
    nodes = Nodes([A, B, C], health)
    assert [(status.address, status.role, status.serving) for status in nodes.status()] == [
        (A, "active", True), (B, "standby", True), (C, "unreachable", False)]


def test_states_tell_each_node_as_last_found_without_asking() -> None:
    health = Health()
    nodes = Nodes([A, B], health)
    try:
        nodes.answered(nodes.nodes[1])
        nodes.failed(nodes.nodes[0], "cannot connect")
        assert nodes.states() == [
            {"address": A, "state": "down", "problem": "cannot connect", "preferred": False},
            {"address": B, "state": "up", "problem": "", "preferred": True}]
        assert health.checks == []  # nothing was asked for that
    finally:
        nodes.close()
