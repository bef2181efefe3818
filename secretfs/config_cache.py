"""The parsed-configuration cache: what ``__pycache__`` is to modules, for config files.

Reading YAML costs a one-shot command like ``secretfs secrets get`` a fifth of its run time
(importing PyYAML alone takes ~13 ms). So after a config file is parsed and validated, the
result is kept in a private cache file, keyed by the SHA-256 of the file's bytes and everything
else parsing depends on (the file's path, the user, the environment that default paths come
from, this code's version). Any edit changes the key; a stale entry is simply not used.

The entry is written with ``marshal`` — the format of ``.pyc`` files, with the same trust
model: it is only read from a folder and file owned by the current user and writable by no one
else, so only someone who could already change this user's files could change it. A cache that
cannot be read or written is silently skipped: it is an optimisation, never a source of truth.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

FORMAT = 1


def cache_folder() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/secretfs")
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "secretfs"


def stamp(path: Path, data: bytes) -> tuple[Any, ...]:
    """Everything a parse of *data* at *path* depends on."""
    from secretfs import __version__

    code = os.stat(Path(__file__).with_name("config.py")).st_mtime_ns  # the parser itself
    environment = tuple(os.environ.get(name) for name in
                        ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"))
    return (FORMAT, __version__, code, str(path), os.path.abspath(path),
            hashlib.sha256(data).hexdigest(), os.geteuid(), environment)


def _entry(path: Path) -> Path:
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24]
    return cache_folder() / f"config-{name}"


def load(path: Path, key: tuple[Any, ...], classes: Mapping[str, Callable[..., Any]]
         ) -> Any | None:
    """The cached parse of *path* under *key*, or None."""
    try:
        folder = os.stat(cache_folder())
        descriptor = os.open(_entry(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(descriptor)
        euid = os.geteuid()
        if (info.st_uid != euid or folder.st_uid != euid or info.st_mode & 0o022
                or folder.st_mode & 0o022):
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            stored_key, frozen = marshal.loads(file.read())
        return _thaw(frozen, classes) if stored_key == key else None
    except Exception:  # a damaged entry is a miss, never an error
        return None
    finally:
        os.close(descriptor)


def store(path: Path, key: tuple[Any, ...], config: Any) -> None:
    """Keep *config* as the parse of *path* under *key* (best effort)."""
    entry = _entry(path)
    temporary = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(marshal.dumps((key, _freeze(config))))
        os.replace(temporary, entry)
    except (OSError, ValueError):
        temporary.unlink(missing_ok=True)


def _freeze(value: Any) -> Any:
    """A config object as marshal-able tuples, each tagged with what it was."""
    if is_dataclass(value) and not isinstance(value, type):
        return ("object", type(value).__name__,
                tuple((f.name, _freeze(getattr(value, f.name))) for f in fields(value)))
    if isinstance(value, Path):
        return ("path", str(value))
    if isinstance(value, Mapping):
        return ("mapping", tuple((key, _freeze(item)) for key, item in value.items()))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_freeze(item) for item in value))
    if value is None or isinstance(value, str | int | float | bool):
        return ("value", value)
    raise ValueError(f"cannot cache a {type(value).__name__} in a config")


def _thaw(node: Any, classes: Mapping[str, Callable[..., Any]]) -> Any:
    kind = node[0]
    if kind == "object":
        return classes[node[1]](**{name: _thaw(item, classes) for name, item in node[2]})
    if kind == "path":
        return Path(node[1])
    if kind == "mapping":
        return MappingProxyType({key: _thaw(item, classes) for key, item in node[1]})
    if kind in ("tuple", "list"):
        items = [_thaw(item, classes) for item in node[1]]
        return tuple(items) if kind == "tuple" else items
    return node[1]
