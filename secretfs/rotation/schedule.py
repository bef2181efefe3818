"""When a secret is next due for rotation, and when its ``previous`` version is let go.

A secret with a rotation policy is due at the earliest of: its interval after the current version
was made, the first slot of its cron schedule after that, and ``max_age`` after it. A policy with
neither interval nor schedule uses the configuration's ``rotation.schedule``; ``max_age`` and
``overlap`` fall back to ``rotation.default_policy``. Because "due" is computed from when the
current version was made, a daemon that was down across several slots rotates once when it
starts, not once per missed slot, and then follows the schedule again.

Jitter: each secret's due time is pushed back by a fixed fraction of ``JITTER`` (at most a tenth
of its period) derived from its name, so a thousand secrets on one schedule do not hit the
backend in the same second — and a given secret always gets the same offset, so restarts do not
move it around.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from secretfs.errors import SecretfsError
from secretfs.model import Label, SecretMetadata

if TYPE_CHECKING:
    from collections.abc import Callable

    from secretfs.config import RotationSettings
    from secretfs.rotation.workflow import Rotator

JITTER = 30.0  # seconds: the most a due time is spread
MAX_SLEEP = 60.0  # the scheduler looks again at least this often (new policies, other hosts)


def next_rotation(metadata: SecretMetadata, settings: RotationSettings | None
                  ) -> datetime | None:
    """When *metadata*'s secret rotates next, as a datetime (None: never) — for display."""
    if settings is None:
        from secretfs.config import RotationSettings

        settings = RotationSettings()
    when = due_at(metadata, settings)
    return None if when is None else datetime.fromtimestamp(when, UTC)


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


def _cron_next(expression: str, after: float) -> float:
    from croniter import croniter

    return float(croniter(expression, after).get_next(float))


def _spread(name: str, period: float, jitter: float | None) -> float:
    """This secret's fixed offset: a fraction of JITTER (≤ a tenth of the period) from its name."""
    limit = min(JITTER if jitter is None else jitter, period / 10)
    fraction = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") / 2**32
    return limit * fraction


def due_at(metadata: SecretMetadata, settings: RotationSettings,
           jitter: float | None = None) -> float | None:
    """When *metadata*'s secret is next due (epoch seconds), or None (no policy, disabled, no
    current version)."""
    policy = metadata.rotation
    current = metadata.current_version
    info = metadata.version_info(current) if current else None
    if policy is None or not policy.enabled or info is None:
        return None
    made = info.created.timestamp()
    times = [made + (policy.max_age or settings.max_age)]
    if policy.interval:
        times.append(made + policy.interval)
    if policy.schedule or not policy.interval:
        times.append(_cron_next(policy.schedule or settings.schedule, made))
    when = min(times)
    return when + _spread(metadata.name, max(when - made, 0.0), jitter)


def previous_expires_at(metadata: SecretMetadata, settings: RotationSettings) -> float | None:
    """When the ``previous`` label is let go: ``overlap`` after the current version was made."""
    current = metadata.current_version
    info = metadata.version_info(current) if current else None
    if Label.PREVIOUS not in metadata.labels or info is None or metadata.rotation is None:
        return None
    overlap = metadata.rotation.overlap
    return info.created.timestamp() + (settings.overlap if overlap is None else overlap)


async def run_schedule(rotator: Rotator, *, on_change: Callable[[str], None] | None = None,
                       max_sleep: float = MAX_SLEEP) -> None:
    """The daemon's scheduler: rotate what is due, sleep until the next due time (at most
    *max_sleep*), forever. At start it runs at once, so what fell due while the daemon was down
    rotates now — once. Rotations run in a worker thread (hooks and the backend block)."""
    import logging

    import trio

    from secretfs.poll import Backoff

    log = logging.getLogger("secretfs.rotation")
    outage = Backoff()
    while True:
        try:
            # Abandoned on cancel: a rotation stuck in a hung backend must not hold up the
            # daemon's shutdown (its persisted state lets the next start resume or roll back).
            results = await trio.to_thread.run_sync(rotator.run_due, abandon_on_cancel=True)
            wake = rotator.next_due
            outage.succeeded()
        except SecretfsError as error:
            # The backend is down, or a cluster is electing a leader (writes refused for a
            # few seconds): look again soon — 1 s doubling to a minute, jittered — so a
            # rotation that fell due meanwhile happens right after, not a minute later.
            if not outage.down:
                log.warning("rotation check failed: %s", error)
            outage.failed(error)
            results, wake = [], rotator.clock() + outage.delay()
        for result in results:
            if on_change is not None:
                on_change(result.name)
            log.info("rotation of %s: %s (%s → %s)", result.name, result.outcome,
                     result.old_version, result.new_version)
        pause = max_sleep if wake is None else min(max_sleep, max(wake - rotator.clock(), 0.05))
        await trio.sleep(pause)
