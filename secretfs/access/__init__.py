"""Who may do what: the access-control seam every front end passes through.

The manager asks ``AccessControl.check(caller, action, resource)`` before every operation and
records the answer in the audit log. Principals (who a caller is) and policies (what a principal
may do) fill this in; until a policy is configured, ``ALLOW_ALL`` answers.
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


class OwnerOnly:
    """The built-in policy of a mount with no policies configured: root and the user who
    mounted may do everything, nobody else anything (like a 0700 folder)."""

    def __init__(self, owner_uid: int) -> None:
        self.owner_uid = owner_uid

    def check(self, caller: Caller | None, action: str, resource: str) -> Decision:
        if caller is None or caller.uid in (0, self.owner_uid):
            who = "this process" if caller is None else f"uid {caller.uid}"
            return Decision(True, who, "built-in policy: root and the mount owner")
        return Decision(
            False, f"uid {caller.uid}",
            f"built-in policy: only root and the mount owner (uid {self.owner_uid}) may "
            f"{action}; configure policies to grant others",
        )

__all__ = ["ACTIONS", "ALLOW_ALL", "AccessControl", "AllowAll", "Caller", "Decision", "OwnerOnly"]
