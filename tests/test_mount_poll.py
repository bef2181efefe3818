"""A backend without a change feed (a remote service other hosts write to) is followed by polling
its metadata: a write made elsewhere shows under the mount within the poll interval."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from secretfs.config import load_config
from tests.helpers import LOCAL_BACKEND_IN_PLUGIN, install_plugin, make_store
from tests.mounting import mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="real mounts need root and /dev/fuse")

SILENT_BACKEND = '''



class Silent:
    """The real local backend, minus its change feed: like OpenBao or AWS to the daemon."""

    kind = "silent"
    capabilities = frozenset({"versions", "labels", "cas", "metadata", "folders"})

    def __init__(self, inner):
        self.inner = inner

    def changes_since(self, cursor):
        return (0, None) if cursor is None else (cursor, set())

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)


def factory(config, *, create=False):
    return Silent(local_backend(config, create=create))
''' + LOCAL_BACKEND_IN_PLUGIN


def test_writes_made_elsewhere_appear_within_the_poll_interval(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    first, second = os.urandom(8).hex(), os.urandom(8).hex()
    store.put("db", first)
    daemon_config = tmp_path / "daemon.yaml"
    daemon_config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: silent, path: {store.db} }}\n"
        f"  encryption: {{ provider: file, key_file: {store.key_file} }}\n"
        f"  audit: {{ path: {store.root / 'audit.log'} }}\n"
        "  cache: { ttl: 1h, poll_interval: 1s }\n"
    )
    plugins = install_plugin(tmp_path / "plugins", "silent_backend", SILENT_BACKEND, "silent")
    env = store.env(PYTHONPATH=str(plugins), SECRETFS_CONFIG=str(daemon_config))
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt", env=env) as mount:
            target = mount.path / "db/latest/value"
            assert target.read_text() == first  # cached for an hour: only polling can tell
            store.put("db", second)  # "another host": the store's own CLI, not the daemon
            store.put("newcomer", first)
            deadline = time.monotonic() + 5
            while target.read_text() != second:
                assert time.monotonic() < deadline, "the change was not noticed"
                time.sleep(0.1)
            assert (mount.path / "newcomer/latest/value").read_text() == first
            assert "backend unavailable" not in mount.log_text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_poll_renews_cached_metadata_past_its_ttl(tmp_path: Path) -> None:
    """What a poll just read replaces an entry past its ttl, so that the first open after it
    costs one backend request (the value), not two (metadata again, then the value)."""
    from secretfs.access.callers import CallerCache
    from secretfs.cache import TtlCache
    from secretfs.fs.operations import SecretsFS
    from secretfs.manager import SecretsManager, SyncSecretsManager
    from secretfs.poll import MetadataPoller
    from tests.test_cache import FakeClock

    store = make_store(tmp_path / "s")
    store.put("db", os.urandom(8).hex())
    clock = FakeClock()
    cache = TtlCache(ttl=10, max_size=100, max_stale=3600, clock=clock)
    sync = SyncSecretsManager.from_config(load_config(str(store.config)))
    filesystem = SecretsFS(SecretsManager(sync, cache=cache), CallerCache())
    await filesystem.load_names()
    poller = MetadataPoller(filesystem.manager, known=lambda: set(filesystem.tree.index.names()),
                            changed=filesystem.changed)
    await poller.poll_once(0)  # the first look
    clock.advance(11)
    assert cache.peek("db", "metadata").stale
    await poller.poll_once(0)  # nothing changed, but the entry is renewed
    renewed = cache.peek("db", "metadata")
    assert renewed is not None and not renewed.stale and renewed.loaded_at == clock.now
    filesystem.manager.close()


async def test_the_kernel_drops_a_changed_files_pages_off_the_request_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping an inode's pages waits for a page lock that a read in flight holds until the
    daemon's request thread answers it: called on that thread, the daemon would deadlock on
    itself (seen under a reader loop). It must run in a worker thread."""
    import threading

    import pyfuse3

    from secretfs.access.callers import CallerCache
    from secretfs.fs.operations import SecretsFS
    from secretfs.manager import SecretsManager, SyncSecretsManager

    store = make_store(tmp_path / "s")
    store.put("db", os.urandom(8).hex())
    sync = SyncSecretsManager.from_config(load_config(str(store.config)))
    filesystem = SecretsFS(SecretsManager(sync), CallerCache())
    await filesystem.load_names()
    threads: list[threading.Thread] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode",
                        lambda inode, attr_only=False: threads.append(threading.current_thread()))
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", lambda *args, **kwargs: None)
    monkeypatch.setattr(filesystem.tree, "inodes_of", lambda name: [1234] if name == "db" else [])
    await filesystem.changed({"db"})
    assert threads and all(thread is not threading.main_thread() for thread in threads)
    filesystem.manager.close()
