"""Rotation: a new value is generated, applied, proven, then promoted — or nothing changes.

The steps are AWS Secrets Manager's (createSecret → setSecret → testSecret → finishSecret), on
any backend and without a cloud function:

1. **create** — a new value, stored as a version labelled ``pending`` with check-and-set on the
   current version. Only one pending version may exist, so when two hosts find a secret due at
   once exactly one gets here; the other *adopts* the winner's result.
2. **set** — the policy's ``set_cmd`` applies the new value to the system that uses it.
3. **validate** — ``validate_cmd`` (and a Python validator, if given) proves the value works.
4. **finish** — in one atomic label move: ``current`` → the new version, ``previous`` → the old
   one, ``pending`` removed. Readers switch at once (the mount follows ``current``).

Any failure in 2–3 removes the ``pending`` label, leaves ``current`` untouched and raises
RotationFailed (exit 6) naming the step. The unlabelled version stays readable by number, since
the system behind ``set`` may already hold it.

The state is persisted before each step (``Backend.set_rotation_state``). A rotation cut short
(``kill -9``, a power cut) is found by the next run: before ``set`` started it is rolled back;
from ``set`` on it is resumed — set and validate again, then finish — because rolling back could
leave the system behind ``set`` with a value secretfs no longer has. Hooks must therefore be
idempotent (``ALTER ROLE … PASSWORD`` is). Each rotation writes exactly one audit line, whose
``outcome`` says what happened: rotated, resumed, rolled back, adopted or failed.

The schedule (when a secret is due) and the overlap (when ``previous`` goes) live in
schedule.py; ``Rotator.run_due`` applies both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from secretfs.access import Decision
from secretfs.errors import AccessDenied, ConflictError, RotationFailed, SecretfsError
from secretfs.model import (
    Label,
    RotationPolicy,
    RotationState,
    RotationStep,
    SecretMetadata,
    value_of_key,
)
from secretfs.rotation.generate import generate
from secretfs.rotation.schedule import due_at, previous_expires_at

if TYPE_CHECKING:
    from secretfs.access.principal import Caller
    from secretfs.config import RotationSettings
    from secretfs.manager import SyncSecretsManager

HOOK_TIMEOUT = 300.0  # seconds a set or validate hook may run
LEASE = 600.0  # an unfinished rotation of another host, silent this long, is taken over
DEFAULT_MAP_KEY = "password"  # the key a map-valued secret rotates when the policy names none

Validator = Callable[[str, bytes], object]  # (name, new value) → False or raise: not valid


@dataclass(frozen=True)
class RotationResult:
    name: str
    outcome: str  # rotated | resumed | rolled back | adopted | failed
    old_version: int | None
    new_version: int | None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _last_line(text: bytes, secret: bytes) -> str:
    """A hook's last stderr line for a message, with the value concealed if it echoed it."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else b"(no output)"
    if secret:
        last = last.replace(secret, b"<concealed>")
    return last.decode("utf-8", "replace")[:300]


class Rotator:
    """Carries out rotations for one manager (its backend, access control and audit log)."""

    def __init__(self, manager: SyncSecretsManager, *, settings: RotationSettings | None = None,
                 clock: Callable[[], float] = time.time, hook_timeout: float = HOOK_TIMEOUT,
                 jitter: float | None = None) -> None:
        self.manager = manager
        self.backend = manager.backend
        self._settings = settings
        self.clock = clock
        self.hook_timeout = hook_timeout
        self.jitter = jitter  # None: schedule.py's default spread
        self.owner = _owner()
        self.next_due: float | None = None  # set by run_due: the earliest _wakes it saw

    @property
    def settings(self) -> RotationSettings:
        """The defaults in force: given, else the manager's (a config reload changes them)."""
        from secretfs.config import RotationSettings

        return self._settings or self.manager.rotation or RotationSettings()

    # -- one rotation -----------------------------------------------------------------------------

    def rotate(self, name: str, *, caller: Caller | None = None,
               validator: Validator | None = None) -> RotationResult:
        """Rotate *name* now (or finish what an interrupted rotation left). RotationFailed on
        failure, AccessDenied without the ``rotate`` right."""
        decision = self._allowed(caller, name)
        metadata = self.manager.metadata(name)
        recovered = self._recover(metadata, caller, decision, validator)
        if recovered is not None:
            return recovered
        return self._run(metadata, caller, decision, validator)

    def _allowed(self, caller: Caller | None, name: str) -> Decision:
        decision = self.manager.access.check(caller, "rotate", name)
        if not decision.allowed:
            self.manager.audit.record("denied", caller=caller, resource=name, decision=decision,
                                      action="rotate")
            raise AccessDenied(f"{decision.principal} may not rotate {name!r}", decision.reason)
        return decision

    def _record(self, result: RotationResult, caller: Caller | None, decision: Decision,
                **fields: Any) -> RotationResult:
        """The one audit line of a rotation."""
        self.manager.audit.record(
            "rotate", caller=caller, resource=result.name, decision=decision, action="rotate",
            outcome=result.outcome, from_version=result.old_version,
            to_version=result.new_version, **fields,
        )
        return result

    def policy_of(self, metadata: SecretMetadata) -> RotationPolicy:
        return metadata.rotation or RotationPolicy()

    def _new_value(self, metadata: SecretMetadata, policy: RotationPolicy
                   ) -> tuple[Any, bytes, str | None]:
        """(the value to store, the bytes the hooks get, the key rotated) for the next version."""
        fresh = generate(policy.generator)
        current = metadata.current_version
        info = metadata.version_info(current) if current else None
        if info is None or not info.is_map:
            return fresh.encode(), fresh.encode(), None
        key = policy.key or DEFAULT_MAP_KEY
        value = dict(self.backend.read_value(metadata.name, current))  # the other keys stay
        value[key] = fresh
        return value, fresh.encode(), key

    def _run(self, metadata: SecretMetadata, caller: Caller | None, decision: Decision,
             validator: Validator | None) -> RotationResult:
        name, old = metadata.name, metadata.current_version
        policy = self.policy_of(metadata)
        value, secret, key = self._new_value(metadata, policy)
        try:
            new = self.backend.write_version(name, value, label=Label.PENDING, cas=old or 0)
        except ConflictError:  # another rotation got there first: take its result
            now = self.manager.metadata(name)
            # (its version may still be pending, its owner finishing it: name that version)
            winner = now.labels.get(Label.PENDING) or now.current_version
            return self._record(RotationResult(name, "adopted", old, winner), caller, decision)
        started = self.clock()
        self._save(name, new, RotationStep.CREATED, started)
        return self._apply(name, old, new, secret, key, policy, started, caller, decision,
                           validator, outcome="rotated")

    def _save(self, name: str, version: int, step: RotationStep, started: float) -> None:
        self.backend.set_rotation_state(
            name, RotationState(version, step, self.owner, started, self.clock()))

    def _apply(self, name: str, old: int | None, new: int, secret: bytes, key: str | None,
               policy: RotationPolicy, started: float, caller: Caller | None,
               decision: Decision, validator: Validator | None, *, outcome: str
               ) -> RotationResult:
        """Steps 2–4 (module docstring); on failure, the pending version is let go and, if
        ``set`` had applied it, ``set`` runs once more with the current value to put it back."""
        self._save(name, new, RotationStep.APPLYING, started)
        step, applied = "set", False
        try:
            self._hook("set", policy.set_cmd, name, new, secret, key)
            applied = bool(policy.set_cmd)
            step = "validate"
            self._hook("validate", policy.validate_cmd, name, new, secret, key)
            if validator is not None and validator(name, secret) is False:
                raise RotationFailed(f"rotation of {name!r} failed: the validator said no")
            step = "finish"
            self.backend.update_labels(
                name, {Label.CURRENT: new, Label.PREVIOUS: old, Label.PENDING: None},
                expect={Label.CURRENT: old, Label.PENDING: new})
        except (SecretfsError, OSError) as error:
            failure = error if isinstance(error, RotationFailed) else RotationFailed(
                f"rotation of {name!r} failed at {step}: {error}")
            reverted = self._revert(name, old, key, policy) if applied else None
            self._let_go(name, new)
            if reverted is not None:
                failure = RotationFailed(f"{failure.what}; {reverted}", failure.fix)
            self._record(RotationResult(name, "failed", old, None), caller, decision,
                         step=step, failure=failure.what)
            raise failure from None
        self.backend.set_rotation_state(name, None)
        return self._record(RotationResult(name, outcome, old, new), caller, decision)

    def _revert(self, name: str, old: int | None, key: str | None,
                policy: RotationPolicy) -> str:
        """Run ``set`` with the current value again, after it applied a value that then
        failed: the system behind it goes back to what ``current`` says. What happened, in a
        phrase for the error and the audit line."""
        if old is None:
            return "there was no current value to set back"
        try:
            previous = value_of_key(self.backend.read_value(name, old), key, name)
            self._hook("set", policy.set_cmd, name, old, previous, key)
        except (SecretfsError, OSError) as error:
            detail = error.what if isinstance(error, SecretfsError) else str(error)
            return (f"setting the current value back failed too ({detail}): the system may "
                    f"hold the failed value, kept unlabelled in the store")
        return f"the current value (version {old}) was set back"

    def _let_go(self, name: str, pending: int) -> None:
        """Remove the pending label (if still ours) and the state; current is untouched."""
        with contextlib.suppress(ConflictError):  # someone else already moved on
            self.backend.update_labels(name, {Label.PENDING: None},
                                       expect={Label.PENDING: pending})
        self.backend.set_rotation_state(name, None)

    def _hook(self, step: str, command: str | None, name: str, version: int, secret: bytes,
              key: str | None) -> None:
        """Run a hook with the new value on stdin; RotationFailed naming the step if it fails."""
        if not command:
            return
        env = {**os.environ, "SECRETFS_NAME": name, "SECRETFS_VERSION": str(version),
               "SECRETFS_KEY": key or ""}
        try:
            done = subprocess.run(command, shell=True, input=secret, env=env, timeout=
                                  self.hook_timeout, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        except subprocess.TimeoutExpired:
            raise RotationFailed(f"rotation of {name!r} failed: {step} timed out after "
                                 f"{self.hook_timeout:.0f} s") from None
        if done.returncode != 0:
            raise RotationFailed(
                f"rotation of {name!r} failed: {step} exited {done.returncode}: "
                f"{_last_line(done.stderr, secret)}",
                "current is unchanged; fix the hook and rotate again")

    # -- interrupted rotations ----------------------------------------------------------------

    def _stale(self, state: RotationState) -> bool:
        """Whether *state*'s owner is gone: a dead process here, or silent too long elsewhere."""
        host, _, pid = state.owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return self.clock() - state.updated > LEASE

    def _recover(self, metadata: SecretMetadata, caller: Caller | None, decision: Decision,
                 validator: Validator | None) -> RotationResult | None:
        """Finish or undo an interrupted rotation of *metadata*'s secret; None if there was
        none."""
        name = metadata.name
        state = self.backend.rotation_state(name)
        pending = metadata.labels.get(Label.PENDING)
        old = metadata.current_version
        if state is None:
            if pending is None:
                return None
            info = metadata.version_info(pending)
            if info is not None and self.clock() - info.created.timestamp() < LEASE:
                raise ConflictError(f"a rotation of {name!r} is in progress (pending version "
                                    f"{pending})", "wait for it to finish")
            self._let_go(name, pending)  # stored, never applied: undo
            return self._record(RotationResult(name, "rolled back", old, None), caller,
                                decision, step="create")
        if pending != state.version:  # the labels moved on; the record is a leftover
            self.backend.set_rotation_state(name, None)
            return None
        if not self._stale(state):
            raise ConflictError(f"a rotation of {name!r} is in progress ({state.owner})",
                                "wait for it to finish")
        if state.step is RotationStep.CREATED:
            self._let_go(name, pending)
            return self._record(RotationResult(name, "rolled back", old, None), caller,
                                decision, step="create")
        # set may have run: go forward with the value already stored
        policy = self.policy_of(metadata)
        key = policy.key or DEFAULT_MAP_KEY if metadata.version_info(pending).is_map else None
        secret = value_of_key(self.backend.read_value(name, pending), key, name)
        self.owner = _owner()
        return self._apply(name, old, pending, secret, key, policy, state.started, caller,
                           decision, validator, outcome="resumed")

    # -- the schedule ---------------------------------------------------------------------------

    def run_due(self, now: float | None = None, *, caller: Caller | None = None
                ) -> list[RotationResult]:
        """Once over every secret with a rotation policy: finish or undo interrupted rotations,
        rotate what is due, let ``previous`` go where the overlap is over. A failure of one
        secret is recorded and does not stop the others. Sets ``next_due``, so the scheduler
        needs no second listing to know when to look again."""
        now = self.clock() if now is None else now
        results: list[RotationResult] = []
        wakes: list[float] = []
        for metadata in self.backend.list():
            if metadata.rotation is None or not metadata.rotation.enabled:
                continue
            try:
                metadata = self._tend(metadata, now, caller, results)
            except RotationFailed:
                results.append(RotationResult(metadata.name, "failed",
                                              metadata.current_version, None))
            except ConflictError:
                pass  # another process is on it
            wakes.extend(self._wakes(metadata))
        self.next_due = min(wakes, default=None)
        return results

    def _tend(self, metadata: SecretMetadata, now: float, caller: Caller | None,
              results: list[RotationResult]) -> SecretMetadata:
        """Do what one secret needs now (appending to *results*); its metadata afterwards."""
        name = metadata.name
        if metadata.labels.get(Label.PENDING) is not None:  # an interrupted rotation
            recovered = self._recover(metadata, caller, self._allowed(caller, name), None)
            if recovered is not None:
                results.append(recovered)
            return self.manager.metadata(name)
        when = due_at(metadata, self.settings, jitter=self.jitter)
        if when is not None and when <= now:
            results.append(self._run(metadata, caller, self._allowed(caller, name), None))
            metadata = self.manager.metadata(name)
        expires = previous_expires_at(metadata, self.settings)
        previous = metadata.labels.get(Label.PREVIOUS)
        if expires is not None and previous is not None and expires <= now:
            with contextlib.suppress(ConflictError):  # a rotation moved it meanwhile
                self.backend.update_labels(
                    name, {Label.PREVIOUS: None},
                    expect={Label.PREVIOUS: previous, Label.CURRENT: metadata.current_version})
                metadata = self.manager.metadata(name)
        return metadata

    def _wakes(self, metadata: SecretMetadata) -> list[float]:
        """When *metadata*'s secret next needs attention: its rotation, its ``previous``."""
        times = (due_at(metadata, self.settings, jitter=self.jitter),
                 previous_expires_at(metadata, self.settings))
        return [when for when in times if when is not None]

    def next_wakeup(self) -> float | None:
        """The earliest time something is due (a rotation, or a ``previous`` to let go)."""
        return min((when for metadata in self.backend.list()
                    if metadata.rotation is not None and metadata.rotation.enabled
                    for when in self._wakes(metadata)), default=None)


__all__ = ["HOOK_TIMEOUT", "LEASE", "RotationResult", "Rotator", "Validator"]
