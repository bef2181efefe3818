"""Backends: where secrets are kept. ``open_backend`` builds the one a configuration names.

Built-in backends are found by name; third-party ones register a factory under the entry-point
group ``secretfs.backends`` (``factory(config, create=False) -> Backend``), looked up only when
the configured type is not built in, so the common path pays nothing for the scan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secretfs.backends.base import Backend, MetadataUpdate
from secretfs.errors import ConfigError

if TYPE_CHECKING:
    from secretfs.config import Config
    from secretfs.crypto.keys import MasterKey

ENTRY_POINT_GROUP = "secretfs.backends"


def _open_local(config: Config, *, create: bool = False) -> Backend:
    from secretfs.backends.local import LocalBackend
    from secretfs.crypto.keys import configured_master_key

    settings = config.manager
    master_key = configured_master_key(settings.encryption, create=create)
    return LocalBackend.open(
        settings.backend.path, master_key, create=create,
        max_versions=settings.backend.max_versions,
    )


BUILT_IN = {"local": _open_local}


def open_backend(config: Config, *, create: bool = False) -> Backend:
    """The backend *config* names, opened (and with *create*, initialised)."""
    kind = config.manager.backend.type
    factory = BUILT_IN.get(kind)
    if factory is None:
        from importlib.metadata import entry_points

        found = entry_points(group=ENTRY_POINT_GROUP, name=kind)
        if not found:
            known = ", ".join(sorted(BUILT_IN))
            raise ConfigError(
                f"unknown backend type {kind!r}",
                f"built in: {known}; plugins register under the entry-point group "
                f"'{ENTRY_POINT_GROUP}'",
            )
        factory = next(iter(found)).load()
    return factory(config, create=create)


def master_key_of(config: Config, backend: Backend) -> MasterKey:
    """The master key: the one the backend holds (local), else the configured provider's."""
    key = getattr(backend, "master_key", None)
    if key is None:
        from secretfs.crypto.keys import configured_master_key

        key = configured_master_key(config.manager.encryption, create=False)
    return key


__all__ = [
    "BUILT_IN", "ENTRY_POINT_GROUP", "Backend", "MetadataUpdate", "master_key_of", "open_backend",
]
