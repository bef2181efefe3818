"""Reading what references name: through a live mount when there is one, else the store.

Through a mount, the injector is just another reader: the daemon decides each open for this
process (its uid, executable, unit…) and audits it, and the injector needs no master key, no
backend credentials, and none of cryptography, trio or pyfuse3 — it opens files. Without a mount,
it opens the store itself through the manager, as the CLI does (checked and audited as a key
holder, docs/policies.md).

Which mount: ``--mount M``, else ``$SECRETFS_MOUNT``, else the configured ``mount.path``. The
first two are explicit, so one that is not a live secretfs mount is an error; the configured
path is only used when something is mounted there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from secretfs.errors import (
    AccessDenied,
    BackendUnavailable,
    SecretfsError,
    SecretNotFound,
    UsageError,
)
from secretfs.model import SINGLE_VALUE_KEY, SecretRef, encode_value, format_version

if TYPE_CHECKING:
    from secretfs.config import Config

MOUNT_TYPE = "fuse.secretfs"


class Source(Protocol):
    """Where values come from: a mount or the store."""

    where: str  # for messages and --dry-run: "mount /run/secretfs/mnt" or "store …"

    def read(self, ref: SecretRef) -> bytes: ...

    def fingerprint(self, ref: SecretRef) -> Hashable:
        """Cheap, and unaudited: changes when the version *ref* points at changes."""
        ...

    def close(self) -> None: ...


# -- finding the mount ----------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as \\ooo."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def live_mount(path: str | os.PathLike[str]) -> bool:
    """Whether a secretfs filesystem is mounted exactly at *path* (per /proc/self/mountinfo)."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                dash = fields.index("-")
                if _unescape(fields[4]) == target and fields[dash + 1] == MOUNT_TYPE:
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def find_mount(explicit: str | None, environ: Mapping[str, str],
               config: Config | None) -> Path | None:
    """The mount to resolve through, or None to use the store (module docstring)."""
    for given, origin in ((explicit, "--mount"), (environ.get("SECRETFS_MOUNT"), "SECRETFS_MOUNT")):
        if given:
            if not live_mount(given):
                raise UsageError(f"{origin} {given}: no secretfs filesystem is mounted there",
                                 "start it with 'secretfs mount PATH', or leave it out to "
                                 "read the store directly")
            return Path(given)
    if config is not None and live_mount(config.manager.mount.path):
        return config.manager.mount.path
    return None


# -- through a mount ------------------------------------------------------------------------------


def _failure(error: OSError, ref: SecretRef, where: Path) -> SecretfsError:
    """The secretfs error (and exit code) an errno from the mount stands for."""
    what = f"secretfs://{ref.path} through {where}"
    if error.errno == errno.ENOENT:
        return SecretNotFound(f"{what}: not found",
                              "check the name, version and key with 'ls' under the mount")
    if error.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"{what}: access denied",
                            "the daemon's policy does not let this process read it; "
                            "'secretfs audit tail' says why")
    if error.errno == errno.EIO:
        return BackendUnavailable(f"{what}: the daemon could not read it (EIO)",
                                  "see the daemon's log")
    return SecretfsError(f"{what}: {error.strerror or error}")


def _stat(path: Path) -> tuple[int, ...]:
    """What changes when a file under the mount becomes another version: inode, size, mtime
    (or ``(-1, errno)`` when it cannot be seen)."""
    try:
        st = os.stat(path)
    except OSError as error:
        return (-1, error.errno or 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class MountSource:
    """Values read as files under a live mount: ``<mount>/<name>/<version>/<key>``."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.where = f"mount {mount}"

    def folder(self, ref: SecretRef) -> Path:
        return self.mount / ref.name / format_version(ref.version)

    def path(self, ref: SecretRef) -> Path:
        """The file of *ref* (its key, or ``value`` for a single value)."""
        return self.folder(ref) / (ref.key or SINGLE_VALUE_KEY)

    def _read_file(self, path: Path, ref: SecretRef) -> bytes:
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise _failure(error, ref, self.mount) from None

    def read(self, ref: SecretRef) -> bytes:
        try:
            return self._read_file(self.path(ref), ref)
        except SecretNotFound:
            if ref.key is not None:
                raise
        # no single value: a map, read as JSON like the store gives it
        keys = self._keys(ref)
        return encode_value({key: self._read_file(self.folder(ref) / key, ref)
                             .decode("utf-8", "surrogateescape") for key in keys})

    def _keys(self, ref: SecretRef) -> list[str]:
        try:
            return sorted(os.listdir(self.folder(ref)))
        except OSError as error:
            raise _failure(error, ref, self.mount) from None

    def fingerprint(self, ref: SecretRef) -> Hashable:
        """The inode, size and change time of the file(s): a label's file is its version's
        file, so a new version is a new inode (docs/filesystem.md). stat is not an open: it is
        neither checked nor audited, so watching costs the daemon no audit lines."""
        single = _stat(self.path(ref))
        if ref.key is not None or single != (-1, errno.ENOENT):
            return (single,)
        try:  # no single value: a map, each of its keys
            keys = self._keys(ref)
        except SecretfsError:
            return ("missing",)
        return tuple(_stat(self.folder(ref) / key) for key in keys)

    def close(self) -> None:
        return None


# -- through the store ----------------------------------------------------------------------------


class StoreSource:
    """Values read by opening the store, as the CLI does (a key holder)."""

    def __init__(self, config: Config) -> None:
        from secretfs.manager import SyncSecretsManager

        self.manager = SyncSecretsManager.from_config(config)
        self.where = f"store {config.manager.backend.type}"

    def read(self, ref: SecretRef) -> bytes:
        return self.manager.read(ref)

    def fingerprint(self, ref: SecretRef) -> Hashable:
        from secretfs.manager import pick_version

        try:
            info = pick_version(self.manager.metadata(ref.name), ref)
        except SecretfsError as error:
            return ("missing", type(error).__name__)
        return (info.version, info.created)

    def close(self) -> None:
        self.manager.close()


def open_source(mount: str | None, environ: Mapping[str, str], config_file: str | None,
                *, require_mount: str | None = None) -> MountSource | StoreSource:
    """The source for this run: the mount if there is one, else the store.

    *require_mount*: a reason the store will not do (``--as-files``): without a mount, refuse.
    The configuration is read only when no mount was named (a configured mount path, or the
    store, need it).
    """
    config = None
    if not mount and not environ.get("SECRETFS_MOUNT"):
        from secretfs.config import load_config

        config = load_config(config_file)
    found = find_mount(mount, environ, config)
    if found is not None:
        return MountSource(found)
    if require_mount is not None:
        raise UsageError(f"{require_mount} needs a live secretfs mount",
                         "mount one ('secretfs mount PATH') and pass --mount PATH or set "
                         "SECRETFS_MOUNT")
    assert config is not None
    return StoreSource(config)


# -- references inside loaded objects -------------------------------------------------------------


def resolve_refs(obj: Any, *, source: Source | None = None) -> Any:
    """*obj* with every secretfs reference inside it replaced by its value.

    For an application's own config loader: dicts, lists and tuples are walked (a new object is
    returned; *obj* is not changed), a string that is a whole reference becomes the value, and
    ``{{ secretfs://… }}`` placeholders inside a string are filled in. Values are decoded as
    UTF-8. *source*: where to read (default: the mount or the store, as ``secretfs run``).
    """
    from injector.refs import bind, render

    own = source is None
    if source is None:
        source = open_source(None, os.environ, None)
    cache: dict[SecretRef, str] = {}

    def value(ref: SecretRef) -> str:
        if ref not in cache:
            cache[ref] = source.read(ref).decode("utf-8", "surrogateescape")
        return cache[ref]

    def walk(item: Any, where: str) -> Any:
        if isinstance(item, str):
            binding = bind(where, item, "resolve_refs")
            return render(binding, {ref: value(ref) for ref in binding.refs})
        if isinstance(item, Mapping):
            return {k: walk(v, f"{where}.{k}") for k, v in item.items()}
        if isinstance(item, list | tuple):
            return type(item)(walk(v, f"{where}[{i}]") for i, v in enumerate(item))
        return item

    try:
        return walk(obj, "$")
    finally:
        if own:
            source.close()


__all__ = [
    "MOUNT_TYPE", "MountSource", "Source", "StoreSource", "find_mount", "live_mount",
    "open_source", "resolve_refs",
]
