"""Policies: which principal may do which action on which secrets, and the engine that answers.

Pure evaluation logic: the caller's facts (addresses, the time) come in as arguments or
injectable callables, so everything here is testable without /proc or FUSE. The default
resolvers of principal matchers (user, group, unit, container, cmdline, exe digest) read /proc
and live in identity.py. docs/policies.md is the user reference.

Evaluation order of one policy: a matching deny rule denies; then every condition must hold;
then a matching allow rule allows; anything else denies.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from secretfs.access import Decision
from secretfs.access.identity import (
    ExeDigests,
    container_id,
    group_name,
    read_cmdline,
    stat_identity,
    systemd_unit,
    user_name,
)
from secretfs.access.principal import Caller

if TYPE_CHECKING:
    from secretfs.config import Condition, Config, PolicySpec, PrincipalSpec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CACHE_LIMIT = 100_000
ANONYMOUS = "anonymous"


# -- globs ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """Whether *name* matches *pattern*: ``*`` any characters (``/`` included), ``?`` one
    character, everything else literal (no ``[]`` classes)."""
    return _compile(pattern).fullmatch(name) is not None


# -- rules and conditions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Some actions on some resources; the action ``*`` means every action."""

    actions: frozenset[str]
    resources: tuple[str, ...]

    def matches(self, action: str, resource: str) -> bool:
        if "*" not in self.actions and action not in self.actions:
            return False
        return any(glob_match(pattern, resource) for pattern in self.resources)

    def describe(self) -> str:
        return f"{','.join(sorted(self.actions))} {','.join(self.resources)}"


class Clock(Protocol):
    def now(self) -> datetime: ...  # timezone-aware


class SystemClock:
    """The real time, in the local time zone."""

    def now(self) -> datetime:
        return datetime.now(UTC).astimezone()


@dataclass(frozen=True)
class CallerFacts:
    """What conditions look at, resolved by someone else: the request's peer address if any,
    else the addresses of the caller's network namespace."""

    addresses: tuple[IPAddress, ...] = ()


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})(?: ([A-Za-z,-]+))?(?: tz=(\S+))?")


def _parse_days(text: str | None) -> frozenset[int]:
    """``Mon-Fri``, ``Sat,Sun``, ``Mon-Wed,Fri`` (a range may wrap: ``Fri-Mon``) → weekdays."""
    if not text:
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        ends = [_DAYS.index(day.lower()) for day in part.split("-")]
        first, last = ends[0], ends[-1]
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


class _Check:
    """A parsed condition: ``holds(facts, clock)`` → (ok, reason when not ok)."""

    def __init__(self, condition: Condition) -> None:
        self.type, self.value = condition.type, condition.value
        self.label = f"condition {condition.type} {condition.value}"

    def holds(self, facts: CallerFacts, clock: Clock) -> tuple[bool, str]:
        raise NotImplementedError


class _IpRange(_Check):
    def __init__(self, condition: Condition) -> None:
        super().__init__(condition)
        self.networks = tuple(ipaddress.ip_network(part.strip(), strict=False)
                              for part in condition.value.split(","))

    def holds(self, facts: CallerFacts, clock: Clock) -> tuple[bool, str]:
        if not facts.addresses:
            return False, f"{self.label} not met (no address known)"
        for given in facts.addresses:
            # an IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d
            address = getattr(given, "ipv4_mapped", None) or given
            for network in self.networks:
                if address.version == network.version and address in network:
                    return True, ""
        shown = ",".join(str(a) for a in facts.addresses)
        return False, f"{self.label} not met (from {shown})"


class _TimeWindow(_Check):
    def __init__(self, condition: Condition) -> None:
        super().__init__(condition)
        match = _WINDOW.fullmatch(condition.value)
        if match is None:
            raise ValueError(f"{condition.value!r} is not a time window")
        sh, sm, eh, em = (int(x) for x in match.group(1, 2, 3, 4))
        self.start, self.end = sh * 60 + sm, eh * 60 + em
        self.days = _parse_days(match[5])
        self.zone = None
        if match[6]:
            from zoneinfo import ZoneInfo

            self.zone = ZoneInfo(match[6])

    def holds(self, facts: CallerFacts, clock: Clock) -> tuple[bool, str]:
        now = clock.now()
        if self.zone is not None:
            now = now.astimezone(self.zone)
        minute, weekday = now.hour * 60 + now.minute, now.weekday()
        if self.start < self.end:
            inside = self.start <= minute < self.end
        elif minute >= self.start:  # across midnight, before it
            inside = True
        elif minute < self.end:  # across midnight, after it: the window began yesterday
            inside, weekday = True, (weekday - 1) % 7
        else:
            inside = False
        if inside and weekday in self.days:
            return True, ""
        return False, f"{self.label} not met"


_CHECKS: Mapping[str, type[_Check]] = {"ip_range": _IpRange, "time_window": _TimeWindow}


def _parse(condition: Condition) -> _Check:
    try:
        kind = _CHECKS[condition.type]
    except KeyError:
        raise ValueError(f"unknown condition type {condition.type!r}") from None
    return kind(condition)


# -- policies -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessPolicy:
    """The seed's AccessPolicy: allow and deny rules plus conditions that gate the allows."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    conditions: tuple[Condition, ...] = ()
    _checks: tuple[_Check, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checks", tuple(_parse(c) for c in self.conditions))

    @property
    def time_dependent(self) -> bool:
        """Whether the answer can change with time alone (then decisions are not cached)."""
        return any(isinstance(check, _TimeWindow) for check in self._checks)

    def with_allow(self, action: str, resource: str) -> AccessPolicy:
        rule = Rule(frozenset({action}), (resource,))
        return AccessPolicy((*self.allow, rule), self.deny, self.conditions)

    def with_deny(self, action: str, resource: str) -> AccessPolicy:
        rule = Rule(frozenset({action}), (resource,))
        return AccessPolicy(self.allow, (*self.deny, rule), self.conditions)

    def with_conditions(self, *conditions: Condition) -> AccessPolicy:
        return AccessPolicy(self.allow, self.deny, (*self.conditions, *conditions))

    @classmethod
    def from_spec(cls, spec: PolicySpec) -> AccessPolicy:
        def rules(specs: tuple) -> tuple[Rule, ...]:
            return tuple(Rule(frozenset(r.actions), tuple(r.resources)) for r in specs)

        return cls(rules(spec.allow), rules(spec.deny), tuple(spec.conditions))

    def evaluate(
        self, action: str, resource: str, facts: CallerFacts, clock: Clock
    ) -> tuple[bool, str]:
        """(allowed, reason): deny rules, then conditions, then allow rules."""
        for rule in self.deny:
            if rule.matches(action, resource):
                return False, f"deny rule: {rule.describe()}"
        for check in self._checks:
            ok, why = check.holds(facts, clock)
            if not ok:
                return False, why
        for rule in self.allow:
            if rule.matches(action, resource):
                return True, f"allow rule: {rule.describe()}"
        return False, f"no allow rule matches {action} {resource}"


# -- the engine -----------------------------------------------------------------------------------


def _no_facts(caller: Caller) -> CallerFacts:
    return CallerFacts()


class PolicyEngine:
    """Principals + policies → decisions; implements ``secretfs.access.AccessControl``."""

    def __init__(
        self,
        principals: Mapping[str, PrincipalSpec],
        policies: Mapping[str, AccessPolicy],
        *,
        clock: Clock | None = None,
        facts: Callable[[Caller], CallerFacts] | None = None,
        exe_identity: Callable[[str], tuple[int, int] | None] | None = None,
        exe_digest: Callable[[Caller], str | None] | None = None,
        cmdline: Callable[[Caller], str | None] | None = None,
        user_of: Callable[[Caller], str | None] | None = None,
        group_of: Callable[[Caller], str | None] | None = None,
        unit_of: Callable[[Caller], str | None] | None = None,
        container_of: Callable[[Caller], str | None] | None = None,
    ) -> None:
        self.principals = dict(principals)
        self.policies = dict(policies)
        self.clock: Clock = clock or SystemClock()
        self.facts = facts or _no_facts
        self.exe_identity = exe_identity or stat_identity
        self.exe_digest = exe_digest or ExeDigests()
        self.cmdline = cmdline or read_cmdline
        self.user_of = user_of or user_name
        self.group_of = group_of or group_name
        self.unit_of = unit_of or systemd_unit
        self.container_of = container_of or container_id
        self.generation = 0
        self._cache: dict[tuple, Decision] = {}
        self._me: Caller | None = None  # this process, resolved once
        self._near_miss: str | None = None  # why the last principal_of found none (exe)

    @classmethod
    def from_config(cls, config: Config, **kwargs) -> PolicyEngine:
        policies = {name: AccessPolicy.from_spec(spec) for name, spec in config.policies.items()}
        return cls(config.principals, policies, **kwargs)

    # principals

    def _matches(self, spec: PrincipalSpec, caller: Caller) -> str | None:
        """Why *caller* is *spec* (every set matcher matches), or None."""
        why = []
        if spec.uid is not None:
            if caller.uid != spec.uid:
                return None
            why.append(f"uid {caller.uid}")
        if spec.gid is not None:
            if caller.gid != spec.gid:
                return None
            why.append(f"gid {caller.gid}")
        if spec.user is not None:
            if self.user_of(caller) != spec.user:
                return None
            why.append(f"user {spec.user}")
        if spec.group is not None:
            if self.group_of(caller) != spec.group:
                return None
            why.append(f"group {spec.group}")
        if spec.exe is not None:
            exe = caller.exe
            if exe is None or caller.exe_id is None or not glob_match(spec.exe, exe):
                return None
            if self.exe_identity(exe) != caller.exe_id:  # another file shows at that path
                self._near_miss = (f"{exe} run by the caller is not the file at that path "
                                   f"(exe rule of {spec.name})")
                return None
            why.append(f"exe {exe}")
        if spec.exe_sha256 is not None:
            if self.exe_digest(caller) != spec.exe_sha256.lower():
                return None
            why.append("exe sha256")
        if spec.unit is not None:
            unit = self.unit_of(caller)
            if unit is None or not glob_match(spec.unit, unit):
                return None
            why.append(f"unit {unit}")
        if spec.container is not None:
            container = self.container_of(caller)
            if container is None or not glob_match(spec.container, container):
                return None
            why.append(f"container {container}")
        if spec.cmdline is not None:
            line = self.cmdline(caller)
            if line is None or not glob_match(spec.cmdline, line):
                return None
            why.append("cmdline")
        return " and ".join(why) if why else None

    def principal_of(self, caller: Caller | None) -> tuple[str, str]:
        """(principal name, why): the first principal whose matchers all match."""
        if caller is None:
            caller = Caller.current()
        self._near_miss = None
        for name, spec in self.principals.items():
            why = self._matches(spec, caller)
            if why is not None:
                return name, f"{why} matches {name}"
        if self._near_miss is not None:  # worth saying: it looks like a spoofed executable
            return ANONYMOUS, f"uid {caller.uid} matches no principal: {self._near_miss}"
        return ANONYMOUS, f"uid {caller.uid} matches no principal"

    # decisions

    def _decide(self, principal: str, action: str, resource: str,
                facts: CallerFacts) -> Decision:
        policy = self.policies.get(principal)
        if policy is None:
            return Decision(False, principal, f"principal {principal} has no policy")
        allowed, reason = policy.evaluate(action, resource, facts, self.clock)
        return Decision(allowed, principal, reason)

    def check(self, caller: Caller | None, action: str, resource: str) -> Decision:
        if caller is None:
            if self._me is None:
                self._me = Caller.current()
            caller = self._me
        key = (caller.identity, caller.exe_id, action, resource, self.generation)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        principal, why = self.principal_of(caller)
        decision = self._decide(principal, action, resource, self.facts(caller))
        if principal == ANONYMOUS and not decision.allowed:
            decision = decision._replace(reason=f"{decision.reason} ({why})")
        policy = self.policies.get(principal)
        # Not cached: time-dependent answers, and callers without a start time (a bare pid
        # can be reused by another process).
        if caller.start_time is not None and (policy is None or not policy.time_dependent):
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def apply_policy(self, name: str, policy: AccessPolicy) -> None:
        """Set (or replace) the policy of principal *name*."""
        self.policies[name] = policy
        self._bump()

    def replace(self, principals: Mapping[str, PrincipalSpec],
                policies: Mapping[str, AccessPolicy]) -> None:
        """Swap in a whole new configuration (e.g. after a config reload)."""
        self.principals, self.policies = dict(principals), dict(policies)
        self._bump()

    def _bump(self) -> None:
        self.generation += 1
        self._cache.clear()

    def check_access(self, principal: str, action: str, resource: str,
                     facts: CallerFacts | None = None) -> Decision:
        """The seed's check: evaluate principal *principal* by name, with no caller."""
        return self._decide(principal, action, resource, facts or CallerFacts())


def _administrators(owner_uid: int) -> dict[str, PrincipalSpec]:
    """Principals ``root`` (uid 0) and ``owner`` (*owner_uid*, unless that is root)."""
    from secretfs.config import PrincipalSpec

    principals = {"root": PrincipalSpec(name="root", uid=0)}
    if owner_uid != 0:
        principals["owner"] = PrincipalSpec(name="owner", uid=owner_uid)
    return principals


EVERYTHING = AccessPolicy(allow=(Rule(frozenset({"*"}), ("*",)),))


def builtin_policy(owner_uid: int) -> PolicyEngine:
    """The built-in policy as an ordinary one: root and *owner_uid* may do everything, others
    nothing — like a 0700 folder."""
    principals = _administrators(owner_uid)
    return PolicyEngine(principals, dict.fromkeys(principals, EVERYTHING))


def access_control(config: Config, owner_uid: int, *, key_holder: bool = False,
                   **options: Any) -> PolicyEngine:
    """The access control a configuration asks for: its principals and policies, with each
    caller's network-namespace addresses as the facts of ip_range conditions; or, with no
    policies configured, the built-in policy (root and *owner_uid* only).

    *key_holder*: the caller opens the store with the master key itself (the CLI), so root and
    *owner_uid* are appended as administrators after the configured principals (names already
    taken by the configuration are left alone). *options* go to PolicyEngine (a fixed clock or
    facts, for `secrets check-access --at/--address`)."""
    if not config.policies:
        return builtin_policy(owner_uid)
    if "facts" not in options:
        from secretfs.access.network import AddressCache

        addresses = AddressCache()
        options["facts"] = lambda caller: CallerFacts(addresses=addresses.addresses(caller.pid))
    engine = PolicyEngine.from_config(config, **options)
    if key_holder:
        for name, spec in _administrators(owner_uid).items():
            if name not in engine.principals:
                engine.principals[name] = spec
                engine.policies[name] = EVERYTHING
    return engine


__all__ = [
    "ANONYMOUS", "AccessPolicy", "CallerFacts", "Clock", "ExeDigests", "PolicyEngine", "Rule",
    "SystemClock", "builtin_policy", "glob_match",
]
