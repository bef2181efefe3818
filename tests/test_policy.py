"""Policies and the policy engine (secretfs.access.policy)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secretfs.access.identity import container_from_cgroup, unit_from_cgroup
from secretfs.access.policy import (
    AccessPolicy,
    CallerFacts,
    PolicyEngine,
    Rule,
    builtin_policy,
    glob_match,
)
from secretfs.access.principal import Caller
from secretfs.config import Condition, PrincipalSpec, parse_config
from tests.helpers import SEED_POLICY


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.at = now
        self.calls = 0

    def now(self) -> datetime:
        self.calls += 1
        return self.at


def at(hour: int, minute: int = 0, day: int = 2) -> datetime:
    """2026-11-{day} (the 2nd is a Monday) at hour:minute UTC."""
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def facts_from(address: str | None):
    def facts(caller: Caller) -> CallerFacts:
        return CallerFacts(() if address is None else (ipaddress.ip_address(address),))

    return facts


def seed_engine(now: datetime, address: str | None = "10.1.2.3") -> PolicyEngine:
    return PolicyEngine.from_config(parse_config(SEED_POLICY), clock=FixedClock(now),
                                    facts=facts_from(address))


SERVICE_A = Caller(uid=1001, gid=1001, pid=4242, start_time=1)


# -- the seed's example ------------------------------------------------------------------------


def test_seed_policy_allows_reads_in_office_hours_from_the_network() -> None:
    engine = seed_engine(at(10))
    for resource in ("db_password", "api_keys/x", "api_keys/a/b"):
        decision = engine.check(SERVICE_A, "read", resource)
        assert decision.allowed, decision
        assert decision.principal == "service-a"
    assert "allow rule" in engine.check(SERVICE_A, "read", "db_password").reason


def test_seed_policy_denies_other_actions_and_resources() -> None:
    engine = seed_engine(at(10))
    write = engine.check(SERVICE_A, "write", "db_password")
    assert not write.allowed and "no allow rule matches write db_password" in write.reason
    assert not engine.check(SERVICE_A, "read", "other").allowed
    for resource in ("db_password", "api_keys/x", "anything"):
        delete = engine.check(SERVICE_A, "delete", resource)
        assert not delete.allowed
        assert delete.reason == "deny rule: delete *"


@pytest.mark.parametrize("now", [at(8, 59), at(17, 0), at(23, 30)])
def test_seed_policy_outside_the_time_window(now: datetime) -> None:
    decision = seed_engine(now).check(SERVICE_A, "read", "db_password")
    assert not decision.allowed
    assert "time_window 09:00-17:00" in decision.reason


def test_seed_policy_from_another_network() -> None:
    decision = seed_engine(at(10), "192.168.1.5").check(SERVICE_A, "read", "db_password")
    assert not decision.allowed and "ip_range 10.0.0.0/8" in decision.reason


def test_ipv4_mapped_address_counts_as_ipv4() -> None:
    decision = seed_engine(at(10), "::ffff:10.1.2.3").check(SERVICE_A, "read", "db_password")
    assert decision.allowed, decision


def test_no_address_known_fails_closed() -> None:
    decision = seed_engine(at(10), None).check(SERVICE_A, "read", "db_password")
    assert not decision.allowed and "no address known" in decision.reason


def test_unknown_uid_is_anonymous_and_denied() -> None:
    engine = seed_engine(at(10))
    stranger = Caller(uid=2002, gid=2002, pid=99, start_time=1)
    assert engine.principal_of(stranger)[0] == "anonymous"
    decision = engine.check(stranger, "read", "db_password")
    assert not decision.allowed and decision.principal == "anonymous"
    assert "no policy" in decision.reason


def test_principal_of_explains_the_match() -> None:
    expected = ("service-a", "uid 1001 matches service-a")
    assert seed_engine(at(10)).principal_of(SERVICE_A) == expected


def test_seed_builder_and_check_access() -> None:
    policy = (AccessPolicy().with_allow("read", "db_password").with_allow("write", "api_keys/*")
              .with_deny("delete", "*")
              .with_conditions(Condition("ip_range", "10.0.0.0/8")))
    engine = PolicyEngine({}, {}, clock=FixedClock(at(10)))
    assert not engine.check_access("service-a", "read", "db_password").allowed
    engine.apply_policy("service-a", policy)
    inside = CallerFacts((ipaddress.ip_address("10.0.0.1"),))
    assert engine.check_access("service-a", "read", "db_password", inside).allowed
    assert engine.check_access("service-a", "write", "api_keys/k", inside).allowed
    assert not engine.check_access("service-a", "delete", "api_keys/k", inside).allowed
    assert not engine.check_access("service-a", "read", "db_password").allowed


# -- properties --------------------------------------------------------------------------------


def reference_match(pattern: str, name: str) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        return any(reference_match(rest, name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    return (head == "?" or head == name[0]) and reference_match(rest, name[1:])


names = st.text(alphabet="ab/.", max_size=8)
patterns = st.text(alphabet="ab/.*?", max_size=8)
ACTION = st.sampled_from(["read", "list", "write", "delete", "rotate"])
rules = st.builds(Rule, st.frozensets(st.sampled_from(["read", "write", "delete", "*"]),
                                      min_size=1),
                  st.lists(patterns, min_size=1, max_size=3).map(tuple))


@given(patterns, names)
def test_glob_match_agrees_with_the_reference(pattern: str, name: str) -> None:
    assert glob_match(pattern, name) == reference_match(pattern, name)


def test_glob_is_literal_apart_from_star_and_question_mark() -> None:
    assert glob_match("a.b[1]", "a.b[1]") and not glob_match("a.b", "axb")
    assert glob_match("api_keys/*", "api_keys/x/y") and not glob_match("api_keys/?", "api_keys/")


@given(st.lists(rules, max_size=3), st.lists(rules, min_size=1, max_size=3), ACTION, names)
def test_deny_always_wins(allow: list[Rule], deny: list[Rule], action: str, name: str) -> None:
    policy = AccessPolicy(tuple(allow), tuple(deny))
    allowed, reason = policy.evaluate(action, name, CallerFacts(), FixedClock(at(10)))
    if any(rule.matches(action, name) for rule in deny):
        assert not allowed and reason.startswith("deny rule")
    else:
        assert allowed == any(rule.matches(action, name) for rule in allow)


@given(st.lists(rules, max_size=3), ACTION, names)
def test_no_allow_means_deny(deny: list[Rule], action: str, name: str) -> None:
    allowed, _ = AccessPolicy((), tuple(deny)).evaluate(action, name, CallerFacts(),
                                                         FixedClock(at(10)))
    assert not allowed


# -- time windows ------------------------------------------------------------------------------


def window_allows(window: str, now: datetime) -> bool:
    policy = AccessPolicy((Rule(frozenset({"*"}), ("*",)),),
                          conditions=(Condition("time_window", window),))
    return policy.evaluate("read", "x", CallerFacts(), FixedClock(now))[0]


FRI, SAT, SUN = 6, 7, 8  # November 2026


@pytest.mark.parametrize(("now", "expected"), [
    (at(23, 0, FRI), True),
    (at(1, 0, SAT), True),  # the window began on Friday
    (at(23, 0, SAT), False),
    (at(5, 59, SAT), True),
    (at(6, 0, SAT), False),  # end-exclusive
    (at(22, 0, FRI), True),  # start-inclusive
    (at(1, 0, FRI), False),  # began on Thursday
    (at(12, 0, FRI), False),
])
def test_window_across_midnight_with_days(now: datetime, expected: bool) -> None:
    assert window_allows("22:00-06:00 Fri", now) is expected


def test_day_lists_and_ranges() -> None:
    assert window_allows("09:00-17:00 Mon-Wed,Fri", at(10, 0, 2))  # Monday
    assert not window_allows("09:00-17:00 Mon-Wed,Fri", at(10, 0, 5))  # Thursday
    assert window_allows("09:00-17:00 Sat,Sun", at(10, 0, SUN))
    assert not window_allows("09:00-17:00 Mon-Fri", at(10, 0, SAT))
    assert window_allows("09:00-17:00 Fri-Mon", at(10, 0, SUN))  # a range may wrap


def test_window_time_zone() -> None:
    # 08:30 UTC in November is 09:30 in Berlin (UTC+1)
    assert window_allows("09:00-17:00 tz=Europe/Berlin", at(8, 30))
    assert not window_allows("09:00-17:00", at(8, 30))
    assert not window_allows("09:00-17:00 tz=Europe/Berlin", at(16, 30))
    # without tz the clock's own zone is used
    berlin = datetime(2026, 11, 2, 9, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert window_allows("09:00-17:00", berlin)


def test_window_ending_at_24_00() -> None:
    assert window_allows("18:00-24:00", at(23, 59))
    assert not window_allows("18:00-24:00", at(0, 0))
    assert not window_allows("18:00-24:00", at(17, 59))


# -- principals --------------------------------------------------------------------------------


def exe_engine(identity: tuple[int, int] | None) -> PolicyEngine:
    spec = PrincipalSpec(name="tool", exe="/usr/bin/tool*")
    return PolicyEngine({"tool": spec}, {}, exe_identity=lambda path: identity)


def test_exe_rule_requires_the_same_file() -> None:
    caller = Caller(uid=5, gid=5, pid=7, exe="/usr/bin/tool-x", exe_id=(1, 99))
    assert exe_engine((1, 99)).principal_of(caller)[0] == "tool"
    assert exe_engine((1, 100)).principal_of(caller)[0] == "anonymous"  # bind-mounted over
    assert exe_engine(None).principal_of(caller)[0] == "anonymous"
    other = Caller(uid=5, gid=5, pid=7, exe="/usr/bin/other", exe_id=(1, 99))
    assert exe_engine((1, 99)).principal_of(other)[0] == "anonymous"


def test_all_matchers_must_match_and_first_wins() -> None:
    principals = {
        "both": PrincipalSpec(name="both", uid=5, unit="web*.service", cmdline="python *"),
        "uid": PrincipalSpec(name="uid", uid=5),
        "sha": PrincipalSpec(name="sha", exe_sha256="ab" * 32),
    }
    engine = PolicyEngine(principals, {}, unit_of=lambda c: "web1.service",
                          cmdline=lambda c: "python app.py", exe_digest=lambda c: "ab" * 32)
    assert engine.principal_of(Caller(uid=5, gid=1, pid=1))[0] == "both"
    assert engine.principal_of(Caller(uid=6, gid=1, pid=1))[0] == "sha"
    engine.cmdline = lambda c: "bash"
    assert engine.principal_of(Caller(uid=5, gid=1, pid=1))[0] == "uid"


def test_user_group_container_matchers() -> None:
    principals = {"c": PrincipalSpec(name="c", user="alice", group="staff", container="abc*")}
    engine = PolicyEngine(principals, {}, user_of=lambda c: "alice",
                          group_of=lambda c: "staff", container_of=lambda c: "abc123")
    assert engine.principal_of(Caller(uid=5, gid=1, pid=1))[0] == "c"
    engine.container_of = lambda c: None
    assert engine.principal_of(Caller(uid=5, gid=1, pid=1))[0] == "anonymous"


def test_cgroup_parsing() -> None:
    cid = "0123456789abcdef" * 4
    assert unit_from_cgroup("/system.slice/nginx.service") == "nginx.service"
    assert unit_from_cgroup("/user.slice/user-1000.slice/session-2.scope") == "session-2.scope"
    assert unit_from_cgroup("/") is None
    assert container_from_cgroup(f"/system.slice/docker-{cid}.scope") == cid
    assert container_from_cgroup(f"/docker/{cid}") == cid
    assert container_from_cgroup(f"/machine.slice/libpod-{cid}.scope") == cid
    assert container_from_cgroup(f"/kubepods/crio-{cid}.scope") == cid
    # cgroupfs drivers: kubelet, podman, containerd namespaces (nerdctl), nested cgroups
    assert container_from_cgroup(f"/kubepods/burstable/pod1f2e-33/{cid}") == cid
    assert container_from_cgroup(f"/libpod_parent/libpod-{cid}") == cid
    assert container_from_cgroup(f"/default/{cid}") == cid
    assert container_from_cgroup(f"/system.slice/nerdctl-{cid}.scope") == cid
    assert container_from_cgroup(f"/machine.slice/libpod-{cid}.scope/container") == cid
    assert container_from_cgroup(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e.slice/"
        f"cri-containerd-{cid}.scope") == cid
    # not a container: a unit, a shorter or longer hex run, hex inside a longer name
    assert container_from_cgroup("/system.slice/nginx.service") is None
    assert container_from_cgroup(f"/docker/{cid[:63]}") is None
    assert container_from_cgroup(f"/docker/{cid}0") is None
    assert container_from_cgroup(f"/system.slice/app-{cid}.service") is None
    assert container_from_cgroup("/system.slice/nginx.service") is None


# -- the decision cache ------------------------------------------------------------------------


def test_decisions_are_cached_until_a_policy_changes() -> None:
    evaluations = 0

    def counting_facts(caller: Caller) -> CallerFacts:
        nonlocal evaluations
        evaluations += 1
        return CallerFacts()

    principals = {"svc": PrincipalSpec(name="svc", uid=1001)}
    engine = PolicyEngine(principals, {"svc": AccessPolicy().with_allow("read", "*")},
                          facts=counting_facts)
    assert engine.check(SERVICE_A, "read", "x").allowed
    assert engine.check(SERVICE_A, "read", "x").allowed
    assert evaluations == 1
    generation = engine.generation
    engine.apply_policy("svc", AccessPolicy().with_deny("read", "x"))
    assert engine.generation == generation + 1
    decision = engine.check(SERVICE_A, "read", "x")
    assert not decision.allowed and decision.reason == "deny rule: read x"
    assert evaluations == 2


def test_time_window_policies_are_not_cached() -> None:
    clock = FixedClock(at(10))
    engine = PolicyEngine.from_config(parse_config(SEED_POLICY), clock=clock,
                                      facts=facts_from("10.1.2.3"))
    assert engine.check(SERVICE_A, "read", "db_password").allowed
    clock.at = at(18)
    assert not engine.check(SERVICE_A, "read", "db_password").allowed
    assert clock.calls == 2


# -- the built-in policy -----------------------------------------------------------------------


@pytest.mark.parametrize("uid", [0, 1000, 1001, 65534])
@pytest.mark.parametrize("action", ["read", "write", "delete", "list", "rotate"])
def test_builtin_policy_lets_only_root_and_the_owner_in(uid: int, action: str) -> None:
    caller = Caller(uid=uid, gid=uid, pid=10 + uid, start_time=1)
    decision = builtin_policy(1000).check(caller, action, "a/b")
    assert decision.allowed is (uid in (0, 1000))


def test_no_caller_means_this_process() -> None:
    import os

    engine = builtin_policy(os.geteuid())
    decision = engine.check(None, "read", "x")
    assert decision.allowed and decision.principal in ("root", "owner")
    assert engine.check(None, "read", "x") == decision
