"""Following a backend that has no change feed (OpenBao, AWS): poll its metadata.

Other hosts write to such a backend and it tells nobody, so each daemon looks: one *pass* per
``cache.poll_interval`` (±10 %, the first at a random offset, so a thousand hosts polling one
cluster do not arrive in the same second) compares every secret's metadata — never a value —
with the last pass's, and hands the names that differ to a ``changed`` callback (the mount
drops its caches and tells the kernel). What a pass costs the backend, per host, is what
docs/scaling.md budgets:

- **by fingerprints**, when the backend lists names with a digest of their metadata
  (``scan_metadata``; OpenBao's ``LIST detailed-metadata``): one request per folder and
  1,000 names, however many secrets there are — and the listing carries each secret's metadata,
  which fills the cache for the names the mount holds;
- else **by reading each name's metadata**: the listing plus one read per secret, spread evenly
  over the interval (HashiCorp Vault, which has no detailed-metadata listing).

While the backend fails, passes wait with backoff (1 s doubling to a minute, jittered) and the
outage is logged once when it starts and once when it ends.

The poller needs a manager and two callables, not a mount, so ``benchmarks/fleet.py`` runs fifty
of them in one process against one cluster.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from secretfs.errors import NotFound, SecretfsError

if TYPE_CHECKING:
    from secretfs.backends.base import Scanned
    from secretfs.manager import SecretsManager
    from secretfs.model import SecretMetadata

log = logging.getLogger("secretfs.poll")


class Backoff:
    """Retry delays while a backend is down: 1 s doubling to a minute, each jittered by ±20 %;
    the outage logged when it begins and when it ends, not at every failed attempt."""

    FIRST, LIMIT = 1.0, 60.0

    def __init__(self) -> None:
        self._next = self.FIRST
        self.down = False
        self.since: float | None = None  # when the outage began (time.time())
        self.problem = ""

    def failed(self, error: Exception) -> None:
        if not self.down:
            import time

            log.warning("backend unavailable: %s", error)
            self.down, self.since = True, time.time()
        self.problem = str(error)

    def delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.LIMIT)
        return delay * random.uniform(0.8, 1.2)

    def succeeded(self) -> None:
        if self.down:
            log.info("backend available again")
        self.down, self._next, self.since, self.problem = False, self.FIRST, None, ""


class MetadataPoller:
    """Passes over a backend's metadata (see the module docstring).

    *known* returns the names the caller holds now (the mount's index); *changed* is awaited
    with the names whose state differs from what the caller holds — new, changed or gone. The
    first look at a name counts as a change: what the caller holds may predate it.
    """

    def __init__(self, manager: SecretsManager, *, known: Callable[[], set[str]],
                 changed: Callable[[set[str]], Awaitable[None]],
                 outage: Backoff | None = None) -> None:
        self.manager = manager
        self.outage = outage or Backoff()  # (the mount's, so <mount>/.secretfs/health tells)
        self._known = known
        self._changed = changed
        self._seen: dict[str, SecretMetadata] = {}  # what the last passes found, per name
        self._deleted: set[str] = set()  # listed names whose metadata says deleted
        self._prints: dict[str, bytes] = {}  # the last pass's metadata digests, per name

    async def run(self, interval: float) -> None:
        """Pass after pass, one per *interval* (each stretched or shrunk by up to 10 %, so
        hosts that started together drift apart), forever (cancel to stop)."""
        import trio

        await trio.sleep(random.uniform(0, interval))
        while True:
            started = trio.current_time()
            try:
                await self.poll_once(interval)
            except SecretfsError as error:
                self.outage.failed(error)
                await trio.sleep(self.outage.delay())
                continue
            self.outage.succeeded()
            await trio.sleep_until(started + interval * random.uniform(0.9, 1.1))

    async def poll_once(self, interval: float) -> None:
        """One pass: by fingerprints when the backend lists them (a few requests, at once),
        else by reading each name's metadata (spread over *interval*)."""
        scanned = await self.manager.scan_metadata()
        if scanned is None:
            await self._read_each(interval)
        else:
            await self._compare_fingerprints(scanned)

    async def _compare_fingerprints(self, scanned: dict[str, Scanned]) -> None:
        """Report the names whose metadata digest differs from the last pass's, and those gone
        from the listing.

        At a first look at a name there is no last digest: it is reported if the caller does
        not hold it, or holds its metadata cached (read before this scan, so maybe older); a
        name the caller holds but has not read since it started is only recorded — whatever
        it reads next is newer than this scan. So a daemon's first pass costs a reload only of
        what was opened since it started, not of every name.

        A listed name that turns out deleted is reported once, when its digest changes, not at
        every pass. A digest is recorded only once ``changed`` has reloaded its name, so the
        cached metadata of a name whose digest did not change is current: it is renewed in
        the cache without a request. A held name with nothing cached gets the metadata the
        listing carried, so its first open costs one request (the value), as a direct read of
        the service would. (A version another tool wrote has no recorded keys and sizes: the
        backend reads it once for them.)
        """
        known = self._known()
        cached = self.manager.cached_metadata
        report = {name for name, entry in scanned.items()
                  if (self._prints.get(name) != entry.fingerprint if name in self._prints
                      else name not in known or cached(name) is not None)}
        gone = set()
        for name in sorted(known - set(scanned)):
            # Confirmed before anything is dropped: a node that is stopping can answer a
            # listing with less than there is, and dropping a name's cache on its word would
            # leave nothing to serve in the outage that follows (BackendUnavailable here ends
            # the pass with nothing changed).
            try:
                await self.manager.fresh_metadata(name)
            except NotFound:
                gone.add(name)
        report |= gone
        if report:
            log.info("metadata changed in the backend: %d secret(s), %d of them gone "
                     "(%d listed)", len(report), len(gone), len(scanned))
            await self._changed(report)
        self._prints = {name: entry.fingerprint for name, entry in scanned.items()}
        cache = self.manager.cache
        for name in sorted((scanned.keys() - report) & known):
            if cache.wants(name, "metadata"):
                current = cached(name) or await self.manager.listed_metadata(name, scanned[name])
                if current is not None:
                    await cache.get_or_load(name, "metadata", partial(_ready, current))

    async def _read_each(self, interval: float) -> None:
        """One pass over every listed name's metadata, spread over *interval*.

        The listing may include names a metadata read then finds deleted (OpenBao lists
        soft-deleted secrets; telling them apart costs a read per name, which the pass makes
        anyway). State is compared with what the last passes saw, not with the cache, because
        the cache may have reloaded a changed secret by itself (its ttl ran out) without the
        kernel being told.
        """
        import trio

        listed = set(await self.manager.candidate_names())
        self._deleted &= listed
        known = self._known()
        gone = (known | set(self._seen)) - listed
        for name in gone:
            self._seen.pop(name, None)
        # New names are reported at once rather than when the pass reaches them; their read
        # below then only records what they are.
        new = listed - known - set(self._seen) - self._deleted
        if gone & known or new:
            await self._changed((gone & known) | new)
        names = sorted(listed)
        pause = interval / max(len(names), 1)
        for name in names:
            await trio.sleep(pause)
            try:
                fresh = await self.manager.fresh_metadata(name)
            except NotFound:  # listed, but deleted: once reported, not again every pass
                self._seen.pop(name, None)
                self._deleted.add(name)
                if name in self._known():
                    await self._changed({name})
                continue
            self._deleted.discard(name)
            last = self._seen.get(name)
            self._seen[name] = fresh
            if name in new:  # reported above: again only if it changed since
                stale = self.manager.cached_metadata(name) != fresh
            else:
                stale = last != fresh or name not in self._known()
            if stale:
                await self._changed({name})
            elif self.manager.cache.wants(name, "metadata"):
                # Keep what was just read (also over an entry past its ttl): the first open of
                # this secret then costs one backend request (its value), as a direct read of
                # the service would.
                await self.manager.cache.get_or_load(name, "metadata", partial(_ready, fresh))


async def _ready(value: Any) -> Any:
    """An already-loaded value, as the loader a cache expects."""
    return value
