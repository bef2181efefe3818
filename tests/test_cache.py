"""The daemon's cache: ttl, LRU bound, single-flight, stale-if-error, invalidation, cancellation.

Time is a fake clock handed to the cache (a seam, not a backend); loads are small coroutines that
count their calls, since what is under test is how often and when the cache calls them.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from secretfs.cache import NO_CACHE, Cached, CacheStats, NoCache, TtlCache, ValueCache
from secretfs.errors import AccessDenied, BackendUnavailable, IntegrityError, SecretNotFound


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Loader:
    """A load function that counts its calls; raises *error* when set, else returns v1, v2…"""

    delay: float = 0.0
    error: Exception | None = None
    calls: int = 0
    gate: trio.Event | None = field(default=None, repr=False)

    async def __call__(self) -> str:
        self.calls += 1
        call = self.calls
        if self.delay:
            await trio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"v{call}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, *, ttl: float = 10.0, max_size: int = 100,
         max_stale: float = 60.0) -> TtlCache:
    return TtlCache(ttl=ttl, max_size=max_size, max_stale=max_stale, clock=clock)


async def gather(count: int, call: Callable[[], object]) -> list[object]:
    """Run *call* in *count* tasks at once; each result, or the exception it raised."""
    results: list[object] = [None] * count

    async def one(i: int) -> None:
        try:
            results[i] = await call()  # type: ignore[misc]
        except Exception as error:
            results[i] = error

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    return results


# -- hits, misses, expiry ---------------------------------------------------------------------


async def test_a_miss_loads_a_fresh_hit_does_not_and_expiry_loads_again(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10), Loader()
    assert await cache.get_or_load("db", "v1", load) == Cached("v1", False, 1000.0)
    clock.advance(10)  # age == ttl is still fresh
    assert await cache.get_or_load("db", "v1", load) == Cached("v1", False, 1000.0)
    assert load.calls == 1
    clock.advance(0.001)
    assert await cache.get_or_load("db", "v1", load) == Cached("v2", False, 1010.001)
    assert load.calls == 2
    assert cache.stats == CacheStats(hits=1, misses=2, loads=2)


async def test_keys_of_one_name_are_separate_entries(clock: FakeClock) -> None:
    cache, meta, value = make(clock), Loader(), Loader()
    await cache.get_or_load("db", "meta", meta)
    await cache.get_or_load("db", "v3", value)
    await cache.get_or_load("db", "meta", meta)
    assert (meta.calls, value.calls, len(cache)) == (1, 1, 2)


async def test_ttl_zero_loads_every_time_but_still_single_flight(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=0), Loader()
    assert (await cache.get_or_load("db", "v1", load)).value == "v1"
    assert (await cache.get_or_load("db", "v1", load)).value == "v2"
    slow = Loader(delay=0.01)
    results = await gather(16, lambda: cache.get_or_load("api", "v1", slow))
    assert slow.calls == 1
    assert {result.value for result in results} == {"v1"}  # type: ignore[attr-defined]


# -- single-flight ----------------------------------------------------------------------------


async def test_64_concurrent_misses_make_one_load(clock: FakeClock) -> None:
    cache, load = make(clock), Loader(delay=0.01)
    results = await gather(64, lambda: cache.get_or_load("db", "v1", load))
    assert load.calls == 1
    assert results == [Cached("v1", False, 1000.0)] * 64
    assert cache.stats == CacheStats(misses=64, loads=1)
    assert await cache.get_or_load("db", "v1", load) == Cached("v1", False, 1000.0)
    assert load.calls == 1


async def test_an_error_reaches_every_waiter_and_is_not_cached(clock: FakeClock) -> None:
    cache = make(clock)
    load = Loader(delay=0.01, error=BackendUnavailable("backend 'bao' did not answer"))
    results = await gather(8, lambda: cache.get_or_load("db", "v1", load))
    assert load.calls == 1
    assert all(result is load.error for result in results)
    assert cache.stats.load_errors == 1
    assert len(cache) == 0
    load.error = None
    assert (await cache.get_or_load("db", "v1", load)).value == "v2"  # loads again
    assert load.calls == 2


# -- stale-if-error ---------------------------------------------------------------------------


async def test_stale_if_error_serves_the_expired_value_within_max_stale(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10, max_stale=60), Loader()
    await cache.get_or_load("db", "v1", load)
    clock.advance(10 + 60)  # age == ttl + max_stale: still servable
    load.error, load.delay = BackendUnavailable("backend down"), 0.01
    results = await gather(5, lambda: cache.get_or_load("db", "v1", load))
    assert results == [Cached("v1", True, 1000.0)] * 5
    assert load.calls == 2
    assert cache.stats.stale_serves == 5
    assert cache.peek("db", "v1") == Cached("v1", True, 1000.0)  # the entry is kept
    load.error = None
    assert await cache.get_or_load("db", "v1", load) == Cached("v3", False, 1070.0)


async def test_past_max_stale_the_error_propagates_and_the_entry_goes(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10, max_stale=60), Loader()
    await cache.get_or_load("db", "v1", load)
    clock.advance(10 + 60 + 0.001)
    load.error = BackendUnavailable("backend down")
    with pytest.raises(BackendUnavailable):
        await cache.get_or_load("db", "v1", load)
    assert cache.peek("db", "v1") is None
    assert cache.stats.stale_serves == 0


@pytest.mark.parametrize("error", [
    SecretNotFound("secret 'db' not found"),
    AccessDenied("backend refused the token"),
    IntegrityError("ciphertext failed authentication"),
    RuntimeError("a bug in a backend"),
])
async def test_other_errors_are_never_masked_by_stale_data(clock: FakeClock,
                                                           error: Exception) -> None:
    cache, load = make(clock, ttl=10, max_stale=60), Loader()
    await cache.get_or_load("db", "v1", load)
    clock.advance(11)
    load.error = error
    with pytest.raises(type(error)) as raised:
        await cache.get_or_load("db", "v1", load)
    assert raised.value is error
    # The backend's answer outranks the old value: it is dropped, not kept for a later outage.
    assert cache.peek("db", "v1") is None
    load.error = BackendUnavailable("backend down")
    with pytest.raises(BackendUnavailable):
        await cache.get_or_load("db", "v1", load)


# -- invalidation -----------------------------------------------------------------------------


async def test_invalidate_drops_every_key_of_a_name_only(clock: FakeClock) -> None:
    cache, load = make(clock), Loader()
    for name, key in [("db", "meta"), ("db", "v1"), ("db/replica", "v1"), ("api", "v1")]:
        await cache.get_or_load(name, key, load)
    assert cache.names() == {"db", "db/replica", "api"}
    cache.invalidate("db")
    assert cache.names() == {"db/replica", "api"}
    assert (cache.peek("db", "meta"), cache.peek("db", "v1")) == (None, None)
    assert cache.peek("db/replica", "v1") is not None
    assert cache.stats.invalidations == 2
    await cache.get_or_load("db", "v1", load)
    assert load.calls == 5
    cache.invalidate("never-cached")
    assert cache.stats.invalidations == 2


async def test_a_load_in_flight_during_invalidate_is_not_stored(clock: FakeClock) -> None:
    cache, old = make(clock), Loader(gate=trio.Event())
    new = Loader()
    results: dict[str, Cached[str]] = {}

    async def get(who: str, load: Loader) -> None:
        results[who] = await cache.get_or_load("db", "v1", load)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "loader", old)
            nursery.start_soon(get, "waiter", old)
            await trio.testing.wait_all_tasks_blocked()
            cache.invalidate("db")
            # A caller after the invalidation does not join the old load: it loads anew.
            await get("after", new)
            old.gate.set()  # type: ignore[union-attr]
    assert (old.calls, new.calls) == (1, 1)
    assert results["loader"].value == results["waiter"].value == "v1"  # from the old load
    assert results["after"].value == "v1"  # from the new load
    assert cache.peek("db", "v1") is results["after"]


async def test_an_invalidated_load_stores_nothing(clock: FakeClock) -> None:
    cache, load = make(clock), Loader(gate=trio.Event())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.get_or_load, "db", "v1", load)
            await trio.testing.wait_all_tasks_blocked()
            cache.invalidate("db")
            load.gate.set()  # type: ignore[union-attr]
    assert len(cache) == 0
    assert cache.names() == set()
    load.gate = None
    assert (await cache.get_or_load("db", "v1", load)).value == "v2"


async def test_an_invalidated_entry_is_not_served_stale(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10, max_stale=60), Loader()
    await cache.get_or_load("db", "v1", load)
    clock.advance(11)
    load.error, load.gate = BackendUnavailable("backend down"), trio.Event()
    failures: list[Exception] = []

    async def get() -> None:
        try:
            await cache.get_or_load("db", "v1", load)
        except BackendUnavailable as error:
            failures.append(error)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            await trio.testing.wait_all_tasks_blocked()
            cache.invalidate("db")  # the secret changed while the backend went away
            load.gate.set()
    assert failures == [load.error]
    assert cache.stats.stale_serves == 0


async def test_clear_drops_everything(clock: FakeClock) -> None:
    cache, load = make(clock), Loader()
    await cache.get_or_load("db", "v1", load)
    await cache.get_or_load("api", "v1", load)
    cache.clear()
    assert (len(cache), cache.names(), cache.stats.invalidations) == (0, set(), 2)
    await cache.get_or_load("db", "v1", load)
    assert load.calls == 3


# -- size bound -------------------------------------------------------------------------------


async def test_lru_eviction_keeps_the_bound_and_drops_the_least_recently_used(
        clock: FakeClock) -> None:
    cache, load = make(clock, max_size=3), Loader()
    for name in ("a", "b", "c"):
        await cache.get_or_load(name, "v1", load)
    await cache.get_or_load("a", "v1", load)  # a is now the most recently used
    await cache.get_or_load("d", "v1", load)  # evicts b
    assert len(cache) == 3
    assert cache.names() == {"a", "c", "d"}
    await cache.get_or_load("e", "v1", load)  # evicts c
    assert cache.names() == {"a", "d", "e"}
    assert cache.stats.evictions == 2
    calls = load.calls
    await cache.get_or_load("b", "v1", load)  # evicted: loads again
    assert load.calls == calls + 1
    assert len(cache) == 3


async def test_peek_touches_nothing(clock: FakeClock) -> None:
    cache, load = make(clock, max_size=2, ttl=10, max_stale=5), Loader()
    await cache.get_or_load("a", "v1", load)
    await cache.get_or_load("b", "v1", load)
    before = cache.stats.to_json()
    assert cache.peek("a", "v1") == Cached("v1", False, 1000.0)
    assert cache.peek("a", "meta") is None
    assert cache.stats.to_json() == before
    await cache.get_or_load("c", "v1", load)  # peek did not refresh a: a is evicted
    assert cache.names() == {"b", "c"}
    clock.advance(12)
    assert cache.peek("b", "v1") == Cached("v2", True, 1000.0)
    clock.advance(4)  # 16 > ttl + max_stale: can never be served
    assert cache.peek("b", "v1") is None
    assert load.calls == 3


async def test_wants_is_true_only_when_a_load_would_be_of_use(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10), Loader(gate=trio.Event())
    assert cache.wants("a", "v1")  # nothing there
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get_or_load, "a", "v1", load)
        await trio.testing.wait_all_tasks_blocked()
        assert not cache.wants("a", "v1")  # being loaded: a read-ahead would only join it
        load.gate.set()
    assert not cache.wants("a", "v1")  # fresh
    clock.advance(11)
    assert cache.wants("a", "v1")  # past its ttl (though still servable stale)
    assert not NO_CACHE.wants("a", "v1")  # nothing loaded ahead would be kept
    assert load.calls == 1


# -- cancellation -----------------------------------------------------------------------------


async def test_a_cancelled_loader_does_not_hang_its_waiters(clock: FakeClock) -> None:
    cache, calls = make(clock), 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()  # a backend that hangs until the caller gives up
        return f"v{calls}"

    results: list[Cached[str]] = []

    async def loader() -> None:
        with trio.move_on_after(0.05):
            await cache.get_or_load("db", "v1", load)

    async def waiter() -> None:
        results.append(await cache.get_or_load("db", "v1", load))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                nursery.start_soon(waiter)
    # The waiters loaded again, once between them.
    assert calls == 2
    assert [result.value for result in results] == ["v2"] * 3
    assert cache.stats.load_errors == 0
    assert cache.peek("db", "v1") == Cached("v2", False, 1000.0)


async def test_a_cancelled_waiter_does_not_disturb_the_load(clock: FakeClock) -> None:
    cache, load = make(clock), Loader(delay=0.05)
    got: list[str] = []

    async def waiter() -> None:
        with trio.move_on_after(0.01):
            got.append((await cache.get_or_load("db", "v1", load)).value)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.get_or_load, "db", "v1", load)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
    assert got == []
    assert load.calls == 1
    assert cache.peek("db", "v1") == Cached("v1", False, 1000.0)


# -- stats, secrecy, the seam -----------------------------------------------------------------


async def test_stats_count_every_event(clock: FakeClock) -> None:
    cache, load = make(clock, ttl=10, max_stale=60, max_size=2), Loader()
    await cache.get_or_load("a", "v1", load)  # miss, load
    await cache.get_or_load("a", "v1", load)  # hit
    clock.advance(11)
    load.error = BackendUnavailable("down")
    await cache.get_or_load("a", "v1", load)  # miss, load, load error, stale serve
    load.error = None
    await cache.get_or_load("b", "v1", load)  # miss, load
    await cache.get_or_load("c", "v1", load)  # miss, load, eviction of a
    cache.invalidate("b")  # invalidation
    assert cache.stats.to_json() == {
        "hits": 1, "misses": 4, "loads": 4, "load_errors": 1, "stale_serves": 1,
        "evictions": 1, "invalidations": 1,
    }


async def test_values_never_show_and_never_pickle(clock: FakeClock) -> None:
    cache = make(clock)

    async def load() -> str:
        return "hunter2"

    cached = await cache.get_or_load("db_password", "v1", load)
    assert "hunter2" not in repr(cached)
    assert "hunter2" not in repr(cache) and "db_password" not in repr(cache)
    assert "entries=1" in repr(cache)
    for thing in (cached, cache):
        with pytest.raises(TypeError):
            pickle.dumps(thing)


async def test_no_cache_always_loads() -> None:
    load = Loader()
    cache: ValueCache = NO_CACHE
    first = await cache.get_or_load("db", "v1", load)
    second = await cache.get_or_load("db", "v1", load)
    assert (first.value, first.stale, second.value) == ("v1", False, "v2")
    cache.invalidate("db")
    assert isinstance(NO_CACHE, NoCache)


def test_importing_the_cache_does_not_import_trio() -> None:
    code = ("import sys; from secretfs.cache import NO_CACHE, Cached, NoCache; "
            "Cached('x', False, 0.0); assert 'trio' not in sys.modules, 'trio was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("settings_", [
    {"ttl": -1, "max_size": 1, "max_stale": 0},
    {"ttl": float("nan"), "max_size": 1, "max_stale": 0},
    {"ttl": 1, "max_size": 0, "max_stale": 0},
    {"ttl": 1, "max_size": 1.5, "max_stale": 0},
    {"ttl": 1, "max_size": 1, "max_stale": -0.1},
])
def test_bad_settings_are_refused(settings_: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TtlCache(**settings_)  # type: ignore[arg-type]


# -- against a reference model ----------------------------------------------------------------

NAMES, KEYS = ("a", "b", "c"), ("meta", "v1")
operations = st.lists(st.one_of(
    st.tuples(st.just("get"), st.sampled_from(NAMES), st.sampled_from(KEYS),
              st.sampled_from(("ok", "ok", "down", "gone"))),
    st.tuples(st.just("invalidate"), st.sampled_from(NAMES)),
    st.tuples(st.just("advance"), st.sampled_from((0.5, 1.0, 2.0, 5.0, 20.0))),
    st.tuples(st.just("clear")),
), max_size=40)


class Model:
    """The cache's rules written the slow, obvious way: a dict and a use counter."""

    def __init__(self, ttl: float, max_size: int, max_stale: float) -> None:
        self.ttl, self.max_size, self.max_stale = ttl, max_size, max_stale
        self.entries: dict[tuple[str, str], list[object]] = {}  # [value, loaded_at, last use]
        self.uses = 0

    def get(self, slot: tuple[str, str], now: float, outcome: str,
            value: str) -> tuple[bool, object]:
        """(whether it loads, what the caller gets: (value, stale) or an exception type)."""
        self.uses += 1
        entry = self.entries.get(slot)
        if entry is not None and self.ttl > 0 and now - entry[1] <= self.ttl:  # type: ignore
            entry[2] = self.uses
            return False, (entry[0], False)
        if outcome == "ok":
            self.entries[slot] = [value, now, self.uses]
            while len(self.entries) > self.max_size:
                del self.entries[min(self.entries, key=lambda s: self.entries[s][2])]  # type: ignore
            return True, (value, False)
        if (outcome == "down" and entry is not None
                and now - entry[1] <= self.ttl + self.max_stale):  # type: ignore[operator]
            entry[2] = self.uses
            return True, (entry[0], True)
        self.entries.pop(slot, None)
        return True, BackendUnavailable if outcome == "down" else SecretNotFound


@settings(max_examples=200, deadline=None)
@given(ttl=st.sampled_from((0.0, 1.0, 3.0)), max_size=st.integers(1, 4),
       max_stale=st.sampled_from((0.0, 2.0, 10.0)), ops=operations)
def test_the_cache_agrees_with_a_reference_model(ttl: float, max_size: int, max_stale: float,
                                                 ops: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    cache = TtlCache(ttl=ttl, max_size=max_size, max_stale=max_stale, clock=clock)
    model = Model(ttl, max_size, max_stale)
    loads: list[tuple[str, str]] = []

    async def run() -> None:
        for op in ops:
            if op[0] == "get":
                _, name, key, outcome = op
                value = f"{name}/{key}#{len(loads) + 1}"

                async def load(name: str = name, key: str = key, outcome: object = outcome,
                               value: str = value) -> str:
                    loads.append((name, key))
                    if outcome == "down":
                        raise BackendUnavailable("down")
                    if outcome == "gone":
                        raise SecretNotFound(f"secret {name!r} not found")
                    return value

                calls = len(loads)
                expect_load, expected = model.get((name, key), clock.now, outcome, value)
                try:
                    got: object = await cache.get_or_load(name, key, load)
                except (BackendUnavailable, SecretNotFound) as error:
                    assert expected is type(error)
                else:
                    assert isinstance(got, Cached)
                    assert expected == (got.value, got.stale)
                assert len(loads) - calls == expect_load
            elif op[0] == "invalidate":
                cache.invalidate(op[1])  # type: ignore[arg-type]
                model.entries = {s: e for s, e in model.entries.items() if s[0] != op[1]}
            elif op[0] == "advance":
                clock.advance(op[1])  # type: ignore[arg-type]
            else:
                cache.clear()
                model.entries.clear()
            assert len(cache) == len(model.entries)
            assert cache.names() == {name for name, _ in model.entries}

    trio.run(run)
    assert cache.stats.loads == len(loads)
