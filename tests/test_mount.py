"""The filesystem through real mounts: shape, per-caller decisions, freshness, failure, life.

Every test mounts for real (root, /dev/fuse) and unmounts in a `finally`, whatever happens.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import LOCAL_BACKEND_IN_PLUGIN, Store, eventually, install_plugin, make_store
from tests.mounting import (
    Mount,
    as_user,
    force_unmount,
    is_mounted,
    mounted,
    start,
    stop,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="real mounts need root and /dev/fuse")


def fresh(size: int = 16) -> str:
    return secrets.token_hex(size)


@pytest.fixture
def mnt(store: Store):
    """A mount of the test's store, on a path other uids can reach (tmp_path's parents are
    private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    folder.chmod(0o755)
    try:
        with mounted(store, folder / "mnt") as mount:
            yield mount
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the tree ---------------------------------------------------------------------------------


def test_files_folders_labels_and_versions(store: Store, tmp_path: Path) -> None:
    first, second = fresh(), fresh()
    store.put("db_password", first, "--description", "Database password", "--tag", "env=prod",
              "--rotate-every", "90d")
    store.put("db_password", second)
    password = fresh()
    store.put("api_keys/stripe", "--key", "secret=" + password, "--key", "account=acct_1")
    with mounted(store, tmp_path / "mnt") as mount:
        root = mount.path
        assert (root / "db_password/latest/value").read_text() == second
        assert (root / "db_password/current/value").read_text() == second
        assert (root / "db_password/previous/value").read_text() == first
        assert (root / "db_password/1/value").read_text() == first
        assert (root / "api_keys/stripe/latest/secret").read_text() == password
        assert (root / "api_keys/stripe/1/account").read_text() == "acct_1"
        assert sorted(os.listdir(root)) == [".secretfs", "api_keys", "db_password"]
        assert sorted(os.listdir(root / "db_password")) == ["1", "2", "current", "latest",
                                                             "previous"]
        assert not (root / "db_password/pending").exists()
        assert sorted(os.listdir(root / "api_keys/stripe/latest")) == ["account", "secret"]

        info = os.stat(root / "db_password/latest/value")
        assert oct(info.st_mode) == oct(0o100400) and info.st_uid == 0
        assert info.st_size == len(second)
        assert oct(os.stat(root / "db_password").st_mode) == oct(0o40500)
        # latest/value is version 2's file: the same inode, like a hard link
        assert info.st_ino == os.stat(root / "db_password/2/value").st_ino

        listing = subprocess.run(["ls", "-R", str(root)], capture_output=True, check=True,
                                 text=True).stdout
        assert "previous" in listing and "secret" in listing
        attributes = subprocess.run(
            ["getfattr", "-d", "--absolute-names", str(root / "db_password/previous/value")],
            capture_output=True, check=True, text=True).stdout
        assert 'user.secretfs.version="1"' in attributes
        assert 'user.secretfs.description="Database password"' in attributes
        assert "user.secretfs.next_rotation=" in attributes
        assert "user.secretfs.tags=" in attributes
        stat_out = subprocess.run(["stat", "-c", "%a %U %s", str(root / "db_password/1/value")],
                                  capture_output=True, check=True, text=True).stdout
        assert stat_out.split() == ["400", "root", str(len(first))]


def test_writes_are_refused(mnt: Mount) -> None:
    with pytest.raises(OSError) as caught:
        (mnt.path / "new").write_text("x")
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        os.mkdir(mnt.path / "folder")
    assert caught.value.errno == errno.EROFS


def test_a_folder_of_5000_secrets_lists_each_once(tmp_path: Path) -> None:
    store = make_store(tmp_path / "big")
    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import Secret

    with SyncSecretsManager.from_config(load_config(store.config)) as manager:
        for i in range(5000):
            manager.store(Secret(f"many/s{i:05d}", "x"))
    with mounted(store, tmp_path / "mnt") as mount:
        listing = subprocess.run(["ls", "-f", str(mount.path / "many")], capture_output=True,
                                 check=True, text=True).stdout.split()
        names = [n for n in listing if n not in (".", "..")]
        assert len(names) == 5000 and len(set(names)) == 5000


def test_odd_names_are_enoent_and_never_crash_the_daemon(mnt: Mount, store: Store) -> None:
    store.put("db", fresh())
    for odd in ("..", "db/..x", "db/latest/..", "db/0", "db/01/value", "db/latest/value/x",
                ".secretfs/nope", "a b", "db/latest/user"):
        with pytest.raises(OSError) as caught:
            (mnt.path / odd).read_bytes() if not odd.endswith("..") else os.stat(
                mnt.path / odd / "value")
        assert caught.value.errno in (errno.ENOENT, errno.ENOTDIR), odd

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\x00" not in b and b"/" not in b))
    def probe(name: bytes) -> None:
        for parent in (b"", b"db/", b"db/latest/"):
            path = os.fsencode(mnt.path) + b"/" + parent + name
            try:
                os.open(path, os.O_RDONLY)
            except OSError as error:
                assert error.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR,
                                       errno.EISDIR), error

    probe()
    assert mnt.process.poll() is None
    assert (mnt.path / "db/latest/value").exists()


# -- who may read -----------------------------------------------------------------------------


def test_other_uids_are_denied_under_the_default_policy(store: Store, mnt: Mount) -> None:
    value = fresh()
    store.put("db", value)
    target = str(mnt.path / "db/latest/value")
    for _ in range(2):  # every open reaches the daemon: a denial is never cached as allowed
        denied = as_user(4242, "cat", target)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert value.encode() not in denied.stdout
    listing = as_user(4242, "ls", "-A", str(mnt.path))
    assert listing.returncode == 0 and listing.stdout == b""
    assert (mnt.path / "db/latest/value").read_text() == value
    assert mnt.stats()["fs"]["denials"] == 2  # no default_permissions: the daemon saw both


def test_status_files_are_for_root_only(store: Store, mnt: Mount) -> None:
    health = json.loads((mnt.path / ".secretfs/health").read_text())
    assert health["status"] == "ok"
    denied = as_user(4242, "cat", str(mnt.path / ".secretfs/stats"))
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_a_reader_in_other_namespaces_is_identified(store: Store, mnt: Mount,
                                                    tmp_path: Path) -> None:
    import psutil

    value = fresh()
    store.put("db", value)
    inside = tmp_path / "inside"
    inside.mkdir()
    script = (f"mount --bind {mnt.path} {inside} && exec 3< {inside}/db/latest/value "
              f"&& cat <&3 && sleep 3")
    child = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                              "sh", "-c", script], stdout=subprocess.PIPE)
    try:
        reader = eventually(lambda: [p for p in psutil.Process(child.pid).children(True)
                                     if p.name() == "sleep"], timeout=3.0)
        assert reader, "the reader in the namespace did not start"
        shell = reader[0].parent()  # `sleep` was forked by the shell that opened the file
        stats = mnt.stats()
        readers = {entry["pid"]: entry for entry in stats["fs"]["recent_opens"]}
        assert shell.pid in readers, (shell.pid, readers)
        assert readers[shell.pid]["exe"].endswith("sh") or "dash" in readers[shell.pid]["exe"]
        assert readers[shell.pid]["pid_ns"] != os.stat("/proc/self/ns/pid").st_ino
    finally:
        out, _ = child.communicate(timeout=10)
    assert out == value.encode()


# -- the cache and freshness ------------------------------------------------------------------


def test_64_concurrent_opens_of_an_uncached_secret_read_the_backend_once(
        store: Store, mnt: Mount) -> None:
    value = fresh()
    store.put("cold", value)
    before = mnt.stats()["backend_reads"]
    barrier = threading.Barrier(64)
    results: list[bytes] = []

    def read() -> None:
        barrier.wait()
        with open(mnt.path / "cold/latest/value", "rb") as file:
            results.append(file.read())

    threads = [threading.Thread(target=read) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [value.encode()] * 64
    assert mnt.stats()["backend_reads"] - before == 1


def test_a_lookup_inside_a_secret_reads_its_value_ahead_for_a_caller_who_may_read_it(
        store: Store, mnt: Mount) -> None:
    value = fresh()
    store.put("ahead", value)
    before = mnt.stats()["backend_reads"]
    # the default policy denies uid 4242: its lookups start nothing
    as_user(4242, "stat", str(mnt.path / "ahead" / "latest"))
    time.sleep(0.3)
    assert mnt.stats()["backend_reads"] == before
    os.stat(mnt.path / "ahead")  # root's walk towards ahead/latest/value
    eventually(lambda: mnt.stats()["backend_reads"] == before + 1)
    time.sleep(1.5)  # past the audit log's flush: still nothing on record, nothing disclosed
    records = [json.loads(line) for line in (store.root / "audit.log").read_text().splitlines()]
    assert not [r for r in records if r["resource"] == "ahead" and r["action"] == "read"]
    assert (mnt.path / "ahead/latest/value").read_text() == value
    assert mnt.stats()["backend_reads"] == before + 1  # the open found it loaded


def test_read_ahead_can_be_turned_off(store: Store, tmp_path: Path) -> None:
    store.config.write_text(store.config.read_text() + "  cache: { read_ahead: false }\n")
    store.put("ahead", fresh())
    with mounted(store, tmp_path / "mnt") as mount:
        before = mount.stats()["backend_reads"]
        os.stat(mount.path / "ahead" / "latest" / "value")
        time.sleep(0.3)
        assert mount.stats()["backend_reads"] == before
        (mount.path / "ahead/latest/value").read_bytes()
        assert mount.stats()["backend_reads"] == before + 1


def test_an_open_reader_keeps_its_version_while_new_opens_see_the_new_one(
        store: Store, mnt: Mount, tmp_path: Path) -> None:
    old = os.urandom(100_000)
    new = os.urandom(120_000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    store.put("cert", "--from-file", str(tmp_path / "old"))
    with open(mnt.path / "cert/latest/value", "rb", buffering=0) as reader:
        start = reader.read(4096)
        store.put("cert", "--from-file", str(tmp_path / "new"))
        seen = eventually(lambda: (mnt.path / "cert/latest/value").read_bytes() == new,
                          timeout=1.0)
        assert seen, "a new open did not see the new version within one second"
        rest = reader.read()
    assert start + rest == old
    assert sorted(os.listdir(mnt.path / "cert")) == ["1", "2", "current", "latest", "previous"]
    assert (mnt.path / "cert/previous/value").read_bytes() == old
    assert os.getxattr(mnt.path / "cert/latest/value", "user.secretfs.version") == b"2"


def test_labels_follow_puts_deletes_and_new_names(store: Store, mnt: Mount) -> None:
    store.put("db", fresh())
    assert sorted(os.listdir(mnt.path / "db")) == ["1", "current", "latest"]
    store.put("later", fresh())
    assert eventually(lambda: "later" in os.listdir(mnt.path), timeout=1.5)
    store.cli("secrets", "rm", "later", check=True)
    assert eventually(lambda: "later" not in os.listdir(mnt.path), timeout=1.5)
    assert eventually(lambda: not (mnt.path / "later").exists(), timeout=1.5)


# -- failure and life -------------------------------------------------------------------------


FLAKY_BACKEND = '''
import os

from secretfs.errors import BackendUnavailable


class Flaky:
    """The real local backend, failing while a switch file exists."""

    kind = "flaky"

    def __init__(self, inner, switch):
        self.inner, self.switch = inner, switch

    def __getattr__(self, attribute):
        target = getattr(self.inner, attribute)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            if os.path.exists(self.switch):
                raise BackendUnavailable("flaky backend switched off")
            if os.path.exists(self.switch + ".bug"):
                raise ValueError("a bug in a backend")
            return target(*args, **kwargs)

        return call


def factory(config, *, create=False):
    return Flaky(local_backend(config, create=create),
                 str(config.manager.backend.options["switch"]))
''' + LOCAL_BACKEND_IN_PLUGIN


def test_backend_failure_serves_cached_values_stale_and_recovers(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    cached, uncached = fresh(), fresh()
    store.put("cached", cached)
    store.put("uncached", uncached)
    switch = tmp_path / "backend-down"
    store.config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: flaky, path: {store.db}, switch: {switch} }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  cache: { ttl: 0s, max_stale: 1h, read_ahead: false }\n"  # `uncached` stays so
        "  audit: { path: audit.log }\n"
    )
    plugins = install_plugin(tmp_path / "plugins", "flaky_backend", FLAKY_BACKEND, "flaky")
    env = store.env(PYTHONPATH=str(plugins))
    with mounted(store, tmp_path / "mnt", env=env) as mount:
        cached_file = mount.path / "cached/latest/value"
        assert cached_file.read_text() == cached
        os.listdir(mount.path / "uncached/latest")  # metadata cached, value not
        switch.touch()
        assert cached_file.read_text() == cached
        assert os.getxattr(cached_file, "user.secretfs.stale") == b"1"
        with pytest.raises(OSError) as caught:
            (mount.path / "uncached/latest/value").read_text()
        assert caught.value.errno == errno.EIO
        switch.unlink()
        bug = Path(f"{switch}.bug")
        bug.touch()  # an unexpected exception: EIO for this read, the mount lives on
        with pytest.raises(OSError) as caught:
            (mount.path / "uncached/latest/value").read_text()
        assert caught.value.errno == errno.EIO
        assert "bug in open" in mount.log_text() or "Traceback" in mount.log_text()
        bug.unlink()
        assert (mount.path / "uncached/latest/value").read_text() == uncached
        assert cached_file.read_text() == cached
        with pytest.raises(OSError):
            os.getxattr(cached_file, "user.secretfs.stale")
        assert mount.stats()["fs"]["stale_serves"] >= 1


def test_sigterm_unmounts_and_exits_0(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "mnt"
    log = tmp_path / "mnt.log"
    process = start(store, path, log)
    try:
        assert is_mounted(path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not is_mounted(path)
    finally:
        force_unmount(path)
        if process.poll() is None:
            process.kill()


def test_a_killed_daemon_leaves_a_mount_the_next_one_cleans_up(store: Store,
                                                               tmp_path: Path) -> None:
    value = fresh()
    store.put("db", value)
    path = tmp_path / "mnt"
    log = tmp_path / "mnt.log"
    process = start(store, path, log)
    try:
        process.kill()
        process.wait()
        with pytest.raises(OSError) as caught:
            os.listdir(path / "db")
        assert caught.value.errno == errno.ENOTCONN
        process = start(store, path, log)
        assert (path / "db/latest/value").read_text() == value
    finally:
        stop(Mount(path, process, log))


def test_sighup_with_a_bad_config_keeps_serving(store: Store, mnt: Mount) -> None:
    value = fresh()
    store.put("db", value)
    good = store.config.read_text()
    store.config.write_text(good + "  cache: { ttl: never }\n")
    try:
        mnt.process.send_signal(signal.SIGHUP)
        assert eventually(lambda: "config reload rejected" in mnt.log_text(), timeout=3.0)
        assert "ttl" in mnt.log_text()
        assert (mnt.path / "db/latest/value").read_text() == value
        assert mnt.process.poll() is None
    finally:
        store.config.write_text(good)
    mnt.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: "configuration reloaded" in mnt.log_text(), timeout=3.0)


def test_mount_daemonizes_and_umount_stops_it(store: Store, tmp_path: Path) -> None:
    value = fresh()
    store.put("db", value)
    path = tmp_path / "mnt"
    log = tmp_path / "daemon.log"
    try:
        started = subprocess.run(
            [sys.executable, "-m", "secretfs", "mount", str(path), "--log-file", str(log)],
            env=store.env(), capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started.stderr
        assert (path / "db/latest/value").read_text() == value  # answering on return
        again = subprocess.run([sys.executable, "-m", "secretfs", "mount", str(path)],
                               env=store.env(), capture_output=True, timeout=30)
        assert again.returncode == 1 and b"already mounted" in again.stderr
        stopped = store.cli("umount", str(path))
        assert stopped.returncode == 0, stopped.stderr
        assert not is_mounted(path)
    finally:
        force_unmount(path)


def test_ready_is_sent_only_once_the_mount_answers(store: Store, tmp_path: Path) -> None:
    import socket

    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(20)
    path = tmp_path / "mnt"
    path.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "secretfs", "mount", str(path), "--foreground"],
        env=store.env(NOTIFY_SOCKET=str(notify)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        message = sock.recv(256)
        assert message == b"READY=1"
        assert os.listdir(path) == [".secretfs"]  # answering already
        process.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert process.wait(10) == 0
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
        force_unmount(path)


def test_the_daemon_is_hardened(store: Store, mnt: Mount) -> None:
    value = fresh()
    store.put("db", value)
    assert (mnt.path / "db/latest/value").read_text() == value
    proc = Path(f"/proc/{mnt.process.pid}")
    core = next(line for line in (proc / "limits").read_text().splitlines()
                if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    locked_kb = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                     if line.startswith("VmLck:"))
    assert locked_kb > 0  # mlockall: values stay out of swap
    for exposed in ("environ", "cmdline"):
        assert value.encode() not in (proc / exposed).read_bytes()
    assert value not in mnt.log_text()
