"""The configuration file: YAML in, typed, validated, frozen settings out.

Every mistake in a config file must be reported with the file, the line and the dotted key
(CONTRACT.md, "Configuration"), and only PyYAML's *nodes* remember where a value came from; so
this module composes the document into nodes and walks them against a schema instead of loading
plain dicts. The schema is a few tables that map each key to a converter; one walker applies them,
so a new key is one table row.

Import cost matters because one-shot CLI commands read the config: this module imports only the
stdlib (and secretfs.errors/model); ``yaml`` is imported when there is text to parse, so
``default_config()`` and ``data_dir()`` never load it.

Where the file is (CONTRACT.md): ``--config FILE``, else ``$SECRETFS_CONFIG``, else
``/etc/secretfs/config.yaml`` for root or ``$XDG_CONFIG_HOME/secretfs/config.yaml`` for anyone else,
else the embedded default. See docs/config.md for the user-facing reference.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

from secretfs import config_cache
from secretfs.errors import ConfigError
from secretfs.model import parse_duration

if TYPE_CHECKING:
    from yaml.nodes import Node

MAX_CONFIG_BYTES = 1024 * 1024
SYSTEM_CONFIG = Path("/etc/secretfs/config.yaml")
ACTIONS = ("read", "list", "write", "delete", "rotate", "*")
DURATION_HINT = "use e.g. 300s, 15m, 1h, 90d"


# -- where things live ------------------------------------------------------------------------


def _xdg_home(variable: str, fallback: str) -> Path:
    """An XDG base folder; unset, empty or relative values fall back, as the XDG spec says."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def data_dir() -> Path:
    """The folder of the embedded store, master key and audit log when the config names none."""
    if os.geteuid() == 0:
        return Path("/var/lib/secretfs")
    return _xdg_home("XDG_DATA_HOME", ".local/share") / "secretfs"


def config_path_from_env(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read, or None for the embedded default.

    A path the user named (``--config`` or ``$SECRETFS_CONFIG``) must exist: silently running
    with defaults would put secrets somewhere the user did not ask for. The implicit per-user or
    system file is optional.
    """
    if explicit is not None:
        return _must_exist(explicit, "check the path given with --config")
    from_env = os.environ.get("SECRETFS_CONFIG", "")
    if from_env:
        return _must_exist(from_env, "$SECRETFS_CONFIG names it; fix or unset the variable")
    if os.geteuid() == 0:
        implicit = SYSTEM_CONFIG
    else:
        implicit = _xdg_home("XDG_CONFIG_HOME", ".config") / "secretfs" / "config.yaml"
    return implicit if implicit.exists() else None


def _must_exist(path: str | os.PathLike[str], fix: str) -> Path:
    found = Path(os.path.expanduser(path))
    if not found.exists():
        raise ConfigError(f"config file {found} not found", fix)
    return found


# -- the settings -----------------------------------------------------------------------------


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Where secrets are kept. ``options`` holds the type-specific keys (see docs/config.md)."""

    type: str = "local"
    path: Path = field(default_factory=lambda: data_dir() / "store.db")
    max_versions: int = 10
    options: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """Where the master key that wraps every data key comes from."""

    provider: str = "file"
    key_file: Path = field(default_factory=lambda: data_dir() / "master.key")
    key_name: str | None = None  # openbao_transit
    key_id: str | None = None  # aws_kms


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The in-memory value cache; durations in seconds."""

    enabled: bool = True
    ttl: float = 300.0
    max_size: int = 1000
    max_stale: float = 3600.0  # serve a stale value this long while the backend is down
    poll_interval: float = 30.0  # how often a remote backend's metadata is checked
    read_ahead: bool = True  # a lookup inside a secret starts loading the value it leads to


@dataclass(frozen=True, slots=True)
class RotationSettings:
    """The rotation scheduler; ``max_age``/``overlap`` come from YAML ``default_policy``."""

    enabled: bool = True
    schedule: str = "0 0 * * *"
    max_age: float = 90 * 86400.0
    overlap: float = 3600.0


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool = True
    path: Path = field(default_factory=lambda: data_dir() / "audit.log")
    log_level: str = "info"  # info: every decision; debug: also cache events
    retention: float = 90 * 86400.0
    fail_open: bool = False  # False: an access whose audit record cannot be written is refused


@dataclass(frozen=True, slots=True)
class MountConfig:
    path: Path = Path("/run/secretfs/mnt")
    allow_other: bool = True


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    """The ``secrets_manager`` section."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rotation: RotationSettings = field(default_factory=RotationSettings)
    audit: AuditConfig = field(default_factory=AuditConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    backend_timeout: float = 5.0  # seconds a backend read by the daemon may take (docs/cache.md)


@dataclass(frozen=True, slots=True)
class PrincipalSpec:
    """Who a caller is: every matcher that is set must match (first matching principal wins)."""

    name: str
    uid: int | None = None
    user: str | None = None
    gid: int | None = None
    group: str | None = None
    exe: str | None = None  # glob over the executable's path
    exe_sha256: str | None = None  # lowercase hex
    unit: str | None = None
    container: str | None = None
    cmdline: str | None = None  # glob; chosen by the process itself, so never trust it alone


@dataclass(frozen=True, slots=True)
class Rule:
    actions: tuple[str, ...]
    resources: tuple[str, ...]  # secret names with * (any characters, / included) and ?


@dataclass(frozen=True, slots=True)
class Condition:
    """A further requirement of a policy, e.g. ``ip_range`` or ``time_window``.

    ``value`` is one canonical string: for ``ip_range`` the networks joined by commas
    (``10.0.0.0/8,fd00::/8``), for ``time_window`` the window with single spaces.
    """

    type: str
    value: str

    @property
    def values(self) -> tuple[str, ...]:
        """An ``ip_range``'s networks one by one (any other condition: its one value)."""
        return tuple(self.value.split(",")) if self.type == "ip_range" else (self.value,)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """A whole config file; ``source`` is the file it came from (None: the embedded default)."""

    manager: ManagerConfig = field(default_factory=ManagerConfig)
    principals: Mapping[str, PrincipalSpec] = field(default_factory=_empty)  # file order
    policies: Mapping[str, PolicySpec] = field(default_factory=_empty)
    source: str | None = None


_CLASSES = {cls.__name__: cls for cls in (
    Config, ManagerConfig, BackendConfig, EncryptionConfig, CacheConfig, RotationSettings,
    AuditConfig, MountConfig, PrincipalSpec, PolicySpec, Rule, Condition)}
"""The settings classes by name, for reading a cached parse back (config_cache.py)."""


def default_config() -> Config:
    """The embedded default: the local store under data_dir(), no principals, no policies."""
    return Config()


# -- reading ----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The config at *path* (None: where the environment points), or the embedded default."""
    found = config_path_from_env(path)
    if found is None:
        return default_config()
    data = _read_bytes(found)
    key = config_cache.stamp(found, data)
    cached = config_cache.load(found, key, _CLASSES)
    if cached is not None:
        return cached
    config = parse_config(_decode(data, found), str(found))
    config_cache.store(found, key, config)
    return config


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(
            f"cannot read config file {path}: {error.strerror or error}",
            "check the path and its permissions",
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise _too_large(str(path))
    return data


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        what = f"{path}:{line}: the file is not UTF-8 text"
        raise ConfigError(what, "save it as UTF-8") from None


def _too_large(source: str) -> ConfigError:
    return ConfigError(
        f"config file {source} is larger than 1 MiB",
        "a secretfs config is a few kilobytes; check that this is the right file",
    )


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate *text* as a config file named *source* (used in messages and as the base of
    relative paths; a ``<name>`` source resolves them against the working directory).

    Raises ConfigError naming ``source:line: dotted.key`` for anything it does not accept; an
    empty document is the default config.
    """
    if len(text) > MAX_CONFIG_BYTES or len(text.encode(errors="surrogatepass")) > MAX_CONFIG_BYTES:
        raise _too_large(source)
    root = _compose(text, source)
    reader = _Reader(source)
    if root is None or reader.is_null(root):
        return Config(source=source)
    if root.id != "mapping":
        reader.fail(
            root,
            "",
            f"the top level must be a mapping, not {_describe(root)}",
            f"start with one of: {', '.join(_TOP)}",
        )
    values = reader.section(root, "", _TOP)
    if "secrets_manager" in values:  # the YAML name of Config.manager
        values["manager"] = values.pop("secrets_manager")
    return Config(source=source, **values)


_SYNTAX_FIX = "check indentation, and quote values that contain ': ' or start with * & ! % @ or `"


def _compose(text: str, source: str) -> Node | None:
    """The document's node tree; YAML errors become ConfigErrors with the line.

    Messages are built from the error's *problem*, never from ``str(error)``, whose snippet of
    the surrounding text could show a token written in the file.
    """
    import yaml

    try:
        return yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = ": ".join(filter(None, (error.context, error.problem))) or "not valid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}", _SYNTAX_FIX) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        raise ConfigError(
            f"{source}:{line}: YAML syntax error: {error.reason}",
            "remove control characters from the file",
        ) from None
    except UnicodeError:
        raise ConfigError(f"{source}: the text is not valid Unicode", "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{source}: the document is nested too deeply") from None


# -- the walker -------------------------------------------------------------------------------

_YAML_TAG = "tag:yaml.org,2002:"
_NULL, _BOOL, _INT, _FLOAT, _STR = (_YAML_TAG + t for t in ("null", "bool", "int", "float", "str"))
_MERGE = _YAML_TAG + "merge"
_KINDS = {_NULL: "nothing", _BOOL: "true/false", _INT: "a number", _FLOAT: "a number",
          _STR: "text", _YAML_TAG + "timestamp": "a date"}
_MAX_DEPTH = 32

Entries = dict[str, tuple["Node", "Node"]]
Convert = Callable[["_Reader", "Node", str], Any]


def _describe(node: Node) -> str:
    if node.id == "mapping":
        return "a mapping"
    if node.id == "sequence":
        return "a list"
    return _KINDS.get(node.tag, f"a value tagged {node.tag}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


_MAX_KEY_SHOWN = 200
_MAX_PROBLEM = 400


def _bounded_key(key: str) -> str:
    """A dotted key as an error shows it: the file's own key names, but on one line (control
    characters escaped) and cut short: an error is one line however hostile the file."""
    if key.isprintable() and len(key) <= _MAX_KEY_SHOWN:
        return key
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key[:_MAX_KEY_SHOWN])
    return shown + ("…" if len(key) > _MAX_KEY_SHOWN else "")


class _Reader:
    """Walks one composed document; every failure names ``source:line: dotted.key``."""

    def __init__(self, source: str) -> None:
        from yaml.constructor import SafeConstructor

        self.source = source
        self._constructor = SafeConstructor()
        self._mappings: dict[int, Entries] = {}  # by node, so a shared anchor is read once
        self._plain: dict[int, Any] = {}
        self._open: set[int] = set()  # collections being read: an alias back to one is a cycle
        self._base: Path | None = None

    def fail(self, node: Node, key: str, problem: str, fix: str | None = None) -> NoReturn:
        where = f"{self.source}:{node.start_mark.line + 1}"
        key = _bounded_key(key)
        if len(problem) > _MAX_PROBLEM:  # it may quote a value of any length from the file
            problem = problem[:_MAX_PROBLEM] + "…"
        raise ConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}", fix)

    @staticmethod
    def is_null(node: Node) -> bool:
        return node.id == "scalar" and node.tag == _NULL

    def scalar(self, node: Node, key: str, expected: str, tags: Iterable[str] = ()) -> Node:
        """*node* if it is a non-null scalar (of one of *tags*, when given)."""
        if node.id == "scalar" and not node.tag.startswith(_YAML_TAG):
            self.fail(node, key, f"unsupported YAML tag {node.tag}", "remove the tag")
        if node.id != "scalar" or node.tag == _NULL or (tags and node.tag not in tags):
            self.fail(node, key, f"expected {expected}, got {_describe(node)}")
        return node

    def construct(self, node: Node, key: str) -> Any:
        """The Python value of a scalar, as PyYAML's safe loader would build it."""
        import yaml

        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "unsupported value"
            self.fail(node, key, f"cannot read this value: {problem}")
        except (ValueError, OverflowError) as error:
            self.fail(node, key, f"cannot read this value: {error}")

    def path(self, text: str) -> Path:
        """``~`` expanded; a relative path is relative to the config file's folder."""
        path = Path(os.path.expanduser(text))
        if path.is_absolute():
            return path
        if self._base is None:
            named = self.source.startswith("<") and self.source.endswith(">")
            self._base = Path.cwd() if named else Path(os.path.abspath(self.source)).parent
        return self._base / path

    def sequence(self, node: Node, key: str) -> list[Node]:
        if self.is_null(node):
            return []
        if node.id != "sequence":
            self.fail(node, key, f"expected a list, got {_describe(node)}")
        return node.value

    def mapping(self, node: Node, key: str, depth: int = 0) -> Entries:
        """A mapping's entries in file order: name → (key node, value node).

        Null is empty (``cache:`` with nothing under it). A duplicate key is an error (PyYAML
        would silently keep the last). ``<<`` merge keys work as in PyYAML: merged entries
        first, the mapping's own keys overriding them.
        """
        if self.is_null(node):
            return {}
        if node.id != "mapping":
            self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        if id(node) in self._mappings:
            return self._mappings[id(node)]
        self._enter(node, key, depth)
        merged: Entries = {}
        own: Entries = {}
        for key_node, value_node in node.value:
            if key_node.id == "scalar" and key_node.tag == _MERGE:
                sources = value_node.value if value_node.id == "sequence" else [value_node]
                for source in sources:
                    for name, entry in self.mapping(source, key, depth + 1).items():
                        merged.setdefault(name, entry)
                continue
            if key_node.id != "scalar" or key_node.tag == _NULL:
                self.fail(key_node, key, f"a key must be text, not {_describe(key_node)}")
            name = key_node.value
            if name in own:
                first = own[name][0].start_mark.line + 1
                self.fail(key_node, _join(key, name), f"duplicate key (first at line {first})")
            own[name] = (key_node, value_node)
        entries = merged | own
        self._mappings[id(node)] = entries
        self._open.discard(id(node))
        return entries

    def _enter(self, node: Node, key: str, depth: int) -> None:
        """Guard the two recursive walks (merge keys, plugin options) against cycles and depth."""
        if id(node) in self._open:
            self.fail(node, key, "an alias refers to the mapping or list that contains it")
        if depth > _MAX_DEPTH:
            self.fail(node, key, f"nested more than {_MAX_DEPTH} levels deep")
        self._open.add(id(node))

    def fields(self, entries: Entries, key: str, schema: Mapping[str, Convert]) -> dict[str, Any]:
        """Each entry converted by its schema row; a key with no row is an error."""
        values = {}
        for name, (key_node, value_node) in entries.items():
            convert = schema.get(name)
            if convert is None:
                import difflib

                close = difflib.get_close_matches(name, list(schema), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(key_node, _join(key, name), "unknown key",
                          f"{hint}known keys here: {', '.join(schema)}")
            values[name] = convert(self, value_node, _join(key, name))
        return values

    def section(self, node: Node, key: str, schema: Mapping[str, Convert]) -> dict[str, Any]:
        return self.fields(self.mapping(node, key), key, schema)

    def require(self, node: Node, key: str, values: Mapping[str, Any], *names: str) -> None:
        for name in names:
            if values.get(name) is None:
                self.fail(node, _join(key, name), "is required")

    def plain(self, node: Node, key: str, depth: int = 0) -> Any:
        """A plugin option as immutable plain data (scalars, tuples, read-only mappings).

        Memoized per node, so aliases repeated exponentially ("billion laughs") cost once.
        """
        if id(node) in self._plain:
            return self._plain[id(node)]
        value: Any
        if node.id == "mapping":
            entries = self.mapping(node, key)
            self._enter(node, key, depth)
            value = MappingProxyType({
                name: self.plain(item, _join(key, name), depth + 1)
                for name, (_, item) in entries.items()
            })
        elif node.id == "sequence":
            self._enter(node, key, depth)
            value = tuple(
                self.plain(item, f"{key}[{i}]", depth + 1) for i, item in enumerate(node.value)
            )
        else:
            value = self.construct(node, key)
        self._plain[id(node)] = value
        self._open.discard(id(node))
        return value


# -- converters: (reader, node, dotted key) → value -------------------------------------------


def _text(r: _Reader, node: Node, key: str) -> str:
    """Any scalar's text (so ``user: no`` is "no", not False). Never echoed in errors: a token
    is text too."""
    value = r.scalar(node, key, "text").value
    if not value.strip():
        r.fail(node, key, "is empty")
    return value


def _flag(r: _Reader, node: Node, key: str) -> bool:
    return r.construct(r.scalar(node, key, "true or false", (_BOOL,)), key)


def _count(minimum: int, maximum: int | None = None) -> Convert:
    def convert(r: _Reader, node: Node, key: str) -> int:
        value = r.construct(r.scalar(node, key, "a whole number", (_INT,)), key)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            r.fail(node, key, f"{value} is out of range", f"use a whole number {bounds}")
        return value

    return convert


def _duration(positive: bool = False) -> Convert:
    def convert(r: _Reader, node: Node, key: str) -> float:
        node = r.scalar(node, key, "a duration", (_STR, _INT, _FLOAT))
        try:
            seconds = parse_duration(node.value if node.tag == _STR else r.construct(node, key))
        except (ValueError, OverflowError):
            seconds = math.nan
        if not math.isfinite(seconds):
            r.fail(node, key, f"{node.value!r} is not a duration", DURATION_HINT)
        if positive and seconds <= 0:
            r.fail(node, key, "must be longer than 0s", DURATION_HINT)
        return seconds

    return convert


def _optional(convert: Convert) -> Convert:
    """Null (``key_name:`` with no value) means "not set"."""
    return lambda r, node, key: None if r.is_null(node) else convert(r, node, key)


def _one_or_more(convert: Convert) -> Convert:
    """One value or a non-empty list of them, as a tuple."""

    def convert_all(r: _Reader, node: Node, key: str) -> tuple[Any, ...]:
        if node.id != "sequence":
            return (convert(r, node, key),)
        if not node.value:
            r.fail(node, key, "is an empty list")
        return tuple(convert(r, item, f"{key}[{i}]") for i, item in enumerate(node.value))

    return convert_all


def _matching(pattern: str, what: str, fix: str | None, lower: bool = False) -> Convert:
    """Text that must match *pattern*; the value is shown in the error (not for secrets).

    Patterns stay strings (compiled on first use, by re's cache) to keep import time down.
    """

    def convert(r: _Reader, node: Node, key: str) -> str:
        value = _text(r, node, key)
        value = value.lower() if lower else value
        if not re.fullmatch(pattern, value):
            r.fail(node, key, f"{value!r} is not {what}", fix)
        return value

    return convert


def _choice(*options: str) -> Convert:
    listed = ", ".join(options)
    return _matching("|".join(map(re.escape, options)), f"one of {listed}", None)


def _path(r: _Reader, node: Node, key: str) -> Path:
    return r.path(_text(r, node, key))


def _section(cls: Callable[..., Any], schema: Mapping[str, Convert]) -> Convert:
    return lambda r, node, key: cls(**r.section(node, key, schema))


_url = _matching(r"https?://[^\s/?#]+(?:[/?#]\S*)?", "an http:// or https:// URL",
                 "e.g. https://bao.example.com:8200")
_resource = _matching(r"[A-Za-z0-9._/*?-]+", "a resource pattern",
                      "secret names with * and ?, e.g. db_password or api_keys/*")
_sha256 = _matching(r"[0-9a-f]{64}", "a sha256 digest", "64 hex digits, e.g. from sha256sum",
                    lower=True)
_NAME = r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}"
_NAME_FIX = "letters, digits and . _ @ -, at most 128 characters"


# -- cron -------------------------------------------------------------------------------------

_CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: i for i, name in enumerate(_MONTHS, start=1)}),
    ("day of week", 0, 7, {name: i for i, name in enumerate(_WEEKDAYS)}),
)
_CRON_ITEM = r"(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/([0-9]+))?"


def _cron_problem(expression: str) -> str | None:
    """Why *expression* is not a cron schedule, or None.

    A structural check only, so that reading the config never imports croniter (~60 ms on every
    CLI call). croniter is the authority where rotations are actually scheduled (rotation/); it
    accepts everything this accepts. Reversed ranges (``SAT-SUN``) wrap, as in croniter.
    """
    text = expression.strip()
    if text.startswith("@"):
        return None if text in _CRON_ALIASES else f"unknown alias {text}"
    fields = text.split()
    if len(fields) != 5:
        return f"it has {len(fields)} fields, not 5 (minute hour day-of-month month day-of-week)"
    for value, (label, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in value.split(","):
            match = re.fullmatch(_CRON_ITEM, item)
            if match is None:
                return f"{label} {item!r} is not *, a number, a range a-b or a step /n"
            span, step = match.groups()
            if step is not None and int(step) == 0:
                return f"{label} {item!r} has a step of 0"
            for bound in () if span == "*" else span.split("-"):
                number = int(bound) if bound.isdigit() else names.get(bound.lower())
                if number is None:
                    return f"{label} {bound!r} is not a number" + (" or a name" if names else "")
                if not low <= number <= high:
                    return f"{label} {number} is outside {low}-{high}"
    return None


def _cron(r: _Reader, node: Node, key: str) -> str:
    text = _text(r, node, key).strip()
    problem = _cron_problem(text)
    if problem:
        r.fail(node, key, f"{text!r} is not a cron expression: {problem}",
               "use 5 fields, e.g. '0 3 * * *' (quoted), or @daily, @hourly, @weekly…")
    return text


# -- policy conditions ------------------------------------------------------------------------

_WINDOW = r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})(?: ([A-Za-z,-]+))?(?: tz=(\S+))?"
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _time_window_problem(text: str) -> str | None:
    """Why *text* is not ``HH:MM-HH:MM [days] [tz=Zone]``, or None."""
    match = re.fullmatch(_WINDOW, text)
    if match is None:
        return "expected HH:MM-HH:MM, then optionally days (Mon-Fri) and tz=Area/City"
    start_h, start_m, end_h, end_m = (int(part) for part in match.group(1, 2, 3, 4))
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        return "hours run 00-23 (24:00 may end a window), minutes 00-59"
    if (start_h, start_m) == (end_h, end_m):
        return "it starts and ends at the same time"
    for part in match[5].split(",") if match[5] else ():
        ends = part.split("-")
        if len(ends) > 2 or any(day.lower() not in _DAYS for day in ends):
            return f"{part!r} is not a day or a range of days (Mon, Tue, … Sun)"
    if match[6]:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(match[6])
        except (KeyError, ValueError, OSError):
            return f"unknown time zone {match[6]!r}"
    return None


def _time_window(r: _Reader, node: Node, key: str) -> str:
    text = " ".join(_text(r, node, key).split())
    problem = _time_window_problem(text)
    if problem:
        r.fail(node, key, f"{text!r} is not a time window: {problem}",
               "e.g. '09:00-17:00', '22:00-06:00 Mon-Fri', '09:00-17:00 Mon,Wed tz=Europe/Berlin'")
    return text


def _ip_ranges(r: _Reader, node: Node, key: str) -> str:
    """CIDRs, as a list or comma-separated text, canonicalized and joined by commas."""
    import ipaddress

    items = node.value if node.id == "sequence" else [node]
    if not items:
        r.fail(node, key, "is an empty list")
    networks = []
    for item in items:
        for part in _text(r, item, key).split(","):
            try:
                networks.append(str(ipaddress.ip_network(part.strip(), strict=False)))
            except ValueError:
                r.fail(item, key, f"{part.strip()!r} is not an IP network",
                       "use CIDR notation, e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8")
    return ",".join(networks)


_CONDITION_VALUES: Mapping[str, Convert] = {"ip_range": _ip_ranges, "time_window": _time_window}
_condition_type = _choice(*_CONDITION_VALUES)


def _condition(r: _Reader, node: Node, key: str) -> Condition:
    entries = r.mapping(node, key)
    kind = _condition_type(r, entries["type"][1], f"{key}.type") if "type" in entries else None
    values = r.fields(entries, key, {"type": _condition_type,
                                     "value": _CONDITION_VALUES.get(kind or "", _text)})
    r.require(node, key, values, "type", "value")
    return Condition(**values)


_RULE: Mapping[str, Convert] = {"action": _one_or_more(_choice(*ACTIONS)),
                                "resources": _one_or_more(_resource)}


def _rule(r: _Reader, node: Node, key: str) -> Rule:
    values = r.section(node, key, _RULE)
    r.require(node, key, values, "action", "resources")
    return Rule(actions=values["action"], resources=values["resources"])


def _list_of(convert: Convert) -> Convert:
    def convert_all(r: _Reader, node: Node, key: str) -> tuple[Any, ...]:
        items = r.sequence(node, key)
        return tuple(convert(r, item, f"{key}[{i}]") for i, item in enumerate(items))

    return convert_all


def _named(
    r: _Reader, node: Node, key: str, build: Callable[[str, Node, str], Any]
) -> Mapping[str, Any]:
    """A mapping of names (principals, policies) → *build(name, value node, dotted key)*."""
    built = {}
    for name, (key_node, value_node) in r.mapping(node, key).items():
        if not re.fullmatch(_NAME, name):
            r.fail(key_node, _join(key, name), f"{name!r} is not a valid name", _NAME_FIX)
        built[name] = build(name, value_node, _join(key, name))
    return MappingProxyType(built)


_POLICY: Mapping[str, Convert] = {"allow": _list_of(_rule), "deny": _list_of(_rule),
                                  "conditions": _list_of(_condition)}


def _policies(r: _Reader, node: Node, key: str) -> Mapping[str, PolicySpec]:
    return _named(r, node, key, lambda name, value, where: PolicySpec(
        name=name, **r.section(value, where, _POLICY)))


_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"
_MATCHERS: Mapping[str, Convert] = {
    "uid": _count(0, _MAX_ID), "user": _text, "gid": _count(0, _MAX_ID), "group": _text,
    "exe": _text, "exe_sha256": _sha256, "unit": _text, "container": _text, "cmdline": _text,
}


def _principal(r: _Reader, name: str, node: Node, key: str) -> PrincipalSpec:
    values = r.section(node, key, _MATCHERS)
    if not values:
        r.fail(node, key, "needs at least one matcher", f"use any of: {', '.join(_MATCHERS)}")
    return PrincipalSpec(name=name, **values)


def _principals(r: _Reader, node: Node, key: str) -> Mapping[str, PrincipalSpec]:
    return _named(r, node, key, lambda name, value, where: _principal(r, name, value, where))


# -- secrets_manager --------------------------------------------------------------------------

_PLUGIN_NAME = r"[a-z][a-z0-9_]*"
_backend_type = _matching(_PLUGIN_NAME, "a backend type",
                          f"use local, openbao, aws, keyring or a plugin name ({_PLUGIN_NAME})")
_timeout = _duration(positive=True)
_max_versions = _count(1)


def _addresses(r: _Reader, node: Node, key: str) -> str | tuple[str, ...]:
    """One URL stays a string; a list (a cluster) becomes a tuple."""
    urls = _one_or_more(_url)(r, node, key)
    return urls if node.id == "sequence" else urls[0]


def _approle(r: _Reader, node: Node, key: str) -> Mapping[str, Any]:
    values = r.section(node, key, {"role_id": _text, "secret_id_file": _path})
    r.require(node, key, values, "role_id")
    return MappingProxyType(values)


_BACKENDS: Mapping[str, Mapping[str, Convert]] = {
    "local": {"path": _path, "max_versions": _max_versions},
    "openbao": {
        "max_versions": _max_versions, "address": _addresses, "mount": _text, "token": _text,
        "token_file": _path, "approle": _approle, "ca_file": _path, "namespace": _text,
        "timeout": _timeout,
    },
    "aws": {"max_versions": _max_versions, "region": _text, "endpoint_url": _url,
            "prefix": _text, "timeout": _timeout},
    "keyring": {"max_versions": _max_versions, "service": _text},
}
_OPENBAO_AUTH = ("token", "token_file", "approle")


def _backend(r: _Reader, node: Node, key: str) -> BackendConfig:
    """Built-in types are checked key by key; a plugin's keys go to ``options`` untouched."""
    entries = r.mapping(node, key)
    kind = _backend_type(r, entries["type"][1], f"{key}.type") if "type" in entries else "local"
    if kind not in _BACKENDS:
        options = {name: r.plain(value, _join(key, name))
                   for name, (_, value) in entries.items() if name != "type"}
        return BackendConfig(type=kind, options=MappingProxyType(options))
    values = r.fields(entries, key, {"type": _backend_type, **_BACKENDS[kind]})
    values.pop("type", None)
    if kind == "openbao":
        given = [name for name in _OPENBAO_AUTH if name in values]
        if len(given) > 1:
            r.fail(entries[given[1]][0], f"{key}.{given[1]}", f"conflicts with {given[0]}",
                   f"set only one of {', '.join(_OPENBAO_AUTH)}")
        values.setdefault("mount", "secret")
    common = {name: values.pop(name) for name in ("path", "max_versions") if name in values}
    return BackendConfig(type=kind, options=MappingProxyType(values), **common)


_PROVIDERS = ("file", "keyring", "passphrase", "openbao_transit", "aws_kms")
_ENCRYPTION: Mapping[str, Convert] = {
    "provider": _choice(*_PROVIDERS), "key_file": _path,
    "key_name": _optional(_text), "key_id": _optional(_text),
}
_PROVIDER_KEYS = {"key_name": "openbao_transit", "key_id": "aws_kms"}


def _encryption(r: _Reader, node: Node, key: str) -> EncryptionConfig:
    entries = r.mapping(node, key)
    values = r.fields(entries, key, _ENCRYPTION)
    provider = values.get("provider", "file")
    for name, owner in _PROVIDER_KEYS.items():
        if provider == owner and values.get(name) is None:
            r.fail(entries["provider"][1], f"{key}.{name}", f"is required when provider is {owner}")
        if provider != owner and values.get(name) is not None:
            r.fail(entries[name][0], f"{key}.{name}", f"only applies to provider {owner}",
                   f"remove it, or set provider: {owner}")
    return EncryptionConfig(**values)


def _rotation(r: _Reader, node: Node, key: str) -> RotationSettings:
    """YAML nests ``default_policy: {max_age, overlap}``; the settings are flat."""
    values = r.section(node, key, _ROTATION)
    return RotationSettings(**values.pop("default_policy", {}), **values)


_ROTATION: Mapping[str, Convert] = {
    "enabled": _flag,
    "schedule": _cron,
    "default_policy": _section(dict, {"max_age": _duration(positive=True), "overlap": _duration()}),
}


_MANAGER: Mapping[str, Convert] = {
    "backend": _backend,
    "encryption": _encryption,
    "cache": _section(CacheConfig, {
        "enabled": _flag, "ttl": _duration(), "max_size": _count(1),
        "max_stale": _duration(), "poll_interval": _duration(positive=True),
        "read_ahead": _flag,
    }),
    "rotation": _rotation,
    "audit": _section(AuditConfig, {
        "enabled": _flag, "path": _path, "log_level": _choice("info", "debug"),
        "retention": _duration(positive=True), "fail_open": _flag,
    }),
    "mount": _section(MountConfig, {"path": _path, "allow_other": _flag}),
    "backend_timeout": _duration(positive=True),
}
_TOP: Mapping[str, Convert] = {
    "secrets_manager": _section(ManagerConfig, _MANAGER),
    "principals": _principals,
    "policies": _policies,
}
