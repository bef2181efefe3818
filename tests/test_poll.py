"""The metadata poller (secretfs/poll.py): what one pass costs a backend, and which names it
reports as changed. A real local backend, wrapped to count calls and to list soft-deleted names
the way OpenBao's LISTs do."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from secretfs.backends.local import LocalBackend
from secretfs.cache import TtlCache
from secretfs.crypto.keys import LocalMasterKey
from secretfs.errors import NotFound
from secretfs.manager import SecretsManager, SyncSecretsManager
from secretfs.poll import MetadataPoller


class Counting:
    """The local backend, counting calls; ``scan_names`` also lists soft-deleted secrets."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.deleted: set[str] = set()

    def scan_names(self, prefix: str = "") -> list[str]:
        self.calls["scan_names"] += 1
        return sorted(set(self.inner.list_names(prefix)) | self.deleted)

    def __getattr__(self, attribute: str) -> Any:
        method = getattr(self.inner, attribute)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[attribute] += 1
            return method(*args, **kwargs)
        return counted


class Holder:
    """What a mount holds: a set of names, updated by ``changed`` as the mount's is (the
    manager's cache reloaded)."""

    def __init__(self, backend: Counting, names: set[str]) -> None:
        self.manager = SecretsManager(SyncSecretsManager(backend),  # type: ignore[arg-type]
                                      cache=TtlCache(ttl=3600, max_size=1000, max_stale=0))
        self.names = set(names)
        self.reported: list[set[str]] = []

    async def changed(self, names: set[str]) -> None:
        self.reported.append(set(names))
        for name in names:
            self.manager.forget(name)
            try:
                await self.manager.metadata(name)
                self.names.add(name)
            except NotFound:
                self.names.discard(name)


@pytest.fixture
def counting(tmp_path: Path) -> Counting:
    key = LocalMasterKey(secrets.token_bytes(32))
    backend = Counting(LocalBackend.open(tmp_path / "store.db", key, create=True))
    yield backend
    backend.inner.close()


def poller_for(holder: Holder) -> MetadataPoller:
    return MetadataPoller(holder.manager, known=lambda: set(holder.names),
                          changed=holder.changed)


async def test_a_pass_costs_one_listing_and_one_metadata_read_per_secret(
        counting: Counting) -> None:
    names = [f"app/s{index:02d}" for index in range(20)]
    for name in names:
        counting.inner.write_version(name, secrets.token_bytes(8))
    holder = Holder(counting, set(names))
    poller = poller_for(holder)

    await poller.poll_once(0)  # the first look reports every name (the mount may predate it)
    assert set().union(*holder.reported) == set(names)
    counting.calls.clear()
    holder.reported.clear()

    await poller.poll_once(0)
    assert counting.calls == Counter({"scan_names": 1, "read_metadata": len(names)}), \
        counting.calls
    assert holder.reported == []  # nothing changed, nothing reported; no value was read


async def test_changes_new_names_and_deletions_are_reported_once(counting: Counting) -> None:
    for name in ("a", "b", "c"):
        counting.inner.write_version(name, secrets.token_bytes(8))
    holder = Holder(counting, {"a", "b", "c"})
    poller = poller_for(holder)
    await poller.poll_once(0)
    holder.reported.clear()

    counting.inner.write_version("b", secrets.token_bytes(8))  # "another host" writes
    counting.inner.write_version("new", secrets.token_bytes(8))
    counting.inner.delete("c")
    counting.deleted.add("c")  # still listed, as OpenBao lists a soft-deleted secret
    await poller.poll_once(0)
    assert sorted(sorted(names) for names in holder.reported) == [["b"], ["c"], ["new"]]
    assert holder.names == {"a", "b", "new"}

    holder.reported.clear()
    await poller.poll_once(0)  # the deleted name stays listed: not reported again
    assert holder.reported == []

    counting.inner.destroy("a")  # gone from the listing altogether
    await poller.poll_once(0)
    assert holder.reported == [{"a"}] and holder.names == {"b", "new"}


async def test_a_pass_spreads_its_reads_over_the_interval(counting: Counting) -> None:
    for index in range(10):
        counting.inner.write_version(f"s{index}", secrets.token_bytes(8))
    holder = Holder(counting, set())
    poller = poller_for(holder)
    await poller.poll_once(0)  # the first look: everything is new
    moments: list[float] = []
    read = counting.inner.read_metadata

    def timed(name: str) -> Any:
        moments.append(time.monotonic())
        return read(name)
    counting.inner.read_metadata = timed  # type: ignore[method-assign]

    started = time.monotonic()
    await poller.poll_once(0.5)
    assert time.monotonic() - started >= 0.5
    gaps = [later - earlier for earlier, later in pairwise(moments)]
    assert len(moments) >= 10 and min(gaps) >= 0.03  # ~0.05 s apart, not in one burst


class Listing(Counting):
    """Lists names with a fingerprint of their metadata (like OpenBao's detailed listing);
    ``hidden`` names are left out of the listing, as a node that is stopping may do."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.hidden: set[str] = set()

    def scan_metadata(self, prefix: str = "") -> dict[str, Any]:
        from secretfs.backends.base import Scanned

        self.calls["scan_metadata"] += 1
        found = {}
        for name in self.inner.list_names(prefix):
            if name not in self.hidden:
                metadata = self.inner.read_metadata(name)
                found[name] = Scanned(repr(metadata).encode(), lambda m=metadata: m)
        return found


async def test_a_name_missing_from_a_listing_is_dropped_only_once_confirmed(
        tmp_path: Path) -> None:
    key = LocalMasterKey(secrets.token_bytes(32))
    backend = Listing(LocalBackend.open(tmp_path / "store.db", key, create=True))
    try:
        for name in ("a", "b"):
            backend.inner.write_version(name, secrets.token_bytes(8))
        holder = Holder(backend, {"a", "b"})
        poller = poller_for(holder)
        await poller.poll_once(0)
        await holder.manager.metadata("a")  # cached
        holder.reported.clear()

        backend.hidden.add("a")  # a partial listing: "a" still exists
        await poller.poll_once(0)
        assert holder.reported == [] and holder.manager.cached_metadata("a") is not None

        backend.inner.destroy("a")  # now it is gone for real
        await poller.poll_once(0)
        assert holder.reported == [{"a"}] and holder.names == {"b"}
    finally:
        backend.inner.close()
