"""When a secret is next due for rotation."""

from __future__ import annotations

from datetime import datetime, timedelta

from secretfs.model import RotationPolicy


def next_rotation(policy: RotationPolicy, last_rotated: datetime) -> datetime | None:
    """The next time *policy* rotates a secret last rotated at *last_rotated* (None: never)."""
    if not policy.enabled:
        return None
    if policy.schedule:
        from croniter import croniter  # 60 ms to import: only where a schedule is evaluated

        return croniter(policy.schedule, last_rotated).get_next(datetime)
    if policy.interval:
        return last_rotated + timedelta(seconds=policy.interval)
    return None


def check_schedule(expression: str) -> str:
    """Raise UsageError unless croniter accepts *expression*."""
    from croniter import croniter

    from secretfs.errors import UsageError

    if not croniter.is_valid(expression):
        raise UsageError(
            f"invalid cron expression {expression!r}",
            "use five fields: minute hour day-of-month month day-of-week, e.g. '0 0 * * *'",
        )
    return expression
