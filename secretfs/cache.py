"""The cache of the filesystem daemon: TTL, size bound, single-flight loads, stale-if-error.

The manager asks ``get_or_load(name, key, load)`` for everything it reads about a secret (its
metadata under one key, each version's value under another) and calls ``invalidate(name)`` when
the secret changed. Why each behaviour is there:

- **Single-flight.** A service that starts 64 workers opens the same cold secret 64 times at once;
  that must cost one backend read, not 64 (and not 64 KMS decrypts). Concurrent misses of one
  ``(name, key)`` wait for the first caller's load and share its outcome.
- **Stale-if-error.** When the backend is down, a value that was right a moment ago is more useful
  than EIO, for a bounded time (``max_stale``). Only :class:`BackendUnavailable` qualifies: an
  answer from the backend (not found, access denied, integrity failure) is never hidden behind an
  old value.
- **Invalidation beats in-flight loads.** A load that started before ``invalidate(name)`` may have
  read the old value; it still answers the callers that were waiting for it, but it is not stored,
  and callers that arrive after the invalidation start a load of their own.
- **Bounded.** At most ``max_size`` entries, least recently used evicted first, O(1) per operation.

Values live in this process's memory only: nothing here writes a file, a value never appears in a
``repr``, and neither :class:`Cached` nor :class:`TtlCache` can be pickled. An entry the cache
drops (evicted, invalidated, cleared, replaced by a newer load, or past ``ttl + max_stale``) is
overwritten in place by :func:`wipe` when its value can be: a ``bytearray`` is zeroed, an object
with a ``wipe()`` method (the manager's ``HeldValue``) is asked to. Best effort: see docs/cache.md
for the copies Python makes that no one can overwrite. Everything runs on the trio thread, so no
locks. trio is imported only where an event is needed, because the CLI imports
:class:`NoCache` and :class:`Cached` without an event loop. See docs/cache.md.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar

from secretfs.errors import BackendUnavailable

if TYPE_CHECKING:
    from types import TracebackType

    import trio

T = TypeVar("T")


def wipe(value: object) -> None:
    """Overwrite a dropped value in place, as far as it can be: a ``bytearray`` is zeroed, an
    object with a ``wipe()`` method is asked to wipe itself, a dict or list is wiped item by item.
    Anything else (``bytes``, ``str``, metadata) is immutable or not secret and is left alone."""
    if isinstance(value, bytearray):
        if value:
            memoryview(value)[:] = bytes(len(value))  # in place, also while a view is exported
        return
    method = getattr(value, "wipe", None)
    if callable(method):
        method()
    elif isinstance(value, dict):
        for item in value.values():
            wipe(item)
    elif isinstance(value, list):
        for item in value:
            wipe(item)


@dataclass(frozen=True, slots=True)
class Cached(Generic[T]):
    """A value as the cache hands it out, with how old it is and whether it is past its ttl."""

    value: T = field(repr=False)  # a secret: never in a repr, a log line or a traceback
    stale: bool  # True: served past its ttl because the backend failed (stale-if-error)
    loaded_at: float  # clock time the load of this value started

    def __reduce__(self) -> NoReturn:
        raise TypeError("a cached secret value cannot be pickled")


@dataclass(slots=True)
class CacheStats:
    """Counters since start; the daemon shows them in ``.secretfs/stats``.

    Every ``get_or_load`` counts one hit or one miss. ``loads`` counts calls of a loader (after
    single-flight), ``load_errors`` those that raised. ``stale_serves`` counts callers answered
    with a stale value. ``evictions`` counts entries dropped for the size bound, ``invalidations``
    entries dropped by ``invalidate`` or ``clear``. (Entries dropped because they were past
    ``ttl + max_stale`` are not counted: they are of no use any more, not even stale.)
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    stale_serves: int = 0
    evictions: int = 0
    invalidations: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class ValueCache(Protocol):
    """What the async manager needs from a cache."""

    async def get_or_load(
        self, name: str, key: str, load: Callable[[], Awaitable[T]]
    ) -> Cached[T]: ...

    def invalidate(self, name: str) -> None: ...

    def peek(self, name: str, key: str) -> Cached[Any] | None: ...

    def wants(self, name: str, key: str) -> bool: ...


class NoCache:
    """Caching off: every read goes to the backend (one-shot commands, ``enabled: false``)."""

    __slots__ = ()

    async def get_or_load(
        self, name: str, key: str, load: Callable[[], Awaitable[T]]
    ) -> Cached[T]:
        loaded_at = time.monotonic()
        return Cached(await load(), False, loaded_at)

    def invalidate(self, name: str) -> None:
        return None

    def peek(self, name: str, key: str) -> Cached[Any] | None:
        return None

    def wants(self, name: str, key: str) -> bool:
        return False  # nothing loaded ahead would be kept

    def __repr__(self) -> str:
        return "NoCache()"


NO_CACHE = NoCache()


class _Flight:
    """One load in progress of one ``(name, key)``; the callers that join it wait on ``done``.

    Its outcome is ``result`` (loaded, or stale-if-error) or ``error``; neither means the loading
    task was cancelled, and the waiters load again. ``invalidate`` clears ``current``: the flight
    then still answers its waiters but no longer reads or writes the cache, and new callers do
    not find it. (A flag per flight rather than a generation number per name: the same guarantee,
    with state that lives only as long as the load, where per-name counters would grow with every
    name the daemon ever saw change.)
    """

    __slots__ = ("current", "done", "error", "result", "traceback")

    def __init__(self, done: trio.Event) -> None:
        self.done = done
        self.current = True
        self.result: Cached[Any] | None = None
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None


class TtlCache:
    """Values and metadata of secrets by ``(name, key)``, for the trio daemon.

    *ttl*: seconds an entry is fresh (0: every get loads). *max_size*: entries kept.
    *max_stale*: seconds past the ttl an entry may still be served while the backend is
    unavailable. *clock*: seconds, monotonic; a seam for tests.
    """

    def __init__(self, *, ttl: float, max_size: int, max_stale: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl >= 0:
            raise ValueError(f"ttl must be 0 or more seconds, not {ttl!r}")
        if not max_stale >= 0:
            raise ValueError(f"max_stale must be 0 or more seconds, not {max_stale!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a whole number 1 or more, not {max_size!r}")
        self.ttl = ttl
        self.max_size = max_size
        self.max_stale = max_stale
        self.stats = CacheStats()
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], Cached[Any]] = OrderedDict()  # LRU first
        self._keys: dict[str, set[str]] = {}  # name → keys with an entry, for invalidate
        self._flights: dict[str, dict[str, _Flight]] = {}  # name → key → current load

    # -- reading ------------------------------------------------------------------------------

    async def get_or_load(
        self, name: str, key: str, load: Callable[[], Awaitable[T]]
    ) -> Cached[T]:
        """The fresh entry of ``(name, key)``, or the outcome of one shared call of *load*.

        Raises what *load* raised (to every caller that waited for it), unless it raised
        BackendUnavailable and the expired entry is within ``max_stale``: then that entry is
        returned with ``stale=True``. If the caller running *load* is cancelled, the callers
        waiting for it start a new load (one of them runs it).
        """
        hit = self._fresh(name, key)
        if hit is not None:
            self.stats.hits += 1
            return hit
        self.stats.misses += 1
        while True:
            flight = self._flights.get(name, {}).get(key)
            if flight is None:
                return await self._load(name, key, load)
            await flight.done.wait()
            result, error, traceback = flight.result, flight.error, flight.traceback
            del flight
            if result is not None:
                if result.stale:
                    self.stats.stale_serves += 1
                return result
            if error is not None:
                try:
                    # The loader's own traceback, not one that grows with every waiter's raise.
                    raise error.with_traceback(traceback)
                finally:
                    del error, traceback  # no frame ↔ exception cycle (as outcome does)
            hit = self._fresh(name, key)  # the loader was cancelled; a newer load may have won
            if hit is not None:
                return hit

    def peek(self, name: str, key: str) -> Cached[Any] | None:
        """The entry without loading, counting or touching its recency.

        None if there is none, or if it is past ``ttl + max_stale`` (it can never be served
        again); ``stale`` tells whether it is past its ttl.
        """
        entry = self._entries.get((name, key))
        if entry is None:
            return None
        age = self._clock() - entry.loaded_at
        if age > self.ttl + self.max_stale:
            return None
        return entry if age <= self.ttl else Cached(entry.value, True, entry.loaded_at)

    def wants(self, name: str, key: str) -> bool:
        """Whether a load of ``(name, key)`` started now would be of use: no fresh entry, and
        none being loaded (for a read-ahead, which must not cost a request a hit would save)."""
        if key in self._flights.get(name, ()):
            return False
        entry = self._entries.get((name, key))
        return entry is None or self.ttl == 0 or self._clock() - entry.loaded_at > self.ttl

    def names(self) -> set[str]:
        """Names with at least one entry: the ones a change poller needs to watch."""
        return set(self._keys)

    def __len__(self) -> int:
        return len(self._entries)

    # -- forgetting ---------------------------------------------------------------------------

    def invalidate(self, name: str) -> None:
        """Drop every entry of *name* (it changed), wiping their values; loads of it in flight
        will not be stored."""
        keys = self._keys.pop(name, ())
        for key in keys:
            wipe(self._entries.pop((name, key)).value)
        self.stats.invalidations += len(keys)
        for flight in self._flights.pop(name, {}).values():
            flight.current = False

    def clear(self) -> None:
        """Drop everything, wiping the values (loads in flight will not be stored). The daemon
        calls this when it stops and when a reload replaces the cache."""
        self.stats.invalidations += len(self._entries)
        for entry in self._entries.values():
            wipe(entry.value)
        self._entries.clear()
        self._keys.clear()
        for flights in self._flights.values():
            for flight in flights.values():
                flight.current = False
        self._flights.clear()

    def expire(self) -> int:
        """Drop (and wipe) every entry past ``ttl + max_stale``: it can never be served again,
        not even while the backend is down. Returns how many. The daemon calls this now and
        then, so a value read once is not kept in memory long after it stopped being of use."""
        limit = self._clock() - (self.ttl + self.max_stale)
        old = [slot for slot, entry in self._entries.items() if entry.loaded_at < limit]
        for name, key in old:
            self._remove(name, key)
        return len(old)

    # -- inside -------------------------------------------------------------------------------

    def _fresh(self, name: str, key: str) -> Cached[Any] | None:
        entry = self._entries.get((name, key))
        if entry is None:
            return None
        age = self._clock() - entry.loaded_at
        if self.ttl == 0 or age > self.ttl:
            if age > self.ttl + self.max_stale:  # of no use any more, not even stale: wipe it
                self._remove(name, key)
            return None
        self._entries.move_to_end((name, key))
        return entry

    async def _load(self, name: str, key: str, load: Callable[[], Awaitable[T]]) -> Cached[T]:
        import trio

        flight = _Flight(trio.Event())
        self._flights.setdefault(name, {})[key] = flight
        self.stats.loads += 1
        loaded_at = self._clock()  # when the load starts: the value is at least this recent
        # An Exception is the flight's outcome; anything else (trio.Cancelled, KeyboardInterrupt)
        # leaves none, and the waiters load again.
        try:
            value = await load()
        except Exception as error:
            self.stats.load_errors += 1
            stale = self._stale_if_error(name, key, flight, error)
            if stale is None:
                flight.error, flight.traceback = error, error.__traceback__
                raise
            flight.result = stale
            self.stats.stale_serves += 1
            return stale
        else:
            flight.result = result = Cached(value, False, loaded_at)
            if flight.current:
                self._store(name, key, result)
            return result
        finally:
            flight.done.set()
            if flight.current:
                flights = self._flights[name]
                del flights[key]
                if not flights:
                    del self._flights[name]
            del flight

    def _stale_if_error(self, name: str, key: str, flight: _Flight,
                        error: Exception) -> Cached[Any] | None:
        """The stale entry to serve instead of *error*, or None (and drop an unusable entry)."""
        if not flight.current:
            return None  # invalidated while loading: the old value is known to be wrong
        entry = self._entries.get((name, key))
        if entry is None:
            return None
        age = self._clock() - entry.loaded_at
        if isinstance(error, BackendUnavailable) and age <= self.ttl + self.max_stale:
            self._entries.move_to_end((name, key))
            return Cached(entry.value, True, entry.loaded_at)
        # The backend answered (e.g. not found) or the entry is too old: it must not be served.
        self._remove(name, key)
        return None

    def _store(self, name: str, key: str, entry: Cached[Any]) -> None:
        replaced = self._entries.get((name, key))
        self._entries[name, key] = entry
        self._entries.move_to_end((name, key))
        self._keys.setdefault(name, set()).add(key)
        if replaced is not None and replaced.value is not entry.value:
            wipe(replaced.value)  # a newer load took its place
        while len(self._entries) > self.max_size:
            (old_name, old_key), old = self._entries.popitem(last=False)
            self._unindex(old_name, old_key)
            wipe(old.value)
            self.stats.evictions += 1

    def _remove(self, name: str, key: str) -> None:
        wipe(self._entries.pop((name, key)).value)
        self._unindex(name, key)

    def _unindex(self, name: str, key: str) -> None:
        keys = self._keys[name]
        keys.discard(key)
        if not keys:
            del self._keys[name]

    def __repr__(self) -> str:
        loading = sum(len(flights) for flights in self._flights.values())
        return (f"TtlCache(entries={len(self._entries)}, names={len(self._keys)}, "
                f"loading={loading}, ttl={self.ttl}, max_size={self.max_size}, "
                f"max_stale={self.max_stale})")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a cache of secret values cannot be pickled")
