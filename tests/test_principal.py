"""Caller resolution: /proc parsing, the per-process cache, pidfd eviction, pid and tid reuse."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from secretfs.access import principal
from secretfs.access.callers import CallerCache, CallerStats
from secretfs.access.principal import (
    Caller,
    ProcessGone,
    read_process,
    thread_group,
)

SLEEP = "/usr/bin/sleep"
NO_SUCH_PID = 4194305  # above PID_MAX_LIMIT: never a process


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def no_pidfds(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EPERM, "pidfd_open refused")

    monkeypatch.setattr(os, "pidfd_open", refuse)


@pytest.fixture
def cache() -> Iterator[CallerCache]:
    callers = CallerCache()
    yield callers
    callers.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(argv or (SLEEP, "30"), **kwargs)  # type: ignore[call-overload]
        children.append(child)
        if not argv:
            wait_for_exe(child.pid, SLEEP)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


class Parked:
    """A thread of this process that waits until released; ``tid`` is its kernel thread id."""

    def __init__(self) -> None:
        self.release = threading.Event()
        started = threading.Event()
        self.tid = 0

        def body() -> None:
            self.tid = threading.get_native_id()
            started.set()
            self.release.wait()

        self.thread = threading.Thread(target=body)
        self.thread.start()
        started.wait()

    def stop(self) -> None:
        self.release.set()
        self.thread.join()
        while os.path.exists(f"/proc/{os.getpid()}/task/{self.tid}"):  # the kernel side exits last
            time.sleep(0.001)


def wait_for_exe(pid: int, exe: str) -> None:
    """Until *pid* runs *exe* and blocks (so its execve, and the exec event, are complete)."""
    deadline = time.monotonic() + 5
    process = psutil.Process(pid)  # (its exe() is cached: it would miss an execve)
    while os.readlink(f"/proc/{pid}/exe") != exe or process.status() != psutil.STATUS_SLEEPING:
        assert time.monotonic() < deadline, f"{pid} never ran {exe}"
        time.sleep(0.005)


# --- Caller and reading /proc ----------------------------------------------------------------


def test_current_matches_psutil_and_stat() -> None:
    me = Caller.current()
    ps = psutil.Process()
    assert (me.uid, me.gid, me.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert (me.uid, me.gid) == (ps.uids().effective, ps.gids().effective)
    assert me.exe == ps.exe()
    assert me.exe_id == file_id(ps.exe())
    assert me.start_time is not None
    started = psutil.boot_time() + me.start_time / os.sysconf("SC_CLK_TCK")
    assert started == pytest.approx(ps.create_time(), abs=0.05)
    assert me.mnt_ns == os.stat("/proc/self/ns/mnt").st_ino
    assert me.pid_ns == os.stat("/proc/self/ns/pid").st_ino
    assert me.identity == (os.getpid(), me.start_time)


def test_old_style_construction_still_works() -> None:
    caller = Caller(uid=1000, gid=100, pid=42)
    assert (caller.start_time, caller.exe, caller.exe_id, caller.mnt_ns, caller.pid_ns) == (
        None, None, None, None, None)
    assert caller.identity == (42, None)
    assert caller == Caller(uid=1000, gid=100, pid=42)
    assert hash(caller) == hash(Caller(uid=1000, gid=100, pid=42))


def test_read_process_of_a_child_matches_psutil(spawn: Callable[..., subprocess.Popen[bytes]]
                                                 ) -> None:
    child = spawn()
    caller = read_process(child.pid, 1000, 1000)
    ps = psutil.Process(child.pid)
    assert caller.pid == child.pid and (caller.uid, caller.gid) == (1000, 1000)
    assert caller.exe == SLEEP == ps.exe()
    assert caller.exe_id == file_id(SLEEP)
    assert caller.start_time is not None
    assert psutil.boot_time() + caller.start_time / os.sysconf("SC_CLK_TCK") == pytest.approx(
        ps.create_time(), abs=0.05)


def test_thread_group_maps_threads_to_their_process() -> None:
    parked = Parked()
    try:
        assert parked.tid != os.getpid()
        assert thread_group(parked.tid) == os.getpid()
        assert thread_group(os.getpid()) == os.getpid()
    finally:
        parked.stop()
    with pytest.raises(ProcessGone):
        thread_group(parked.tid)
    with pytest.raises(ProcessGone):
        thread_group(NO_SUCH_PID)


def test_read_process_of_a_missing_pid_raises_process_gone() -> None:
    with pytest.raises(ProcessGone):
        read_process(NO_SUCH_PID, 0, 0)


def test_fake_proc_tree_parses_hostile_command_names(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "43").mkdir()
    fields = ["S"] + [str(n) for n in range(4, 22)] + ["12345"] + ["0"] * 30
    (tmp_path / "42" / "stat").write_bytes(b"42 (a) b) S (c) " + " ".join(fields).encode())
    (tmp_path / "43" / "status").write_bytes(b"Name:\tx\nUmask:\t0022\nState:\tS\nTgid:\t42\n")
    caller = read_process(42, 1, 2, proc=tmp_path)
    assert caller == Caller(uid=1, gid=2, pid=42, start_time=12345)  # no exe, no ns: None
    assert thread_group(43, proc=tmp_path) == 42
    with pytest.raises(ProcessGone):
        thread_group(44, proc=tmp_path)


@given(comm=st.binary(max_size=15).filter(lambda b: b"\0" not in b and b"\n" not in b),
       start=st.integers(min_value=0, max_value=2**63))
def test_start_time_survives_any_command_name(comm: bytes, start: int) -> None:
    line = b"7 (" + comm + b") R " + b" ".join(b"%d" % n for n in range(4, 22))
    assert principal.parse_start_time(line + b" %d 0 0\n" % start) == start


# --- the cache ---------------------------------------------------------------------------------


def test_resolve_own_process_and_hit(cache: CallerCache) -> None:
    first = cache.resolve(0, 0, os.getpid())
    assert first == replace(Caller.current(), uid=0, gid=0)
    assert cache.resolve(0, 0, os.getpid()) is first
    assert (cache.stats.misses, cache.stats.hits, len(cache)) == (1, 1, 1)


def test_a_thread_resolves_to_its_process(cache: CallerCache) -> None:
    parked = Parked()
    try:
        caller = cache.resolve(0, 0, parked.tid)
        assert caller.pid == os.getpid()
        assert caller.identity == Caller.current().identity
        assert cache.resolve(0, 0, parked.tid) is caller  # cached under the tid too
        assert cache.resolve(0, 0, os.getpid()) is caller  # and the process under its tgid
        assert (cache.stats.misses, cache.stats.hits, len(cache)) == (1, 2, 1)
    finally:
        parked.stop()
    # The thread is gone: its tid no longer leads to this process.
    gone = cache.resolve(0, 0, parked.tid)
    assert gone == Caller(uid=0, gid=0, pid=parked.tid)
    assert cache.stats.stale == 1


def test_credentials_come_from_each_request(cache: CallerCache) -> None:
    root = cache.resolve(0, 0, os.getpid())
    user = cache.resolve(1000, 1001, os.getpid())
    assert (user.uid, user.gid) == (1000, 1001)
    assert user.identity == root.identity and user.exe_id == root.exe_id
    assert cache.stats.hits == 1


def test_a_process_gone_before_resolve_is_answered_but_not_cached(cache: CallerCache) -> None:
    done = subprocess.Popen(["true"])
    done.wait()
    assert cache.resolve(1000, 1000, done.pid) == Caller(uid=1000, gid=1000, pid=done.pid)
    assert cache.resolve(5, 6, 0) == Caller(uid=5, gid=6, pid=0)  # kernel-internal requests
    assert len(cache) == 0
    assert cache.stats.gone == 2


def test_exit_is_noticed_on_the_next_resolve_without_run(
        cache: CallerCache, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    child = spawn()
    assert cache.resolve(0, 0, child.pid).exe == SLEEP
    child.kill()
    child.wait()
    assert cache.resolve(0, 0, child.pid) == Caller(uid=0, gid=0, pid=child.pid)
    assert (cache.stats.exits, cache.stats.pidfds, len(cache)) == (1, 0, 0)


def test_bounded_least_recently_used_first(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    callers = CallerCache(max_entries=2)
    try:
        a, b, c = spawn(), spawn(), spawn()
        callers.resolve(0, 0, a.pid)
        callers.resolve(0, 0, b.pid)
        callers.resolve(0, 0, a.pid)  # a is now more recent than b
        before = fd_count()
        callers.resolve(0, 0, c.pid)  # evicts b, closing its pidfd
        assert len(callers) == 2 and callers.stats.pidfds == 2 and fd_count() == before
        misses = callers.stats.misses
        callers.resolve(0, 0, a.pid)
        callers.resolve(0, 0, c.pid)
        assert callers.stats.misses == misses
        callers.resolve(0, 0, b.pid)
        assert callers.stats.misses == misses + 1
        assert callers.stats.evictions == 2
    finally:
        callers.close()
    with pytest.raises(ValueError):
        CallerCache(max_entries=0)


def test_other_pid_and_mount_namespace(cache: CallerCache,
                                       spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    outer = spawn("unshare", "--pid", "--mount", "--fork", "--mount-proc", SLEEP, "30")
    deadline = time.monotonic() + 5
    while not (children := psutil.Process(outer.pid).children()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    inner = children[0].pid  # the host's pid of the process that is pid 1 in its namespace
    wait_for_exe(inner, SLEEP)
    me = Caller.current()
    caller = cache.resolve(1000, 1000, inner)
    assert caller.pid == inner
    assert caller.exe == SLEEP and caller.exe_id == file_id(SLEEP)
    assert caller.pid_ns is not None and caller.pid_ns != me.pid_ns
    assert caller.mnt_ns is not None and caller.mnt_ns != me.mnt_ns


@pytest.mark.parametrize("watch_exec", [True, False], ids=["proc-connector", "stat-exe"])
def test_exec_replaces_the_cached_program(watch_exec: bool,
                                          spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    callers = CallerCache(watch_exec=watch_exec)
    try:
        shell = spawn("sh", "-c", f"read line; exec {SLEEP} 30", stdin=subprocess.PIPE)
        wait_for_exe(shell.pid, "/usr/bin/dash")
        before = callers.resolve(0, 0, shell.pid)
        assert before.exe == "/usr/bin/dash"
        assert callers.watching_exec == (watch_exec and os.geteuid() == 0)
        assert shell.stdin is not None
        shell.stdin.write(b"go\n")
        shell.stdin.flush()
        wait_for_exe(shell.pid, SLEEP)
        after = callers.resolve(0, 0, shell.pid)
        assert after.identity == before.identity  # execve keeps the pid and the start time
        assert after.exe == SLEEP and after.exe_id == file_id(SLEEP)
        if callers.watching_exec:
            assert (callers.stats.execs, callers.stats.stale) == (1, 0)
        else:
            assert (callers.stats.execs, callers.stats.stale) == (0, 1)
    finally:
        callers.close()


def test_forged_entry_with_a_wrong_start_time_is_detected(
        monkeypatch: pytest.MonkeyPatch, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    no_pidfds(monkeypatch)  # the fallback: every hit re-reads the start time
    callers = CallerCache()
    try:
        child = spawn()
        real = callers.resolve(0, 0, child.pid)
        assert callers.stats.pidfds == 0 and real.start_time is not None
        assert callers.resolve(0, 0, child.pid) is real
        # Forge what pid reuse would leave behind: an entry for this pid, another process.
        entry = callers._processes[child.pid]
        entry.caller = replace(real, start_time=real.start_time - 7, exe="/usr/bin/forged")
        again = callers.resolve(0, 0, child.pid)
        assert again == real and callers.stats.stale == 1
    finally:
        callers.close()


def test_fallback_thread_entries_check_the_thread_start_time(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    no_pidfds(monkeypatch)
    callers = CallerCache()
    parked = Parked()
    try:
        caller = callers.resolve(0, 0, parked.tid)
        assert caller.pid == os.getpid()
        callers._threads[parked.tid].start_time -= 1  # as if the tid now named another thread
        assert callers.resolve(0, 0, parked.tid).identity == caller.identity  # re-resolved
        assert callers.stats.stale == 1 and callers.stats.misses == 2
    finally:
        parked.stop()
        callers.close()


# --- what a hit costs: counted, not timed ------------------------------------------------------


class ProcAccess:
    """Counts every filesystem call the module could make under /proc."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        for name in ("open", "stat", "lstat", "readlink", "access", "listdir", "pidfd_open"):
            self._wrap(monkeypatch, name)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        real = getattr(os, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls.append((name, str(args[0]) if args else ""))
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)


def test_a_cached_leader_hit_touches_nothing_in_proc(cache: CallerCache,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cache.resolve(0, 0, os.getpid())
    if not cache.watching_exec:
        pytest.skip("the proc connector needs root in the initial namespaces")
    counter = ProcAccess(monkeypatch)
    cache.resolve(0, 0, os.getpid())
    assert counter.calls == []
    assert cache.stats.hits == 1


def test_a_cached_thread_hit_costs_one_access(cache: CallerCache,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    parked = Parked()
    try:
        cache.resolve(0, 0, parked.tid)
        counter = ProcAccess(monkeypatch)
        cache.resolve(0, 0, parked.tid)
        expected = [("access", f"/proc/{os.getpid()}/task/{parked.tid}")]
        if not cache.watching_exec:
            expected.append(("stat", f"/proc/{os.getpid()}/exe"))
        assert counter.calls == expected
    finally:
        monkeypatch.undo()
        parked.stop()


def test_without_exec_events_a_hit_stats_the_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    callers = CallerCache(watch_exec=False)
    try:
        callers.resolve(0, 0, os.getpid())
        counter = ProcAccess(monkeypatch)
        callers.resolve(0, 0, os.getpid())
        assert counter.calls == [("stat", f"/proc/{os.getpid()}/exe")]
    finally:
        callers.close()


def test_without_pidfds_a_hit_reads_the_start_time(monkeypatch: pytest.MonkeyPatch) -> None:
    no_pidfds(monkeypatch)
    callers = CallerCache()
    try:
        callers.resolve(0, 0, os.getpid())
        counter = ProcAccess(monkeypatch)
        callers.resolve(0, 0, os.getpid())
        calls = [c for c in counter.calls if c[0] != "stat" or not c[1].endswith("/exe")]
        assert calls == [("open", f"/proc/{os.getpid()}/stat")]
        assert callers.stats.hits == 1
    finally:
        callers.close()


# --- run(): eviction on exit, and no fd left behind --------------------------------------------


async def test_run_evicts_a_killed_process_within_a_second(
        cache: CallerCache, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    cache.resolve(0, 0, os.getpid())  # opens the epoll set (and exec socket) up front
    baseline = fd_count()
    child = spawn()
    assert cache.resolve(0, 0, child.pid).pid == child.pid
    assert len(cache) == 2 and fd_count() == baseline + 1  # one pidfd
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        await trio.sleep(0.05)
        child.kill()
        with trio.fail_after(1):
            while len(cache) != 1:
                await trio.sleep(0.005)
        assert fd_count() == baseline
        assert cache.stats.exits == 1 and cache.stats.pidfds == 1
        nursery.cancel_scope.cancel()


async def test_cancelling_run_closes_every_fd(spawn: Callable[..., subprocess.Popen[bytes]]
                                             ) -> None:
    baseline = fd_count()
    callers = CallerCache()
    for child in (spawn(), spawn(), spawn()):
        callers.resolve(0, 0, child.pid)
    assert fd_count() > baseline + 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(callers.run)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert fd_count() == baseline
    assert len(callers) == 0 and callers.stats.pidfds == 0


async def test_close_stops_run(cache: CallerCache,
                               spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    baseline = fd_count()
    cache.resolve(0, 0, spawn().pid)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run)
            await trio.sleep(0.05)
            cache.close()  # run() wakes with ClosedResourceError and returns
    assert fd_count() == baseline and len(cache) == 0


def test_stats_to_json() -> None:
    stats = CallerStats(hits=3, misses=1)
    assert stats.to_json() == {"hits": 3, "misses": 1, "gone": 0, "evictions": 0, "exits": 0,
                               "execs": 0, "stale": 0, "pidfds": 0}
    json.dumps(stats.to_json())


def test_importing_the_module_does_not_import_trio() -> None:
    code = "import sys, secretfs.access.principal; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- real pid and tid reuse, in a private pid namespace ----------------------------------------

REUSE = r"""
import errno, json, os, subprocess, sys, threading, time

from secretfs.access.callers import CallerCache

if sys.argv[1] == "fallback":
    def refuse(pid, flags=0):
        raise OSError(errno.EPERM, "pidfd_open refused")
    os.pidfd_open = refuse

def start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])

def spawn_at(pid):
    for _ in range(100):  # the kernel frees a pid a little after the task left /proc
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:  # the next pid handed out here
            f.write(str(pid - 1))
        child = subprocess.Popen(["sleep", "30"])
        if child.pid == pid:
            return child
        child.kill(); child.wait()
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never became free")

cache = CallerCache()
out = {"mode": sys.argv[1]}

# 1. A process exits; a new process gets its pid.
old = subprocess.Popen(["sleep", "30"])
first = cache.resolve(0, 0, old.pid)
old.kill(); old.wait()
time.sleep(0.03)  # a later clock tick, so the start times differ
new = spawn_at(old.pid)
second = cache.resolve(0, 0, new.pid)
out["process"] = {"old": first.identity, "new": second.identity,
                  "real": [new.pid, start_time(new.pid)], "stats": cache.stats.to_json()}
new.kill(); new.wait()

# 2. A thread of this (living) process exits; a new process gets its tid.
release, tids = threading.Event(), []
worker = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), release.wait()))
worker.start()
while not tids:
    time.sleep(0.001)
tid = tids[0]
by_thread = cache.resolve(0, 0, tid)
release.set(); worker.join()
while os.path.exists(f"/proc/{os.getpid()}/task/{tid}"):
    time.sleep(0.001)
other = spawn_at(tid)
reused = cache.resolve(0, 0, tid)
out["thread"] = {"tid": tid, "me": os.getpid(), "by_thread": by_thread.pid,
                 "reused": reused.pid, "exe": reused.exe, "other": other.pid}
other.kill(); other.wait()
cache.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["pidfd", "fallback"])
def test_real_pid_and_tid_reuse_in_a_private_pid_namespace(mode: str) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a pid namespace whose ns_last_pid we may set)")
    root = Path(principal.__file__).resolve().parents[2]
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", REUSE, mode],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    process = out["process"]
    assert process["new"] == process["real"]  # the new process, not the cached old one
    assert process["old"][0] == process["new"][0] and process["old"][1] != process["new"][1]
    if mode == "pidfd":
        assert process["stats"]["exits"] == 1  # noticed by the pidfd, before the lookup
    else:
        assert process["stats"]["stale"] == 1  # noticed by the start time
    thread = out["thread"]
    assert thread["by_thread"] == thread["me"]
    assert thread["reused"] == thread["other"] == thread["tid"] != thread["me"]
    assert thread["exe"] == SLEEP
