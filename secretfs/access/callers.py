"""The callers cache of the filesystem: (uid, gid, thread id) of a FUSE request → Caller.

The first request from a process reads ``/proc`` once (principal.py's readers) and opens a pidfd
for it; later requests from it read nothing. Exited processes are evicted when their pidfd
becomes readable, exec'd ones through the kernel's exec events (docs/callers.md).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import struct
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from secretfs.access.principal import (
    PROC,
    Caller,
    ProcessGone,
    parse_start_time,
    read_proc_file,
    resolve_process,
    thread_group,
)

log = logging.getLogger(__name__)


# --- exec notifications -------------------------------------------------------------------------

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_PROC_EVENT_NONE = 0  # the acknowledgement of a LISTEN
_PROC_EVENT_EXEC = 2
_NLMSG_DONE = 3
_EVENT = 36  # offset of struct proc_event: after nlmsghdr (16) and cn_msg (20)
_EVENT_DATA = _EVENT + 16  # the union after what, cpu, timestamp_ns


class _ExecWatch:
    """A proc-connector socket that reports every execve() on the machine.

    Needs CAP_NET_ADMIN and the initial pid and user namespaces; :meth:`open` returns None
    elsewhere. The kernel queues the event before the new program runs, so by the time that
    program's first request reaches the daemon, the event is already readable here.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @staticmethod
    def _message(payload: bytes) -> bytes:
        cn = struct.pack("=IIIIHH", _CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        return struct.pack("=IHHII", 16 + len(cn), _NLMSG_DONE, 0, 0, 0) + cn

    @classmethod
    def open(cls) -> _ExecWatch | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 _NETLINK_CONNECTOR)
        except (OSError, AttributeError) as e:
            log.debug("no proc connector: %s", e)
            return None
        try:
            try:  # room for bursts; FORCE works for root, plain RCVBUF is capped by rmem_max
                sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, _CN_IDX_PROC))
            sock.setblocking(False)
            # The 4-byte LISTEN is acknowledged synchronously (err 0, or EPERM without
            # CAP_NET_ADMIN); outside the initial pid/user namespace nothing comes back.
            sock.send(cls._message(struct.pack("=I", _PROC_CN_MCAST_LISTEN)))
            if not cls._acknowledged(sock):
                sock.close()
                return None
            # Linux >= 6.6: narrow the subscription to exec events (struct proc_input); older
            # kernels ignore this message and keep sending every event, which is only slower.
            sock.send(cls._message(struct.pack("=II", _PROC_CN_MCAST_LISTEN, _PROC_EVENT_EXEC)))
        except OSError as e:
            log.debug("proc connector unavailable: %s", e)
            sock.close()
            return None
        return cls(sock)

    @staticmethod
    def _acknowledged(sock: socket.socket) -> bool:
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return False
            if len(data) >= _EVENT_DATA + 4:
                what, = struct.unpack_from("=I", data, _EVENT)
                if what == _PROC_EVENT_NONE:
                    err, = struct.unpack_from("=I", data, _EVENT_DATA)
                    return err == 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[int] | None:
        """The tgids that called execve since the last read; None if events were lost."""
        tgids: list[int] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return tgids
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the queue overflowed: some events are lost
                    return None
                raise
            at = 0
            while at + _EVENT_DATA + 8 <= len(data):
                length, = struct.unpack_from("=I", data, at)
                what, = struct.unpack_from("=I", data, at + _EVENT)
                if what == _PROC_EVENT_EXEC:
                    tgids.append(struct.unpack_from("=I", data, at + _EVENT_DATA + 4)[0])
                if length < 16:
                    break
                at += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


# --- the cache ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CallerStats:
    """Counters since start; the daemon shows them in ``.secretfs/stats``.

    ``hits``/``misses`` count ``resolve`` calls. ``gone`` counts misses whose process vanished
    before it could be read (answered uid/gid only, not cached). ``evictions`` counts entries
    dropped for any reason, of which ``exits`` for a process exit, ``execs`` for an execve,
    ``stale`` when a check on a hit found the pid, tid or executable no longer the cached one.
    ``pidfds`` is the number of pidfds open now.
    """

    hits: int = 0
    misses: int = 0
    gone: int = 0
    evictions: int = 0
    exits: int = 0
    execs: int = 0
    stale: int = 0
    pidfds: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class _Process:
    """A cached process. With a pidfd the entry is valid until the pidfd turns readable."""

    __slots__ = ("caller", "pidfd", "threads")

    def __init__(self, caller: Caller, pidfd: int | None) -> None:
        self.caller = caller
        self.pidfd = pidfd
        self.threads: set[int] = set()  # cached non-leader tids of this process


class _Thread:
    __slots__ = ("process", "start_time")

    def __init__(self, process: _Process, start_time: int) -> None:
        self.process = process
        self.start_time = start_time


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class CallerCache:
    """Resolves (uid, gid, tid) from a FUSE request to a Caller, cached per live process.

    A miss reads /proc once and opens a pidfd for the process. A hit reads nothing: it asks one
    epoll set, without waiting, whether any cached process exited or exec'd (``epoll_wait`` with a
    zero timeout, well under a microsecond), and otherwise trusts the entry.

    **How pidfds reach the watcher.** Every pidfd, and the exec-notification socket, is added to
    one ``select.epoll`` set owned by the cache; ``resolve()`` registers a new pidfd with a plain
    ``epoll_ctl``. The ``run()`` task waits on that single epoll fd with
    ``trio.lowlevel.wait_readable`` (an epoll fd is pollable, so it nests in trio's own) and
    evicts what it reports. Compared with handing each pidfd to a task (a memory channel, or
    ``spawn_system_task`` per process), there is nothing to hand over: ``resolve()`` works before
    ``run()`` starts and without trio at all, there is one task however many processes are
    cached, and closing the set is one place. It also closes a race a watcher task cannot:
    process A exits, its pid is reused by B, and B's request is handled in the same scheduler
    batch, before the watcher task ran. Because ``resolve()`` drains the same set first, an
    exited process is always evicted before its pid is looked up.

    **Threads.** A request from a non-leader thread is cached under its tid too. The tid can be
    reused by another process while the cached process lives on, so each such hit checks that
    ``/proc/TGID/task/TID`` exists: procfs only resolves that path while TID is a thread of TGID,
    and TGID is known alive (its pidfd is not readable). One ``access()`` call, no read.

    **Without pidfds** (``pidfd_open`` fails: old kernel, seccomp, or the fd budget, half the
    soft RLIMIT_NOFILE, is spent) an entry is checked on every hit by re-reading its start time
    (for a thread: the thread's own start time) — exact, one small read slower.

    **Exec.** execve keeps the pid and the start time but changes the program. Where the kernel
    allows it (root in the initial namespaces) a proc-connector socket in the same epoll set
    evicts the process on exec; elsewhere each hit stats /proc/PID/exe and compares (st_dev,
    st_ino) with the cached ``exe_id``.

    At most ``max_entries`` processes (and as many non-leader threads) are cached; the least
    recently used is dropped first. Not thread-safe: use it from the one trio thread.
    """

    def __init__(self, *, proc: Path = PROC, max_entries: int = 4096,
                 watch_exec: bool = True) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._proc = str(proc)
        self._max = max_entries
        self._want_exec_watch = watch_exec
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Leave half the fd limit to the rest of the daemon; entries past it go without pidfds.
        self._max_pidfds = max_entries if soft == resource.RLIM_INFINITY else soft // 2
        self._processes: OrderedDict[int, _Process] = OrderedDict()  # by tgid, LRU first
        self._threads: OrderedDict[int, _Thread] = OrderedDict()  # non-leader tids
        self._by_fd: dict[int, _Process] = {}
        self._epoll: select.epoll | None = None
        self._exec: _ExecWatch | None = None
        self._pidfd_works = hasattr(os, "pidfd_open")
        self._running = False
        self.stats = CallerStats()

    def __len__(self) -> int:
        return len(self._processes)

    @property
    def watching_exec(self) -> bool:
        """True when execve is reported by the kernel (else each hit stats the executable)."""
        return self._exec is not None

    # -- resolution --

    def resolve(self, uid: int, gid: int, tid: int) -> Caller:
        """The Caller for a request from thread *tid* with credentials *uid*/*gid*.

        Never raises for a process that is gone: the answer is then ``Caller(uid, gid, tid)``
        with nothing else known, and it is not cached.
        """
        epoll = self._epoll
        if epoll is None:
            epoll = self._start()
        if epoll.poll(0):  # something exited or exec'd: evict it before any lookup
            self._drain()
        entry = self._processes.get(tid)
        if entry is not None:  # tid is the leader of a cached process
            if entry.pidfd is None and not self._same_start(entry):
                self._stale(entry)
                entry = None
        else:
            thread = self._threads.get(tid)
            if thread is not None:
                entry = thread.process
                if not self._thread_alive(entry, tid, thread):  # also vouches for the process
                    self._forget_thread(tid)
                    self.stats.stale += 1
                    entry = None
        if entry is not None and self._exec is None and not self._same_exe(entry):
            self._stale(entry)
            entry = None
        if entry is None:
            return self._miss(uid, gid, tid)
        self.stats.hits += 1
        return self._answer(entry, uid, gid)

    def _answer(self, entry: _Process, uid: int, gid: int) -> Caller:
        self._processes.move_to_end(entry.caller.pid)
        caller = entry.caller
        if caller.uid != uid or caller.gid != gid:  # credentials are per request (setuid, fsuid)
            caller = entry.caller = replace(caller, uid=uid, gid=gid)
        return caller

    def _same_start(self, entry: _Process) -> bool:
        try:
            stat = read_proc_file(f"{self._proc}/{entry.caller.pid}/stat")
        except (ProcessGone, OSError):
            return False
        return parse_start_time(stat) == entry.caller.start_time

    def _thread_alive(self, entry: _Process, tid: int, thread: _Thread) -> bool:
        path = f"{self._proc}/{entry.caller.pid}/task/{tid}"
        if entry.pidfd is not None:
            return os.access(path, os.F_OK)
        try:  # the same thread (same start time) is still in the same process
            return parse_start_time(read_proc_file(f"{path}/stat")) == thread.start_time
        except (ProcessGone, OSError):
            return False

    def _same_exe(self, entry: _Process) -> bool:
        try:
            st = os.stat(f"{self._proc}/{entry.caller.pid}/exe")
        except OSError:
            return entry.caller.exe_id is None
        return (st.st_dev, st.st_ino) == entry.caller.exe_id

    def _miss(self, uid: int, gid: int, tid: int) -> Caller:
        self.stats.misses += 1
        try:
            tgid = thread_group(tid, Path(self._proc))
            entry = self._processes.get(tgid)
            if entry is not None and not self._valid(entry):
                self._stale(entry)
                entry = None
            if entry is None:
                entry = self._load(uid, gid, tgid)
            if tid != tgid:
                # Confirms tid is (still) a thread of tgid: status may have been read just before
                # the process exited and tgid was taken by another.
                start = parse_start_time(read_proc_file(f"{self._proc}/{tgid}/task/{tid}/stat"))
                self._add_thread(entry, tid, start)
        except (ProcessGone, OSError, ValueError) as e:
            log.debug("caller %d gone before it could be read: %s", tid, e)
            self.stats.gone += 1
            return Caller(uid=uid, gid=gid, pid=tid)
        return self._answer(entry, uid, gid)

    def _valid(self, entry: _Process) -> bool:
        """Checks for an entry found by tgid on a miss (a new thread of a cached process)."""
        if entry.pidfd is None and not self._same_start(entry):
            return False
        return self._exec is not None or self._same_exe(entry)

    def _load(self, uid: int, gid: int, tgid: int) -> _Process:
        while len(self._processes) >= self._max:  # make room first: its pidfd can be reused
            self._evict(next(iter(self._processes.values())))
        pidfd = self._open_pidfd(tgid)
        try:
            caller = resolve_process(tgid, uid, gid, self._proc, recheck=pidfd is None)
            # With a pidfd taken before the reads: if it is still not readable, the process
            # was alive throughout, so every field above belongs to it.
            if pidfd is not None and _exited(pidfd):
                raise ProcessGone(tgid)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
                self.stats.pidfds -= 1
            raise
        entry = _Process(caller, pidfd)
        if pidfd is not None:
            assert self._epoll is not None
            self._epoll.register(pidfd, select.EPOLLIN)
            self._by_fd[pidfd] = entry
        self._processes[tgid] = entry
        return entry

    def _open_pidfd(self, tgid: int) -> int | None:
        if not self._pidfd_works or len(self._by_fd) >= self._max_pidfds:
            return None
        try:
            fd = os.pidfd_open(tgid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessGone(tgid) from None
            if e.errno in (errno.ENOSYS, errno.EPERM):  # old kernel, or forbidden by seccomp
                self._pidfd_works = False
            log.debug("pidfd_open(%d): %s; checking start times instead", tgid, e)
            return None
        self.stats.pidfds += 1  # pidfds are close-on-exec
        return fd

    def _add_thread(self, entry: _Process, tid: int, start: int) -> None:
        self._threads[tid] = _Thread(entry, start)
        entry.threads.add(tid)
        while len(self._threads) > self._max:
            self._forget_thread(next(iter(self._threads)))

    def _forget_thread(self, tid: int) -> None:
        thread = self._threads.pop(tid, None)
        if thread is not None:
            thread.process.threads.discard(tid)

    # -- eviction --

    def _evict(self, entry: _Process) -> None:
        tgid = entry.caller.pid
        if self._processes.get(tgid) is not entry:
            return
        del self._processes[tgid]
        for tid in entry.threads:
            self._threads.pop(tid, None)
        entry.threads.clear()
        if entry.pidfd is not None:
            del self._by_fd[entry.pidfd]
            if self._epoll is not None:
                self._epoll.unregister(entry.pidfd)
            os.close(entry.pidfd)
            entry.pidfd = None
            self.stats.pidfds -= 1
        self.stats.evictions += 1

    def _stale(self, entry: _Process) -> None:
        self.stats.stale += 1
        self._evict(entry)

    def _drain(self) -> None:
        """Evict every cached process that exited or exec'd; never waits."""
        while self._epoll is not None:
            events = self._epoll.poll(0, 1024)
            for fd, _ in events:
                if self._exec is not None and fd == self._exec.fileno():
                    self._read_execs()
                else:
                    entry = self._by_fd.get(fd)
                    if entry is not None:
                        self.stats.exits += 1
                        self._evict(entry)
            if len(events) < 1024:
                return

    def _read_execs(self) -> None:
        assert self._exec is not None
        try:
            tgids = self._exec.read()
        except OSError as e:
            log.warning("proc connector failed (%s); checking executables on every hit", e)
            tgids = None
            self._stop_exec_watch()
        if tgids is None:  # events were lost: nothing cached can be trusted
            self.clear()
            return
        for tgid in tgids:
            entry = self._processes.get(tgid)
            if entry is not None:
                self.stats.execs += 1
                self._evict(entry)

    # -- lifecycle --

    def _start(self) -> select.epoll:
        epoll = self._epoll = select.epoll()
        if self._want_exec_watch:
            self._exec = _ExecWatch.open()
            if self._exec is not None:
                epoll.register(self._exec.fileno(), select.EPOLLIN)
        return epoll

    def _stop_exec_watch(self) -> None:
        if self._exec is not None:
            if self._epoll is not None:
                self._epoll.unregister(self._exec.fileno())
            self._exec.close()
            self._exec = None

    def clear(self) -> None:
        """Drop every entry and close its pidfd."""
        for entry in list(self._processes.values()):
            self._evict(entry)

    def close(self) -> None:
        """Drop every entry and close every fd; a later ``resolve()`` starts afresh."""
        self.clear()
        if self._epoll is not None:
            if self._running:  # wake run() with ClosedResourceError instead of a dead fd
                import trio

                trio.lowlevel.notify_closing(self._epoll.fileno())
            self._stop_exec_watch()
            self._epoll.close()
            self._epoll = None

    async def run(self) -> None:
        """Evict processes as they exit or exec; runs until cancelled, then closes every fd."""
        import trio

        epoll = self._epoll if self._epoll is not None else self._start()
        self._running = True
        try:
            while True:
                try:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                except trio.ClosedResourceError:  # close() was called
                    return
                self._drain()
        finally:
            self._running = False
            self.close()
