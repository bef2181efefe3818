"""The audit seam: every access decision and every change is recorded here, never a value.

``AuditSink.record`` is called by the manager once per operation, after the access decision.
``NO_AUDIT`` discards records; the hash-chained log replaces it when auditing is configured.
"""

from __future__ import annotations

from typing import Any, Protocol

from secretfs.access import Decision
from secretfs.access.principal import Caller


class AuditSink(Protocol):
    def record(
        self, event: str, *, caller: Caller | None, resource: str, decision: Decision, **fields: Any
    ) -> None: ...


class NoAudit:
    """Auditing disabled: records go nowhere."""

    def record(
        self, event: str, *, caller: Caller | None, resource: str, decision: Decision, **fields: Any
    ) -> None:
        return None


NO_AUDIT = NoAudit()
