"""The FUSE operations: thin handlers that ask the tree for shape and the manager for content.

Per request: the caller is resolved from the FUSE context (uid, gid, thread → process); an
``open`` asks the manager ``(caller, read, name)`` and snapshots the bytes into the handle; an
``opendir`` asks ``(caller, list, name)`` for each entry and keeps the filtered listing in the
handle, so readdir offsets stay stable however large the folder. ``read`` and ``release`` carry
no request context in FUSE, which is why every decision is taken at open.

Traps from DESIGN.md ("FUSE facts") that shape this file: no ``default_permissions`` (the
daemon decides, and audits denials); never ENOSYS from open/opendir; any exception other than
FUSEError kills the mount, so every handler converts the unexpected to EIO after logging it.

Every backend call a handler makes goes through the manager, which bounds it by
``secrets_manager.backend_timeout`` in a worker thread: the trio thread that answers the kernel
never waits on a backend. Each open handle keeps its own copy of the bytes it serves (a
``bytearray``), zeroed at release and when the daemon stops; ``read`` hands pyfuse3 a view of
it, so no ``bytes`` copy of a value is made per read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from secretfs.access.callers import CallerCache
from secretfs.access.principal import Caller
from secretfs.cache import wipe
from secretfs.errors import NotFound, SecretfsError
from secretfs.fs.tree import STATUS_FOLDER, Kind, Node, Tree, resolve_word
from secretfs.manager import SecretsManager
from secretfs.model import SecretMetadata, format_duration
from secretfs.poll import Backoff

log = logging.getLogger("secretfs.fs")

T = TypeVar("T")
XATTR_PREFIX = "user.secretfs."
FILE_MODE = stat.S_IFREG | 0o400
FOLDER_MODE = stat.S_IFDIR | 0o500


def fuse_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn every failure into a FUSE error: one escaping exception would unmount us."""

    @functools.wraps(handler)
    async def guarded(*args: Any) -> T:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except SecretfsError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        except Exception:
            log.exception("bug in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


@dataclass
class FsStats:
    """Counters for <mount>/.secretfs/stats."""

    opens: int = 0
    denials: int = 0
    not_found: int = 0
    errors: int = 0
    stale_serves: int = 0
    started: float = field(default_factory=time.time)
    open_latency_ns: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    # (pid, uid, exe, pid namespace, secret, outcome) of the latest opens, newest last
    recent_opens: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=32))

    def to_json(self) -> dict[str, Any]:
        latencies = sorted(self.open_latency_ns)

        def percentile(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1000, 1)

        return {
            "opens": self.opens, "denials": self.denials, "not_found": self.not_found,
            "errors": self.errors, "stale_serves": self.stale_serves,
            "open_latency_us": {"p50": percentile(0.50), "p99": percentile(0.99)},
            "uptime_s": round(time.time() - self.started, 1),
            "recent_opens": [dict(zip(("pid", "uid", "exe", "pid_ns", "secret", "outcome"),
                                      entry, strict=True)) for entry in self.recent_opens],
        }

    def opened(self, caller: Caller, name: str, outcome: str) -> None:
        self.recent_opens.append(
            (caller.pid, caller.uid, caller.exe, caller.pid_ns, name, outcome))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the kernel may cache names and attributes. Changes are invalidated explicitly,
    so names can be cached long; attributes carry the caller's uid, so they are kept short."""

    entry: float = 60.0
    attr: float = 1.0


class SecretsFS(pyfuse3.Operations):
    """The read-only tree of DESIGN.md, answered through a SecretsManager."""

    enable_writeback_cache = False

    def __init__(self, manager: SecretsManager, callers: CallerCache, *,
                 timeouts: Timeouts = Timeouts(), status: Callable[[], dict[str, Any]]
                 | None = None) -> None:
        super().__init__()
        self.manager = manager
        self.callers = callers
        self.tree = Tree()
        self.timeouts = timeouts
        self.stats = FsStats()
        self._status = status or (lambda: {})
        self._files: dict[int, bytearray | bytes] = {}  # open file handle → its snapshot
        self._folders: dict[int, list[tuple[str, pyfuse3.EntryAttributes]]] = {}
        self._next_handle = 1
        self._cursor: int | None = None  # position in the backend's change feed
        self._feed_lock: Any = None  # a trio.Lock, made by load_names (inside trio)
        self._background: Any = None  # the daemon's trio nursery, for read-ahead
        self.outage = Backoff()  # the backend's, as the change follower or poller sees it
        self.read_ahead = True

    def run_background_in(self, nursery: Any) -> None:
        """Work the handlers start and do not wait for (read-ahead) runs in *nursery*."""
        self._background = nursery

    # -- helpers ------------------------------------------------------------------------------

    async def load_names(self) -> None:
        """(Re)build the folder index from the backend's names, and start following changes
        from here (the cursor is taken first, so nothing written meanwhile is missed)."""
        import trio

        from secretfs.fs.tree import NameIndex

        self._feed_lock = trio.Lock()
        self._cursor, _ = await self.manager.changes_since(None)
        self.tree.index = NameIndex(await self.manager.names())

    async def catch_up(self) -> bool:
        """Apply the backend's changes now; True if there were any.

        The daemon calls this twice a second; a lookup that finds nothing calls it too, so a
        name written a moment ago is found at once rather than at the next poll.
        """
        async with self._feed_lock:
            cursor, names = await self.manager.changes_since(self._cursor)
            if names is not None and not names:
                self._cursor = cursor
                return False
            try:
                await self.changed(names)
            except BaseException:
                if names is None:  # the reload failed half-way: all of it again next time
                    self._cursor = None
                raise
            if names is not None:  # (a reload took its own cursor)
                self._cursor = cursor  # only now: a failure leaves these changes to retry
            return True

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        return self.callers.resolve(ctx.uid, ctx.gid, ctx.pid)

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _metadata(self, node: Node) -> SecretMetadata | None:
        if node.kind not in (Kind.SECRET, Kind.VERSION, Kind.FILE):
            return None
        try:
            return (await self.manager.metadata(node.name)).value
        except NotFound:
            return None

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _attributes(self, node: Node, metadata: SecretMetadata | None,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = node.inode
        attributes.entry_timeout = self.timeouts.entry
        attributes.attr_timeout = self.timeouts.attr
        attributes.st_uid = ctx.uid  # owned by whoever looks: ssh and PostgreSQL check this
        attributes.st_gid = ctx.gid
        attributes.st_blksize = 4096
        moment = int(self.stats.started * 1e9)
        if node.kind is Kind.FILE and metadata is not None:
            info = metadata.version_info(node.version)
            size = info.size_of(node.key) if info else None
            attributes.st_mode = FILE_MODE
            attributes.st_nlink = 1
            attributes.st_size = size or 0
            if info is not None:
                moment = int(info.created.timestamp() * 1e9)
        elif node.kind is Kind.STATUS_FILE:
            attributes.st_mode = FILE_MODE
            attributes.st_nlink = 1
        else:
            attributes.st_mode = FOLDER_MODE
            attributes.st_nlink = 2
            if metadata is not None and metadata.updated is not None:
                moment = int(metadata.updated.timestamp() * 1e9)
        attributes.st_blocks = (attributes.st_size + 511) // 512
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = moment
        return attributes

    # -- names --------------------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        try:
            entry = name.decode()
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        metadata = await self._metadata(parent)
        node = self.tree.child(parent, entry, metadata)
        if node is None and await self.catch_up():  # perhaps written a moment ago
            metadata = await self._metadata(parent)
            node = self.tree.child(parent, entry, metadata)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.kind is Kind.SECRET:
            # The kernel holds the parent folder's lock for the whole lookup (no parallel
            # lookups in one FUSE folder), so a lookup in a folder of names — the root, above
            # all — must not wait on the backend: the name is known from the index; metadata
            # is used if cached, else loaded in the background for the lookup that follows
            # (inside the secret's own folder, where waiting holds up only that secret).
            cached = self.manager.cached_metadata(node.name)
            if cached is None:
                self.tree.handed_out(node.name, parent_inode, entry)
                self._load_ahead(node, ctx)
                return self._attributes(node, None, ctx)
            metadata = cached
        if node.kind in (Kind.SECRET, Kind.VERSION, Kind.FILE):
            self.tree.handed_out(node.name, parent_inode, entry)
            self._read_ahead(node, metadata, ctx)
        return self._attributes(node, metadata, ctx)

    def _load_ahead(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Start loading a secret's metadata (then reading its value ahead, as
        :meth:`_read_ahead`) in the background, unless it is being loaded already."""
        if self._background is None or not self.manager.cache.wants(node.name, "metadata"):
            return
        caller = self._caller(ctx) if self.read_ahead else None

        async def load() -> None:
            try:
                metadata = (await self.manager.metadata(node.name)).value
                self._read_ahead(node, metadata, ctx, caller)
            except SecretfsError:
                pass  # the lookup that follows meets it, and reports it
            except Exception:  # in the daemon's nursery: it must not take the mount down
                log.exception("bug in loading the metadata of %r ahead", node.name)

        self._background.start_soon(load)

    def _read_ahead(self, node: Node, metadata: SecretMetadata | None,
                    ctx: pyfuse3.RequestContext, caller: Caller | None = None) -> None:
        """A lookup inside a secret is most often a path walk on its way to an open
        (``db`` → ``latest`` → ``password``): start loading the value it leads to now, so the
        backend request overlaps the kernel's remaining lookups; the open joins the load
        (single-flight) instead of starting it. Only for a caller the policy lets read it, and
        only when nothing is cached or loading. Not audited: nothing is handed out here — the
        open is decided and audited as always."""
        if not self.read_ahead or self._background is None or metadata is None:
            return
        if node.kind is Kind.FILE:
            info = metadata.version_info(node.version)
        elif node.kind is Kind.VERSION:
            info = resolve_word(metadata, node.word)
        else:
            current = metadata.current_version
            info = metadata.version_info(current) if current else None
        if info is None or not info.readable:
            return
        if not self.manager.wants_value(node.name, info.version):
            return
        caller = caller or self._caller(ctx)
        if self.manager.sync.access.check(caller, "read", node.name).allowed:
            self._background.start_soon(self.manager.read_ahead, node.name, info.version)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._attributes(node, await self._metadata(node), ctx)

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.kind.is_folder:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        caller = self._caller(ctx)
        metadata = await self._metadata(node)
        entries = self.tree.listing(node, metadata)
        if node.kind in (Kind.ROOT, Kind.FOLDER):
            entries = self._visible(caller, node, entries)
        elif node.kind is Kind.STATUS_FOLDER:
            entries = entries if ctx.uid == 0 else []
        elif not self.manager.sync.access.check(caller, "list", node.name).allowed:
            entries = []
        # The kernel asks with READDIRPLUS: each entry's attributes are cached as if looked up,
        # so they must be complete, and the entry remembered for invalidation.
        listing = []
        for entry in entries:
            child = self.tree.child(node, entry, metadata)
            if child is None:
                continue
            if child.kind in (Kind.SECRET, Kind.VERSION, Kind.FILE):
                self.tree.handed_out(child.name, inode, entry)
            listing.append((entry, self._attributes(child, metadata, ctx)))
        handle = self._handle()
        self._folders[handle] = listing
        return handle

    def _visible(self, caller: Caller, folder: Node, entries: list[str]) -> list[str]:
        """The entries of a name folder this caller may list: secrets it may list, and folders
        holding at least one. One audit record for the listing, not one per entry."""
        access = self.manager.sync.access
        index = self.tree.index
        shown = []
        for entry in entries:
            path = f"{folder.name}/{entry}" if folder.name else entry
            is_secret = index.kind_of(path) is Kind.SECRET
            names = (path,) if is_secret else index.secrets_under(path)
            if any(access.check(caller, "list", name).allowed for name in names):
                shown.append(entry)
        if folder.kind is Kind.ROOT and caller.uid == 0:
            shown.insert(0, STATUS_FOLDER)
        self.manager.sync.audit_listing(caller, folder.name or "/", len(shown), len(entries))
        return shown

    @fuse_errors
    async def readdir(self, handle: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._folders.get(handle, [])
        for position in range(start_id, len(listing)):
            entry, attributes = listing[position]
            if not pyfuse3.readdir_reply(token, entry.encode(), attributes, position + 1):
                return

    @fuse_errors
    async def releasedir(self, handle: int) -> None:
        self._folders.pop(handle, None)

    # -- files --------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        started = time.perf_counter_ns()
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind.is_folder:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.stats.opens += 1
        try:
            if node.kind is Kind.STATUS_FILE:
                data = self._status_file(node, ctx)
                direct = True  # generated content: its size is not known in advance
            else:
                caller = self._caller(ctx)
                try:
                    snapshot = await self.manager.snapshot(node.ref, caller=caller)
                except SecretfsError as error:
                    self.stats.opened(caller, node.name, errno.errorcode.get(error.errno, "?"))
                    raise
                self.stats.opened(caller, node.name, "stale" if snapshot.stale else "ok")
                data = snapshot.data
                # Without a known size the file reports 0 bytes: bypass the page cache.
                direct = not snapshot.size_known
                if snapshot.stale:
                    self.stats.stale_serves += 1
        except SecretfsError as error:
            if error.errno == errno.EACCES:
                self.stats.denials += 1
            elif error.errno == errno.ENOENT:
                self.stats.not_found += 1
            else:
                self.stats.errors += 1
            raise
        handle = self._handle()
        self._files[handle] = data
        self.stats.open_latency_ns.append(time.perf_counter_ns() - started)
        # The inode belongs to one immutable version, so the kernel may keep its pages.
        return pyfuse3.FileInfo(fh=handle, keep_cache=not direct, direct_io=direct)

    def _status_file(self, node: Node, ctx: pyfuse3.RequestContext) -> bytes:
        if ctx.uid != 0:
            self.stats.denials += 1
            raise pyfuse3.FUSEError(errno.EACCES)
        if node.name == "stats":
            document = {"fs": self.stats.to_json(), **self._status()}
        else:
            document = {"status": "backend unavailable" if self.outage.down else "ok",
                        "secrets": len(self.tree.index), "inodes": len(self.tree),
                        "open_files": len(self._files)}
            if self.outage.down:
                document["backend_unavailable_since"] = self.outage.since
                document["backend_problem"] = self.outage.problem
            nodes = getattr(self.manager.sync.backend, "node_states", None)
            if nodes is not None:  # a cluster: each node as this host's client sees it
                document["nodes"] = nodes()
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    @fuse_errors
    async def read(self, handle: int, offset: int, size: int) -> memoryview:
        data = self._files.get(handle)
        if data is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # A view, not a copy: pyfuse3 takes any buffer and hands it to the kernel at once.
        return memoryview(data)[offset:offset + size]

    @fuse_errors
    async def release(self, handle: int) -> None:
        wipe(self._files.pop(handle, None))

    def wipe(self) -> None:
        """Zero the snapshot of every open handle and every cached value (the daemon stops)."""
        for data in self._files.values():
            wipe(data)
        self._files.clear()
        clear = getattr(self.manager.cache, "clear", None)
        if clear is not None:
            clear()

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.tree.index)
        data.f_namemax = 128
        return data

    # -- metadata as extended attributes ------------------------------------------------------

    async def _xattrs(self, node: Node, ctx: pyfuse3.RequestContext) -> dict[str, str]:
        if node.kind not in (Kind.SECRET, Kind.VERSION, Kind.FILE):
            return {}
        caller = self._caller(ctx)
        if not self.manager.sync.access.check(caller, "list", node.name).allowed:
            raise pyfuse3.FUSEError(errno.EACCES)
        metadata = await self._metadata(node)
        if metadata is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attributes = {
            "name": metadata.name,
            "description": metadata.description,
            "tags": json.dumps(dict(metadata.tags), sort_keys=True),
            "labels": json.dumps({label.value: v for label, v in metadata.labels.items()},
                                 sort_keys=True),
        }
        info = None
        if node.kind is Kind.FILE:
            info = metadata.version_info(node.version)
        elif node.kind is Kind.VERSION:
            info = resolve_word(metadata, node.word)
        elif metadata.current_version:
            info = metadata.version_info(metadata.current_version)
        if info is not None:
            attributes["version"] = str(info.version)
            attributes["created"] = info.created.isoformat()
            if self.manager.is_stale(node.name, info.version):
                attributes["stale"] = "1"
        if metadata.rotation is not None:
            from secretfs.rotation.schedule import next_rotation

            policy = metadata.rotation
            attributes["rotation"] = (f"every {format_duration(policy.interval)}"
                                      if policy.interval else policy.schedule or "manual")
            due = next_rotation(metadata, self.manager.sync.rotation)
            if due is not None:
                attributes["next_rotation"] = due.isoformat()
        return attributes

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        wanted = name.decode(errors="replace")
        if not wanted.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = (await self._xattrs(self._node(inode), ctx)).get(wanted[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        attributes = await self._xattrs(self._node(inode), ctx)
        return [(XATTR_PREFIX + key).encode() for key in attributes]

    # -- freshness ----------------------------------------------------------------------------

    async def poll_metadata(self, interval: float) -> None:
        """Follow a backend without a change feed by polling its metadata (secretfs/poll.py)."""
        from secretfs.poll import MetadataPoller

        poller = MetadataPoller(self.manager, known=lambda: set(self.tree.index.names()),
                                changed=self.changed, outage=self.outage)
        await poller.run(interval)

    async def changed(self, names: set[str] | None) -> None:
        """Secrets changed in the backend: drop every cache that may hold the old state.

        None means anything may have changed: rebuild the index and invalidate everything
        handed out.
        """
        if names is None:
            names = set(self.tree.index.names())
            await self.load_names()
            names |= set(self.tree.index.names())
        for name in names:  # first, whatever happens next: nothing old is served as fresh
            self.manager.forget(name)
        failure: SecretfsError | None = None
        for name in names:
            if failure is None:  # once the backend failed, do not wait on it per name
                try:
                    await self.manager.metadata(name)
                    self.tree.index.add(name)
                except NotFound:
                    self.tree.index.remove(name)
                except SecretfsError as error:  # the index keeps the name as it was
                    failure = error
            await self._invalidate_kernel(name)
        if failure is not None:
            raise failure

    async def _invalidate_kernel(self, name: str) -> None:
        import trio

        for parent, entry in self.tree.entries_of(name):
            pyfuse3.invalidate_entry_async(parent, entry.encode(), ignore_enoent=True)
        inodes = list(self.tree.inodes_of(name))
        if inodes:
            # In a worker thread, never on this one: dropping an inode's pages waits for each
            # page's lock, and a page a process is reading right now stays locked until this
            # thread answers that read — the daemon would wait on itself for ever (seen: a
            # reader in a loop while the poller reported its file changed).
            await trio.to_thread.run_sync(_invalidate_inodes, inodes, abandon_on_cancel=True)


def _invalidate_inodes(inodes: list[int]) -> None:
    """Drop the kernel's attributes and pages of *inodes* (a worker thread: see the caller)."""
    for inode in inodes:
        with contextlib.suppress(OSError):  # FileNotFoundError: the kernel forgot it
            pyfuse3.invalidate_inode(inode)
