"""A backend that hangs, a reader that stops reading, and values wiped from memory.

The mount tests run a real daemon over a backend plugin (installed the way FLAKY_BACKEND is in
test_mount.py) that never answers for some names, or for everything while a switch file exists.
The memory tests are unit-level: they hold a reference to the buffer the cache (or an open file
handle) kept, and look at it after the cache or the handle let go of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import LOCAL_BACKEND_IN_PLUGIN, Store, eventually, install_plugin, make_store
from tests.mounting import Mount, is_mounted, mounted, stop

needs_mounts = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                  reason="real mounts need root and /dev/fuse")

TIMEOUT = 1.0  # secrets_manager.backend_timeout in these tests
BOUND = TIMEOUT + 1.0  # what a read that meets a hung backend may cost, at most
QUICK = 0.5  # what a read that does not need the backend may cost, at most

HANGING_BACKEND = '''
import os
import threading
import time


NEVER = threading.Event()  # never set: a call that waits on it never returns


class Hanging:
    """The real local backend, except that reads of names under stuck/ never return, and
    every call waits while the switch file exists."""

    kind = "hanging"

    def __init__(self, inner, switch):
        self.inner, self.switch = inner, switch

    def __getattr__(self, attribute):
        target = getattr(self.inner, attribute)
        if not callable(target) or attribute == "close":
            return target

        def call(*args, **kwargs):
            name = args[0] if args and isinstance(args[0], str) else ""
            if attribute in ("read_value", "read_metadata") and name.startswith("stuck/"):
                NEVER.wait()
            while os.path.exists(self.switch):
                time.sleep(0.02)
            return target(*args, **kwargs)

        return call


def factory(config, *, create=False):
    return Hanging(local_backend(config, create=create),
                   str(config.manager.backend.options["switch"]))
''' + LOCAL_BACKEND_IN_PLUGIN


def fresh() -> str:
    return secrets.token_hex(16)


def timed(action: Callable[[], object]) -> tuple[object, float]:
    """(what *action* returned or the OSError it raised, seconds it took)."""
    started = time.monotonic()
    try:
        result: object = action()
    except OSError as error:
        result = error
    return result, time.monotonic() - started


def assert_eio_within(path: Path, bound: float) -> float:
    result, took = timed(lambda: path.read_bytes())
    assert isinstance(result, OSError) and result.errno == errno.EIO, (path, result)
    assert took <= bound, f"{path} failed after {took:.2f}s, more than {bound}s"
    return took


def assert_reads_within(path: Path, expected: str, bound: float = QUICK) -> None:
    result, took = timed(lambda: path.read_text())
    assert result == expected, (path, result)
    assert took <= bound, f"{path} took {took:.2f}s, more than {bound}s"


def hanging_store(tmp_path: Path, names: dict[str, str], *, ttl: str) -> tuple[Store, Path,
                                                                                dict[str, str]]:
    """A store holding *names*, configured for the hanging plugin; (store, switch, env)."""
    store = make_store(tmp_path / "s")
    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import Secret

    with SyncSecretsManager.from_config(load_config(store.config)) as manager:
        for name, value in names.items():
            manager.store(Secret(name, value))
    switch = tmp_path / "hang"
    store.config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: hanging, path: {store.db}, switch: {switch} }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        f"  cache: {{ ttl: {ttl}, max_stale: 1h, read_ahead: false }}\n"
        "  rotation: { enabled: false }\n"
        "  audit: { path: audit.log }\n"
        f"  backend_timeout: {TIMEOUT:g}s\n"
    )
    plugins = install_plugin(tmp_path / "plugins", "hanging_backend", HANGING_BACKEND, "hanging")
    return store, switch, store.env(PYTHONPATH=str(plugins))


def in_parallel(actions: list[Callable[[], object]]) -> list[tuple[object, float]]:
    results: list[tuple[object, float]] = [(None, 0.0)] * len(actions)

    def run(i: int) -> None:
        results[i] = timed(actions[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def backend_stats(mount: Mount) -> dict:
    return mount.stats()["backend"]


# -- a backend that hangs ---------------------------------------------------------------------


@needs_mounts
def test_a_hung_backend_costs_a_reader_at_most_the_timeout_and_no_one_else_anything(
        tmp_path: Path) -> None:
    names = {"warm": fresh(), "cold": fresh(), "cold2": fresh(), "cold3": fresh(),
             **{f"stuck/s{i}": fresh() for i in range(10)},
             **{f"more/m{i}": fresh() for i in range(10)}}
    store, switch, env = hanging_store(tmp_path, names, ttl="300s")
    with mounted(store, tmp_path / "mnt", env=env) as mount:
        root = mount.path

        def file(name: str) -> Path:
            return root / name / "latest" / "value"

        def fail_together(prefix: str, numbers: range) -> None:
            for result, took in in_parallel([lambda i=i: file(f"{prefix}{i}").read_bytes()
                                             for i in numbers]):
                assert isinstance(result, OSError) and result.errno == errno.EIO, result
                assert took <= BOUND, f"failed after {took:.2f}s"

        def others_answer_quickly() -> None:
            assert_reads_within(file("warm"), names["warm"])
            for action in (lambda: os.listdir(root), lambda: os.listdir(root / "warm"),
                           lambda: os.stat(file("warm")),
                           lambda: (root / ".secretfs/health").read_text()):
                result, took = timed(action)
                assert not isinstance(result, OSError), result
                assert took <= QUICK, f"took {took:.2f}s"
            # (says so once the change follower has met the hang; answers at once either way)
            assert json.loads((root / ".secretfs/health").read_text())["status"] in (
                "ok", "backend unavailable")

        assert_reads_within(file("warm"), names["warm"], bound=5.0)  # now cached

        # One read that hangs: it fails within the bound, and meanwhile everything else that
        # needs no backend answers at once (the trio thread never waits on the backend).
        reader = threading.Thread(target=lambda: assert_eio_within(file("stuck/s0"), BOUND))
        reader.start()
        time.sleep(0.2)
        others_answer_quickly()
        reader.join()

        # More hung reads than there are worker threads (8), which never return …
        fail_together("stuck/s", range(1, 8))
        fail_together("stuck/s", range(8, 10))
        assert eventually(lambda: backend_stats(mount)["abandoned"] == 10, timeout=2.0), \
            backend_stats(mount)
        # … gave their thread back: an uncached read of a healthy secret still works.
        assert backend_stats(mount)["threads_busy"] == 0
        assert_reads_within(file("cold"), names["cold"], bound=TIMEOUT)
        # A read identical to one still hung is refused at once, adding no thread.
        assert_eio_within(file("stuck/s0"), QUICK)
        assert backend_stats(mount)["abandoned"] == 10

        # Now everything hangs: cached reads still answer at once, uncached ones fail in time.
        switch.touch()
        others_answer_quickly()
        assert_eio_within(file("cold2"), BOUND)
        # Past the bound of abandoned threads (2 per worker thread: 16), reads fail at once
        # instead of leaving one more thread behind.
        fail_together("more/m", range(10))
        stats = backend_stats(mount)
        assert stats["max_abandoned"] == 16
        assert 16 <= stats["abandoned"] <= 16 + 8 - 1, stats
        assert_eio_within(file("cold3"), QUICK)  # refused: no thread is started for it
        assert backend_stats(mount)["refused"] >= 1
        others_answer_quickly()

        # The switch goes: the threads it held return, and uncached reads work again.
        switch.unlink()
        assert eventually(lambda: backend_stats(mount)["abandoned"] == 10, timeout=3.0), \
            backend_stats(mount)
        assert_reads_within(file("cold2"), names["cold2"], bound=TIMEOUT)
        assert_reads_within(file("cold3"), names["cold3"], bound=TIMEOUT)

        # SIGTERM with threads that will never return: a clean unmount, exit 0.
        started = time.monotonic()
        code = stop(mount)
        assert code == 0, mount.log_text()[-3000:]
        assert time.monotonic() - started < 5.0
        assert not is_mounted(mount.path)
        log = mount.log_text()
        assert "did not return in time" in log and "Traceback" not in log
        for value in names.values():
            assert value not in log


@needs_mounts
def test_stale_values_are_served_within_the_timeout_while_the_backend_hangs(
        tmp_path: Path) -> None:
    names = {"cached": fresh(), "half": fresh(), "never": fresh()}
    store, switch, env = hanging_store(tmp_path, names, ttl="0s")  # every read asks
    with mounted(store, tmp_path / "mnt", env=env) as mount:
        root = mount.path
        cached = root / "cached/latest/value"
        assert cached.read_text() == names["cached"]
        os.listdir(root / "half/latest")  # its metadata is cached, its value is not
        switch.touch()
        try:
            # The first read waits one timeout (metadata), then is served the stale value
            # without waiting a second time for the value.
            assert_reads_within(cached, names["cached"], bound=BOUND)
            assert os.getxattr(cached, "user.secretfs.stale") == b"1"
            assert_reads_within(cached, names["cached"])  # the hung request is not repeated
            assert_eio_within(root / "half/latest/value", BOUND)
            assert_eio_within(root / "never/latest/value", BOUND)
            for action in (lambda: os.listdir(root),
                           lambda: (root / ".secretfs/health").read_text()):
                result, took = timed(action)
                assert not isinstance(result, OSError) and took <= QUICK, (result, took)
            assert mount.stats()["cache"]["stale_serves"] >= 1
        finally:
            switch.unlink()
        assert eventually(lambda: mount.stats()["backend"]["abandoned"] == 0, timeout=3.0)
        assert (root / "half/latest/value").read_text() == names["half"]
        assert (root / "never/latest/value").read_text() == names["never"]
        assert cached.read_text() == names["cached"]
        with pytest.raises(OSError):
            os.getxattr(cached, "user.secretfs.stale")


def test_backend_timeout_is_a_validated_config_key(tmp_path: Path) -> None:
    from secretfs.config import load_config
    from secretfs.errors import ConfigError

    config = tmp_path / "config.yaml"
    config.write_text("secrets_manager:\n  backend_timeout: 250ms\n")
    assert load_config(str(config)).manager.backend_timeout == 0.25
    config.write_text("secrets_manager: {}\n")
    assert load_config(str(config)).manager.backend_timeout == 5.0
    for bad in ("0s", "soon"):
        config.write_text(f"secrets_manager:\n  backend_timeout: {bad}\n")
        with pytest.raises(ConfigError, match=r"secrets_manager\.backend_timeout"):
            load_config(str(config))


async def test_hung_reads_give_their_thread_back_and_are_bounded(tmp_path: Path) -> None:
    """The manager alone (no mount): more hung reads than threads, a healthy read still
    runs; past max_abandoned, reads fail at once; a returning thread frees its place."""
    import trio

    from secretfs.errors import BackendUnavailable
    from secretfs.manager import SecretsManager

    release = threading.Event()
    calls: list[str] = []

    class Backend:
        kind = "test"

        def read_metadata(self, name: str) -> object:
            calls.append(name)
            if name.startswith("stuck"):
                release.wait()
            raise_not_found(name)

    def raise_not_found(name: str) -> None:
        from secretfs.errors import SecretNotFound

        raise SecretNotFound(f"secret {name!r} not found", "none here")

    class Sync:
        backend = Backend()

        def metadata(self, name: str) -> object:
            return self.backend.read_metadata(name)

        def close(self) -> None:
            pass

    manager = SecretsManager(Sync(), max_threads=2, backend_timeout=0.2,  # type: ignore[arg-type]
                             max_abandoned=3)
    from secretfs.errors import SecretNotFound

    for i in range(3):  # three hung reads, more than the two threads
        with pytest.raises(BackendUnavailable, match=r"did not answer within 0\.2s"):
            await manager.fresh_metadata(f"stuck{i}")
    assert manager.backend_status()["abandoned"] == 3
    assert manager.backend_status()["threads_busy"] == 0
    with trio.fail_after(1):
        with pytest.raises(BackendUnavailable, match=r"3 requests .* have not returned"):
            await manager.fresh_metadata("healthy")  # at the bound: refused at once
    assert "healthy" not in calls
    release.set()  # the hung threads return; their results are dropped
    with trio.fail_after(2):
        while manager.backend_status()["abandoned"]:
            await trio.sleep(0.01)
    with pytest.raises(SecretNotFound):  # answered, not refused
        await manager.fresh_metadata("healthy")
    assert manager.timeouts == 3 and manager.refused == 1


# -- a reader that stops reading --------------------------------------------------------------

PAUSING_READER = r"""
import hashlib, os, signal, sys
with open(sys.argv[1], "rb", buffering=0) as file:
    first = file.read(1)
    print("read", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped here until SIGCONT
    rest = b""
    while chunk := file.read(65536):
        rest += chunk
print(hashlib.sha256(first + rest).hexdigest(), len(first + rest), flush=True)
"""


def start_pausing_reader(path: Path) -> subprocess.Popen[str]:
    reader = subprocess.Popen([sys.executable, "-c", PAUSING_READER, str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    assert reader.stdout.readline() == "read\n", reader.stderr.read() if reader.stderr else ""
    assert eventually(lambda: Path(f"/proc/{reader.pid}/stat").read_text()
                      .rsplit(")", 1)[1].split()[0] == "T", timeout=5.0), "reader not stopped"
    return reader


@needs_mounts
def test_a_stopped_reader_blocks_nothing_and_reads_its_own_snapshot_when_continued(
        store: Store, tmp_path: Path) -> None:
    old, new = os.urandom(300_000), os.urandom(200_000)  # larger than one kernel read-ahead
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    store.put("cert", "--from-file", str(tmp_path / "old"))
    with mounted(store, tmp_path / "mnt") as mount:
        path = mount.path / "cert/latest/value"
        reader = start_pausing_reader(path)
        try:
            assert json.loads((mount.path / ".secretfs/health").read_text())["open_files"] >= 1
            assert path.read_bytes() == old  # other readers are served meanwhile
            store.put("cert", "--from-file", str(tmp_path / "new"))  # a rotation
            assert eventually(lambda: path.read_bytes() == new, timeout=2.0)
            assert (mount.path / "cert/previous/value").read_bytes() == old
            os.kill(reader.pid, signal.SIGCONT)
            out, err = reader.communicate(timeout=10)
        finally:
            if reader.poll() is None:
                reader.kill()
        assert reader.returncode == 0, err
        assert out.split() == [hashlib.sha256(old).hexdigest(), str(len(old))]  # ITS snapshot
        assert path.read_bytes() == new

        # A reader stopped with the file open does not hold up the unmount either.
        second = start_pausing_reader(path)
        try:
            code = stop(mount)
            assert code == 0, mount.log_text()[-2000:]
            assert not is_mounted(mount.path)
        finally:
            second.kill()
            second.wait()


# -- values in memory -------------------------------------------------------------------------


def buffer_loader(value: bytes) -> Callable[[], object]:
    async def load() -> bytearray:
        return bytearray(value)

    return load


async def test_the_cache_zeroes_the_buffers_it_drops() -> None:
    from secretfs.cache import TtlCache
    from tests.test_cache import FakeClock

    clock = FakeClock()
    cache = TtlCache(ttl=10, max_size=2, max_stale=60, clock=clock)

    async def held(name: str, key: str = "v1", value: bytes = b"s3cr3t-value") -> bytearray:
        buffer = (await cache.get_or_load(name, key, buffer_loader(value))).value
        assert buffer == value  # type: ignore[comparison-overlap]
        return buffer  # type: ignore[return-value]

    def zeroed(buffer: bytearray) -> bool:
        return len(buffer) > 0 and buffer == bytearray(len(buffer))

    invalidated = await held("a")
    cache.invalidate("a")
    assert zeroed(invalidated)

    evicted = await held("b")
    await held("c")
    await held("d")  # max_size 2: b, the least recently used, goes
    assert zeroed(evicted)

    replaced = await held("c")  # still fresh: the same buffer
    clock.advance(11)
    newer = await held("c", value=b"another-value")  # past its ttl: a new load replaces it
    assert zeroed(replaced) and not zeroed(newer)

    expired = await held("e")
    clock.advance(10 + 60 + 1)  # past ttl + max_stale: of no use any more, not even stale
    assert cache.expire() >= 1
    assert zeroed(expired)

    also_expired = await held("f")
    clock.advance(100)
    await held("f", value=b"reloaded")  # found past ttl + max_stale on a read: dropped
    assert zeroed(also_expired)

    kept = [await held("g"), await held("h")]
    cache.clear()
    assert all(zeroed(buffer) for buffer in kept)


async def test_the_manager_caches_values_in_buffers_it_wipes(tmp_path: Path) -> None:
    import trio

    from secretfs.backends.local import LocalBackend
    from secretfs.cache import TtlCache
    from secretfs.crypto.keys import LocalMasterKey
    from secretfs.manager import HeldValue, SecretsManager, SyncSecretsManager
    from secretfs.model import Secret

    sync = SyncSecretsManager(LocalBackend.open(tmp_path / "store.db",
                                                LocalMasterKey(secrets.token_bytes(32)),
                                                create=True))
    cache = TtlCache(ttl=300, max_size=100, max_stale=3600)
    manager = SecretsManager(sync, cache=cache)
    try:
        password = fresh()
        await manager.store(Secret("db", {"user": "app", "password": password}))
        await manager.store(Secret("single", b"one-value"))
        # The public types are as before: bytes from resolve, bytes or a str map from get.
        assert await manager.resolve("db/latest/password") == password.encode()
        assert (await manager.get("db")).value == {"user": "app", "password": password}
        assert (await manager.get("single")).value == b"one-value"
        assert await manager.resolve("single") == b"one-value"

        held = cache.peek("db", "v1")
        assert held is not None and isinstance(held.value, HeldValue)
        assert "app" not in repr(held) and password not in repr(held.value)
        for thing in (held, held.value, cache):
            with pytest.raises(TypeError, match="pickle"):
                pickle.dumps(thing)
        assert held.value.key_bytes("password", "db") == password.encode()
        manager.forget("db")  # what a change does
        assert held.value.wiped
        assert held.value.key_bytes("password", "db") == bytearray(len(password))
        assert held.value.key_bytes("user", "db") == bytearray(3)

        # Two readers share one load; the first drops (wipes) the entry as soon as it has
        # its copy, before the second's turn comes: the second loads again, never reads zeros.
        manager.forget("single")
        reloads: list[str] = []
        reload = manager._reload

        async def counted(*args: object) -> object:
            reloads.append("reload")
            return await reload(*args)  # type: ignore[arg-type]

        manager._reload = counted  # type: ignore[method-assign]
        got: list[bytes] = []

        async def read_then_forget() -> None:
            got.append(await manager.resolve("single"))
            manager.forget("single")

        before = manager.backend_reads
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_then_forget)
            nursery.start_soon(read_then_forget)
        assert got == [b"one-value"] * 2
        assert reloads == ["reload"] and manager.backend_reads == before + 2
    finally:
        manager.close()


async def test_open_handles_keep_their_own_copy_and_zero_it_at_release(tmp_path: Path) -> None:
    import pyfuse3

    from secretfs.access.callers import CallerCache
    from secretfs.backends.local import LocalBackend
    from secretfs.cache import TtlCache
    from secretfs.crypto.keys import LocalMasterKey
    from secretfs.fs.operations import SecretsFS
    from secretfs.manager import SecretsManager, SyncSecretsManager
    from secretfs.model import Secret

    sync = SyncSecretsManager(LocalBackend.open(tmp_path / "store.db",
                                                LocalMasterKey(secrets.token_bytes(32)),
                                                create=True))
    value = fresh().encode()
    sync.store(Secret("db", value))
    filesystem = SecretsFS(SecretsManager(sync, cache=TtlCache(ttl=300, max_size=10,
                                                               max_stale=60)), CallerCache())
    ctx = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    try:
        await filesystem.load_names()
        inode = pyfuse3.ROOT_INODE
        for part in (b"db", b"latest", b"value"):
            inode = (await filesystem.lookup(inode, part, ctx)).st_ino

        async def open_view() -> tuple[int, memoryview]:
            handle = (await filesystem.open(inode, os.O_RDONLY, ctx)).fh
            view = await filesystem.read(handle, 0, 4096)
            assert bytes(view) == value
            return handle, view

        first, first_view = await open_view()
        _, second_view = await open_view()
        assert first_view.obj is not second_view.obj  # each open has its own copy
        filesystem.manager.forget("db")  # the cache drops (and wipes) its entry …
        assert bytes(await filesystem.read(first, 0, 4096)) == value  # … the handle keeps its
        await filesystem.release(first)
        assert first_view.obj == bytearray(len(value))  # zeroed at release
        assert bytes(second_view) == value
        filesystem.wipe()  # the daemon stops: open handles are zeroed too
        assert second_view.obj == bytearray(len(value))
    finally:
        filesystem.manager.close()
