"""The floor for a Python FUSE daemon: the least a pyfuse3 filesystem can do to serve one file.

It serves one constant 32-byte file, ``/value``, beside the root folder, with the mount options
and kernel-cache settings secretfs uses (no ``default_permissions``, ``allow_other``, ``ro``;
``entry_timeout`` 60 s, ``attr_timeout`` 1 s, mode 0400, ``keep_cache`` on open). Reads come from
memory. benchmarks/read.py compares secretfs against it: whatever secretfs costs above this floor
is secretfs's own work (identity, policy, audit, snapshot), not FUSE's or pyfuse3's.

    python benchmarks/floor.py MOUNTPOINT      # serves until SIGTERM/SIGINT; prints nothing
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

VALUE = bytes(range(65, 65 + 32))  # 32 constant bytes: "ABC…`"
NAME = b"value"
FILE_INODE = pyfuse3.ROOT_INODE + 1
MOUNT_OPTIONS = {"fsname=floor", "ro", "nosuid", "nodev", "noexec", "allow_other"}
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 1.0
FILE_MODE = stat.S_IFREG | 0o400
FOLDER_MODE = stat.S_IFDIR | 0o500


class Floor(pyfuse3.Operations):
    """A read-only root folder holding ``value``."""

    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self._started = int(time.time() * 1e9)
        self._next_handle = 1

    def _attributes(self, inode: int, ctx: pyfuse3.RequestContext | None
                    ) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        attributes.entry_timeout = ENTRY_TIMEOUT
        attributes.attr_timeout = ATTR_TIMEOUT
        attributes.st_uid = ctx.uid if ctx is not None else 0
        attributes.st_gid = ctx.gid if ctx is not None else 0
        attributes.st_blksize = 4096
        if inode == FILE_INODE:
            attributes.st_mode = FILE_MODE
            attributes.st_nlink = 1
            attributes.st_size = len(VALUE)
        else:
            attributes.st_mode = FOLDER_MODE
            attributes.st_nlink = 2
        attributes.st_blocks = (attributes.st_size + 511) // 512
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = self._started
        return attributes

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attributes(pyfuse3.ROOT_INODE, ctx)
        if name == NAME:
            return self._attributes(FILE_INODE, ctx)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode, ctx)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._handle()

    async def readdir(self, handle: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attributes(FILE_INODE, None), 1)

    async def releasedir(self, handle: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=self._handle(), keep_cache=True, direct_io=False)

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        return VALUE[offset:offset + size]

    async def release(self, handle: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = 1
        data.f_namemax = 255
        return data


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python benchmarks/floor.py MOUNTPOINT\n")
        return 2
    pyfuse3.init(Floor(), args[0], MOUNT_OPTIONS)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
