"""Who may do what: the access-control seam every front end passes through.

The manager asks ``AccessControl.check(caller, action, resource)`` before every operation and
records the answer in the audit log. Principals (who a caller is) and policies (what a principal
may do) fill this in (policy.py); one-shot commands on the embedded store use ``ALLOW_ALL``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from secretfs.access.principal import Caller

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

__all__ = ["ACTIONS", "ALLOW_ALL", "AccessControl", "AllowAll", "Caller", "Decision"]
