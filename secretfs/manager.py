"""The one door: every front end (CLI, Python API, filesystem, injector) goes through here.

Each operation asks access control ``(caller, action, resource)``, records the decision in the
audit log, then talks to the backend. Nothing else decides access or reaches a backend, which is
what makes "every read is checked and audited" true by construction.

Two faces over one implementation:

- ``SyncSecretsManager`` holds the logic and blocks. The one-shot CLI uses it directly, so a
  ``secretfs secrets get`` starts without importing trio (it must start in a few tens of ms).
- ``SecretsManager`` is the seed's async API on trio: each operation runs the sync one in a
  worker thread behind a CapacityLimiter (backends block: SQLite, boto3, keyring), and values
  pass through the cache seam. The filesystem and Python programs use this one.

A backend *read* made by the async face is bounded by ``backend_timeout`` (config
``secrets_manager.backend_timeout``): past it the thread is abandoned and the read fails with
BackendUnavailable, which the cache answers from a stale entry when it has one. An abandoned
thread gives its worker slot back at once, so hung calls never starve the others; at most
``max_abandoned`` may be outstanding, and a read identical to one still outstanding is refused
at once rather than stacked behind it (see docs/cache.md, "A backend that hangs").
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from secretfs.access import ALLOW_ALL, AccessControl, Caller, Decision
from secretfs.audit import NO_AUDIT, AuditSink
from secretfs.backends.base import Backend, MetadataUpdate
from secretfs.errors import (
    AccessDenied,
    BackendUnavailable,
    SecretfsError,
    SecretNotFound,
    VersionNotFound,
)
from secretfs.model import (
    SINGLE_VALUE_KEY,
    Label,
    RotationPolicy,
    Secret,
    SecretMetadata,
    SecretRef,
    Value,
    VersionInfo,
    format_version,
    normalize_value,
    validate_name,
    value_of_key,
)

if TYPE_CHECKING:
    from secretfs.access.policy import AccessPolicy, PolicyEngine
    from secretfs.backends.base import Scanned
    from secretfs.cache import Cached, ValueCache
    from secretfs.config import Config, RotationSettings
    from secretfs.rotation.workflow import RotationResult, Rotator, Validator

T = TypeVar("T")

log = logging.getLogger("secretfs.manager")

DEFAULT_BACKEND_TIMEOUT = 5.0  # seconds; config: secrets_manager.backend_timeout
ABANDONED_PER_THREAD = 2  # abandoned (hung) backend calls tolerated per worker thread


def as_ref(ref: str | SecretRef) -> SecretRef:
    return ref if isinstance(ref, SecretRef) else SecretRef.parse(ref)


def pick_version(metadata: SecretMetadata, ref: SecretRef) -> VersionInfo:
    """The version a reference points at, readable, with its key present."""
    name = metadata.name
    if isinstance(ref.version, Label):
        number = metadata.labels.get(ref.version)
        if number is None:
            held = ", ".join(f"{label.value}→{v}" for label, v in sorted(metadata.labels.items()))
            raise VersionNotFound(
                f"secret {name!r} has no {ref.version.value} version",
                f"its labels are: {held}" if held else "it has no labelled version",
            )
    else:
        number = ref.version
    info = metadata.version_info(number)
    if info is None:
        raise VersionNotFound(
            f"secret {name!r} has no version {number}",
            f"versions kept: {', '.join(str(v.version) for v in metadata.versions) or 'none'}",
        )
    if info.destroyed:
        raise VersionNotFound(f"version {number} of {name!r} was destroyed")
    if info.deleted:
        raise VersionNotFound(
            f"version {number} of {name!r} is deleted",
            f"undelete it with 'secretfs secrets undelete {name} --version {number}'",
        )
    if ref.key is not None and ref.key not in info.keys:
        from secretfs.errors import KeyNotFound

        raise KeyNotFound(
            f"secret {name!r} has no key {ref.key!r}", f"its keys are: {', '.join(info.keys)}"
        )
    return info


class SyncSecretsManager:
    """The manager's logic, blocking. See the module docstring for why there are two faces."""

    def __init__(self, backend: Backend, *, access: AccessControl = ALLOW_ALL,
                 audit: AuditSink = NO_AUDIT, rotation: RotationSettings | None = None) -> None:
        self.backend = backend
        self.access = access
        self.audit = audit
        self.rotation = rotation  # the config's defaults for rotation (None: built-in ones)

    @classmethod
    def from_config(cls, config: Config | None = None, *, create: bool = False
                    ) -> SyncSecretsManager:
        """The manager a configuration describes (None: the file the environment points at),
        for a process that holds the master key: access by ``access.for_key_holder``, every
        record written to the audit log before the operation returns."""
        from secretfs.access import for_key_holder
        from secretfs.audit import open_audit
        from secretfs.backends import master_key_of, open_backend
        from secretfs.config import load_config

        config = config or load_config()
        backend = open_backend(config, create=create)
        try:
            audit = open_audit(config, master_key_of(config, backend, create=create),
                               immediate=True)
            return cls(backend, access=for_key_holder(config), audit=audit,
                       rotation=config.manager.rotation)
        except BaseException:
            backend.close()
            raise

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> SyncSecretsManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the door ----------------------------------------------------------------------------

    def authorize(self, caller: Caller | None, action: str, resource: str, event: str,
                   **fields: Any) -> None:
        decision = self.access.check(caller, action, resource)
        self.audit.record(
            event if decision.allowed else "denied", caller=caller, resource=resource,
            decision=decision, action=action, **fields,
        )
        if not decision.allowed:
            raise AccessDenied(
                f"{decision.principal} may not {action} {resource!r}", decision.reason
            )

    def audit_listing(self, caller: Caller | None, folder: str, shown: int, total: int) -> None:
        """One record for a folder listing (each entry was filtered by a 'list' decision)."""
        principal = self.access.check(caller, "list", folder).principal  # who, for the record
        self.audit.record(
            "list", caller=caller, resource=folder, action="list",
            decision=Decision(True, principal, f"{shown} of {total} entries visible"),
        )

    def _not_found(self, error: SecretNotFound, name: str) -> SecretNotFound:
        """Add a 'did you mean' to a not-found error when a close name exists."""
        if error.fix is not None:
            return error
        from difflib import get_close_matches  # only on this error path

        close = get_close_matches(name, self.backend.list_names(), n=1)
        return SecretNotFound(error.what, f"did you mean {close[0]!r}?" if close else
                              "list secrets with 'secretfs secrets list'")

    def metadata(self, name: str) -> SecretMetadata:
        """Metadata for internal use (the tree of the mount): not access-checked, not audited."""
        try:
            return self.backend.read_metadata(name)
        except SecretNotFound as error:
            raise self._not_found(error, name) from None

    # -- writing ------------------------------------------------------------------------------

    def store(self, secret: Secret, *, cas: int | None = None, caller: Caller | None = None,
              label: Label = Label.CURRENT) -> int:
        """Store a new version of *secret* (and its metadata); return the version number."""
        name = validate_name(secret.name)
        value = normalize_value(secret.value)
        self.authorize(caller, "write", name, "put")
        update = MetadataUpdate(secret.description, secret.tags, secret.rotation)
        return self.backend.write_version(
            name, value, label=label, cas=cas, metadata=None if update.empty else update
        )

    def rotator(self, **options: Any) -> Rotator:
        """The rotation workflow over this manager (options: clock, hook_timeout, jitter)."""
        from secretfs.rotation.workflow import Rotator

        return Rotator(self, **options)

    def rotate(self, name: str, *, caller: Caller | None = None,
               validator: Validator | None = None) -> RotationResult:
        """Rotate *name* now: generate, set, validate, promote (rotation/workflow.py)."""
        validate_name(name)
        return self.rotator().rotate(name, caller=caller, validator=validator)

    def update_metadata(self, name: str, *, description: str | None = None,
                        tags: Mapping[str, str] | None = None,
                        rotation: RotationPolicy | None = None,
                        caller: Caller | None = None) -> None:
        validate_name(name)
        self.authorize(caller, "write", name, "metadata")
        try:
            self.backend.update_metadata(name, MetadataUpdate(description, tags, rotation))
        except SecretNotFound as error:
            raise self._not_found(error, name) from None

    def delete(self, name: str, *, version: int | None = None, destroy: bool = False,
               caller: Caller | None = None) -> None:
        """Soft-delete (recoverable with undelete) or, with *destroy*, erase for good."""
        validate_name(name)
        self.authorize(caller, "delete", name, "destroy" if destroy else "delete",
                        version=version)
        operation = self.backend.destroy if destroy else self.backend.delete
        try:
            operation(name, version)
        except SecretNotFound as error:
            raise self._not_found(error, name) from None

    def undelete(self, name: str, *, version: int | None = None,
                 caller: Caller | None = None) -> None:
        validate_name(name)
        self.authorize(caller, "delete", name, "undelete", version=version)
        self.backend.undelete(name, version)

    # -- reading ------------------------------------------------------------------------------

    def get(self, ref: str | SecretRef, *, caller: Caller | None = None) -> Secret:
        """The value of the version *ref* points at (all keys), with its metadata."""
        ref = as_ref(ref)
        self.authorize(caller, "read", ref.name, "read", version=format_version(ref.version))
        metadata = self.metadata(ref.name)
        info = pick_version(metadata, ref)
        value = self.backend.read_value(ref.name, info.version)
        return Secret(ref.name, value, metadata.description, dict(metadata.tags),
                      metadata.rotation, info.version)

    def read(self, ref: str | SecretRef, *, caller: Caller | None = None) -> bytes:
        """The bytes *ref* names: one key, the single value, or a map value as JSON."""
        ref = as_ref(ref)
        secret = self.get(ref, caller=caller)
        return value_of_key(_value(secret), ref.key, ref.name)

    resolve = read

    def validate(self, ref: str | SecretRef, *, caller: Caller | None = None) -> VersionInfo:
        """Check that *ref* resolves, from metadata alone (no value is decrypted)."""
        ref = as_ref(ref)
        self.authorize(caller, "read", ref.name, "validate")
        return pick_version(self.metadata(ref.name), ref)

    def info(self, name: str, *, caller: Caller | None = None) -> SecretMetadata:
        validate_name(name)
        self.authorize(caller, "list", name, "info")
        return self.metadata(name)

    def versions(self, name: str, *, caller: Caller | None = None) -> tuple[VersionInfo, ...]:
        return self.info(name, caller=caller).versions

    def list(self, prefix: str = "", *, caller: Caller | None = None) -> list[SecretMetadata]:
        """Metadata of the secrets under *prefix* that the caller may list."""
        found = self.backend.list(prefix)
        shown = [m for m in found if self.access.check(caller, "list", m.name).allowed]
        self.audit_listing(caller, prefix or "/", len(shown), len(found))
        return shown


def _value(secret: Secret) -> Value:
    return normalize_value(secret.value)


class HeldValue:
    """A version's value as the async manager caches it: ``bytearray`` buffers that
    :meth:`wipe` overwrites with zeros. The cache wipes an entry it drops; the garbage collector
    wipes one nobody holds any more (a load no cache kept). A single value is one buffer, a map
    one per key (its UTF-8 bytes). Never in a repr, never pickled.

    ``wiped`` tells a reader that got the object just before the cache dropped it (between a
    shared load's end and the reader's turn) to load again instead of reading zeros.
    """

    __slots__ = ("_map", "_single", "wiped")

    def __init__(self, value: Value) -> None:
        self.wiped = False
        self._single: bytearray | None = None
        self._map: dict[str, bytearray] | None = None
        if isinstance(value, bytes | bytearray):
            self._single = bytearray(value)
        else:
            self._map = {key: bytearray(item.encode() if isinstance(item, str) else item)
                         for key, item in value.items()}

    def value(self) -> Value:
        """The value in its public type (bytes, or a str→str map): a copy, the caller's."""
        if self._single is not None:
            return bytes(self._single)
        return {key: item.decode() for key, item in (self._map or {}).items()}

    def key_bytes(self, key: str | None, name: str) -> bytearray:
        """A copy of the bytes of one key (as ``value_of_key``), for one open to keep and
        wipe when it is done."""
        if self._single is not None and key in (None, SINGLE_VALUE_KEY):
            return bytearray(self._single)
        if self._map is not None and key is not None and key in self._map:
            return bytearray(self._map[key])
        return bytearray(value_of_key(self.value(), key, name))  # a whole map, or the error

    def wipe(self) -> None:
        for buffer in (self._single, *(self._map or {}).values()):
            if buffer:
                memoryview(buffer)[:] = bytes(len(buffer))
        self.wiped = True

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also during interpreter shutdown
            self.wipe()

    def __repr__(self) -> str:
        return "HeldValue(<concealed>)"

    def __reduce__(self) -> Any:
        raise TypeError("a cached secret value cannot be pickled")


class _Slot:
    """One backend read's claim on a worker thread, in the shape ``trio.to_thread`` wants of a
    limiter (``acquire_on_behalf_of`` / ``release_on_behalf_of``).

    trio gives a limiter's token back only when the thread returns, so reads hung for good
    would keep every token and all later reads would queue behind them. A read abandoned at
    its timeout gives its token back at once instead (:meth:`give_back`); the manager counts
    its thread among the abandoned until trio reports that it returned (``on_return``).
    *admit* is asked again once a token is got (it raises to refuse): the abandoned threads may
    have reached their bound while this read waited for a token."""

    __slots__ = ("admit", "holding", "limiter", "on_return")

    def __init__(self, limiter: Any, admit: Callable[[], None]) -> None:
        self.limiter = limiter
        self.admit = admit
        self.holding = False
        self.on_return: Callable[[], None] | None = None

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.limiter.acquire_on_behalf_of(self)
        try:
            self.admit()
        except BaseException:
            self.limiter.release_on_behalf_of(self)
            raise
        self.holding = True

    def release_on_behalf_of(self, borrower: object) -> None:
        """Called by trio, on its thread, once the worker thread returned."""
        self.give_back()
        if self.on_return is not None:
            on_return, self.on_return = self.on_return, None
            on_return()

    def give_back(self) -> None:
        if self.holding:
            self.holding = False
            self.limiter.release_on_behalf_of(self)


def _describe(what: tuple[Any, ...]) -> str:
    """A backend read's key, in words (names and version numbers only, never a value)."""
    kind, *rest = what
    if kind == "value":
        return f"the value of {rest[0]!r} version {rest[1]}"
    if kind == "metadata":
        return f"the metadata of {rest[0]!r}"
    if kind == "list":
        return f"the list of secrets under {rest[0]!r}" if rest[0] else "the list of secrets"
    return {"names": "the list of names", "changes": "the change feed"}.get(kind, kind)


class Snapshot(NamedTuple):
    """What one open of a file sees: the bytes of one key of one version, fixed at open.

    ``data`` is the open's own copy: whoever holds the snapshot wipes it when done (the
    filesystem at release). A tuple because one is made per open, on the hot path."""

    data: bytearray
    version: int
    stale: bool  # served from cache past its ttl because the backend failed
    size_known: bool  # metadata told its size (so a file can report it before any read)


class SecretsManager:
    """The seed's async API (trio). Blocking backend work runs in worker threads.

    Metadata is cached per secret and values per (secret, version): versions never change, so
    a cached value is right until the secret changes, which ``forget(name)`` reports (the
    daemon calls it from the backend's change feed; this object calls it after its own writes).
    """

    def __init__(self, sync: SyncSecretsManager, *, cache: ValueCache | None = None,
                 max_threads: int = 8,
                 backend_timeout: float | None = DEFAULT_BACKEND_TIMEOUT,
                 max_abandoned: int | None = None) -> None:
        import trio

        from secretfs.cache import NO_CACHE

        self.sync = sync
        self.cache = NO_CACHE if cache is None else cache  # an empty cache is falsy
        self.backend_reads = 0  # values read from the backend (cache misses that loaded)
        self.backend_timeout = backend_timeout  # seconds a backend read may take (None: no bound)
        self.max_abandoned = (ABANDONED_PER_THREAD * max_threads if max_abandoned is None
                              else max_abandoned)
        self.timeouts = 0  # backend reads abandoned at their timeout
        self.refused = 0  # backend reads refused at once because of abandoned ones
        self._stale: set[tuple[str, int]] = set()  # versions last served stale
        self._limiter = trio.CapacityLimiter(max_threads)
        self._abandoned: dict[_Slot, tuple[tuple[Any, ...], float]] = {}  # → (read, since)
        self._abandoned_reads: Counter[tuple[Any, ...]] = Counter()

    @classmethod
    def from_config(cls, config: Config | None = None, *, create: bool = False
                    ) -> SecretsManager:
        from secretfs.config import load_config

        config = config or load_config()
        return cls(SyncSecretsManager.from_config(config, create=create),
                   backend_timeout=config.manager.backend_timeout)

    async def _run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking call (a write) in a worker thread, waited for however long it takes: a
        write abandoned half-way might still commit after its caller was told it failed."""
        import trio

        return await trio.to_thread.run_sync(
            lambda: function(*args, **kwargs), limiter=self._limiter
        )

    async def _ask(self, what: tuple[Any, ...], function: Callable[..., T], *args: Any,
                   **kwargs: Any) -> T:
        """A backend read in a worker thread, bounded by ``backend_timeout``.

        *what* names the read (``("value", name, version)``, ``("metadata", name)``…). Past the
        timeout the thread is abandoned (it runs on; its result is dropped), its worker slot is
        given back at once, and the read fails with BackendUnavailable. While *what* is still
        outstanding from an earlier abandoned read, or ``max_abandoned`` threads are, a read
        fails at once instead of adding one more thread to those that hang."""
        import trio

        admit = partial(self._refuse_if_hung, what)
        if self._abandoned:
            admit()
        slot = _Slot(self._limiter, admit)
        timeout = self.backend_timeout
        timed_out = False
        try:
            with trio.fail_after(timeout) if timeout else contextlib.nullcontext():
                return await trio.to_thread.run_sync(
                    partial(function, *args, **kwargs), limiter=slot, abandon_on_cancel=True)
        except trio.TooSlowError:
            self.timeouts += 1
            timed_out = True
            raise BackendUnavailable(
                f"the {self._backend_kind()} backend did not answer within {timeout:g}s "
                f"(reading {_describe(what)})",
                "cached values are served meanwhile (cache.max_stale); "
                "secrets_manager.backend_timeout sets this bound",
            ) from None
        finally:
            if slot.holding:  # leaving while its thread runs on (timeout or cancellation)
                self._abandon(what, slot, timed_out=timed_out)

    def _refuse_if_hung(self, what: tuple[Any, ...]) -> None:
        """Raise BackendUnavailable if *what* is still outstanding from an abandoned read, or
        if ``max_abandoned`` threads are (up to ``max_threads`` reads running at that moment
        may still be abandoned after it: never more than ``max_abandoned + max_threads - 1``
        threads are left behind)."""
        if not self._abandoned:
            return
        if what in self._abandoned_reads:
            self.refused += 1
            raise BackendUnavailable(
                f"the {self._backend_kind()} backend has not yet answered an earlier request "
                f"for {_describe(what)}", "it is not asked again until that request returns",
            )
        if len(self._abandoned) >= self.max_abandoned:
            self.refused += 1
            raise BackendUnavailable(
                f"{len(self._abandoned)} requests to the {self._backend_kind()} backend have "
                "not returned", "no new request is made until some return; check the backend",
            )

    def _abandon(self, what: tuple[Any, ...], slot: _Slot, *, timed_out: bool) -> None:
        import trio

        slot.give_back()
        self._abandoned[slot] = (what, trio.current_time())
        self._abandoned_reads[what] += 1
        slot.on_return = partial(self._returned, slot)
        if timed_out:
            log.warning("backend request abandoned: %s did not return in time (%d outstanding)",
                        _describe(what), len(self._abandoned))
        else:  # its caller was cancelled (the daemon stopping): nothing went wrong
            log.debug("backend request for %s left to finish: its caller was cancelled",
                      _describe(what))

    def _returned(self, slot: _Slot) -> None:
        """An abandoned thread returned (its result was dropped)."""
        import trio

        what, since = self._abandoned.pop(slot)
        self._abandoned_reads[what] -= 1
        if not self._abandoned_reads[what]:
            del self._abandoned_reads[what]
        log.info("abandoned backend request for %s returned after %.1fs (%d outstanding)",
                 _describe(what), trio.current_time() - since, len(self._abandoned))

    def _backend_kind(self) -> str:
        return str(getattr(self.sync.backend, "kind", "")) or "secrets"

    def backend_status(self) -> dict[str, Any]:
        """How the backend is answering, for ``<mount>/.secretfs/stats``."""
        return {"timeout_s": self.backend_timeout, "timeouts": self.timeouts,
                "abandoned": len(self._abandoned), "max_abandoned": self.max_abandoned,
                "refused": self.refused, "threads_busy": self._limiter.borrowed_tokens}

    def close(self) -> None:
        """Close the backend, unless abandoned calls to it are still running: closing would
        wait for them (the local backend's lock) and the process is about to exit anyway."""
        if self._abandoned:
            hung = self.timeouts > 0  # else they were only left behind by a cancellation
            (log.warning if hung else log.debug)(
                "not closing the backend: %d abandoned requests are still running",
                len(self._abandoned))
            return
        self.sync.close()

    def forget(self, name: str) -> None:
        """Drop what is cached about *name* (it changed)."""
        self.cache.invalidate(name)

    def is_stale(self, name: str, version: int) -> bool:
        """Whether this version was last served past its ttl because the backend failed."""
        return (name, version) in self._stale

    # -- writing ------------------------------------------------------------------------------

    async def store(self, secret: Secret, *, cas: int | None = None,
                    caller: Caller | None = None) -> int:
        try:
            return await self._run(self.sync.store, secret, cas=cas, caller=caller)
        finally:
            self.forget(secret.name)

    async def rotate(self, name: str, *, caller: Caller | None = None,
                     validator: Validator | None = None) -> RotationResult:
        """Rotate *name* now; *validator(name, new_value)* returning False (or raising) fails
        it, as a ``validate_cmd`` would."""
        try:
            return await self._run(self.sync.rotate, name, caller=caller, validator=validator)
        finally:
            self.forget(name)

    async def run_rotation(self, **options: Any) -> None:
        """Rotate what falls due, forever (run it in a nursery; cancel it to stop)."""
        from secretfs.rotation.schedule import run_schedule

        await run_schedule(self.sync.rotator(**options), on_change=self.forget)

    async def delete(self, name: str, *, version: int | None = None, destroy: bool = False,
                     caller: Caller | None = None) -> None:
        try:
            await self._run(self.sync.delete, name, version=version, destroy=destroy,
                            caller=caller)
        finally:
            self.forget(name)

    # -- reading ------------------------------------------------------------------------------

    async def metadata(self, name: str) -> Cached[SecretMetadata]:
        """Cached metadata for internal use (the mount's tree): not access-checked."""
        return await self.cache.get_or_load(
            name, "metadata", partial(self._ask, ("metadata", name), self.sync.metadata, name)
        )

    def cached_metadata(self, name: str) -> SecretMetadata | None:
        """The cached metadata of *name*, fresh or stale, without asking the backend (None if
        none is cached)."""
        entry = self.cache.peek(name, "metadata")
        return None if entry is None else entry.value

    async def _load_value(self, name: str, version: int) -> HeldValue:
        self.backend_reads += 1
        return HeldValue(await self._ask(("value", name, version),
                                         self.sync.backend.read_value, name, version))

    async def _version_value(self, name: str, version: int) -> Cached[HeldValue]:
        key = f"v{version}"
        load = partial(self._load_value, name, version)
        value = await self.cache.get_or_load(name, key, load)
        return value if not value.value.wiped else await self._reload(name, key, load)

    async def _reload(self, name: str, key: str, load: Callable[[], Any]) -> Cached[HeldValue]:
        """The cache dropped (and wiped) the entry this task was handed before its turn came:
        ask again (a few times; each round needs another drop to race it)."""
        for _ in range(4):
            value = await self.cache.get_or_load(name, key, load)
            if not value.value.wiped:
                return value
        raise BackendUnavailable(f"the value of {name!r} kept being dropped from the cache "
                                 "while it was read", "try again")

    def wants_value(self, name: str, version: int) -> bool:
        """Whether reading this version ahead would fill the cache (it is neither cached fresh
        nor being loaded, and there is a cache to keep it)."""
        return self.cache.wants(name, f"v{version}")

    async def read_ahead(self, name: str, version: int) -> None:
        """Load a version's value into the cache and hand it to no one: the mount calls this
        when a lookup makes an open of it likely. Nothing is disclosed, so nothing is audited;
        a failure is left for the open that follows to meet (and report)."""
        try:
            await self._version_value(name, version)
        except SecretfsError:
            pass
        except Exception:  # run in the daemon's nursery: it must not take the mount down
            log.exception("bug in reading %r version %d ahead", name, version)

    async def snapshot(self, ref: SecretRef, *, caller: Caller | None = None) -> Snapshot:
        """The bytes of one key for one open, checked ('read') and audited.

        The filesystem calls this for every open, so it calls the cache directly rather than
        through metadata() and _version_value(): two coroutine layers less on a warm open."""
        name = ref.name
        self.sync.authorize(caller, "read", name, "read", version=ref.version, key=ref.key)
        metadata = await self.cache.get_or_load(
            name, "metadata", partial(self._ask, ("metadata", name), self.sync.metadata, name))
        info = pick_version(metadata.value, ref)
        key = f"v{info.version}"
        if metadata.stale:
            # The backend just failed to answer for this secret: serve the cached value as it
            # is rather than wait for the backend a second time (a hung backend would make
            # every stale read cost two timeouts).
            value = self.cache.peek(name, key)
            if value is None or value.value.wiped:
                raise BackendUnavailable(
                    f"the backend is not answering and the value of {name!r} version "
                    f"{info.version} is not cached", "try again once the backend answers")
        else:
            load = partial(self._load_value, name, info.version)
            value = await self.cache.get_or_load(name, key, load)
            if value.value.wiped:
                value = await self._reload(name, key, load)
        stale = metadata.stale or value.stale
        if value.stale:
            self._stale.add((name, info.version))
        elif self._stale:
            self._stale.discard((name, info.version))
        return Snapshot(value.value.key_bytes(ref.key, name), info.version, stale,
                        info.size_of(ref.key or SINGLE_VALUE_KEY) is not None)

    async def get(self, ref: str | SecretRef, *, caller: Caller | None = None) -> Secret:
        ref = as_ref(ref)
        self.sync.authorize(caller, "read", ref.name, "read", version=format_version(ref.version))
        metadata = (await self.metadata(ref.name)).value
        info = pick_version(metadata, ref)
        value = (await self._version_value(ref.name, info.version)).value.value()
        return Secret(ref.name, value, metadata.description, dict(metadata.tags),
                      metadata.rotation, info.version)

    async def resolve(self, ref: str | SecretRef, *, caller: Caller | None = None) -> bytes:
        """The bytes a reference names; a ref with a resolver derives them from other secrets."""
        ref = as_ref(ref)
        if ref.resolver is not None:
            derived = await ref.resolver(self)
            return derived.encode() if isinstance(derived, str) else bytes(derived)
        snapshot = await self.snapshot(ref, caller=caller)
        data = bytes(snapshot.data)  # the caller's, as before; the snapshot's copy is wiped
        memoryview(snapshot.data)[:] = bytes(len(snapshot.data))
        return data

    async def validate(self, ref: str | SecretRef, *, caller: Caller | None = None
                       ) -> VersionInfo:
        ref = as_ref(ref)
        self.sync.authorize(caller, "read", ref.name, "validate")
        return pick_version((await self.metadata(ref.name)).value, ref)

    async def list(self, prefix: str = "", *, caller: Caller | None = None
                   ) -> list[SecretMetadata]:
        return await self._ask(("list", prefix), self.sync.list, prefix, caller=caller)

    async def fresh_metadata(self, name: str) -> SecretMetadata:
        """Metadata straight from the backend (the cache is neither read nor filled): what the
        mount's poller compares with what it has cached."""
        return await self._ask(("metadata", name), self.sync.metadata, name)

    async def names(self) -> list[str]:
        """Every live secret name, for the mount's tree (visibility is filtered per caller)."""
        return await self._ask(("names",), self.sync.backend.list_names)

    async def candidate_names(self) -> list[str]:
        """Every name that may be a live secret, as cheaply as the backend can list them: its
        optional ``scan_names`` (OpenBao: the LISTs alone, soft-deleted names included, where
        ``list_names`` reads each name's metadata too), else ``list_names``. For the poller,
        which reads every listed name's metadata anyway."""
        backend = self.sync.backend
        return await self._ask(("names",), getattr(backend, "scan_names", backend.list_names))

    async def scan_metadata(self) -> dict[str, Scanned] | None:
        """Every name that may be a live secret with a digest of its metadata (and the metadata
        as listed), if the backend can list them together (its optional ``scan_metadata``:
        OpenBao's detailed-metadata LIST); else None. For the poller: one request per folder
        instead of one per name."""
        scan = getattr(self.sync.backend, "scan_metadata", None)
        return None if scan is None else await self._ask(("names",), scan)

    async def listed_metadata(self, name: str, entry: Scanned) -> SecretMetadata | None:
        """*name*'s metadata from a scan's listing (None: deleted), in a worker thread like
        every backend call: the backend may need a request for what the listing lacks."""
        return await self._ask(("metadata", name), entry.metadata)

    async def info(self, name: str, *, caller: Caller | None = None) -> SecretMetadata:
        validate_name(name)
        self.sync.authorize(caller, "list", name, "info")
        return (await self.metadata(name)).value

    async def versions(self, name: str, *, caller: Caller | None = None
                       ) -> tuple[VersionInfo, ...]:
        return (await self.info(name, caller=caller)).versions

    # -- the seed's access-control API ---------------------------------------------------------

    def _engine(self) -> PolicyEngine:
        from secretfs.access.policy import PolicyEngine

        if not isinstance(self.sync.access, PolicyEngine):  # no policy yet: start an empty one
            self.sync.access = PolicyEngine({}, {})
        return self.sync.access

    async def apply_policy(self, name: str, policy: AccessPolicy, *,
                           caller: Caller | None = None) -> None:
        """Set the policy of principal *name*; the next decision uses it."""
        self.sync.authorize(caller, "write", f"policy:{name}", "policy")  # by the rules so far
        self._engine().apply_policy(name, policy)

    async def check_access(self, principal: str, action: str, resource: str) -> bool:
        """Whether principal *principal* may *action* *resource* (conditions: no facts)."""
        return self._engine().check_access(principal, action, resource).allowed

    async def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        return await self._ask(("changes",), self.sync.backend.changes_since, cursor)
