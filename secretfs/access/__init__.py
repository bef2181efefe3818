"""Who may do what: the access-control seam every front end passes through.

The manager asks ``AccessControl.check(caller, action, resource)`` before every operation and
records the answer in the audit log. Principals (who a caller is) and policies (what a principal
may do) fill this in (policy.py). ``for_key_holder`` is the access control of a process that
opens the store itself with the master key (the CLI, the Python API).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple, Protocol

from secretfs.access.principal import Caller

if TYPE_CHECKING:
    from secretfs.config import Config

ACTIONS = ("read", "list", "write", "delete", "rotate")


class Decision(NamedTuple):
    """An access decision and why it was made (the reason goes to the audit log)."""

    allowed: bool
    principal: str
    reason: str


class AccessControl(Protocol):
    def check(self, caller: Caller | None, action: str, resource: str) -> Decision: ...


class AllowAll:
    """No policy configured: every caller may do everything (the embedded, single-user default)."""

    def check(self, caller: Caller | None, action: str, resource: str) -> Decision:
        return Decision(True, "anyone", "no access policy configured")


ALLOW_ALL = AllowAll()


class StoreOwner:
    """The built-in policy as a key holder meets it: whoever runs a one-shot command holds the
    master key, so it is the store's owner (or root), whom the built-in policy lets do
    everything. The same answers as ``policy.builtin_policy`` for that caller, without loading
    the policy engine on the CLI's fast path."""

    def check(self, caller: Caller | None, action: str, resource: str) -> Decision:
        uid = os.geteuid() if caller is None else caller.uid
        return Decision(True, "root" if uid == 0 else "owner",
                        "built-in policy: the store's owner may do everything")


def for_key_holder(config: Config) -> AccessControl:
    """The access control of a process that opens the store with the master key itself.

    With no policies configured: the built-in policy (:class:`StoreOwner`). With policies: the
    configured principals and policies, and after them root and this user as administrators —
    a policy cannot stop whoever holds the key, so it is recorded rather than pretended away; a
    configured principal that matches them first still decides (see docs/policies.md).
    """
    if not config.policies:
        return StoreOwner()
    from secretfs.access.policy import access_control

    return access_control(config, os.geteuid(), key_holder=True)


__all__ = [
    "ACTIONS", "ALLOW_ALL", "AccessControl", "AllowAll", "Caller", "Decision", "StoreOwner",
    "for_key_holder",
]
