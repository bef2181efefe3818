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


def _open_openbao(config: Config, *, create: bool = False) -> Backend:
    from secretfs.backends.openbao import open_openbao

    return open_openbao(config, create=create)


def _open_aws(config: Config, *, create: bool = False) -> Backend:
    from secretfs.backends.aws import open_aws  # boto3: only for this backend

    return open_aws(config, create=create)


def _open_keyring(config: Config, *, create: bool = False) -> Backend:
    from secretfs.backends.keyring import open_keyring

    return open_keyring(config, create=create)


BUILT_IN = {"local": _open_local, "openbao": _open_openbao, "aws": _open_aws,
            "keyring": _open_keyring}


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


def master_key_of(config: Config, backend: Backend, *, create: bool = False) -> MasterKey:
    """The master key: the one the backend holds (local), else the configured provider's
    (a remote backend encrypts values itself; the key still keys the audit log's MAC)."""
    key = getattr(backend, "master_key", None)
    if key is None:
        from secretfs.crypto.keys import configured_master_key

        key = configured_master_key(config.manager.encryption, create=create)
    return key


__all__ = [
    "BUILT_IN", "ENTRY_POINT_GROUP", "Backend", "MetadataUpdate", "master_key_of", "open_backend",
]
