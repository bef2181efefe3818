"""A complete secretfs backend plugin: secrets in memory, the shape of a real client.

Copy it to start a backend for your own secrets service: replace the dict with calls to the
service and keep the rest. It declares the capabilities it has (versions, cas, metadata, folders)
and does what base.CAPABILITIES promises for those it lacks (no labels beyond current, no soft
delete, no rotation state, no change feed). tests/test_plugin_example.py runs the conformance
suite on it; docs/backends.md explains the registration:

    [project.entry-points."secretfs.backends"]
    memory = "memory_backend:factory"
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from secretfs.backends.base import MetadataUpdate
from secretfs.errors import (
    ConflictError,
    InvalidName,
    SecretNotFound,
    UsageError,
    VersionNotFound,
)
from secretfs.model import (
    Label,
    RotationPolicy,
    RotationState,
    SecretMetadata,
    Value,
    VersionInfo,
    parent_folders,
    value_keys,
    value_sizes,
)


@dataclass
class _Secret:
    versions: dict[int, tuple[float, Value | None]] = field(default_factory=dict)  # None: gone
    next_version: int = 1
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    rotation: RotationPolicy | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class MemoryBackend:
    kind = "memory"
    capabilities = frozenset({"versions", "cas", "destroy", "metadata", "folders"})

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the manager calls from several worker threads
        self._secrets: dict[str, _Secret] = {}

    # -- writing ----------------------------------------------------------------------------------

    def write_version(self, name: str, value: Value, *, label: Label = Label.CURRENT,
                      cas: int | None = None, metadata: MetadataUpdate | None = None) -> int:
        if label is not Label.CURRENT:
            raise UsageError(f"the {self.kind} backend keeps no {label.value} label",
                             "it has no labels but current")
        with self._lock:
            secret = self._secrets.get(name)
            if secret is None:
                self._check_folders(name)
                secret = _Secret()
            current = self._current(secret)
            if cas is not None and cas != (current or 0):
                raise ConflictError(f"check-and-set failed: current version of {name!r} is "
                                    f"{current}, not {cas}", "read it again and retry")
            version = secret.next_version
            secret.next_version += 1
            secret.versions[version] = (time.time(), value)
            secret.updated = time.time()
            self._secrets[name] = secret
            if metadata is not None:
                self._apply(secret, metadata)
            return version

    def _check_folders(self, name: str) -> None:
        for other in self._secrets:
            if other.startswith(name + "/") or other in parent_folders(name):
                raise InvalidName(f"cannot create {name!r}: it clashes with {other!r}",
                                  "a name cannot be both a secret and a folder")

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        with self._lock:
            self._apply(self._get(name), metadata)

    @staticmethod
    def _apply(secret: _Secret, metadata: MetadataUpdate) -> None:
        if metadata.description is not None:
            secret.description = metadata.description
        if metadata.tags is not None:
            secret.tags = dict(metadata.tags)
        if metadata.rotation is not None:
            secret.rotation = metadata.rotation
        elif metadata.clear_rotation:
            secret.rotation = None
        secret.updated = time.time()

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        raise UsageError(f"the {self.kind} backend has no labels to move")

    # -- reading ----------------------------------------------------------------------------------

    def _get(self, name: str) -> _Secret:
        secret = self._secrets.get(name)
        if secret is None:
            raise SecretNotFound(f"secret {name!r} not found")
        return secret

    @staticmethod
    def _current(secret: _Secret) -> int | None:
        live = [v for v, (_, value) in secret.versions.items() if value is not None]
        return max(live, default=None)

    def read_metadata(self, name: str) -> SecretMetadata:
        with self._lock:
            return self._metadata(name, self._get(name))

    def _metadata(self, name: str, secret: _Secret) -> SecretMetadata:
        versions = tuple(
            VersionInfo(version, _when(created), value_keys(value) if value is not None else (),
                        value is not None and not isinstance(value, bytes),
                        destroyed=value is None,
                        sizes=value_sizes(value) if value is not None else ())
            for version, (created, value) in sorted(secret.versions.items()))
        current = self._current(secret)
        return SecretMetadata(
            name=name, description=secret.description, tags=dict(secret.tags),
            created=_when(secret.created), updated=_when(secret.updated),
            labels={Label.CURRENT: current} if current else {}, versions=versions,
            rotation=secret.rotation)

    def list(self, prefix: str = "") -> list[SecretMetadata]:
        with self._lock:
            return [self._metadata(name, self._secrets[name])
                    for name in sorted(self._secrets) if name.startswith(prefix)]

    def list_names(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(name for name in self._secrets if name.startswith(prefix))

    def read_value(self, name: str, version: int) -> Value:
        with self._lock:
            entry = self._get(name).versions.get(version)
        if entry is None or entry[1] is None:
            raise VersionNotFound(f"secret {name!r} has no readable version {version}")
        return entry[1]

    # -- removing ---------------------------------------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> None:
        raise UsageError(f"the {self.kind} backend has no recoverable delete",
                         "use 'secretfs secrets rm --destroy'")

    def undelete(self, name: str, version: int | None = None) -> None:
        raise UsageError(f"the {self.kind} backend has no recoverable delete")

    def destroy(self, name: str, version: int | None = None) -> None:
        with self._lock:
            secret = self._get(name)
            if version is None:
                del self._secrets[name]
                return
            if version not in secret.versions:
                raise VersionNotFound(f"secret {name!r} has no version {version}")
            created, _ = secret.versions[version]
            secret.versions[version] = (created, None)  # the number is never reused

    # -- what it does not have ---------------------------------------------------------------

    def rotation_state(self, name: str) -> RotationState | None:
        return None

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        if state is not None:
            raise UsageError(f"the {self.kind} backend cannot record a rotation in progress")

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        return (0, None) if cursor is None else (cursor, set())

    def close(self) -> None:
        return None


def factory(config: Any, *, create: bool = False) -> MemoryBackend:
    """What the entry point names: called with the configuration (its backend section's other
    keys are in ``config.manager.backend.options``)."""
    return MemoryBackend()
