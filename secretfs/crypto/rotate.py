"""Master-key rotation of the embedded store: ``secretfs keys rotate`` and ``keys status``.

A rotation replaces the master key without touching a single ciphertext: each version's data key
is unwrapped with the old master key and wrapped again with the new one, in batches, each batch
one transaction (``UPDATE versions SET key_id = new, wrapped_key = … WHERE key_id = old``).

The steps, and why a crash between any two of them loses nothing (docs/encryption.md):

1. the new key is written to ``<key_file>.next`` (file and folder fsynced) before anything
   refers to it. From then on every process loads both keys (:class:`~secretfs.crypto.keys.
   MasterKeyRing`): the new one wraps, the old one still unwraps;
2. the audit log's MAC key (derived from the store's first master key) is kept in
   ``<key_file>.derived``, wrapped by the old and the new key, so the log verifies the same
   before, during and after;
3. the store records the new key as its current one (new versions are wrapped by it only);
4. batches move data keys from the old key to the new one until none is left;
5. the old key is copied to ``<key_file>.retired/<key id>`` (nothing loads keys from there);
6. ``<key_file>.next`` is renamed over ``<key_file>`` (atomic): the rotation is over.

Run again after a crash, ``keys rotate`` finds ``<key_file>.next`` and resumes with that key
(it never starts a third one while one is unfinished). Every step is idempotent.

The remote providers (``openbao_transit``, ``aws_kms``) keep the master key in the service and
rotate it there; ``keys rotate`` refuses them with that explanation.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from secretfs.crypto.keys import (
    CARRIED_PURPOSES,
    LOCAL_PROVIDERS,
    REMOTE_PROVIDERS,
    KeySlots,
    MasterKeyRing,
    _make_private_dirs,
    _Passphrase,
)
from secretfs.errors import SecretfsError, StoreError, WrongMasterKey

if TYPE_CHECKING:
    from secretfs.backends.local import LocalBackend
    from secretfs.config import Config

__all__ = ["DEFAULT_BATCH_SIZE", "RESOURCE", "RotationReport", "key_status",
           "rotate_master_key"]

DEFAULT_BATCH_SIZE = 500
RESOURCE = "<master-key>"
"""The resource of the audit records of ``keys`` commands (no secret name can look like it)."""
CRASH_ENV = "SECRETFS_KEYS_ROTATE_CRASH_AT"
"""Tests only: SIGKILL this process at the named step (see :func:`_crash_point`)."""
CRASH_POINTS = ("new-key", "carried", "fenced", "batch", "rewrapped", "retired", "promoted")


def _crash_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when $SECRETFS_KEYS_ROTATE_CRASH_AT names this step:
    the crash-safety tests stop a rotation at every step boundary with it."""
    if os.environ.get(CRASH_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _seconds(moment: str | None) -> str | None:
    """An ISO time to the second (the store's own creation time has microseconds)."""
    try:
        return datetime.fromisoformat(moment).isoformat(timespec="seconds") if moment else None
    except ValueError:
        return moment


@dataclass
class RotationReport:
    """What one ``keys rotate`` did."""

    provider: str
    new: str
    old: list[str] = field(default_factory=list)
    rewrapped: int = 0
    resumed: bool = False
    retired: dict[str, str] = field(default_factory=dict)  # key id → where it was kept

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "new": self.new, "old": self.old,
                "rewrapped": self.rewrapped, "resumed": self.resumed, "retired": self.retired}

    def summary(self) -> str:
        old = ", ".join(self.old) or "(none left)"
        verb = "resumed and finished the rotation" if self.resumed else "rotated the master key"
        lines = [f"{verb} {old} → {self.new} ({self.provider} provider): "
                 f"{self.rewrapped} data keys re-wrapped, no value re-encrypted"]
        lines += [f"retired {key_id}: kept at {where} (only backups made before this rotation "
                  "need it)" for key_id, where in self.retired.items()]
        return "\n".join(lines)


def _slots(config: Config) -> KeySlots:
    """The key slots of a configuration that can rotate here; a clear refusal otherwise."""
    settings = config.manager
    provider = settings.encryption.provider
    if provider in REMOTE_PROVIDERS:
        service = ("bao write -f transit/keys/NAME/rotate (then transit/keys/NAME/config "
                   "min_decryption_version)" if provider == "openbao_transit"
                   else "aws kms enable-key-rotation --key-id KEY (or rotate-key-on-demand)")
        raise SecretfsError(
            f"encryption.provider '{provider}' keeps the master key in the service: there is "
            "no local master key for 'keys rotate' to replace",
            f"rotate it in the service: {service}; older key versions keep decrypting, so the "
            "store needs no re-wrapping",
        )
    if provider not in LOCAL_PROVIDERS:
        raise SecretfsError(f"encryption.provider '{provider}' cannot be rotated",
                            "use one of: " + ", ".join(LOCAL_PROVIDERS))
    if settings.backend.type != "local":
        raise SecretfsError(
            f"backend '{settings.backend.type}' encrypts the values itself: 'keys rotate' "
            "re-wraps the data keys of the local store only",
            "rotate the backend's own key in its service; the master key here only keys the "
            "audit log",
        )
    return KeySlots(provider, settings.encryption.key_file)


@contextlib.contextmanager
def _rotation_lock(slots: KeySlots) -> Iterator[None]:
    """One rotation at a time per key file (an flock: a killed rotation leaves none held)."""
    import fcntl

    _make_private_dirs(slots.lock.parent)
    fd = os.open(slots.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SecretfsError(
                f"another 'secretfs keys rotate' is running for {slots.current}",
                "wait for it to finish; it resumes where it is if run again after a crash",
            ) from None
        yield
    finally:
        os.close(fd)


def _open_store(config: Config, ring: MasterKeyRing) -> Any:
    """The manager over the local store, keyed by *ring*, auditing each record at once."""
    from secretfs.access import for_key_holder
    from secretfs.audit import open_audit
    from secretfs.backends.local import LocalBackend
    from secretfs.manager import SyncSecretsManager

    settings = config.manager
    backend = LocalBackend.open(settings.backend.path, ring, create=False,
                                max_versions=settings.backend.max_versions)
    try:
        return SyncSecretsManager(backend, access=for_key_holder(config),
                                  audit=open_audit(config, ring, immediate=True),
                                  rotation=settings.rotation)
    except BaseException:
        backend.close()
        raise


def _unloaded(backend: LocalBackend, ring: MasterKeyRing, pending: bool,
              slots: KeySlots) -> None:
    """Refuse to go on while some version names a master key that is not loaded."""
    missing = {key_id: count for key_id, count in backend.key_usage().items()
               if key_id is not None and ring.key_for(key_id, reload=False) is None}
    if not missing:
        return
    key_id, count = max(missing.items(), key=lambda item: item[1])
    loaded = ", ".join(repr(k) for k in ring.key_ids)
    if pending:
        fix = (f"a key rotation is unfinished and its old key is not at "
               f"{slots.where(slots.current)}: restore that key from your backup, then run "
               "'secretfs keys rotate' again")
    else:
        fix = "point encryption.key_file (or the provider) at the key that created this store"
    raise WrongMasterKey(
        f"{count} stored version(s) have data keys wrapped by master key '{key_id}', which is "
        f"not loaded (loaded: {loaded})", fix)


def rotate_master_key(config: Config, *, batch_size: int = DEFAULT_BATCH_SIZE,
                      pause: float = 0.0, progress: Callable[[int], None] | None = None
                      ) -> RotationReport:
    """Rotate the master key of *config*'s local store, or finish an interrupted rotation.

    *batch_size* data keys are re-wrapped per transaction, with *pause* seconds between
    batches (room for other writers on a busy store); *progress* gets the running count.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    slots = _slots(config)
    passphrase = _Passphrase(slots.current) if slots.provider == "passphrase" else None
    given = passphrase() if passphrase is not None else None  # asked once, for both keys
    with _rotation_lock(slots):
        ring = slots.ring(passphrase=given)
        manager = _open_store(config, ring)
        with manager:
            return _rotate(manager, slots, ring, given, batch_size, pause, progress)


def _rotate(manager: Any, slots: KeySlots, ring: MasterKeyRing, passphrase: str | None,
            batch_size: int, pause: float, progress: Callable[[int], None] | None
            ) -> RotationReport:
    backend: LocalBackend = manager.backend
    ask = _Passphrase(slots.current, passphrase)
    pending = slots.read_raw(slots.next) is not None
    manager.authorize(None, "rotate", RESOURCE, "keys.rotate", provider=slots.provider,
                      key_id=ring.key_id, resumed=pending)  # the command's one audit line
    _unloaded(backend, ring, pending, slots)
    if not pending:
        if backend.store_key_id != ring.key_id:
            raise WrongMasterKey(
                f"store {backend.path} is sealed by master key '{backend.store_key_id}', "
                f"but the configured master key is '{ring.key_id}'",
                "point encryption.key_file (or the provider) at the key that created this store")
        stale = _untidy(backend, slots, ring.key_id)
        if stale:  # a rotation that crashed after its new key took the old one's place
            report = RotationReport(slots.provider, ring.key_id, stale, resumed=True)
            report.retired = {key_id: slots.where(slots.retired_path(key_id)) for key_id in stale
                              if slots.read_raw(slots.retired_path(key_id)) is not None}
            _tidy(backend, slots, ring, report.retired)
            return report
        # 1. the new key, durable before anything names it
        slots.create_next(ask)
        _crash_point("new-key")
        ring = slots.ring(passphrase=passphrase)
        backend.master_key = ring
    new = ring.current
    base = ring.base
    olds = list(ring.keys[1:])
    # 2. the audit log's key, wrapped by every loaded key (it never changes: see derive_key)
    carried: dict[bytes, dict[str, bytes]] = {}
    for purpose in CARRIED_PURPOSES:
        value = ring.derive_key(purpose)
        carried[purpose] = {key.key_id: key.wrap(value) for key in ring.keys}
    slots.write_carried(carried)
    _crash_point("carried")
    # 3. the store's current key: from now on only the new key wraps new data keys
    records: dict[str, dict[str, Any]] = {new.key_id: {"created": _now(),
                                                        "provider": slots.provider}}
    created = backend.store_info().get("created")
    for old in olds:
        records[old.key_id] = {"created": created, "provider": slots.provider}
    if backend.record_keys(records) != new.key_id:
        raise StoreError(f"store {backend.path} did not take master key '{new.key_id}'",
                         "check that no other secretfs version writes to this store")
    _crash_point("fenced")
    # 4. re-wrap, one transaction per batch, until no version names an old key
    report = RotationReport(slots.provider, new.key_id, [old.key_id for old in olds],
                            resumed=pending)
    for old in olds:
        while backend.key_usage().get(old.key_id):
            after = 0
            while True:
                count, after = backend.rewrap(old, new, after=after, limit=batch_size)
                report.rewrapped += count
                if progress is not None and count:
                    progress(report.rewrapped)
                if count < batch_size:
                    break
                _crash_point("batch")
                if pause:
                    time.sleep(pause)
    leftover = {k: n for k, n in backend.key_usage().items() if k is not None and k != new.key_id}
    if leftover:  # only possible if another process wrote with an old key meanwhile
        raise StoreError(f"{sum(leftover.values())} version(s) still name an old master key",
                         "run 'secretfs keys rotate' again")
    _crash_point("rewrapped")
    # 5. keep the old key where nothing loads it from, 6. then the new key takes its place
    if base is not None and base.key_id != new.key_id:
        report.retired[base.key_id] = slots.retire(base, ask)
    _crash_point("retired")
    slots.promote()
    _crash_point("promoted")
    _tidy(backend, slots, ring, report.retired)
    return report


def _untidy(backend: LocalBackend, slots: KeySlots, current: str) -> list[str]:
    """Key ids that a rotation killed after its new key took the old one's place left behind
    (the carried file still wraps for them, the store has not recorded them retired), though
    only *current* is loaded and, as checked before, nothing names them."""
    named = {key_id for entries in slots.read_carried().values() for key_id in entries}
    named |= {key_id for key_id, record in backend.key_records().items()
              if "retired" not in record}
    return sorted(named - {current})


def _tidy(backend: LocalBackend, slots: KeySlots, ring: MasterKeyRing,
          retired: dict[str, str]) -> None:
    """The last step: the carried keys wrapped by the current key alone, the old keys'
    retirement recorded. Nothing depends on it; a re-run does it if a crash skipped it."""
    current = ring.current
    stale = _untidy(backend, slots, current.key_id)
    slots.write_carried({purpose: {current.key_id: current.wrap(ring.derive_key(purpose))}
                         for purpose in CARRIED_PURPOSES})
    if stale:
        backend.record_keys({
            key_id: {"retired": _now(), **({"kept_at": retired[key_id]}
                                           if key_id in retired else {})}
            for key_id in stale})


def key_status(config: Config) -> dict[str, Any]:
    """The master keys of *config*'s store: ids, state, provider, created, versions wrapped;
    whether a rotation is unfinished. Audited as ``keys.status``."""
    from secretfs.backends import master_key_of
    from secretfs.backends.local import LocalBackend
    from secretfs.manager import SyncSecretsManager

    settings = config.manager
    provider = settings.encryption.provider
    with SyncSecretsManager.from_config(config) as manager:
        manager.authorize(None, "list", RESOURCE, "keys.status")
        backend = manager.backend
        ring = master_key_of(config, backend)
        local = isinstance(backend, LocalBackend)
        usage = backend.key_usage() if local else {}
        records = backend.key_records() if local else {}
        created = backend.store_info().get("created") if local else None
    slots = KeySlots(provider, settings.encryption.key_file) \
        if provider in LOCAL_PROVIDERS else None
    loaded = list(getattr(ring, "key_ids", (ring.key_id,)))
    pending = slots is not None and slots.read_raw(slots.next) is not None
    retired_files = slots.retired_ids() if slots else []
    ids = list(dict.fromkeys([*loaded, *(k for k in usage if k is not None), *records,
                              *retired_files]))
    keys = []
    for key_id in ids:
        record = records.get(key_id, {})
        count = usage.get(key_id, 0)
        if key_id == loaded[0]:
            state = "current"
        elif key_id in loaded:
            state = "old"
        elif count:
            state = "missing"
        else:
            state = "retired"
        where = None
        if slots is not None:
            if state == "current":
                where = slots.where(slots.next if pending else slots.current)
            elif state == "old":
                where = slots.where(slots.current)
            elif state == "retired" and (key_id in retired_files or "kept_at" in record):
                where = record.get("kept_at") or slots.where(slots.retired_path(key_id))
        keys.append({
            "key_id": key_id, "state": state, "provider": record.get("provider", provider),
            "created": _seconds(record.get("created")
                                or (created if key_id == loaded[0] else None)),
            "retired": record.get("retired"), "versions": count if local else None,
            "where": where,
        })
    behind = sum(k["versions"] or 0 for k in keys if k["state"] in ("old", "missing"))
    return {
        "provider": provider, "backend": settings.backend.type,
        "key_file": str(settings.encryption.key_file), "current": loaded[0],
        "rotation_unfinished": pending or behind > 0, "versions_behind": behind, "keys": keys,
    }
