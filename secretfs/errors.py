"""One exception family for everything a user can cause.

Every class carries the exit code the CLI returns (CONTRACT.md, "Exit codes") and the errno the
filesystem answers with, so each front end maps a failure the same way. A message has two parts:
*what* went wrong, naming the thing, and *how to fix it*; ``str(error)`` joins them as
``what (fix)``, which the CLI prints after ``secretfs: ``. No message ever contains a secret value.
"""

from __future__ import annotations

import errno as _errno


class SecretfsError(Exception):
    """Base of every error secretfs reports to a user (anything else is a bug)."""

    exit_code: int = 1
    errno: int = _errno.EIO

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})" if fix else what)


class UsageError(SecretfsError):
    """Bad flags, or a name, reference or value that breaks the grammar or a limit."""

    exit_code = 2
    errno = _errno.EINVAL


class InvalidName(UsageError):
    """A secret name, key or version that the naming rules reject."""


class InvalidReference(UsageError):
    """A ``secretfs://`` reference or bare ``name/version/key`` path that does not parse."""


class ValueTooLarge(UsageError):
    """A value (or a map with too many keys) over the documented limits."""


class NotFound(SecretfsError):
    """A secret, version or key that does not exist."""

    exit_code = 3
    errno = _errno.ENOENT


class SecretNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class KeyNotFound(NotFound):
    pass


class AccessDenied(SecretfsError):
    """The caller's principal may not perform the action on the resource."""

    exit_code = 4
    errno = _errno.EACCES


class BackendUnavailable(SecretfsError):
    """The backend did not answer and nothing usable is cached."""

    exit_code = 5
    errno = _errno.EIO


class RotationFailed(SecretfsError):
    """A rotation step failed; the current value is unchanged."""

    exit_code = 6
    errno = _errno.EIO


class ConfigError(SecretfsError):
    """A configuration or policy file that does not validate."""

    exit_code = 7
    errno = _errno.EINVAL


class StoreError(SecretfsError):
    """The store or its keys cannot be trusted or used: wrong key, corruption, unsafe files."""

    exit_code = 8
    errno = _errno.EIO


class IntegrityError(StoreError):
    """A ciphertext failed authentication: it was altered, or moved to another slot."""


class WrongMasterKey(StoreError):
    """The configured master key is not the one that wrapped a data key."""


class UnsafeKeyFile(StoreError):
    """A key file that others than its owner can read or write."""


class ConflictError(SecretfsError):
    """A check-and-set write whose expected version is no longer current."""

    exit_code = 1
    errno = _errno.EAGAIN
