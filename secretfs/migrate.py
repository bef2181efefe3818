"""Moving secrets between backends (`secretfs migrate`), and importing files (`secrets import`).

A migration copies each secret with its live versions in order, then its labels, description,
tags and rotation policy. It is **resumable and idempotent**: the target's versions of a secret
are compared with the source's first (by value), the ones already there are skipped, and only
the rest are written — so a run cut short half-way is simply run again, and a second run writes
nothing. A target secret whose versions differ from the source's is refused, never overwritten.

Version numbers are the target's own (a backend numbers its versions itself); labels are mapped
to the copied versions, so ``current``, ``previous`` and ``pending`` point at the same values.
Deleted and destroyed versions are not copied (their values cannot be read).

Both sides go through a manager, so each secret read and written is checked and audited (one
line per secret on each side), like any other operation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from secretfs.backends.base import MetadataUpdate
from secretfs.errors import ConflictError, NotFound, UsageError
from secretfs.model import Label, SecretMetadata, Value

if TYPE_CHECKING:
    from secretfs.manager import SyncSecretsManager


@dataclass
class MigrationReport:
    secrets: int = 0
    written: int = 0  # versions written now
    present: int = 0  # versions found already copied (an earlier, interrupted run)


def _live(metadata: SecretMetadata) -> list[int]:
    return [v.version for v in metadata.versions if not v.deleted and not v.destroyed]


def copy_secret(source: SyncSecretsManager, target: SyncSecretsManager, name: str,
                report: MigrationReport) -> None:
    """Copy one secret (module docstring: resumable, idempotent, refuses a different target)."""
    source.authorize(None, "read", name, "migrate")
    metadata = source.metadata(name)
    versions = _live(metadata)
    values: dict[int, Value] = {v: source.backend.read_value(name, v) for v in versions}
    target.authorize(None, "write", name, "migrate", versions=len(versions))
    try:
        already = _live(target.metadata(name))
    except NotFound:
        already = []
    if len(already) > len(versions) or any(
            target.backend.read_value(name, mine) != values[theirs]
            for mine, theirs in zip(already, versions, strict=False)):
        raise ConflictError(
            f"{name!r} already exists in the target with other versions",
            "remove it there first, or leave it out with --prefix")
    mapping = dict(zip(versions, already, strict=False))
    report.present += len(already)
    for version in versions[len(already):]:
        label = Label.CURRENT if version == versions[-1] else Label.PREVIOUS
        mapping[version] = target.backend.write_version(name, values[version], label=label)
        report.written += 1
    labels = {label: mapping[v] for label, v in metadata.labels.items() if v in mapping}
    if "labels" in getattr(target.backend, "capabilities", {"labels"}):
        ours = target.metadata(name).labels
        changes: dict[Label, int | None] = {label: None for label in ours if label not in labels}
        changes.update(labels)
        target.backend.update_labels(name, changes)
    target.backend.update_metadata(name, MetadataUpdate(
        description=metadata.description, tags=dict(metadata.tags), rotation=metadata.rotation))
    report.secrets += 1


def migrate(source: SyncSecretsManager, target: SyncSecretsManager, prefix: str = "",
            progress: Callable[[int, int], None] | None = None) -> MigrationReport:
    """Copy every secret under *prefix* from *source* to *target*."""
    names = source.backend.list_names(prefix)
    report = MigrationReport()
    for done, name in enumerate(names, start=1):
        copy_secret(source, target, name, report)
        if progress is not None:
            progress(done, len(names))
    return report


class Progress:
    """A bar on a terminal, a line per tenth otherwise (logs, CI)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.stream.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {done}/{total} "
                              "secrets")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
            return
        tenth = 10 * done // max(total, 1)
        if tenth != self._shown:
            self._shown = tenth
            self.stream.write(f"migrate: {done}/{total} secrets\n")
            self.stream.flush()


# -- secretfs secrets import ----------------------------------------------------------------------


def read_import(text: str, source: str, kind: str) -> list[tuple[str, Value | dict[str, str]]]:
    """``(name, value)`` pairs of a dotenv or JSON file: one secret per key (a JSON object value
    becomes a map-valued secret)."""
    if kind == "dotenv":
        from injector.refs import parse_dotenv

        return [(name, value.encode()) for name, value, _ in parse_dotenv(text, source)]
    import json

    try:
        document = json.loads(text)
    except ValueError as error:
        raise UsageError(f"{source}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{source}: expected a JSON object of name → value")
    pairs: list[tuple[str, Value | dict[str, str]]] = []
    for name, value in document.items():
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            pairs.append((name, value))
        elif isinstance(value, str | int | float | bool):
            text = value if isinstance(value, str) else json.dumps(value)  # true, not True
            pairs.append((name, text.encode()))
        else:
            raise UsageError(f"{source}: the value of {name!r} is neither text nor an object "
                             "of texts")
    return pairs


def import_pairs(manager: SyncSecretsManager, pairs: Iterable[tuple[str, Value]],
                 prefix: str = "") -> int:
    """Store each pair as a new version of ``prefix + name``; the number stored."""
    from secretfs.model import Secret, validate_name

    count = 0
    for name, value in pairs:
        manager.store(Secret(validate_name(prefix + name), value))
        count += 1
    return count


__all__ = ["MigrationReport", "Progress", "copy_secret", "import_pairs", "migrate", "read_import"]
