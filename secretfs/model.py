"""What a secret is, and the one grammar for names, versions, keys, references and durations.

A secret has a name (``api_keys/stripe``), numbered versions that never change once written, and
labels that point at versions (``current``, ``previous``, ``pending``; ``latest`` is an alias of
``current``). A version's value is either one string of bytes (its only key is ``value``) or a
flat map of keys to strings. A reference is the mount path written as a URI,
``secretfs://api_keys/stripe/latest/secret``; the same parser serves the filesystem, the
injector, the CLI and policies.

So that a path can always be split into name, version and key without asking the store, a name
segment may not be a number or a label word: those name versions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from secretfs.errors import (
    InvalidName,
    InvalidReference,
    KeyNotFound,
    UsageError,
    ValueTooLarge,
)

# -- limits -----------------------------------------------------------------------------------

MAX_SEGMENT_BYTES = 128
MAX_NAME_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024
MAX_MAP_KEYS = 256
MAX_VERSION = 2**63 - 1  # versions are SQLite INTEGERs
SINGLE_VALUE_KEY = "value"
REFERENCE_SCHEME = "secretfs://"
RESERVED_TOP_LEVEL = ".secretfs"  # the operator folder of the mount

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _shown(text: str, limit: int = 120) -> str:
    """*text* for an error message: quoted, and cut short so a hostile input cannot make a
    message (one line on stderr, an audit field) arbitrarily long."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def _byte_length(text: str) -> int:
    """The UTF-8 length of *text*; lone surrogates (argv bytes that were not UTF-8) count as
    3 bytes instead of raising: the character check rejects them with a clear message."""
    return len(text.encode(errors="surrogatepass"))


# -- labels -----------------------------------------------------------------------------------


class Label(StrEnum):
    """Names that point at a version; the same meaning as AWS staging labels."""

    CURRENT = "current"
    PREVIOUS = "previous"
    PENDING = "pending"

    @classmethod
    def parse(cls, word: str) -> Label | None:
        """The label a path word names (``latest`` is ``current``), or None."""
        if word == "latest":
            return cls.CURRENT
        try:
            return cls(word)
        except ValueError:
            return None


LABEL_WORDS = frozenset({"latest", *(label.value for label in Label)})


# -- names and keys ---------------------------------------------------------------------------


def _check_segment(segment: str, whole: str, kind: str) -> None:
    if segment == "":
        raise InvalidName(
            f"invalid {kind} {whole!r}: empty segment",
            "segments are joined by a single '/', with none at the start or end",
        )
    if segment in (".", ".."):
        raise InvalidName(f"invalid {kind} {whole!r}: segment {segment!r} is not allowed")
    if _byte_length(segment) > MAX_SEGMENT_BYTES:
        raise InvalidName(
            f"invalid {kind} {whole[:40]!r}…: a segment is longer than {MAX_SEGMENT_BYTES} bytes"
        )
    if not _SEGMENT.fullmatch(segment):
        bad = next(c for c in segment if not _SEGMENT.fullmatch(c))
        raise InvalidName(
            f"invalid {kind} {whole!r}: character {bad!r} is not allowed",
            "use letters, digits, '.', '_' and '-', with '/' between segments",
        )


def validate_name(name: str) -> str:
    """Return *name* if it is a valid secret name, else raise InvalidName saying why."""
    if not isinstance(name, str) or name == "":
        raise InvalidName("invalid secret name: it is empty")
    if "\x00" in name:
        raise InvalidName("invalid secret name: it contains a NUL byte")
    if _byte_length(name) > MAX_NAME_BYTES:
        raise InvalidName(
            f"invalid secret name {name[:40]!r}…: longer than {MAX_NAME_BYTES} bytes"
        )
    segments = name.split("/")
    for segment in segments:
        _check_segment(segment, name, "secret name")
        if segment.isdigit() or segment in LABEL_WORDS:
            raise InvalidName(
                f"invalid secret name {name!r}: segment {segment!r} is reserved",
                "numbers and latest/current/previous/pending name versions in a path",
            )
    if segments[0] == RESERVED_TOP_LEVEL:
        raise InvalidName(f"invalid secret name {name!r}: '.secretfs' is reserved")
    return name


def validate_key(key: str) -> str:
    """Return *key* if it is a valid key of a map-valued secret."""
    if not isinstance(key, str) or key == "":
        raise InvalidName("invalid key: it is empty")
    if "\x00" in key:
        raise InvalidName("invalid key: it contains a NUL byte")
    _check_segment(key, key, "key")
    return key


def parent_folders(name: str) -> list[str]:
    """The folders a name lives in: ``a/b/c`` → ``["a", "a/b"]``."""
    segments = name.split("/")
    return ["/".join(segments[:i]) for i in range(1, len(segments))]


# -- versions ---------------------------------------------------------------------------------

VersionSpec = int | Label
"""A version as a reference names it: a number, or a label."""


def parse_version(word: str) -> VersionSpec:
    """``3`` → 3, ``latest``/``current`` → Label.CURRENT; anything else is InvalidReference."""
    label = Label.parse(word)
    if label is not None:
        return label
    if word.isdigit() and word.isascii() and not word.startswith("0"):
        # Bounded before int(): Python refuses to convert over 4300 digits (ValueError).
        if len(word) <= len(str(MAX_VERSION)) and int(word) <= MAX_VERSION:
            return int(word)
        raise InvalidReference(f"invalid version {_shown(word, 24)}: too large",
                               f"versions are numbers from 1 to {MAX_VERSION}")
    raise InvalidReference(
        f"invalid version {_shown(word)}",
        "use a number from 1, or latest, current, previous, pending",
    )


def format_version(version: VersionSpec) -> str:
    return version.value if isinstance(version, Label) else str(version)


def is_version_word(word: str) -> bool:
    return word in LABEL_WORDS or (word.isdigit() and word.isascii())


# -- values -----------------------------------------------------------------------------------

Value = bytes | dict[str, str]
"""A version's value: bytes for a single-value secret, a flat str→str map otherwise."""


def normalize_value(value: str | bytes | Mapping[str, Any]) -> Value:
    """Check a value against the limits and bring it to its stored form."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) > MAX_VALUE_BYTES:
            raise ValueTooLarge(
                f"value is {len(data)} bytes, over the {MAX_VALUE_BYTES}-byte limit",
                "store large files elsewhere and keep their key here",
            )
        return data
    if isinstance(value, Mapping):
        if not value:
            raise UsageError("a map value needs at least one key")
        if len(value) > MAX_MAP_KEYS:
            raise ValueTooLarge(
                f"map value has {len(value)} keys, over the limit of {MAX_MAP_KEYS}"
            )
        items: dict[str, str] = {}
        for key, item in value.items():
            validate_key(key)
            if isinstance(item, bool):
                item = "true" if item else "false"
            elif isinstance(item, int | float):
                item = json.dumps(item)
            elif isinstance(item, bytes):
                try:
                    item = item.decode()
                except UnicodeDecodeError:
                    raise UsageError(f"key {key!r}: map values must be text") from None
            elif not isinstance(item, str):
                raise UsageError(
                    f"key {key!r}: map values must be strings, numbers or booleans",
                    "nested objects and lists are not supported; flatten them into keys",
                )
            try:
                item.encode()
            except UnicodeEncodeError:  # a lone surrogate: from non-UTF-8 argv or a JSON escape
                raise UsageError(f"key {key!r}: map values must be UTF-8 text") from None
            items[key] = item
        encoded = encode_value(items)
        if len(encoded) > MAX_VALUE_BYTES:
            raise ValueTooLarge(
                f"map value is {len(encoded)} bytes encoded, over the {MAX_VALUE_BYTES}-byte limit"
            )
        return items
    raise UsageError(f"unsupported value type {type(value).__name__}")


def value_keys(value: Value) -> tuple[str, ...]:
    return (SINGLE_VALUE_KEY,) if isinstance(value, bytes) else tuple(value)


def value_sizes(value: Value) -> tuple[int, ...]:
    """The byte length of each key's value, in the order of value_keys."""
    if isinstance(value, bytes):
        return (len(value),)
    return tuple(len(item.encode()) for item in value.values())


def encode_value(value: Value) -> bytes:
    """The bytes that are encrypted: the value itself, or the map as compact JSON."""
    if isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def decode_value(payload: bytes, is_map: bool) -> Value:
    return json.loads(payload) if is_map else payload


def value_of_key(value: Value, key: str | None, name: str) -> bytes:
    """The bytes of one key of a value (``value`` or None for single-value secrets)."""
    if isinstance(value, bytes):
        if key in (None, SINGLE_VALUE_KEY):
            return value
        raise KeyNotFound(
            f"secret {name!r} has no key {key!r}",
            f"it holds a single value; use key {SINGLE_VALUE_KEY!r} or omit the key",
        )
    if key is None:
        return encode_value(value)
    if key not in value:
        raise KeyNotFound(
            f"secret {name!r} has no key {key!r}", f"its keys are: {', '.join(sorted(value))}"
        )
    return value[key].encode()


# -- durations --------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | int | float) -> float:
    """``300s``, ``15m``, ``1h30m``, ``90d`` → seconds. A bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return float(text)
    stripped = str(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return float(stripped)
    parts = _DURATION.findall(stripped)
    if not parts or "".join(n + u for n, u in parts) != stripped:
        raise ValueError(f"{text!r} is not a duration (use e.g. 300s, 15m, 1h, 90d)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """The shortest exact form: 7776000 → ``90d``, 5400 → ``90m``, 0.5 → ``500ms``."""
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0 and unit != "w":
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


# -- metadata ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorSpec:
    """How a new value is drawn; rotation/generate.py checks a spec and carries it out.

    The spec is stored as JSON with each secret's rotation policy, so every field has a default
    and ``from_json`` fills in missing ones: records written before a field existed (only
    ``length`` and ``charset``) keep drawing exactly what they drew before. ``length`` and
    ``charset`` stay the first two fields so positional callers keep working.

    * ``kind``: ``text`` (characters of ``charset``), ``bytes`` (``length`` random bytes,
      base64-encoded) or ``uuid`` (a random UUID; ``length`` and ``charset`` are ignored).
    * ``charset``: a name from ``generate.CHARSETS`` or ``custom:<characters>``.
    * ``require_each``: at least one character of every class (lowercase, uppercase, digits,
      symbols) that the charset contains, for systems whose password rules demand it.
    * ``exclude``: characters never used; ``exclude_ambiguous`` drops ``generate.AMBIGUOUS``,
      for values a person has to read or type.
    """

    length: int = 32
    charset: str = "alnum"
    kind: str = "text"
    require_each: bool = False
    exclude: str = ""
    exclude_ambiguous: bool = False

    def to_json(self) -> dict[str, Any]:
        # Every field, defaults included: a record then says what it draws without knowing
        # which defaults this version of secretfs had.
        return {
            "kind": self.kind,
            "length": self.length,
            "charset": self.charset,
            "require_each": self.require_each,
            "exclude": self.exclude,
            "exclude_ambiguous": self.exclude_ambiguous,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GeneratorSpec:
        return cls(
            kind=str(data.get("kind", "text")),
            length=int(data.get("length", 32)),
            charset=str(data.get("charset", "alnum")),
            require_each=bool(data.get("require_each", False)),
            exclude=str(data.get("exclude", "")),
            exclude_ambiguous=bool(data.get("exclude_ambiguous", False)),
        )


@dataclass(frozen=True)
class RotationPolicy:
    """When and how a secret rotates; stored with the secret, carried out by rotation/."""

    enabled: bool = True
    interval: float | None = None  # seconds between rotations, or…
    schedule: str | None = None  # …a cron expression
    max_age: float | None = None
    overlap: float | None = None  # how long `previous` stays readable after a rotation
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    set_cmd: str | None = None  # applies the new value (gets it on stdin)
    validate_cmd: str | None = None  # exit 0 = the new value works (gets it on stdin)
    key: str | None = None  # for map-valued secrets: the key that rotates

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"enabled": self.enabled, "generator": self.generator.to_json()}
        optional = ("interval", "schedule", "max_age", "overlap", "set_cmd", "validate_cmd", "key")
        for name in optional:
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RotationPolicy:
        return cls(
            enabled=bool(data.get("enabled", True)),
            interval=data.get("interval"),
            schedule=data.get("schedule"),
            max_age=data.get("max_age"),
            overlap=data.get("overlap"),
            generator=GeneratorSpec.from_json(data.get("generator", {})),
            set_cmd=data.get("set_cmd"),
            validate_cmd=data.get("validate_cmd"),
            key=data.get("key"),
        )


class RotationStep(StrEnum):
    """How far a rotation got; persisted before each step so a crash can be resumed or undone.

    ``created``: the pending version is stored, nothing outside secretfs has seen it — undone on
    recovery. ``applying``: the set hook may have applied it to the system that uses it — from
    here on, recovery goes forward (set and validate again, then promote), as AWS's rotation
    does, because rolling back could leave that system with a value secretfs no longer has.
    """

    CREATED = "created"
    APPLYING = "applying"


@dataclass(frozen=True)
class RotationState:
    """An unfinished rotation of one secret, as stored with it."""

    version: int  # the pending version
    step: RotationStep
    owner: str  # "host:pid" of the process carrying it out
    started: float  # epoch seconds
    updated: float  # epoch seconds: the owner's last sign of life


@dataclass(frozen=True)
class VersionInfo:
    """One version's metadata: never its value."""

    version: int
    created: datetime
    keys: tuple[str, ...]
    is_map: bool
    deleted: bool = False  # soft-deleted: recoverable, not readable
    destroyed: bool = False  # crypto-shredded: gone for good
    sizes: tuple[int, ...] = ()  # byte length per key (as keys); empty when the backend can't say

    @property
    def readable(self) -> bool:
        return not (self.deleted or self.destroyed)

    def size_of(self, key: str) -> int | None:
        """The length of one key's value, known without decrypting it (or None)."""
        if len(self.sizes) != len(self.keys) or key not in self.keys:
            return None
        return self.sizes[self.keys.index(key)]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created.isoformat(),
            "keys": list(self.keys),
            "type": "map" if self.is_map else "single",
            "deleted": self.deleted,
            "destroyed": self.destroyed,
        }


@dataclass(frozen=True)
class SecretMetadata:
    """Everything about a secret except its values: what listing and `info` show."""

    name: str
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None
    labels: Mapping[Label, int] = field(default_factory=dict)
    versions: tuple[VersionInfo, ...] = ()
    rotation: RotationPolicy | None = None
    deleted: bool = False

    @property
    def current_version(self) -> int | None:
        return self.labels.get(Label.CURRENT)

    def version_info(self, version: int) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == version), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tags": dict(self.tags),
            "created": self.created.isoformat() if self.created else None,
            "updated": self.updated.isoformat() if self.updated else None,
            "current_version": self.current_version,
            "labels": {label.value: version for label, version in sorted(self.labels.items())},
            "versions": [v.to_json() for v in self.versions],
            "rotation": self.rotation.to_json() if self.rotation else None,
            "deleted": self.deleted,
        }


@dataclass
class Secret:
    """A secret as the seed's API hands it around: a name, one version's value, its metadata.

    To store: ``Secret(name="db_password", value="…", description="…", tags={…})``.
    From ``get``: ``version`` is the version the value came from.
    """

    name: str
    value: Value | str | Mapping[str, Any] = b""
    description: str | None = None  # None on store: keep the stored description
    tags: Mapping[str, str] | None = None  # None on store: keep the stored tags
    rotation: RotationPolicy | None = None
    version: int | None = None

    def __repr__(self) -> str:  # never show the value
        return f"Secret(name={self.name!r}, version={self.version!r}, value=<concealed>)"

    @property
    def keys(self) -> tuple[str, ...]:
        return value_keys(normalize_value(self.value))

    def text(self, key: str | None = None) -> str:
        """The value (or one key of it) as text."""
        return value_of_key(normalize_value(self.value), key, self.name).decode()


# -- references -------------------------------------------------------------------------------

Resolver = Callable[[Any], Awaitable[bytes | str]]
"""An async callable that derives a value from other secrets; gets the SecretsManager."""


@dataclass(frozen=True)
class SecretRef:
    """A pointer to one version (or label) of a secret, and optionally one key of it.

    ``SecretRef.parse("secretfs://api_keys/stripe/latest/secret")`` or the bare
    ``api_keys/stripe/latest/secret``. A ref may instead carry a *resolver*, an async callable
    that builds the value from other secrets (a DSN from a user and a password);
    ``SecretsManager.resolve`` runs it.
    """

    name: str
    version: VersionSpec = Label.CURRENT
    key: str | None = None
    resolver: Resolver | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.key is not None:
            validate_key(self.key)

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        """Parse a reference; InvalidReference (exit 2) says what is wrong."""
        if not isinstance(text, str):
            raise InvalidReference(f"a reference must be text, not {type(text).__name__}")
        body = text[len(REFERENCE_SCHEME) :] if text.startswith(REFERENCE_SCHEME) else text
        if "://" in body:
            raise InvalidReference(
                f"invalid reference {_shown(text)}: unknown scheme",
                "write secretfs://name[/version[/key]] or name[/version[/key]]",
            )
        segments = body.split("/")
        at = next(
            (i for i, word in enumerate(segments) if i > 0 and is_version_word(word)), None
        )
        try:
            if at is None:
                return cls(validate_name(body))
            name = validate_name("/".join(segments[:at]))
            version = parse_version(segments[at])
            rest = segments[at + 1 :]
            if len(rest) > 1:
                raise InvalidReference(
                    f"invalid reference {_shown(text)}: more than one key after the version",
                    "write name/version/key",
                )
            return cls(name, version, validate_key(rest[0]) if rest else None)
        except InvalidName as error:
            raise InvalidReference(f"invalid reference {_shown(text)}: {error.what}",
                                   error.fix) from None

    def with_version(self, version: VersionSpec) -> SecretRef:
        return SecretRef(self.name, version, self.key, self.resolver)

    def with_key(self, key: str | None) -> SecretRef:
        return SecretRef(self.name, self.version, key, self.resolver)

    def with_resolver(self, resolver: Resolver) -> SecretRef:
        return SecretRef(self.name, self.version, self.key, resolver)

    @property
    def path(self) -> str:
        """The bare form, ``name/version[/key]``: also the path under a mount."""
        version = "latest" if self.version is Label.CURRENT else format_version(self.version)
        parts = [self.name, version]
        if self.key is not None:
            parts.append(self.key)
        return "/".join(parts)

    def __str__(self) -> str:
        return REFERENCE_SCHEME + self.path
