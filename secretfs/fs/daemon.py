"""The mount's lifecycle: prepare the mountpoint, harden the process, serve, reload, stop.

``secretfs mount`` runs ``mount()``: by default it forks a daemon and returns once the mount
answers (or prints why it did not); ``--foreground`` serves in the calling process, as systemd's
Type=notify wants, and READY=1 goes to $NOTIFY_SOCKET only once the mount answers.

Inside, one trio nursery holds every task: pyfuse3's request loop, the caller cache's pidfd
watcher, the change follower, the cache's expiry sweep and the signal handler. SIGTERM/SIGINT end
the request loop (``pyfuse3.terminate``), which cancels the rest and unmounts; SIGHUP reloads the
configuration and keeps the old one if the new one does not validate.

Every backend read goes through the manager, bounded by ``secrets_manager.backend_timeout`` in
an abandonable worker thread, so a backend that hangs costs a reader at most that long and never
blocks the trio thread, the other readers or the shutdown. On the way out the open handles'
snapshots and the cache's values are zeroed (best effort: docs/cache.md).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from secretfs.config import Config, load_config
from secretfs.errors import SecretfsError, UsageError

log = logging.getLogger("secretfs.daemon")

READY_TIMEOUT = 30.0  # seconds the launching command waits for the daemon's mount to answer
CHANGE_POLL_INTERVAL = 0.5  # how often the local store's change feed is read
CACHE_EXPIRY_INTERVAL = 30.0  # how often entries past ttl + max_stale are dropped and wiped
SWITCH_INTERVAL = 0.0001  # seconds a thread may hold the GIL while another waits (default 0.005)


# -- the mountpoint ---------------------------------------------------------------------------


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (lazily: also one whose daemon is gone)."""
    command = [shutil.which("fusermount3") or "fusermount3", "-u", *(["-z"] if lazy else []),
               str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().rpartition(": ")[2] or "fusermount3 failed"
        raise SecretfsError(f"cannot unmount {mountpoint}: {reason}",
                            "close the files and shells using it, or use 'umount -l'")


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make *mountpoint* ready: create it, or clean up a mount whose daemon died."""
    try:
        os.listdir(mountpoint)  # reaches a FUSE daemon, if any (a stat may come from cache)
    except FileNotFoundError:
        mountpoint.mkdir(parents=True, mode=0o755)
        return
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise
        log.warning("%s: stale mount of a dead daemon; unmounting it", mountpoint)
        unmount(mountpoint, lazy=True)
        return
    if os.path.ismount(mountpoint):
        raise SecretfsError(f"{mountpoint} is already mounted",
                            f"unmount it first: secretfs umount {mountpoint}")
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint} is not a folder")


# -- process hardening ------------------------------------------------------------------------

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE = 1, 2


def harden() -> None:
    """No core dumps, no ptrace by the same user, and memory kept out of swap when allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))
    # MCL_FUTURE under a small RLIMIT_MEMLOCK would make later allocations fail: lock only
    # where the limit cannot bite (root, or an unlimited limit).
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 and soft != resource.RLIM_INFINITY:
        log.warning("memory not locked (RLIMIT_MEMLOCK is %d bytes): secrets may be swapped; "
                    "run as root or raise LimitMEMLOCK", soft)
    elif libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        log.warning("mlockall failed: %s; secrets may be swapped",
                    os.strerror(ctypes.get_errno()))


# -- readiness --------------------------------------------------------------------------------


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, if it asked; the protocol is one datagram."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)


def daemonize(log_file: Path) -> Callable[[str | None], None]:
    """Fork; the parent waits for the child's word and exits with it. Returns, in the child,
    the function that sends that word: None when the mount answers, else the error."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:  # the launching command
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            word = pipe.read().decode(errors="replace")
        if word == "ok":
            sys.exit(0)
        print(word or "secretfs: the mount daemon exited before the mount answered "
              f"(see {log_file})", file=sys.stderr)
        sys.exit(1)
    os.close(read_end)
    os.setsid()
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    os.chdir("/")

    def report(problem: str | None) -> None:
        nonlocal write_end
        if write_end < 0:
            return
        os.write(write_end, b"ok" if problem is None else problem.encode())
        os.close(write_end)
        write_end = -1

    return report


# -- serving ----------------------------------------------------------------------------------


def mount_options(config: Config) -> set[str]:
    options = {"fsname=secretfs", "subtype=secretfs", "ro", "nosuid", "nodev", "noexec"}
    if os.geteuid() == 0 and config.manager.mount.allow_other:
        options.add("allow_other")  # other users and containers read through the daemon
    return options  # no default_permissions: the daemon decides every open, and audits it


def cache_for(config: Config) -> Any:
    """The value cache the configuration asks for (none when ``cache.enabled`` is false)."""
    from secretfs.cache import NO_CACHE, TtlCache

    settings = config.manager.cache
    if not settings.enabled:
        return NO_CACHE
    return TtlCache(ttl=settings.ttl, max_size=settings.max_size, max_stale=settings.max_stale)


def build_filesystem(config: Config) -> Any:
    """The SecretsFS for *config*: manager, cache, access control, audit."""
    from secretfs.access.callers import CallerCache
    from secretfs.access.policy import access_control
    from secretfs.audit import open_audit
    from secretfs.backends import master_key_of, open_backend
    from secretfs.fs.operations import SecretsFS
    from secretfs.manager import SecretsManager, SyncSecretsManager

    cache = cache_for(config)
    backend = open_backend(config)
    sync = SyncSecretsManager(backend, access=access_control(config, os.geteuid()),
                              audit=open_audit(config, master_key_of(config, backend)),
                              rotation=config.manager.rotation)
    manager = SecretsManager(sync, cache=cache, backend_timeout=config.manager.backend_timeout)
    callers = CallerCache()

    def status() -> dict[str, Any]:
        cache_stats = getattr(manager.cache, "stats", None)  # the cache may be reloaded
        return {"cache": cache_stats.to_json() if cache_stats else None,
                "callers": callers.stats.to_json(), "backend_reads": manager.backend_reads,
                "backend": manager.backend_status()}

    filesystem = SecretsFS(manager, callers, status=status)
    filesystem.read_ahead = config.manager.cache.read_ahead
    return filesystem


async def serve(config_source: str | None, config: Config, mountpoint: Path,
                report: Callable[[str | None], None]) -> None:
    import pyfuse3
    import trio

    # Worker threads (the audit flusher formats and MACs a second's records at once; backend
    # calls) hold the GIL for up to the switch interval before the trio thread that answers the
    # kernel gets it back: 5 ms by default, which would be the p99 of a warm open under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    filesystem = build_filesystem(config)
    await filesystem.load_names()
    pyfuse3.init(filesystem, str(mountpoint), mount_options(config))
    log.info("mounted %s (%d secrets)", mountpoint, len(filesystem.tree.index))
    try:
        async with trio.open_nursery() as nursery:
            filesystem.run_background_in(nursery)
            nursery.start_soon(filesystem.callers.run)
            audit = filesystem.manager.sync.audit
            if hasattr(audit, "run"):  # the log flushes at least every second, and on the way out
                nursery.start_soon(audit.run)
            nursery.start_soon(_expire_cache, filesystem)
            backend = filesystem.manager.sync.backend
            if "change_feed" in getattr(backend, "capabilities", {"change_feed"}):
                nursery.start_soon(_follow_changes, filesystem)
            else:  # other hosts write to it and it says nothing: look (cache.poll_interval)
                nursery.start_soon(filesystem.poll_metadata, config.manager.cache.poll_interval)
            if config.manager.rotation.enabled:  # rotate what falls due (rotation/schedule.py)
                from secretfs.rotation.schedule import run_schedule

                nursery.start_soon(partial(run_schedule, filesystem.manager.sync.rotator(),
                                           on_change=filesystem.manager.forget))
            nursery.start_soon(_handle_signals, filesystem, config_source)
            nursery.start_soon(_announce_when_answering, mountpoint, report)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        sd_notify("STOPPING=1")
        pyfuse3.close(unmount=True)
        filesystem.wipe()  # open handles' snapshots and cached values, zeroed
        filesystem.manager.close()  # (skipped while abandoned backend calls still run)
        log.info("unmounted %s", mountpoint)


async def _announce_when_answering(mountpoint: Path, report: Callable[[str | None], None]
                                   ) -> None:
    import trio

    # Answered by our request loop. Abandoned if cancelled: a SIGTERM can stop the loop before
    # this thread's request reaches it, and that request is then answered only by the unmount
    # that comes after this nursery — waiting for the thread here would never end.
    await trio.to_thread.run_sync(os.listdir, mountpoint, abandon_on_cancel=True)
    sd_notify("READY=1")
    report(None)


async def _follow_changes(filesystem: Any) -> None:
    """Read the backend's change feed and invalidate what changed, here and in the kernel."""
    import trio

    outage = filesystem.outage  # for its once-per-outage log lines; the feed keeps its pace
    while True:
        await trio.sleep(CHANGE_POLL_INTERVAL)
        try:
            await filesystem.catch_up()
        except SecretfsError as error:
            outage.failed(error)
            continue
        outage.succeeded()


async def _expire_cache(filesystem: Any) -> None:
    """Now and then drop (and zero) the cache entries past ``ttl + max_stale``: a value read
    once is not kept in memory long after it can no longer be served."""
    import trio

    while True:
        await trio.sleep(CACHE_EXPIRY_INTERVAL)
        expire = getattr(filesystem.manager.cache, "expire", None)  # (NO_CACHE has none)
        if expire is not None:
            expire()


async def _handle_signals(filesystem: Any, config_source: str | None) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for number in signals:
            if number == signal.SIGHUP:
                _reload(filesystem, config_source)
            else:
                log.info("%s: unmounting", signal.Signals(number).name)
                pyfuse3.terminate()
                return


def _reload(filesystem: Any, config_source: str | None) -> None:
    """SIGHUP: take the new configuration (cache settings, principals and policies: the next
    open is decided by them), or keep the old one if it does not validate."""
    try:
        config = load_config(config_source)
    except SecretfsError as error:
        log.error("config reload rejected, keeping the running configuration: %s", error)
        return
    from secretfs.access.policy import access_control

    old_cache, filesystem.manager.cache = filesystem.manager.cache, cache_for(config)
    clear = getattr(old_cache, "clear", None)
    if clear is not None:
        clear()  # its values, zeroed
    filesystem.manager.backend_timeout = config.manager.backend_timeout
    filesystem.read_ahead = config.manager.cache.read_ahead
    filesystem.manager.sync.access = access_control(config, os.geteuid())
    filesystem.manager.sync.rotation = config.manager.rotation
    log.info("configuration reloaded from %s (backend and mount options need a restart)",
             config.source or "the embedded default")


def mount(mountpoint: Path, *, config_source: str | None, foreground: bool,
          log_file: Path | None = None) -> int:
    """``secretfs mount``: returns the exit code."""
    import trio

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="secretfs[%(process)d] %(levelname)s %(message)s")
    config = load_config(config_source)
    mountpoint = mountpoint.absolute()
    prepare_mountpoint(mountpoint)
    log_file = log_file or config.manager.audit.path.parent / "mount.log"
    report: Callable[[str | None], None] = lambda problem: None  # noqa: E731
    if not foreground:
        report = daemonize(log_file)
    harden()
    try:
        trio.run(serve, config_source, config, mountpoint, report)
    except SecretfsError as error:
        report(f"secretfs: {error}")
        raise
    except BaseException as error:
        report(f"secretfs: mount failed: {type(error).__name__}: {error}")
        raise
    return 0
