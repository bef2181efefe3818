"""The Backend protocol: what the manager needs from a place that keeps secrets.

A backend stores versions and their plaintext values as the manager hands them over; how it
protects them at rest is its own business (the local backend seals each version under a data key,
OpenBao and AWS encrypt server-side). Methods are blocking: the async manager runs them in a
worker thread, and the CLI calls them directly without an event loop.

Semantics every backend keeps (the conformance tests check them):

- versions are numbered from 1, never reused, never changed once written;
- writing a version labelled ``current`` moves ``previous`` to the old current version;
- ``cas`` (check-and-set) makes a write fail with ConflictError unless the current version is
  the one given (0: unless the secret does not exist yet);
- a soft-deleted secret or version is hidden from reads and listings until undeleted; destroying
  erases the value for good;
- only the newest ``max_versions`` versions are kept, plus any a label points at;
- one ``pending`` version at a time: writing a version labelled ``pending`` while another holds
  the label fails with ConflictError (two hosts rotating one secret: one wins, rotation/);
- ``update_labels`` moves labels atomically, after checking where they point (check-and-set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Protocol

from secretfs.errors import ConflictError
from secretfs.model import Label, RotationPolicy, RotationState, SecretMetadata, Value

CAPABILITIES: Mapping[str, str] = MappingProxyType({
    "versions": "many versions are kept, numbered from 1; without it only the newest is kept "
                "(a write replaces the value, its number still goes up, `versions` lists one)",
    "labels": "current, previous and pending are movable and update_labels works; without it "
              "only `current` exists, and a pending write or update_labels raises a SecretfsError",
    "cas": "a write given `cas` checks the current version first; without it such a write raises "
           "a SecretfsError instead of silently skipping the check",
    "soft_delete": "delete hides a secret or version until undelete; without it delete and "
                   "undelete raise a SecretfsError and change nothing (destroy is the way)",
    "destroy": "destroy erases a version's value, or the whole secret, for good; without it "
               "destroy raises a SecretfsError and changes nothing",
    "metadata": "description, tags and rotation policy are stored (MetadataUpdate); without it "
                "update_metadata raises a SecretfsError and they read back empty",
    "rotation_state": "an unfinished rotation is recorded (set_rotation_state); without it "
                      "rotation_state is always None and recording one raises a SecretfsError",
    "change_feed": "changes_since names what changed; without it changes_since returns "
                   "(cursor, None) only on the first call and (cursor, set()) after, and the "
                   "daemon polls metadata instead (cache.poll_interval)",
    "folders": "names may contain '/' (a name is never also a folder of another name); without "
               "it such a name is refused with InvalidName",
})
"""What a backend can do, by name → meaning; a backend lists the ones it has in its
``capabilities``. The manager, daemon and CLI look here instead of at ``kind`` so a plugin is
treated by what it declares, and the conformance suite (secretfs.testing) checks each declared
capability — and, for each missing one, the behaviour its meaning promises instead."""


class Scanned(NamedTuple):
    """One name in a backend's ``scan_metadata`` (see Backend)."""

    fingerprint: bytes  # changes whenever the secret's metadata does
    # its metadata from the listing (None: deleted); blocking, as any backend call — it may
    # need a request for what the listing lacks
    metadata: Callable[[], SecretMetadata | None]


@dataclass(frozen=True)
class MetadataUpdate:
    """Metadata to set along with (or without) a new version; None fields are left as they are."""

    description: str | None = None
    tags: Mapping[str, str] | None = None
    rotation: RotationPolicy | None = None
    clear_rotation: bool = False

    @property
    def empty(self) -> bool:
        return (
            self.description is None
            and self.tags is None
            and self.rotation is None
            and not self.clear_rotation
        )


def check_write(name: str, labels: Mapping[Label, int], *, label: Label, cas: int | None,
                pending: int | None = None) -> None:
    """The conditions every backend checks before writing a version of an existing secret:
    check-and-set on ``current``, and one pending version at a time (*pending*: one being
    written that the labels do not show yet). ConflictError otherwise."""
    current = labels.get(Label.CURRENT)
    if cas is not None and cas != (current or 0):
        raise ConflictError(
            f"check-and-set failed: current version of {name!r} is {current}, not {cas}",
            "read it again and retry with the new version",
        )
    pending = labels.get(Label.PENDING, pending)
    if label is Label.PENDING and pending is not None:
        raise ConflictError(
            f"secret {name!r} already has a pending version ({pending}): a rotation is in "
            "progress", "wait for it, or see 'secretfs secrets info'",
        )


class Backend(Protocol):
    """A store of versioned secrets. Every method may raise BackendUnavailable."""

    kind: str  # "local", "openbao", …: shown by `info` and `doctor`
    capabilities: frozenset[str]  # names from CAPABILITIES: what callers may rely on

    def write_version(
        self,
        name: str,
        value: Value,
        *,
        label: Label = Label.CURRENT,
        cas: int | None = None,
        metadata: MetadataUpdate | None = None,
    ) -> int:
        """Store *value* as a new version of *name* (created if needed); return its number."""
        ...

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        """Change description, tags or rotation policy without a new version."""
        ...

    def read_metadata(self, name: str) -> SecretMetadata:
        """Everything about *name* but its values. SecretNotFound if absent or deleted."""
        ...

    def list(self, prefix: str = "") -> list[SecretMetadata]:
        """Metadata of every live secret whose name starts with *prefix*, sorted by name."""
        ...

    def read_value(self, name: str, version: int) -> Value:
        """The value of one version. VersionNotFound if absent, deleted or destroyed."""
        ...

    def delete(self, name: str, version: int | None = None) -> None:
        """Soft-delete the whole secret, or one version of it."""
        ...

    def undelete(self, name: str, version: int | None = None) -> None:
        """Bring back what delete hid."""
        ...

    def destroy(self, name: str, version: int | None = None) -> None:
        """Erase one version's value for good, or the whole secret with all its versions."""
        ...

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        """Atomically: check that each label in *expect* points at the version given (None:
        the label is absent) — ConflictError if not — then point each label in *changes* at
        its version (None: remove the label)."""
        ...

    def rotation_state(self, name: str) -> RotationState | None:
        """The unfinished rotation of *name*, if any."""
        ...

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        """Record (None: forget) the unfinished rotation of *name*."""
        ...

    def list_names(self, prefix: str = "") -> list[str]:
        """Names of every live secret starting with *prefix*, sorted (cheaper than list)."""
        ...

    # Optional, for the metadata poller of a backend without a change feed (secretfs/poll.py):
    # - ``scan_metadata(prefix="") -> dict[str, Scanned] | None``: every name that *may* be a
    #   live secret (deleted ones may be included), each with a digest that changes whenever its
    #   metadata does and its metadata as listed (Scanned), in a few requests (not one per
    #   name); None when the service cannot;
    # - ``scan_names(prefix="") -> list[str]``: those names alone, when that is much cheaper than
    #   list_names (the poller then reads each name's metadata, which tells deleted ones apart).

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        """The names changed since *cursor* (a value this method returned before), and the
        cursor to pass next time. None instead of names: anything may have changed (the first
        call, or the reader fell too far behind), so reload everything."""
        ...

    def close(self) -> None: ...
