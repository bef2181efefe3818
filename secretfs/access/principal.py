"""The caller of an operation: the process on whose behalf the manager acts.

The CLI and the Python API act for their own process (``Caller.current()``). The filesystem gets
``(uid, gid, tid)`` with every FUSE request and turns it into a :class:`Caller` through the
``CallerCache`` of callers.py, which reads ``/proc`` once per process with the readers here.
docs/callers.md explains the scheme and its limits.

This module is on every command's import path, so it imports only a little of the standard
library; the cache's sockets, epoll and logging live in callers.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PROC = Path("/proc")
T = TypeVar("T")


class ProcessGone(Exception):
    """The process (or thread) exited, or was replaced, before it could be read."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A calling process as the kernel identifies it.

    ``uid``/``gid`` come from the kernel with each request and are what access rules trust.
    ``(pid, start_time)`` names one process for as long as the machine is up (a pid alone can be
    reused). ``exe`` is the path the kernel shows for the running executable: informational, since
    a user in its own user+mount namespace can make any path show; rules compare ``exe_id``
    (the executable's device and inode) instead. Fields that could not be read are None.
    """

    uid: int
    gid: int
    pid: int  # the process (thread-group id), not the thread
    start_time: int | None = None  # field 22 of /proc/PID/stat, clock ticks since boot
    exe: str | None = None  # readlink /proc/PID/exe (may end in " (deleted)")
    exe_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the running executable
    mnt_ns: int | None = None  # inode of /proc/PID/ns/mnt
    pid_ns: int | None = None  # inode of /proc/PID/ns/pid

    @classmethod
    def current(cls) -> Caller:
        """This process, fully resolved (uid/gid only if /proc cannot be read)."""
        uid, gid, pid = os.geteuid(), os.getegid(), os.getpid()
        try:
            return read_process(pid, uid, gid)
        except (ProcessGone, OSError):
            return cls(uid=uid, gid=gid, pid=pid)

    @property
    def identity(self) -> tuple[int, int | None]:
        """``(pid, start_time)``: the same value means the same process."""
        return (self.pid, self.start_time)


# --- reading /proc ------------------------------------------------------------------------------

_GONE = (errno.ENOENT, errno.ESRCH)


def read_proc_file(path: str) -> bytes:
    """The first 4 KiB of a /proc file; ProcessGone if the process (or thread) is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE:
            raise ProcessGone(path) from None
        raise
    try:
        return os.read(fd, 4096)
    except OSError as e:  # ESRCH: the task was reaped between open and read
        if e.errno in _GONE:
            raise ProcessGone(path) from None
        raise
    finally:
        os.close(fd)


def parse_start_time(stat: bytes) -> int:
    """Field 22 (starttime) of a /proc/PID/stat line.

    Field 2 is the command name in parentheses and may itself contain spaces and ``)``; it is the
    only free-form field, so the fields after it start after the *last* ``)``.
    """
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[22 - 3])  # rest[0] is field 3 (state)


def _tgid(status: bytes) -> int:
    at = status.index(b"\nTgid:") + 6
    return int(status[at:status.index(b"\n", at)])


def thread_group(tid: int, proc: Path = PROC) -> int:
    """The process (``Tgid`` in /proc/TID/status) that thread *tid* belongs to."""
    try:
        return _tgid(read_proc_file(f"{proc}/{tid}/status"))
    except ValueError:  # no Tgid line: not a process directory
        raise ProcessGone(tid) from None


def _optional(call: Callable[[str], T], path: str) -> T | None:
    """``call(path)``, or None if the kernel will not show it (zombie, kernel thread, EACCES)."""
    try:
        return call(path)
    except OSError:
        return None


def resolve_process(pid: int, uid: int, gid: int, proc: str, *, recheck: bool) -> Caller:
    base = f"{proc}/{pid}"
    start = parse_start_time(read_proc_file(f"{base}/stat"))
    exe = _optional(os.readlink, f"{base}/exe")
    st = _optional(os.stat, f"{base}/exe")
    mnt = _optional(os.stat, f"{base}/ns/mnt")
    pidns = _optional(os.stat, f"{base}/ns/pid")
    # Without a pidfd held across the reads, re-read the start time: if the pid was freed and
    # taken by another process meanwhile, the fields above may mix two processes.
    if recheck and parse_start_time(read_proc_file(f"{base}/stat")) != start:
        raise ProcessGone(pid)
    return Caller(
        uid=uid, gid=gid, pid=pid, start_time=start, exe=exe,
        exe_id=(st.st_dev, st.st_ino) if st is not None else None,
        mnt_ns=mnt.st_ino if mnt is not None else None,
        pid_ns=pidns.st_ino if pidns is not None else None,
    )


def read_process(pid: int, uid: int, gid: int, proc: Path = PROC) -> Caller:
    """One fresh resolution of process *pid* (a thread-group id; see :func:`thread_group`).

    Raises ProcessGone if the process is not there, or exited and its pid was reused while it was
    being read. Fields the kernel will not show (exe of a zombie, EACCES) are None.
    """
    return resolve_process(pid, uid, gid, str(proc), recheck=True)
