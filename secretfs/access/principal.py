"""The caller of an operation: the process on whose behalf the manager acts."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """A calling process as the kernel identifies it.

    The CLI and the Python API act for their own process (``Caller.current()``); the filesystem
    builds one per request from the FUSE context.
    """

    uid: int
    gid: int
    pid: int

    @classmethod
    def current(cls) -> Caller:
        return cls(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())
