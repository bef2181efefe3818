"""OpenBao (or HashiCorp Vault) KV v2 as a secretfs backend.

Storage layout, chosen so that ``bao kv get`` / ``bao kv put`` stay useful next to secretfs:

- A secretfs version is a KV version (same number). KV data is a JSON object of strings:

  * a map value is stored as itself (``{"user": "app", "password": "…"}``); KV returns keys
    sorted, so when the map's order is not alphabetical its key order is kept in the reserved
    entry ``"__secretfs": "[\"user\", \"password\"]"`` (a JSON list);
  * a single value (bytes) is ``{"__secretfs": "text", "value": "<utf-8 text>"}`` when it is
    valid UTF-8, else ``{"__secretfs": "base64", "value": "<base64>"}``;
  * anything else — a secret written by other tools, even one whose only key is ``value`` — is
    a map of its keys (non-string JSON values become their JSON text). So after
    ``bao kv put secret/db password=x`` the mount shows ``db/latest/password``. A map key named
    ``__secretfs`` is therefore refused on write.

- secretfs metadata lives in the secret's KV ``custom_metadata`` (string values of 1–512 bytes,
  at most 64 keys). Keys starting with ``secretfs.`` are ours; a text longer than 512 bytes is
  split over ``secretfs.<field>``, ``secretfs.<field>.1``, ``.2``…:

  * ``secretfs.labels``: JSON ``{"current": n, "previous": n, "pending": n, "head": n,
    "writing": n}``. ``head`` is the newest KV version secretfs has accounted for: a version
    newer than ``head`` was written by someone else (``bao kv put``) and counts as a write of
    ``current`` (it becomes current, the old current previous). ``writing`` marks a version a
    secretfs writer is about to store with another label (pending), so readers do not take it
    for such an outside write meanwhile. Without the key at all (a secret secretfs never
    wrote), current is the newest live version and previous the one before.
  * ``secretfs.shapes``: the key names and sizes of the versions secretfs wrote, as JSON
    ``{"<version>": <size of a single value> | {"<key>": <size>, …}}`` — what the mount needs
    to show a version's files, without reading its value. So a host learns a version written
    by another host from the metadata it polls anyway (no value read, no value in its memory
    until a process opens it). Kept for the versions shown, at most SHAPES_MAX bytes (the
    oldest dropped beyond); a version without one (written by ``bao kv put``) is read once.
  * ``secretfs.description``, ``secretfs.rotation`` (RotationPolicy JSON),
    ``secretfs.rotation_state`` (RotationState JSON), ``secretfs.deleted`` (a whole-secret
    soft delete: when, and which versions secretfs soft-deleted in KV with it, so undelete
    restores exactly those), ``secretfs.tags`` (JSON, only for tags that cannot be plain keys).
  * tags are plain custom_metadata keys (readable in ``bao kv metadata get``; a key that other
    tools set there shows as a tag) unless one has an empty value, a key over 128 bytes or a
    value over 512 bytes: then all of them go to ``secretfs.tags`` as JSON.

Atomicity. KV data writes carry ``options.cas`` (the KV version read just before), so two
writers never both write "the next version": one retries. Labels are a read-modify-write of the
metadata: OpenBao (2.x) has ``metadata_cas`` on metadata writes, used whenever the server
reports ``current_metadata_version``, which makes ``update_labels`` a true check-and-set.
HashiCorp Vault has no metadata CAS: there each metadata write carries a random ``rev`` and is
read back; a lost write raises ConflictError. Two writers can still both succeed when the
second writes after the first's read-back (a window of one round trip); documented, not closed.

Pruning: KV's own ``max_versions`` would drop the oldest versions even when a label points at
them, so the secret's KV ``max_versions`` is set just high enough to keep the oldest labelled
version, and secretfs destroys the unlabelled versions beyond the newest ``max_versions`` itself
and hides them from metadata.

Auth: a token, a token file (read again on "permission denied", in case it was replaced), or
AppRole (login, renew-self at half the TTL, log in again when the token is expired or refused),
with one retry of the refused request, so an expiring token never fails a read. Without any of
them, ``BAO_TOKEN`` / ``VAULT_TOKEN`` from the environment.

Several addresses (a Raft cluster; docs/scaling.md). Which node to ask is backends/nodes.py's:
the one that answered last, then the others, down nodes last (health-checked in the background).
How one request uses them:

- **one budget**: a request, failover included, takes at most ``timeout``; a node gets only its
  share of what is left to connect (and, for a read, to answer), so one unreachable or hung
  node cannot eat the budget of the others;
- a node that cannot be reached, or answers 5xx/429, is passed over for the next; a write that
  may have landed (the connection broke after sending) is never sent to another node;
- **standby redirects** (HTTP 307 with ``Location``, what a standby answers a write with while
  it does not know the new active node, or when forwarding is off) are followed, at most three
  hops, never from https to http; a redirect to a node that does not answer counts as that
  node's failure to serve, and the next node is tried;
- **read-your-writes**: standbys serve reads from their own, possibly a few milliseconds old,
  copy. Each response's ``X-Vault-Index`` (the Raft index the answer reflects) is remembered, and
  later reads carry the newest: a node that has not caught up with it answers 429 at once and
  the next node is asked; when all are behind, they are asked again after 5 ms, doubling (they
  catch up in milliseconds). So this process never reads older state than it wrote or saw — a
  label update right after a write sees the write. Should no node get there within half the
  budget (the active node died or froze right after a write, before the others learnt
  it was committed), a read is tried once more without the index, accepting a standby's copy:
  a slightly old answer serves better than none. (Not ``X-Vault-Inconsistent:
  forward-active-node``: a standby forwarding to a frozen active node was seen to stop
  answering anything for seconds.)

BackendUnavailable (exit 5) when no node answers.

No change feed: ``changes_since`` says "reload everything" once, then "nothing", and the daemon
polls metadata (cache.poll_interval).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from secretfs.backends.base import MetadataUpdate, Scanned, check_write
from secretfs.backends.http import ConnectError, HttpClient, Response, TransportError
from secretfs.backends.nodes import ROLES, Node, Nodes, NodeStatus
from secretfs.errors import (
    AccessDenied,
    BackendUnavailable,
    ConfigError,
    ConflictError,
    InvalidName,
    SecretfsError,
    SecretNotFound,
    UsageError,
    ValueTooLarge,
    VersionNotFound,
)
from secretfs.model import (
    Label,
    RotationPolicy,
    RotationState,
    RotationStep,
    SecretMetadata,
    Value,
    VersionInfo,
    parent_folders,
)

if TYPE_CHECKING:
    from secretfs.config import Config

MARKER = "__secretfs"  # reserved key in KV data: how a single value is encoded
PREFIX = "secretfs."  # reserved custom_metadata keys
LABELS_KEY = PREFIX + "labels"
FIELDS = ("description", "rotation", "rotation_state", "deleted", "tags", "shapes")
SHAPES_MAX = 4096  # bytes of the shapes field (oldest versions' shapes dropped beyond)
CUSTOM_VALUE_MAX = 512  # bytes per custom_metadata value (KV's limit)
CUSTOM_KEY_MAX = 128
CUSTOM_KEYS_MAX = 64
DEFAULT_TIMEOUT = 10.0
WRITE_ATTEMPTS = 200  # KV cas races lost in a row before giving up (busy secret)
METADATA_ATTEMPTS = 50
SHAPE_CACHE_MAX = 10_000
LIST_PAGE = 1000  # names per LIST of detailed-metadata
MIN_ATTEMPT_TIMEOUT = 0.5  # seconds one node gets at least, however many are left to try
MAX_REDIRECTS = 3
NO_ROUTE = b"no handler for route"  # a 404 from a node that serves no such mount (now)
FIRST_CATCH_UP_PAUSE = 0.005  # seconds before asking again when every node is behind
READS = frozenset({"GET", "LIST"})
# answers after which the next node may do better: redirected (not followed), rate-limited or
# behind this process's index, failed, sealed or without an active node, gateway problems
TRY_ANOTHER_NODE = frozenset({307, 308, 429, 500, 502, 503, 504})

CAPABILITIES = frozenset({
    "versions", "labels", "cas", "soft_delete", "destroy", "metadata", "rotation_state",
    "folders",
})


# -- values -----------------------------------------------------------------------------------


def encode_kv(value: Value) -> dict[str, str]:
    """The KV data object for a value (see the module docstring)."""
    if isinstance(value, bytes):
        try:
            return {MARKER: "text", "value": value.decode("utf-8")}
        except UnicodeDecodeError:
            return {MARKER: "base64", "value": base64.b64encode(value).decode()}
    if MARKER in value:
        raise UsageError(f"the key {MARKER!r} is reserved by the openbao backend",
                         "rename that key")
    data = dict(value)
    if list(value) != sorted(value):
        data[MARKER] = json.dumps(list(value))
    return data


def decode_kv(data: Mapping[str, Any]) -> Value:
    """The value a KV data object holds; other tools' secrets are maps of their keys."""
    marker = data.get(MARKER)
    if isinstance(marker, str) and set(data) == {MARKER, "value"} and \
            isinstance(data["value"], str):
        if marker == "text":
            return data["value"].encode("utf-8")
        if marker == "base64":
            try:
                return base64.b64decode(data["value"], validate=True)
            except (binascii.Error, ValueError):
                pass  # not ours after all: fall through to a map
    items = {key: item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))
             for key, item in data.items() if key != MARKER}
    order: list[str] = []
    if isinstance(marker, str) and marker.startswith("["):
        try:
            order = [key for key in json.loads(marker) if key in items]
        except (ValueError, TypeError):
            order = []
    rest = sorted(key for key in items if key not in order)
    return {key: items[key] for key in [*order, *rest]}


Shape = tuple[bool, tuple[str, ...], tuple[int, ...]]  # (is a map, keys, sizes in bytes)


def _shape(value: Value) -> Shape:
    if isinstance(value, bytes):
        return False, ("value",), (len(value),)
    return True, tuple(value), tuple(len(item.encode()) for item in value.values())


def _shape_to_json(shape: Shape) -> int | dict[str, int]:
    is_map, keys, sizes = shape
    return dict(zip(keys, sizes, strict=True)) if is_map else sizes[0]


def _shape_from_json(item: Any) -> Shape | None:
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return False, ("value",), (item,)
    if isinstance(item, dict) and all(isinstance(size, int) and not isinstance(size, bool)
                                      and size >= 0 for size in item.values()):
        return True, tuple(item), tuple(item.values())
    return None  # not ours after all (edited by hand): the version is read instead


def _shapes_of(custom: Mapping[str, str]) -> dict[int, Shape]:
    """The shapes recorded in ``secretfs.shapes`` (see the module docstring)."""
    text = get_field(custom, "shapes")
    if not text:
        return {}
    try:
        recorded = json.loads(text)
        return {int(version): shape for version, item in recorded.items()
                if (shape := _shape_from_json(item)) is not None}
    except (ValueError, AttributeError, TypeError):
        return {}


def _set_shapes(custom: dict[str, str], shapes: Mapping[int, Shape]) -> None:
    """Record *shapes* (newest first), dropping the oldest beyond SHAPES_MAX bytes."""
    kept = sorted(shapes, reverse=True)
    while True:
        text = json.dumps({str(v): _shape_to_json(shapes[v]) for v in kept},
                          separators=(",", ":"))
        if len(text.encode()) <= SHAPES_MAX or not kept:
            break
        kept.pop()
    set_field(custom, "shapes", text if kept else None)


# -- custom_metadata fields -------------------------------------------------------------------


def _chunks(text: str) -> list[str]:
    """*text* cut into pieces of at most CUSTOM_VALUE_MAX UTF-8 bytes, never inside a char."""
    pieces, piece, size = [], [], 0
    for char in text:
        width = len(char.encode())
        if size + width > CUSTOM_VALUE_MAX:
            pieces.append("".join(piece))
            piece, size = [], 0
        piece.append(char)
        size += width
    if piece:
        pieces.append("".join(piece))
    return pieces


def _field_key(name: str, index: int) -> str:
    return PREFIX + name if index == 0 else f"{PREFIX}{name}.{index}"


def get_field(custom: Mapping[str, str], name: str) -> str | None:
    if _field_key(name, 0) not in custom:
        return None
    parts, index = [], 0
    while _field_key(name, index) in custom:
        parts.append(custom[_field_key(name, index)])
        index += 1
    return "".join(parts)


def set_field(custom: dict[str, str], name: str, text: str | None) -> None:
    """Replace field *name* (None or empty: remove it) in *custom*."""
    index = 0
    while _field_key(name, index) in custom:
        del custom[_field_key(name, index)]
        index += 1
    for index, piece in enumerate(_chunks(text or "")):
        custom[_field_key(name, index)] = piece


def _tags_of(custom: Mapping[str, str]) -> dict[str, str]:
    tags = {key: item for key, item in custom.items() if not key.startswith(PREFIX)}
    packed = get_field(custom, "tags")
    if packed:
        with contextlib.suppress(ValueError):
            tags.update(json.loads(packed))
    return dict(sorted(tags.items()))


def _set_tags(custom: dict[str, str], tags: Mapping[str, str]) -> None:
    for key in [key for key in custom if not key.startswith(PREFIX)]:
        del custom[key]
    plain = all(
        key and not key.startswith(PREFIX) and len(key.encode()) <= CUSTOM_KEY_MAX
        and 0 < len(item.encode()) <= CUSTOM_VALUE_MAX for key, item in tags.items()
    )
    if plain:
        custom.update(tags)
        set_field(custom, "tags", None)
    else:
        set_field(custom, "tags", json.dumps(dict(tags), sort_keys=True) if tags else None)


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


# -- one secret's metadata, parsed ------------------------------------------------------------


@dataclass
class _Kv:
    """A KV metadata response, with the labels secretfs derives from it."""

    name: str
    raw: dict[str, Any]
    custom: dict[str, str]
    versions: dict[int, dict[str, Any]]
    newest: int  # KV current_version
    metadata_version: int | None  # OpenBao's metadata CAS counter (None: Vault)
    stored: dict[str, int] | None  # secretfs.labels, parsed
    deleted_marker: dict[str, Any] | None = None
    labels: dict[Label, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, data: dict[str, Any]) -> _Kv:
        custom = dict(data.get("custom_metadata") or {})
        versions = {int(number): info for number, info in (data.get("versions") or {}).items()}
        stored = None
        text = custom.get(LABELS_KEY)
        if text:
            try:
                stored = {key: int(item) for key, item in json.loads(text).items()
                          if isinstance(item, int)}
            except (ValueError, AttributeError):
                stored = None
        deleted = get_field(custom, "deleted")
        kv = cls(name, data, custom, versions, int(data.get("current_version") or 0),
                 data.get("current_metadata_version"), stored,
                 json.loads(deleted) if deleted else None)
        kv.labels = kv.effective_labels()
        return kv

    @functools.cached_property
    def shapes(self) -> dict[int, Shape]:
        return _shapes_of(self.custom)

    def live(self, version: int) -> bool:
        info = self.versions.get(version)
        return info is not None and not info.get("destroyed") and not self.is_deleted(info)

    @staticmethod
    def is_deleted(info: Mapping[str, Any]) -> bool:
        when = _when(info.get("deletion_time"))
        return when is not None and when <= datetime.now(UTC)

    def effective_labels(self, exclude: frozenset[int] = frozenset()) -> dict[Label, int]:
        """Stored labels, plus outside writes (newer than ``head``) counted as current writes."""
        stored = self.stored or {}
        labels = {label: stored[label.value] for label in Label if label.value in stored}
        head = stored.get("head", 0)
        skip = set(exclude)
        if "writing" in stored and stored["writing"] > head:
            skip.add(stored["writing"])
        newer = [v for v in sorted(self.versions) if v > head and v not in skip and self.live(v)]
        for version in newer:
            if labels.get(Label.CURRENT) is not None:
                labels[Label.PREVIOUS] = labels[Label.CURRENT]
            labels[Label.CURRENT] = version
        return {label: v for label, v in labels.items() if v in self.versions}

    def writing(self) -> int | None:
        """A version another secretfs writer is storing with a non-current label."""
        stored = self.stored or {}
        version = stored.get("writing")
        return version if version is not None and version > stored.get("head", 0) else None


# -- auth -------------------------------------------------------------------------------------


class _Auth:
    """Where the token comes from, and keeping it valid."""

    def __init__(self, options: Mapping[str, Any], login: Callable[[str, dict], dict]) -> None:
        self._lock = threading.Lock()
        self._login_call = login
        self._approle = options.get("approle")
        self._token_file = Path(options["token_file"]) if options.get("token_file") else None
        self._token: str | None = options.get("token")
        self._expires: float | None = None  # monotonic; None: not ours to manage
        self._renew_at: float | None = None
        self._renewable = False
        if self._token_file is not None:
            self._token = self._read_token_file()
        elif self._approle is None and self._token is None:
            self._token = os.environ.get("BAO_TOKEN") or os.environ.get("VAULT_TOKEN")
            if not self._token:
                raise ConfigError(
                    "the openbao backend has no credentials",
                    "set secrets_manager.backend.token_file, token or approle "
                    "(or BAO_TOKEN in the environment)",
                )

    def _read_token_file(self) -> str:
        assert self._token_file is not None
        try:
            token = self._token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read the OpenBao token file {self._token_file}: "
                              f"{error.strerror}", "check the path and its permissions") from None
        if not token:
            raise ConfigError(f"the OpenBao token file {self._token_file} is empty")
        return token

    def _secret_id(self) -> str | None:
        path = self._approle.get("secret_id_file") if self._approle else None
        if path is None:
            return None
        try:
            return Path(path).read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read the AppRole secret_id file {path}: "
                              f"{error.strerror}", "check the path and its permissions") from None

    def _take(self, auth: Mapping[str, Any]) -> None:
        now = time.monotonic()
        self._token = auth["client_token"]
        ttl = float(auth.get("lease_duration") or 0)
        self._renewable = bool(auth.get("renewable"))
        if ttl > 0:
            self._expires = now + ttl
            self._renew_at = now + ttl / 2
        else:
            self._expires = self._renew_at = None

    def _login(self) -> None:
        assert self._approle is not None
        body: dict[str, str] = {"role_id": self._approle["role_id"]}
        secret_id = self._secret_id()
        if secret_id:
            body["secret_id"] = secret_id
        self._take(self._login_call("auth/approle/login", body))

    def token(self, renew: Callable[[str], dict | None]) -> str:
        """A token that is valid now: logs in or renews as needed (AppRole)."""
        with self._lock:
            if self._approle is not None:
                now = time.monotonic()
                if self._token is None or (self._expires is not None
                                           and now >= self._expires - 0.5):
                    self._login()
                elif self._renew_at is not None and now >= self._renew_at:
                    auth = renew(self._token) if self._renewable else None
                    if auth and float(auth.get("lease_duration") or 0) > 1:
                        self._take({**auth, "client_token": self._token})
                    else:  # not renewable (max TTL reached): a fresh login
                        self._login()
            assert self._token is not None
            return self._token

    def refused(self, token: str) -> bool:
        """*token* got "permission denied": get a new one; True if a retry may succeed."""
        with self._lock:
            if self._token != token:
                return True  # another thread already replaced it
            if self._approle is not None:
                self._token = None
                return True
            if self._token_file is not None:
                fresh = self._read_token_file()
                if fresh != token:
                    self._token = fresh
                    return True
            return False


# -- read-your-writes -------------------------------------------------------------------------


class _RaftIndex:
    """The newest ``X-Vault-Index`` this process has seen, and the headers that ask a node for
    an answer at least that new (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._header = ""
        self._value = -1
        self._cluster = ""

    def saw(self, response: Response) -> None:
        header = response.headers.get("x-vault-index")
        if not header or header == self._header:
            return
        try:
            state = json.loads(base64.b64decode(header))
            value, cluster = int(state["value"]), str(state.get("cluster", ""))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return  # not a form we know: leave consistency to the server
        with self._lock:
            if cluster != self._cluster or value > self._value:  # (another cluster: start over)
                self._header, self._value, self._cluster = header, value, cluster

    def header(self) -> str:
        """The ``X-Vault-Index`` to send ("" before any was seen)."""
        return self._header


# -- the backend ------------------------------------------------------------------------------


class OpenBaoBackend:
    """Versioned secrets in an OpenBao/Vault KV v2 mount (see the module docstring)."""

    kind = "openbao"
    capabilities = CAPABILITIES

    def __init__(self, addresses: str | tuple[str, ...] | list[str], *, mount: str = "secret",
                 token: str | None = None, token_file: str | Path | None = None,
                 approle: Mapping[str, Any] | None = None, ca_file: str | Path | None = None,
                 namespace: str | None = None, timeout: float | None = None,
                 max_versions: int = 10) -> None:
        self.addresses = tuple([addresses] if isinstance(addresses, str) else addresses)
        if not self.addresses:
            raise ConfigError("the openbao backend has no address",
                              "set secrets_manager.backend.address")
        self.addresses = tuple(address.rstrip("/") for address in self.addresses)
        self.mount = mount.strip("/")
        self.max_versions = max_versions
        self.timeout = timeout or DEFAULT_TIMEOUT
        headers = {"X-Vault-Request": "true"}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        self._client = HttpClient(headers=headers, timeout=self.timeout, ca_file=ca_file)
        self._nodes = Nodes(self.addresses, self._health)
        self._detailed: bool | None = None  # whether the server lists detailed-metadata
        self._index = _RaftIndex()
        self._shapes: dict[tuple[str, int, str], Shape] = {}
        self._auth = _Auth(
            {"token": token, "token_file": token_file, "approle": approle}, self._login,
        )

    def close(self) -> None:
        self._nodes.close()
        self._client.close()

    def node_states(self) -> list[dict[str, Any]]:
        """Each node as this client last found it, without asking (``.secretfs/health``)."""
        return self._nodes.states()

    def node_status(self) -> list[NodeStatus]:
        """Each node's role now (active, standby, sealed, unreachable…), for ``doctor``."""
        return self._nodes.status()

    # -- HTTP -----------------------------------------------------------------------------------

    def _health(self, address: str, timeout: float) -> NodeStatus:
        """A node's role per ``GET /v1/sys/health`` (unauthenticated)."""
        try:
            response = self._client.request("GET", f"{address}/v1/sys/health", timeout=timeout)
        except TransportError as error:
            return NodeStatus(address, "unreachable", str(error))
        status = response.status_code
        try:
            version = str(response.json().get("version") or "")
        except (ValueError, AttributeError):
            version = ""
        return NodeStatus(address, ROLES.get(status, f"http-{status}"), version=version)

    def _send(self, method: str, path: str, body: Any, params: Mapping[str, str] | None,
              token: str | None) -> Response:
        """One request, node after node (see the module docstring), within ``timeout``."""
        started = time.monotonic()
        deadline = started + self.timeout
        headers = {"X-Vault-Token": token} if token else {}
        index = self._index.header()
        if not index or method not in READS:
            return self._send_to_nodes(method, path, body, params, headers, deadline, "")
        consistent_until = started + self.timeout / 2  # the rest is the fallback's
        pause = FIRST_CATCH_UP_PAUSE
        while True:
            try:
                response = self._send_to_nodes(method, path, body, params, headers,
                                               consistent_until, index)
            except BackendUnavailable:
                break
            if response.status_code not in TRY_ANOTHER_NODE:
                return response
            if response.status_code != 429 or time.monotonic() + pause >= consistent_until:
                break
            time.sleep(pause)  # every node is behind this index: they catch up in ms
            pause = min(pause * 2, 0.1)
        # No node could answer at the index this process has seen (an election under way, or
        # the active node frozen right after a write): a standby's own copy, maybe a little
        # older, serves better than no answer.
        return self._send_to_nodes(method, path, body, params, headers, deadline, "")

    def _send_to_nodes(self, method: str, path: str, body: Any,
                       params: Mapping[str, str] | None, headers: Mapping[str, str],
                       deadline: float, index: str) -> Response:
        """*method* to one node after another until one answers, within *deadline*. With an
        *index*, a node is asked for an answer at least that new: a node that is behind says
        so at once (429) and the next one is asked."""
        order = self._nodes.order()
        last: Response | None = None
        no_route = False
        problems = []
        for position, node in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                problems.append(f"no time left of the {self.timeout:g}s request timeout")
                break
            # A node gets its share of what is left to connect and, for a read (which can go
            # to the next node), to answer: a hung node cannot eat the others' time.
            share = min(max(remaining / (len(order) - position), MIN_ATTEMPT_TIMEOUT), remaining)
            until = time.monotonic() + share if method in READS else deadline
            sent = {**headers, "X-Vault-Index": index} if index else headers
            try:
                response, node = self._exchange(node, f"{node.address}/v1/{path}", method,
                                                 body, params, sent, until, share)
            except ConnectError as error:  # never reached: safe to try the next node
                self._nodes.failed(node, str(error))
                problems.append(str(error))
                continue
            except TransportError as error:
                self._nodes.failed(node, str(error))
                problems.append(str(error))
                if method in READS:
                    continue
                break  # a write may have landed: do not repeat it elsewhere
            if response.status_code in TRY_ANOTHER_NODE:
                if response.status_code == 503:  # sealed, or knows no active node
                    self._nodes.failed(node, "HTTP 503")
                problems.append(f"{node.address}: HTTP {response.status_code}")
                last = response
                continue
            if response.status_code == 404 and NO_ROUTE in response.content:
                # Not "no such secret": the node serves no such mount right now — it is
                # sealing or stopping (its mount table is torn down first), or the mount is
                # misconfigured. Taken for "not found", it would make a stopping node's
                # answers look like every secret deleted.
                problems.append(f"{node.address}: no {self.mount}/ mount (HTTP 404)")
                no_route = True
                continue
            self._nodes.answered(node)
            self._index.saw(response)
            return response
        if last is not None:
            return last
        if no_route:
            raise BackendUnavailable(
                f"OpenBao has no {self.mount}/ mount at {', '.join(self.addresses)} "
                f"({'; '.join(problems)})",
                "check secrets_manager.backend.mount, or wait for the nodes to finish "
                "starting (unsealed, a leader elected)")
        raise BackendUnavailable(
            f"OpenBao did not answer at {', '.join(self.addresses)} ({'; '.join(problems)})",
            "check that the server is running and reachable; cached values are used meanwhile",
        )

    def _exchange(self, node: Node, url: str, method: str, body: Any,
                  params: Mapping[str, str] | None, headers: Mapping[str, str],
                  deadline: float, connect_timeout: float) -> tuple[Response, Node]:
        """One node's answer, standby redirects followed, and the node that gave it (the
        redirect's target when that is one of ours: the active node, worth sticking to).
        ConnectError only for *node* itself: a redirect to a node that does not answer (a
        standby that has not yet heard of the election) returns the redirect."""
        response = self._client.request(
            method, url, json=body, params=params, headers=headers,
            timeout=max(deadline - time.monotonic(), 0.001), connect_timeout=connect_timeout)
        for _ in range(MAX_REDIRECTS):
            target = response.headers.get("location")
            if response.status_code not in (307, 308) or not target:
                break
            target = urljoin(url, target)
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                break  # never downgrade: the token would travel in clear text
            try:
                response = self._client.request(  # (the query string is in Location)
                    method, target, json=body, headers=headers,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    connect_timeout=connect_timeout)
            except ConnectError:
                break
            url = target
            node = self._nodes.find(target) or node
        return response, node

    def _login(self, path: str, body: dict) -> dict:
        response = self._send("POST", path, body, None, None)
        if response.status_code != 200:
            raise AccessDenied(
                f"OpenBao login at {path} failed (HTTP {response.status_code})",
                "check the AppRole role_id and secret_id",
            )
        return response.json()["auth"]

    def _renew(self, token: str) -> dict | None:
        response = self._send("POST", "auth/token/renew-self", {}, None, token)
        return response.json().get("auth") if response.status_code == 200 else None

    def _request(self, method: str, path: str, body: Any = None,
                 params: Mapping[str, str] | None = None) -> Response:
        """An authenticated request; a refused token is replaced and the request retried once."""
        for attempt in range(2):
            token = self._auth.token(self._renew)
            response = self._send(method, path, body, params, token)
            if response.status_code == 403 and attempt == 0 and self._auth.refused(token):
                continue
            return response
        return response

    def _fail(self, response: Response, what: str) -> SecretfsError:
        """The error for an unexpected answer (the server's messages carry no values)."""
        status = response.status_code
        if status == 403:
            return AccessDenied(f"OpenBao denied {what}",
                                f"check the token's policy on {self.mount}/")
        try:
            errors = "; ".join(str(e) for e in response.json().get("errors") or [])[:300]
        except ValueError:
            errors = ""
        detail = f"OpenBao could not {what} (HTTP {status}{': ' + errors if errors else ''})"
        if status >= 500 or status in (307, 308, 429):
            return BackendUnavailable(detail, "check the server's health (sealed? no active "
                                      "node?): 'secretfs doctor' shows each node's role")
        return SecretfsError(detail)

    # -- KV paths -------------------------------------------------------------------------------

    def _path(self, kind: str, name: str = "") -> str:
        return f"{self.mount}/{kind}/{name}"

    def _get_kv(self, name: str) -> _Kv | None:
        response = self._request("GET", self._path("metadata", name))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"read the metadata of {name!r}")
        return _Kv.parse(name, response.json()["data"])

    def _live_kv(self, name: str) -> _Kv:
        kv = self._get_kv(name)
        if kv is None:
            raise SecretNotFound(f"secret {name!r} not found")
        if kv.deleted_marker is not None:
            raise SecretNotFound(f"secret {name!r} is deleted",
                                 f"restore it with 'secretfs secrets undelete {name}'")
        return kv

    def _visible(self, kv: _Kv, labels: Mapping[Label, int] | None = None) -> list[int]:
        """Versions secretfs shows: the newest max_versions, plus labelled ones."""
        labelled = set((labels if labels is not None else kv.labels).values())
        return [v for v in sorted(kv.versions)
                if v > kv.newest - self.max_versions or v in labelled]

    def _write_custom(self, kv: _Kv, custom: dict[str, str], labels: Mapping[Label, int], *,
                      own: int | None = None, announce: int | None = None) -> bool:
        """Write custom_metadata (with labels) if nobody changed it since *kv* was read.

        Every KV version the labels account for moves ``head`` up: *labels* were derived from
        *kv*, so outside writes are folded in. *own* is the version this write records (its
        ``writing`` mark goes); *announce* marks a version about to be written as pending.
        Returns False when another writer got in first (the caller re-reads and tries again).
        """
        old = kv.stored or {}
        active = kv.writing()
        skip = {active} - {own} if active is not None else set()
        head = max([old.get("head", 0), *(v for v in kv.versions if v not in skip)])
        stored: dict[str, Any] = {label.value: version for label, version in labels.items()}
        stored["head"] = head
        for mark in (announce, active if active != own else None):
            if mark is not None and mark > head:
                stored["writing"] = mark
                break
        revision = secrets.token_hex(4)
        if kv.metadata_version is None:
            stored["rev"] = revision
        custom = dict(custom)
        custom[LABELS_KEY] = json.dumps(stored, separators=(",", ":"))
        if len(custom) > CUSTOM_KEYS_MAX:
            raise ValueTooLarge(
                f"metadata of {kv.name!r} needs {len(custom)} custom_metadata entries, over "
                f"OpenBao's limit of {CUSTOM_KEYS_MAX}", "use fewer tags or a shorter description",
            )
        oldest = min(labels.values(), default=kv.newest)
        keep = max(self.max_versions, kv.newest - oldest + 1) + 1
        body: dict[str, Any] = {"custom_metadata": custom, "max_versions": keep}
        if kv.metadata_version is not None:
            body["metadata_cas"] = kv.metadata_version
        response = self._request("POST", self._path("metadata", kv.name), body)
        if response.status_code == 400 and "check-and-set" in response.text:
            return False
        if response.status_code not in (200, 204):
            raise self._fail(response, f"write the metadata of {kv.name!r}")
        if kv.metadata_version is None:  # Vault: read back to see whether ours stuck
            again = self._get_kv(kv.name)
            if again is None or f'"rev":"{revision}"' not in again.custom.get(LABELS_KEY, ""):
                raise ConflictError(f"another process changed the labels of {kv.name!r}",
                                    "read it again and retry")
        return True

    def _modify(self, name: str, change: Callable[[_Kv], tuple[dict[str, str],
                                                               dict[Label, int]]],
                *, own: int | None = None, live: bool = True) -> _Kv:
        """Read, *change* (may raise), write back with metadata CAS; retry lost races."""
        for _ in range(METADATA_ATTEMPTS):
            kv = self._live_kv(name) if live else self._get_kv(name)
            if kv is None:
                raise SecretNotFound(f"secret {name!r} not found")
            custom, labels = change(kv)
            if self._write_custom(kv, custom, labels, own=own):
                return kv
            time.sleep(random.uniform(0, 0.02))
        raise ConflictError(f"the metadata of {name!r} keeps changing under us",
                            "retry later")

    # -- writing --------------------------------------------------------------------------------

    def write_version(self, name: str, value: Value, *, label: Label = Label.CURRENT,
                      cas: int | None = None, metadata: MetadataUpdate | None = None) -> int:
        data = encode_kv(value)
        for _ in range(WRITE_ATTEMPTS):
            kv = self._get_kv(name)
            if kv is None:
                if cas not in (None, 0):
                    raise ConflictError(
                        f"check-and-set failed: secret {name!r} does not exist, "
                        f"expected version {cas}", "use --cas 0 to create it",
                    )
                self._check_folder_conflict(name)
                kv_cas = 0
            else:
                if kv.deleted_marker is not None:
                    raise ConflictError(
                        f"secret {name!r} is deleted",
                        f"undelete it with 'secretfs secrets undelete {name}', or remove it "
                        f"for good with 'secretfs secrets rm {name} --destroy'",
                    )
                check_write(name, kv.labels, label=label, cas=cas, pending=kv.writing())
                kv_cas = kv.newest
                # A pending write is announced, so readers do not take it for an outside write.
                if label is not Label.CURRENT and not self._write_custom(
                        kv, kv.custom, kv.labels, announce=kv_cas + 1):
                    continue
            response = self._request("POST", self._path("data", name),
                                     {"data": data, "options": {"cas": kv_cas}})
            if response.status_code == 400 and "check-and-set" in response.text:
                if cas is not None and kv is None:
                    raise ConflictError(f"check-and-set failed: secret {name!r} was just "
                                        "created by another writer", "read it and retry")
                time.sleep(random.uniform(0, 0.01))
                continue  # another writer took that version number: look again
            if response.status_code not in (200, 204):
                raise self._fail(response, f"write a version of {name!r}")
            version = int(response.json()["data"]["version"])
            self._record(name, version, label, metadata, _shape(value))
            self._remember(name, version, response.json()["data"].get("created_time", ""),
                           value)
            return version
        raise ConflictError(f"too many concurrent writers on {name!r}", "retry later")

    def _record(self, name: str, version: int, label: Label,
                metadata: MetadataUpdate | None, shape: Shape) -> None:
        """After the data write: point *label* at *version*, record its shape, apply metadata,
        prune."""

        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            labels = kv.effective_labels(exclude=frozenset({version}))
            current = labels.get(Label.CURRENT)
            if label is Label.CURRENT:
                if current is None or current < version:
                    if current is not None:
                        labels[Label.PREVIOUS] = current
                    labels[Label.CURRENT] = version
                elif labels.get(Label.PREVIOUS, 0) < version < current:
                    labels[Label.PREVIOUS] = version  # a later write won: we come before it
            else:
                labels[label] = version
            custom = dict(kv.custom)
            if metadata is not None:
                self._apply_metadata(custom, metadata)
            shown = set(self._visible(kv, labels)) | {version}
            shapes = {v: s for v, s in _shapes_of(kv.custom).items() if v in shown}
            _set_shapes(custom, {**shapes, version: shape})
            return custom, labels

        self._modify(name, change, own=version, live=False)
        self._prune(name)

    def _prune(self, name: str) -> None:
        """Destroy versions beyond the newest max_versions that no label points at."""
        kv = self._get_kv(name)
        if kv is None:
            return
        visible = set(self._visible(kv))
        doomed = [v for v, info in kv.versions.items()
                  if v not in visible and not info.get("destroyed")]
        if doomed:
            response = self._request("POST", self._path("destroy", name), {"versions": doomed})
            if response.status_code not in (200, 204):
                raise self._fail(response, f"prune old versions of {name!r}")

    def _check_folder_conflict(self, name: str) -> None:
        """A name may not be a folder of another name, nor have another name as its folder."""
        inside = self._list_folder(name + "/")
        if inside:
            raise InvalidName(
                f"cannot create {name!r}: it would be a folder of the existing secret "
                f"{name + '/' + inside[0].rstrip('/')!r}",
                "a name cannot be both a secret and a folder; choose another name",
            )
        for folder in parent_folders(name):
            if self._get_kv(folder) is not None:
                raise InvalidName(
                    f"cannot create {name!r}: it would be inside the existing secret {folder!r}",
                    "a name cannot be both a secret and a folder; choose another name",
                )

    @staticmethod
    def _apply_metadata(custom: dict[str, str], metadata: MetadataUpdate) -> None:
        if metadata.description is not None:
            set_field(custom, "description", metadata.description)
        if metadata.tags is not None:
            _set_tags(custom, metadata.tags)
        if metadata.rotation is not None:
            set_field(custom, "rotation", json.dumps(metadata.rotation.to_json(),
                                                     separators=(",", ":")))
        elif metadata.clear_rotation:
            set_field(custom, "rotation", None)

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            custom = dict(kv.custom)
            self._apply_metadata(custom, metadata)
            return custom, kv.labels

        self._modify(name, change)

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            labels = dict(kv.labels)
            for label, version in (expect or {}).items():
                if labels.get(label) != version:
                    raise ConflictError(
                        f"label {label.value} of {name!r} points at {labels.get(label)}, "
                        f"not {version}", "another process changed it: read it again",
                    )
            visible = set(self._visible(kv))
            for label, version in changes.items():
                if version is None:
                    labels.pop(label, None)
                    continue
                info = kv.versions.get(version)
                if info is None or version not in visible or info.get("destroyed"):
                    raise VersionNotFound(f"secret {name!r} has no version {version}")
                labels[label] = version
            return dict(kv.custom), labels

        self._modify(name, change)
        self._prune(name)

    def rotation_state(self, name: str) -> RotationState | None:
        kv = self._get_kv(name)
        text = get_field(kv.custom, "rotation_state") if kv is not None else None
        if not text:
            return None
        version, step, owner, started, updated = json.loads(text)
        return RotationState(int(version), RotationStep(step), owner, float(started),
                             float(updated))

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        text = None if state is None else json.dumps(
            [state.version, state.step.value, state.owner, state.started, state.updated])

        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            custom = dict(kv.custom)
            set_field(custom, "rotation_state", text)
            return custom, kv.labels

        self._modify(name, change, live=False)

    # -- deleting -------------------------------------------------------------------------------

    def _kv_post(self, action: str, name: str, versions: list[int]) -> None:
        if not versions:
            return
        response = self._request("POST", self._path(action, name), {"versions": versions})
        if response.status_code not in (200, 204):
            raise self._fail(response, f"{action} versions of {name!r}")

    def _version_of(self, kv: _Kv, version: int, *, destroyed_ok: bool = False
                    ) -> dict[str, Any]:
        info = kv.versions.get(version)
        if info is None or version not in self._visible(kv):
            raise VersionNotFound(f"secret {kv.name!r} has no version {version}")
        if info.get("destroyed") and not destroyed_ok:
            raise VersionNotFound(f"version {version} of {kv.name!r} was destroyed")
        return info

    def delete(self, name: str, version: int | None = None) -> None:
        if version is not None:
            self._version_of(self._live_kv(name), version)
            self._kv_post("delete", name, [version])
            return
        hidden: list[int] = []

        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            hidden[:] = [v for v in kv.versions if kv.live(v)]
            custom = dict(kv.custom)
            set_field(custom, "deleted", json.dumps({"at": time.time(), "versions": hidden}))
            return custom, kv.labels

        # Mark first (secretfs hides it at once), then soft-delete the versions in KV too, so
        # `bao kv get` agrees.
        self._modify(name, change)
        self._kv_post("delete", name, hidden)

    def undelete(self, name: str, version: int | None = None) -> None:
        if version is not None:
            self._version_of(self._live_kv(name), version)
            self._kv_post("undelete", name, [version])
            return
        kv = self._get_kv(name)
        if kv is None:
            raise SecretNotFound(f"secret {name!r} not found")
        if kv.deleted_marker is None:
            return
        self._kv_post("undelete", name, [int(v) for v in kv.deleted_marker.get("versions", [])
                                         if int(v) in kv.versions])

        def change(kv: _Kv) -> tuple[dict[str, str], dict[Label, int]]:
            custom = dict(kv.custom)
            set_field(custom, "deleted", None)
            return custom, kv.labels

        self._modify(name, change, live=False)

    def destroy(self, name: str, version: int | None = None) -> None:
        kv = self._get_kv(name)
        if kv is None:
            raise SecretNotFound(f"secret {name!r} not found")
        if version is None:
            response = self._request("DELETE", self._path("metadata", name))
            if response.status_code not in (200, 204):
                raise self._fail(response, f"destroy {name!r}")
            return
        self._version_of(kv, version, destroyed_ok=True)
        self._kv_post("destroy", name, [version])

    # -- reading --------------------------------------------------------------------------------

    def read_value(self, name: str, version: int) -> Value:
        response = self._request("GET", self._path("data", name), params={"version": str(version)})
        body: dict[str, Any] = {}
        if response.status_code in (200, 404):
            try:
                body = response.json().get("data") or {}
            except ValueError:
                body = {}
        elif response.status_code != 200:
            raise self._fail(response, f"read version {version} of {name!r}")
        info = body.get("metadata") or {}
        custom = info.get("custom_metadata") or {}
        if get_field(custom, "deleted"):
            raise SecretNotFound(f"secret {name!r} is deleted",
                                 f"restore it with 'secretfs secrets undelete {name}'")
        if response.status_code == 404 and not info:
            if self._get_kv(name) is None:
                raise SecretNotFound(f"secret {name!r} not found")
            raise VersionNotFound(f"secret {name!r} has no version {version}")
        if info.get("destroyed"):
            raise VersionNotFound(f"version {version} of {name!r} was destroyed")
        if info.get("deletion_time") or body.get("data") is None:
            raise VersionNotFound(
                f"version {version} of {name!r} is deleted",
                f"undelete it with 'secretfs secrets undelete {name} --version {version}'",
            )
        value = decode_kv(body["data"])
        self._remember(name, version, info.get("created_time", ""), value)
        return value

    def _remember(self, name: str, version: int, created: str, value: Value) -> None:
        """Keep a version's key names and sizes (never its value): KV metadata lacks them."""
        if len(self._shapes) >= SHAPE_CACHE_MAX:
            self._shapes.clear()
        self._shapes[(name, version, created)] = _shape(value)

    def _shape_of(self, kv: _Kv, version: int) -> Shape:
        """A version's keys and sizes: remembered, recorded in the metadata by the secretfs
        writer of that version, or — for a version written by another tool — read once."""
        info = kv.versions[version]
        key = (kv.name, version, info.get("created_time", ""))
        if key in self._shapes:
            return self._shapes[key]
        recorded = kv.shapes.get(version)
        if recorded is not None:
            return recorded
        if kv.live(version):
            with contextlib.suppress(SecretfsError):
                self.read_value(kv.name, version)
        return self._shapes.get(key, (False, (), ()))

    def _metadata(self, kv: _Kv) -> SecretMetadata:
        versions = []
        for number in self._visible(kv):
            info = kv.versions[number]
            is_map, keys, sizes = self._shape_of(kv, number)
            versions.append(VersionInfo(
                version=number, created=_when(info.get("created_time")) or datetime.now(UTC),
                keys=keys, sizes=sizes, is_map=is_map, deleted=kv.is_deleted(info),
                destroyed=bool(info.get("destroyed")),
            ))
        rotation = get_field(kv.custom, "rotation")
        return SecretMetadata(
            name=kv.name, description=get_field(kv.custom, "description") or "",
            tags=_tags_of(kv.custom), created=_when(kv.raw.get("created_time")),
            updated=_when(kv.raw.get("updated_time")), labels=dict(kv.labels),
            versions=tuple(versions),
            rotation=RotationPolicy.from_json(json.loads(rotation)) if rotation else None,
            deleted=kv.deleted_marker is not None,
        )

    def read_metadata(self, name: str) -> SecretMetadata:
        return self._metadata(self._live_kv(name))

    def _list_folder(self, folder: str) -> list[str]:
        response = self._request("GET", self._path("metadata", folder), params={"list": "true"})
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise self._fail(response, f"list {folder or '/'}")
        return list(response.json()["data"].get("keys") or [])

    def _walk(self, prefix: str) -> Iterator[str]:
        """Every KV secret name starting with *prefix* (metadata exists; maybe deleted)."""
        start = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        pending = [start]
        while pending:
            folder = pending.pop()
            for entry in self._list_folder(folder):
                path = folder + entry
                if entry.endswith("/"):
                    if path.startswith(prefix) or prefix.startswith(path):
                        pending.append(path)
                elif path.startswith(prefix):
                    yield path

    def list(self, prefix: str = "") -> list[SecretMetadata]:
        found = []
        for name in sorted(self._walk(prefix)):
            kv = self._get_kv(name)
            if kv is not None and kv.deleted_marker is None:
                found.append(self._metadata(kv))
        return found

    def list_names(self, prefix: str = "") -> list[str]:
        names = []
        for name in sorted(self._walk(prefix)):
            kv = self._get_kv(name)  # one request per name: a soft delete is in its metadata
            if kv is not None and kv.deleted_marker is None:
                names.append(name)
        return names

    def scan_metadata(self, prefix: str = "") -> dict[str, Scanned] | None:
        """Every KV secret name under *prefix* (soft-deleted ones too), each with a digest of
        its whole KV metadata — which changes whenever the secret does — and its metadata as
        listed, from one ``LIST detailed-metadata`` per folder and 1,000 names (OpenBao 2.x),
        not a request per name. None when the server has no such endpoint (HashiCorp Vault):
        the poller then reads each name's metadata (secretfs/poll.py)."""
        if self._detailed is False:
            return None
        found: dict[str, Scanned] = {}
        start = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        pending = [start]
        while pending:
            folder = pending.pop()
            after = ""
            while True:
                params = {"list": "true", "limit": str(LIST_PAGE)}
                if after:
                    params["after"] = after
                response = self._request("GET", self._path("detailed-metadata", folder),
                                         params=params)
                if response.status_code == 404:
                    if "Invalid path" in response.text:  # no such endpoint here
                        self._detailed = False
                        return None
                    break  # an empty folder
                if response.status_code != 200:
                    raise self._fail(response, f"list {folder or '/'} with metadata")
                self._detailed = True
                data = response.json()["data"]
                keys = list(data.get("keys") or [])
                details = data.get("key_info") or {}
                for key in keys:
                    path = folder + key
                    if key.endswith("/"):
                        if path.startswith(prefix) or prefix.startswith(path):
                            pending.append(path)
                    elif path.startswith(prefix):
                        # repr, not a sorted json.dumps: the server's JSON has a fixed key
                        # order (Go sorts map keys), and repr is twice as fast — a pass over
                        # 200 names is dominated by this loop on the host's side
                        info = details.get(key) or {}
                        digest = hashlib.blake2b(repr(info).encode(), digest_size=16).digest()
                        found[path] = Scanned(digest, partial(self._listed_metadata, path, info))
                if len(keys) < LIST_PAGE:
                    break
                after = keys[-1]
        return found

    def _listed_metadata(self, name: str, info: dict[str, Any]) -> SecretMetadata | None:
        """*name*'s metadata from its listing entry (None: deleted). No request, unless a
        version written by another tool has no recorded keys and sizes: it is read once."""
        kv = _Kv.parse(name, info)
        return None if kv.deleted_marker is not None else self._metadata(kv)

    def scan_names(self, prefix: str = "") -> list[str]:
        """Every KV secret name under *prefix*, soft-deleted ones included: the LISTs alone
        (list_names also reads each name's metadata). The poller's listing (secretfs/poll.py)."""
        return sorted(self._walk(prefix))

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        if cursor is None:
            return 0, None
        return cursor, set()


def open_openbao(config: Config, *, create: bool = False) -> OpenBaoBackend:
    """The backend ``secrets_manager.backend`` (type ``openbao``) describes.

    *create* changes nothing: the KV v2 mount is the operator's to enable. Without ``address``,
    ``BAO_ADDR`` / ``VAULT_ADDR`` from the environment.
    """
    del create
    settings = config.manager.backend
    options = settings.options
    address = options.get("address") or os.environ.get("BAO_ADDR") or \
        os.environ.get("VAULT_ADDR")
    if not address:
        raise ConfigError("the openbao backend has no address",
                          "set secrets_manager.backend.address (or BAO_ADDR)")
    # One request, failover over the nodes included, fits in what the daemon waits for a
    # backend read (backend_timeout): otherwise the daemon would give up while a node still
    # waited for its share, and the others never got theirs.
    bounds = [float(limit) for limit in (options.get("timeout"), config.manager.backend_timeout)
              if limit]
    return OpenBaoBackend(
        address, mount=options.get("mount", "secret"), token=options.get("token"),
        token_file=options.get("token_file"), approle=options.get("approle"),
        ca_file=options.get("ca_file"), namespace=options.get("namespace"),
        timeout=min(bounds) if bounds else None, max_versions=settings.max_versions,
    )
