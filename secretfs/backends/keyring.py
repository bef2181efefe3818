"""Secrets in the OS keychain (Secret Service, KWallet, macOS Keychain…) via ``keyring``.

For a desktop or a single host that already has a keychain and wants no store file of its own.
A keychain keeps one password per (service, username) and cannot list them, so:

- each secret is one entry, username = the secret's name, password = one JSON document holding
  the value (bytes base64-encoded, maps as objects) and its metadata: description, tags, rotation
  policy, created/updated times, the version number, is_map, keys and sizes;
- one more entry under the reserved username ``.secretfs/index`` lists the names, so ``list``
  works. ``.secretfs`` is a reserved top-level name (model.RESERVED_TOP_LEVEL), so the index can
  never collide with a secret. A new name goes into the index *before* its entry is written and
  leaves it *after* its entry is deleted: a crash in between leaves a listed name that reads as
  not found (``destroy`` clears it), never a secret nobody can find.

Versions: only the newest value is kept (no ``versions`` capability), but every write still gets
the next number — 1, 2, 3… — so a reader that caches by version number (the mount, the manager's
cache) sees that the value changed; ``read_metadata().versions`` lists that one version, and an
older number reads as VersionNotFound. ``destroy(name, version)`` erases the value but keeps the
record and its number, so numbers are never reused; ``destroy(name)`` removes the entry.

Only ``current`` exists (no ``labels``: no pending versions, so no rotation), there is no soft
delete (use destroy), no rotation state and no change feed (the daemon polls metadata). ``cas``
compares the current version number (0: the secret does not exist).

Concurrency: one lock serializes this object's calls, so threads of one process (the daemon's
workers) never lose an update. The keychain has no transactions, so two *processes* writing at
the same moment can still race: the last write of an entry wins, and two names created at once
can drop one from the index. Use the local backend where several processes write often.

``keyring`` is imported on first use, not with this module: it scans its backends at import,
which costs one-shot CLI commands time they need not spend.
"""

from __future__ import annotations

import base64
import builtins
import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from secretfs.backends.base import MetadataUpdate
from secretfs.errors import (
    BackendUnavailable,
    ConflictError,
    InvalidName,
    SecretNotFound,
    StoreError,
    UsageError,
    VersionNotFound,
)
from secretfs.model import (
    RESERVED_TOP_LEVEL,
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

if TYPE_CHECKING:
    from secretfs.config import Config

DEFAULT_SERVICE = "secretfs"
INDEX_USERNAME = f"{RESERVED_TOP_LEVEL}/index"
FORMAT = 1  # of the JSON documents; a newer one is refused rather than misread
_UNSUPPORTED_FIX = "the keyring backend keeps one value per secret; use the local backend for this"


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


class KeyringBackend:
    """One keychain entry per secret, plus an index entry; see the module docstring."""

    kind = "keyring"
    capabilities = frozenset({"metadata", "folders", "cas", "destroy"})

    def __init__(self, service: str = DEFAULT_SERVICE, keyring: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        """*keyring*: a ``keyring.backend.KeyringBackend`` (tests pass a file-backed one);
        None: the one ``keyring`` picks for this session, looked up on first use."""
        self.service = service
        self._keyring = keyring
        self._clock = clock
        self._lock = threading.RLock()

    # -- the keychain -------------------------------------------------------------------------

    def _ring(self) -> Any:
        if self._keyring is None:
            import keyring

            self._keyring = keyring.get_keyring()
        return self._keyring

    def _unavailable(self, error: Exception) -> BackendUnavailable:
        # Only the error's type: a keychain's message is not ours to vet for secrets.
        ring = type(self._keyring).__name__ if self._keyring is not None else "keyring"
        return BackendUnavailable(
            f"the keychain ({ring}) failed: {type(error).__name__}",
            "check that a keyring service is running and unlocked ('keyring diagnose')",
        )

    def _get(self, username: str) -> str | None:
        try:
            return self._ring().get_password(self.service, username)
        except Exception as error:  # any keychain failure: dbus, locked, missing backend…
            raise self._unavailable(error) from None

    def _set(self, username: str, password: str) -> None:
        try:
            self._ring().set_password(self.service, username, password)
        except Exception as error:
            raise self._unavailable(error) from None

    def _remove(self, username: str) -> bool:
        """Delete one entry; False if there was none."""
        try:
            self._ring().delete_password(self.service, username)
        except Exception as error:
            from keyring.errors import PasswordDeleteError

            if isinstance(error, PasswordDeleteError):
                return False
            raise self._unavailable(error) from None
        return True

    def _load(self, username: str, what: str) -> dict[str, Any] | None:
        text = self._get(username)
        if text is None:
            return None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or int(document.get("format", 0)) != FORMAT:
                raise ValueError
        except (ValueError, TypeError):
            raise StoreError(  # never the text: it may be a value
                f"keychain entry {what} of service {self.service!r} is not a secretfs record",
                "remove it with the keychain's own tools, or configure another service",
            ) from None
        return document

    # -- index and records --------------------------------------------------------------------

    def _names(self) -> builtins.list[str]:
        index = self._load(INDEX_USERNAME, "index")
        return sorted(index.get("names", [])) if index else []

    def _save_names(self, names: set[str]) -> None:
        self._set(INDEX_USERNAME, json.dumps({"format": FORMAT, "names": sorted(names)}))

    def _record(self, name: str) -> dict[str, Any]:
        if name == INDEX_USERNAME:
            raise SecretNotFound(f"secret {name!r} not found")
        record = self._load(name, repr(name))
        if record is None:
            raise SecretNotFound(f"secret {name!r} not found")
        return record

    def _save(self, name: str, record: dict[str, Any]) -> None:
        self._set(name, json.dumps(record, separators=(",", ":"), ensure_ascii=False))

    @staticmethod
    def _unsupported(what: str) -> UsageError:
        return UsageError(f"the keyring backend cannot {what}", _UNSUPPORTED_FIX)

    # -- writing ------------------------------------------------------------------------------

    def write_version(self, name: str, value: Value, *, label: Label = Label.CURRENT,
                      cas: int | None = None, metadata: MetadataUpdate | None = None) -> int:
        if label is not Label.CURRENT:
            raise self._unsupported(f"hold a {label.value} version of {name!r}")
        if name.split("/")[0] == RESERVED_TOP_LEVEL:
            raise InvalidName(f"invalid secret name {name!r}: '.secretfs' is reserved")
        now = self._clock()
        with self._lock:
            names = self._names()
            # read even if unlisted: an entry another process wrote keeps its number going
            record = self._load(name, repr(name))
            if cas is not None:
                if record is None and cas != 0:
                    raise ConflictError(
                        f"check-and-set failed: secret {name!r} does not exist, "
                        f"expected version {cas}", "use --cas 0 to create it",
                    )
                if record is not None and cas != record["version"]:
                    raise ConflictError(
                        f"check-and-set failed: current version of {name!r} is "
                        f"{record['version']}, not {cas}",
                        "read it again and retry with the new version",
                    )
            if record is None:
                self._check_folder_conflict(names, name)
                record = {"format": FORMAT, "version": 0, "created": now, "description": "",
                          "tags": {}, "rotation": None}
            if name not in names:
                self._save_names({*names, name})  # index first: see the module docstring
            is_map = not isinstance(value, bytes)
            record.update(
                version=record["version"] + 1, updated=now, version_created=now,
                is_map=is_map, keys=list(value_keys(value)), sizes=list(value_sizes(value)),
                value=dict(value) if is_map else base64.b64encode(value).decode(),
                destroyed=False,
            )
            if metadata is not None:
                self._apply_metadata(record, metadata)
            self._save(name, record)
            return record["version"]

    @staticmethod
    def _check_folder_conflict(names: builtins.list[str], name: str) -> None:
        """A name may not be a folder of another name, nor have another name as its folder."""
        folders = set(parent_folders(name))
        for other in names:
            if other.startswith(name + "/") or other in folders:
                relation = "a folder of" if other.startswith(name + "/") else "inside"
                raise InvalidName(
                    f"cannot create {name!r}: it would be {relation} the existing secret "
                    f"{other!r}",
                    "a name cannot be both a secret and a folder; choose another name",
                )

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        with self._lock:
            record = self._record(name)
            self._apply_metadata(record, metadata)
            record["updated"] = self._clock()
            self._save(name, record)

    @staticmethod
    def _apply_metadata(record: dict[str, Any], metadata: MetadataUpdate) -> None:
        if metadata.description is not None:
            record["description"] = metadata.description
        if metadata.tags is not None:
            record["tags"] = dict(metadata.tags)
        if metadata.rotation is not None:
            record["rotation"] = metadata.rotation.to_json()
        elif metadata.clear_rotation:
            record["rotation"] = None

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        raise self._unsupported(f"move the labels of {name!r}: only 'current' exists")

    def rotation_state(self, name: str) -> RotationState | None:
        return None  # nothing can be pending, so no rotation is ever unfinished

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        if state is not None:
            raise self._unsupported(f"rotate {name!r}: it has no pending versions")

    # -- deleting -----------------------------------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> None:
        raise UsageError(
            f"the keyring backend cannot soft-delete {name!r}",
            f"remove it for good with 'secretfs secrets rm {name} --destroy'",
        )

    def undelete(self, name: str, version: int | None = None) -> None:
        raise UsageError(f"the keyring backend cannot undelete {name!r}: it never soft-deletes")

    def destroy(self, name: str, version: int | None = None) -> None:
        with self._lock:
            if version is not None:
                record = self._record(name)
                if version != record["version"]:
                    raise VersionNotFound(f"secret {name!r} has no version {version}")
                record.update(value=None, destroyed=True, updated=self._clock())
                self._save(name, record)
                return
            names = self._names()
            removed = name != INDEX_USERNAME and self._remove(name)
            if name in names:  # after the entry: see the module docstring
                self._save_names(set(names) - {name})
            elif not removed:
                raise SecretNotFound(f"secret {name!r} not found")

    # -- reading ------------------------------------------------------------------------------

    def read_metadata(self, name: str) -> SecretMetadata:
        with self._lock:
            return self._metadata(name, self._record(name))

    def list(self, prefix: str = "") -> builtins.list[SecretMetadata]:
        found = []
        with self._lock:
            for name in self.list_names(prefix):
                try:
                    found.append(self._metadata(name, self._record(name)))
                except SecretNotFound:  # listed, but its entry is gone (an interrupted write)
                    continue
        return found

    def list_names(self, prefix: str = "") -> builtins.list[str]:
        with self._lock:
            return [name for name in self._names() if name.startswith(prefix)]

    def read_value(self, name: str, version: int) -> Value:
        with self._lock:
            record = self._record(name)
        if version != record["version"]:
            raise VersionNotFound(
                f"secret {name!r} has no version {version}",
                f"the keyring backend keeps only the newest, version {record['version']}",
            )
        if record.get("destroyed") or record.get("value") is None:
            raise VersionNotFound(f"version {version} of {name!r} was destroyed")
        if record["is_map"]:
            return dict(record["value"])
        return base64.b64decode(record["value"])

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        # No feed: "reload everything" once, then "nothing" — the daemon polls metadata.
        return (0, None) if cursor is None else (cursor, set())

    def close(self) -> None:
        """Nothing to release: every call goes to the keychain afresh."""

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _metadata(name: str, record: dict[str, Any]) -> SecretMetadata:
        version = record["version"]
        info = VersionInfo(
            version=version, created=_when(record.get("version_created")),
            keys=tuple(record.get("keys", ())), sizes=tuple(record.get("sizes", ())),
            is_map=bool(record.get("is_map")), destroyed=bool(record.get("destroyed")),
        )
        rotation = record.get("rotation")
        return SecretMetadata(
            name=name, description=record.get("description", ""),
            tags=dict(record.get("tags", {})), created=_when(record.get("created")),
            updated=_when(record.get("updated")), labels={Label.CURRENT: version},
            versions=(info,), rotation=RotationPolicy.from_json(rotation) if rotation else None,
        )


def open_keyring(config: Config, *, create: bool = False) -> KeyringBackend:
    """The factory ``open_backend`` calls: ``backend.service`` names the keychain service.

    *create* changes nothing: the keychain needs no initialising, and entries appear on write.
    """
    service = config.manager.backend.options.get("service") or DEFAULT_SERVICE
    return KeyringBackend(str(service))
