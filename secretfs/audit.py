"""The audit seam: every access decision and every change is recorded here, never a value.

``AuditSink.record`` is called by the manager once per operation, after the access decision.
``NO_AUDIT`` discards records; ``open_audit`` gives the hash-chained log of auditlog.py when the
configuration enables it. This module stays small: every command imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from secretfs.access import Decision
from secretfs.access.principal import Caller

if TYPE_CHECKING:
    from secretfs.config import Config
    from secretfs.crypto.keys import MasterKey


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


def open_audit(config: Config, master_key: MasterKey, *, immediate: bool = False) -> AuditSink:
    """The audit sink a configuration asks for: the hash-chained log, or none. *immediate*:
    each record is on disk before ``record`` returns (one-shot commands: no flusher task)."""
    settings = config.manager.audit
    if not settings.enabled:
        return NO_AUDIT
    from secretfs.auditlog import AuditLog, audit_key

    return AuditLog(settings.path, audit_key(master_key), log_level=settings.log_level,
                    retention=settings.retention, fail_open=settings.fail_open,
                    immediate=immediate)
