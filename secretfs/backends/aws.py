"""AWS Secrets Manager as a secretfs backend: one AWS secret per secretfs secret.

Layout (so the AWS console, the AWS CLI and other tools see ordinary secrets):

- **Names**: the AWS secret is ``<prefix><name>``; ``/`` in names is fine for AWS. Avoid names
  that end in ``-`` plus six characters: AWS may take them for a partial ARN.
- **Version numbers**: AWS identifies versions by VersionId, which is the ClientRequestToken the
  writer chose. secretfs writes version *n* with the token ``5ec7f500-5ec7-4000-8000-<n as 12
  hex digits>``, so the number travels inside the VersionId itself: no side table that could
  drift, and nothing shifts when AWS drops old versions. Because the token is deterministic, two
  writers racing for the same number collide in AWS (ResourceExistsException: a version's value
  can't change), so numbers are never handed out twice. The next number is the highest one
  present plus one; the highest is always the newest version, which AWS never drops first.
  Versions written by other tools (random VersionIds) are numbered by creation order among the
  rest; those numbers are positional, stable as long as AWS keeps the older foreign versions.
- **Values**: a single value written by secretfs is ``SecretBinary`` (bytes exact). A map is
  ``SecretString`` holding a JSON object, which is what the console and most tools write and
  read. A ``SecretString`` that is not a JSON object (written by another tool) reads as a single
  value (its UTF-8 bytes); non-string JSON members of an object read as their JSON text.
- **Labels** are staging labels: current = AWSCURRENT, previous = AWSPREVIOUS, pending =
  AWSPENDING; other staging labels are left alone.
- **Description and tags** are AWS's own. Tag keys starting with ``secretfs:`` (and ``aws:``) are
  reserved: the rotation policy, the rotation state and the per-version delete marks
  live there as base64 JSON (tag values allow only a few characters), split over ``key``,
  ``key.1``, … when longer than one tag value (256 characters). AWS allows 50 tags per secret.

What AWS cannot do, and what this does instead (see ``capabilities``):

- Deleting a secret schedules its deletion (``recovery_window`` days, 7-30) and undelete
  restores it; destroying it is ForceDeleteWithoutRecovery. One *version* cannot be deleted in
  AWS: secretfs marks it in a tag and hides it from its own reads (other AWS clients still see
  it, labels stay). One version's value cannot be erased at all, so ``destroy(name, version)``
  raises UsageError and there is no ``destroy`` capability (whole-secret destroy still works).
- The empty single value is stored as the SecretString ``{}`` (AWS stores nothing shorter than
  a byte); AWS refuses values over 64 KiB, reported as ValueTooLarge.
- ``max_versions`` hides older unlabelled versions from secretfs; AWS keeps up to ~100.
- Check-and-set and the single-pending rule are checked before the write: there is no
  conditional write in AWS. The deterministic VersionId closes the race between secretfs
  writers; ``update_labels`` re-reads the labels after moving them and reports a ConflictError
  if someone else moved them meanwhile (it cannot undo their change).
- The first version of a secret is always AWSCURRENT, whatever label it is written with.
- No change feed: ``changes_since`` always says "reload", and the daemon polls.

Calls are blocking boto3 calls (a client is thread-safe); the manager runs them in worker
threads. Keys of a version's value are learned by reading it once and cached by VersionId
(versions never change), so ``read_metadata`` costs one GetSecretValue per version the first time.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from secretfs.backends.base import MetadataUpdate, check_write
from secretfs.errors import (
    BackendUnavailable,
    ConfigError,
    ConflictError,
    InvalidName,
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
    encode_value,
    parent_folders,
    validate_name,
    value_keys,
    value_sizes,
)

if TYPE_CHECKING:
    from secretfs.config import Config

CAPABILITIES = frozenset(
    {"versions", "labels", "cas", "soft_delete", "metadata", "rotation_state", "folders"}
)
"""No ``destroy`` (one version's value can't be erased at once), no ``change_feed``."""

STAGES = {Label.CURRENT: "AWSCURRENT", Label.PREVIOUS: "AWSPREVIOUS", Label.PENDING: "AWSPENDING"}
LABELS = {stage: label for label, stage in STAGES.items()}

TOKEN_PREFIX = "5ec7f500-5ec7-4000-8000-"  # + 12 hex digits: a well-formed UUID
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"([0-9a-f]{12})")

RESERVED_TAG_PREFIXES = ("secretfs:", "aws:")
TAG_ROTATION = "secretfs:rotation"
TAG_ROTATION_STATE = "secretfs:rotation-state"
TAG_DELETED = "secretfs:deleted-versions"
TAG_VALUE_MAX = 256
MAX_TAGS = 50
MAX_AWS_VALUE_BYTES = 65536  # per SecretString / SecretBinary, enforced by AWS
EMPTY_VALUE = "{}"
DEFAULT_RECOVERY_DAYS = 30
DEFAULT_TIMEOUT = 10.0
WRITE_ATTEMPTS = 100  # retries when another writer took the next version number first

# Codes that mean "AWS is not answering usefully now": exit 5, try again later.
_UNAVAILABLE = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "InternalServiceError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException",
    "RequestTimeout", "RequestTimeoutException",
})
_REFUSED = frozenset({
    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
    "InvalidSignatureException", "ExpiredTokenException", "IncompleteSignature",
    "InvalidClientTokenId", "SignatureDoesNotMatch",
})


_PUT_PASSING = ("ResourceExistsException", "InvalidRequestException", "ValidationException",
                "InvalidParameterException", "LimitExceededException")


def version_token(number: int) -> str:
    """The ClientRequestToken (and so the VersionId) secretfs writes version *number* under."""
    return f"{TOKEN_PREFIX}{number:012x}"


def token_number(version_id: str) -> int | None:
    """The version number a secretfs-written VersionId carries, or None (another tool's)."""
    match = _TOKEN.fullmatch(version_id)
    return int(match[1], 16) if match else None


def encode_aws_value(value: Value) -> dict[str, Any]:
    """The PutSecretValue/CreateSecret arguments that store *value*.

    AWS stores no empty value (both fields need a byte), so the empty single value is the
    SecretString ``{}``: an empty object, which no map can be (a map has a key). AWS itself
    enforces its 64 KiB limit (see _too_large); it is not duplicated here.
    """
    if isinstance(value, bytes):
        return {"SecretBinary": value} if value else {"SecretString": EMPTY_VALUE}
    return {"SecretString": encode_value(value).decode()}


def decode_aws_value(response: Mapping[str, Any]) -> Value:
    """A GetSecretValue answer as a secretfs value (see the module docstring)."""
    if response.get("SecretBinary") is not None:
        return bytes(response["SecretBinary"])
    text = response.get("SecretString") or ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if text == EMPTY_VALUE:
        return b""
    if isinstance(parsed, dict) and parsed:
        return {
            str(key): item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            for key, item in parsed.items()
        }
    return text.encode()


def _blob_tags(key: str, data: Any) -> dict[str, str]:
    """*data* as JSON in base64, split over ``key``, ``key.1``, … (tag values are short)."""
    text = base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()
    chunks = [text[i:i + TAG_VALUE_MAX] for i in range(0, len(text), TAG_VALUE_MAX)] or [""]
    return {key if i == 0 else f"{key}.{i}": chunk for i, chunk in enumerate(chunks)}


def _blob_keys(key: str, tags: Mapping[str, str]) -> list[str]:
    pattern = re.compile(re.escape(key) + r"(?:\.(\d+))?")
    found = [(int(m[1] or 0), tag) for tag in tags if (m := pattern.fullmatch(tag))]
    return [tag for _, tag in sorted(found)]


def _read_blob(key: str, tags: Mapping[str, str]) -> Any:
    keys = _blob_keys(key, tags)
    if not keys:
        return None
    try:
        return json.loads(base64.b64decode("".join(tags[k] for k in keys)))
    except ValueError:
        return None  # half-written by a concurrent writer, or edited by hand: treat as unset


def _is_reserved(tag: str) -> bool:
    return tag.startswith(RESERVED_TAG_PREFIXES)


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)


@dataclass(frozen=True)
class _Version:
    number: int
    version_id: str
    created: datetime | None
    stages: frozenset[str]


@dataclass(frozen=True)
class _Secret:
    """One DescribeSecret plus ListSecretVersionIds: what most operations start from."""

    name: str
    secret_id: str
    arn: str  # new with every CreateSecret: keys the value-shape cache
    description: str
    tags: dict[str, str]
    created: datetime | None
    updated: datetime | None
    deleted: bool
    versions: tuple[_Version, ...]  # by number

    @property
    def labels(self) -> dict[Label, int]:
        return {LABELS[stage]: v.number for v in self.versions for stage in v.stages
                if stage in LABELS}

    def holder(self, label: Label) -> _Version | None:
        return next((v for v in self.versions if STAGES[label] in v.stages), None)

    def marked(self, tag: str) -> set[int]:
        return set(_read_blob(tag, self.tags) or ())


class AwsBackend:
    """Versioned secrets in AWS Secrets Manager (see the module docstring for the layout)."""

    kind = "aws"
    capabilities = CAPABILITIES

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None,
                 prefix: str = "", max_versions: int = 10, timeout: float = DEFAULT_TIMEOUT,
                 recovery_window: int = DEFAULT_RECOVERY_DAYS, client: Any = None) -> None:
        self.prefix = prefix
        self.max_versions = max_versions
        self.recovery_window = recovery_window
        self.where = endpoint_url or f"region {region or '(default)'}"
        self._keys: dict[str, tuple[bool, tuple[str, ...], tuple[int, ...]]] = {}
        self._keys_lock = threading.Lock()
        self._client = client if client is not None else self._make_client(
            region, endpoint_url, timeout)

    @staticmethod
    def _make_client(region: str | None, endpoint_url: str | None, timeout: float) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import NoRegionError

        config = BotoConfig(connect_timeout=timeout, read_timeout=timeout,
                            retries={"mode": "standard", "max_attempts": 3})
        try:
            return boto3.session.Session().client(
                "secretsmanager", region_name=region, endpoint_url=endpoint_url, config=config)
        except NoRegionError:
            raise ConfigError(
                "no AWS region for the aws backend",
                "set secrets_manager.backend.region, or AWS_REGION in the environment",
            ) from None

    def close(self) -> None:
        self._client.close()

    # -- calling AWS --------------------------------------------------------------------------

    def _call(self, operation: str, name: str | None, *, passing: tuple[str, ...] = (),
              **arguments: Any) -> Any:
        """One API call, its failures as secretfs errors; codes in *passing* are re-raised as
        ClientError for the caller to interpret. Never puts arguments (values) in a message."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self._client, operation)(**arguments)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in passing:
                raise
            if code == "ResourceNotFoundException" and name is not None:
                raise SecretNotFound(f"secret {name!r} not found") from None
            if code in _REFUSED:
                raise BackendUnavailable(
                    f"AWS Secrets Manager ({self.where}) refused {operation}: {code}",
                    "check the AWS credentials and the IAM policy",
                ) from None
            if code in _UNAVAILABLE:
                raise BackendUnavailable(
                    f"AWS Secrets Manager ({self.where}) is unavailable: {code}",
                    "try again later",
                ) from None
            raise BackendUnavailable(
                f"AWS Secrets Manager ({self.where}) failed {operation}: {code or 'error'}"
            ) from None
        except NoCredentialsError:
            raise BackendUnavailable(
                "no AWS credentials for the aws backend",
                "configure them as for the AWS CLI (environment, profile or instance role)",
            ) from None
        except BotoCoreError as error:
            raise BackendUnavailable(
                f"AWS Secrets Manager ({self.where}) did not answer: {type(error).__name__}",
                "check the network, region and endpoint_url",
            ) from None

    def _too_large(self, error: Exception, stored: Mapping[str, Any]) -> None:
        """Raise ValueTooLarge if AWS refused a value over its limit, else BackendUnavailable
        naming the refusal (never the value)."""
        size = len(stored.get("SecretBinary") or stored.get("SecretString", "").encode())
        if size > MAX_AWS_VALUE_BYTES:
            raise ValueTooLarge(
                f"value is {size} bytes, over AWS Secrets Manager's {MAX_AWS_VALUE_BYTES}-byte "
                "limit", "store large files elsewhere and keep their key here",
            ) from None
        if self._code(error) == "InvalidRequestException":
            return  # the caller knows what this one means
        raise BackendUnavailable(
            f"AWS Secrets Manager ({self.where}) refused the value: {self._code(error)}"
        ) from None

    @staticmethod
    def _code(error: Exception) -> str:
        return getattr(error, "response", {}).get("Error", {}).get("Code", "")

    def _id(self, name: str) -> str:
        return self.prefix + name

    def _load(self, name: str, *, include_deleted: bool = False) -> _Secret:
        """The secret's state; SecretNotFound if absent (or deleted, unless *include_deleted*)."""
        secret_id = self._id(name)
        described = self._call("describe_secret", name, SecretId=secret_id)
        deleted = described.get("DeletedDate") is not None
        if deleted and not include_deleted:
            raise SecretNotFound(f"secret {name!r} is deleted",
                                 f"restore it with 'secretfs secrets undelete {name}'")
        raw: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self._call("list_secret_version_ids", name, SecretId=secret_id,
                              IncludeDeprecated=True, MaxResults=100,
                              **({"NextToken": token} if token else {}))
            raw.extend(page.get("Versions", []))
            token = page.get("NextToken")
            if not token:
                break
        return _Secret(
            name=name, secret_id=secret_id, arn=described.get("ARN", secret_id),
            description=described.get("Description") or "",
            tags={t["Key"]: t["Value"] for t in described.get("Tags") or ()},
            created=_when(described.get("CreatedDate")),
            updated=_when(described.get("LastChangedDate")), deleted=deleted,
            versions=self._number(raw),
        )

    @staticmethod
    def _number(raw: list[dict[str, Any]]) -> tuple[_Version, ...]:
        """Number the versions: secretfs's carry theirs, others get the next by creation."""
        ordered = sorted(raw, key=lambda v: _when(v.get("CreatedDate")) or datetime.min.replace(
            tzinfo=UTC))
        highest = 0
        versions = []
        for entry in ordered:
            number = token_number(entry["VersionId"])
            if number is None:
                number = highest + 1
            highest = max(highest, number)
            versions.append(_Version(number, entry["VersionId"], _when(entry.get("CreatedDate")),
                                     frozenset(entry.get("VersionStages") or ())))
        return tuple(sorted(versions, key=lambda v: v.number))

    def _visible(self, secret: _Secret) -> list[_Version]:
        """The versions secretfs shows: the newest max_versions, plus any a label points at."""
        newest = {v.number for v in secret.versions[-self.max_versions:]}
        return [v for v in secret.versions
                if v.number in newest or any(stage in LABELS for stage in v.stages)]

    def _version(self, secret: _Secret, number: int) -> _Version:
        found = next((v for v in self._visible(secret) if v.number == number), None)
        if found is None:
            raise VersionNotFound(f"secret {secret.name!r} has no version {number}")
        return found

    # -- writing ------------------------------------------------------------------------------

    def write_version(self, name: str, value: Value, *, label: Label = Label.CURRENT,
                      cas: int | None = None, metadata: MetadataUpdate | None = None) -> int:
        stored = encode_aws_value(value)
        for _ in range(WRITE_ATTEMPTS):
            try:
                secret = self._load(name, include_deleted=True)
            except SecretNotFound:
                if cas not in (None, 0):
                    raise ConflictError(
                        f"check-and-set failed: secret {name!r} does not exist, "
                        f"expected version {cas}", "use --cas 0 to create it",
                    ) from None
                arn = self._create(name, stored, metadata)
                if arn is not None:
                    self._remember(arn, version_token(1), value)
                    return 1
                continue  # someone created it meanwhile: write a new version of theirs
            if secret.deleted:
                raise ConflictError(
                    f"secret {name!r} is deleted",
                    f"undelete it with 'secretfs secrets undelete {name}', or remove it for "
                    f"good with 'secretfs secrets rm {name} --destroy'",
                )
            check_write(name, secret.labels, label=label, cas=cas)
            number = max((v.number for v in secret.versions), default=0) + 1
            from botocore.exceptions import ClientError

            try:
                answer = self._call("put_secret_value", name, passing=_PUT_PASSING,
                           SecretId=secret.secret_id, ClientRequestToken=version_token(number),
                           VersionStages=[STAGES[label]], **stored)
            except ClientError as error:
                if self._code(error) != "ResourceExistsException":
                    self._too_large(error, stored)
                time.sleep(random.uniform(0, 0.02))  # spread the racers out
                continue  # another writer took this number: look again (cas re-checked)
            self._remember(answer.get("ARN", secret.arn), version_token(number), value)
            if metadata is not None and not metadata.empty:
                self._apply_metadata(self._load(name), metadata)
            return number
        raise ConflictError(f"secret {name!r} is being written by others",
                            "try again in a moment")

    def _create(self, name: str, stored: dict[str, Any], metadata: MetadataUpdate | None
                ) -> str | None:
        """CreateSecret with version 1: its ARN; None if it exists by now (a concurrent
        creator)."""
        from botocore.exceptions import ClientError

        self._check_folder_conflict(name)
        metadata = metadata or MetadataUpdate()
        tags = self._check_user_tags(metadata.tags or {})
        if metadata.rotation is not None:
            tags = {**tags, **_blob_tags(TAG_ROTATION, metadata.rotation.to_json())}
        self._check_tag_count(tags)
        arguments: dict[str, Any] = {"Name": self._id(name),
                                     "ClientRequestToken": version_token(1), **stored}
        if metadata.description:
            arguments["Description"] = metadata.description
        if tags:
            arguments["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
        try:
            answer = self._call("create_secret", name, passing=_PUT_PASSING, **arguments)
        except ClientError as error:
            if self._code(error) != "ResourceExistsException":
                self._too_large(error, stored)
            if self._code(error) == "InvalidRequestException":  # its deletion is scheduled
                raise ConflictError(
                    f"secret {name!r} is deleted",
                    f"undelete it with 'secretfs secrets undelete {name}'",
                ) from None
            return None
        return str(answer.get("ARN", self._id(name)))

    def _check_folder_conflict(self, name: str) -> None:
        """A name may not be a folder of another name, nor have another name as its folder."""
        inside = next(iter(self._names(name + "/", include_deleted=True)), None)
        folders = parent_folders(name)
        clash = inside
        for start in range(0, len(folders), 10):  # a filter takes at most 10 values
            if clash is not None:
                break
            chunk = folders[start:start + 10]
            clash = next((n for n in self._names("", include_deleted=True,
                                                 filters=[self._id(f) for f in chunk])
                          if n in chunk), None)
        if clash is not None:
            relation = "a folder of" if clash.startswith(name + "/") else "inside"
            raise InvalidName(
                f"cannot create {name!r}: it would be {relation} the existing secret {clash!r}",
                "a name cannot be both a secret and a folder; choose another name",
            )

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        secret = self._load(name)
        before = secret.labels
        for label, version in (expect or {}).items():
            if before.get(label) != version:
                raise ConflictError(
                    f"label {label.value} of {name!r} points at {before.get(label)}, "
                    f"not {version}", "another process changed it: read it again",
                )
        wanted = dict(changes)
        if Label.CURRENT in wanted and Label.PREVIOUS not in wanted:
            # AWS moves AWSPREVIOUS along with AWSCURRENT; the contract leaves it alone.
            wanted[Label.PREVIOUS] = before.get(Label.PREVIOUS)
        targets = {label: None if number is None else self._version(secret, number).version_id
                   for label, number in wanted.items()}
        if Label.CURRENT in targets and targets[Label.CURRENT] is None:
            raise UsageError(f"secret {name!r} must keep a current version",
                             "AWS Secrets Manager cannot remove AWSCURRENT, only move it")
        order = sorted(targets, key=lambda label: label is not Label.CURRENT)
        for label in order:
            holder = secret.holder(label)
            holder_id = holder.version_id if holder else None
            if holder_id == targets[label]:
                continue
            arguments: dict[str, Any] = {"SecretId": secret.secret_id,
                                         "VersionStage": STAGES[label]}
            if holder_id is not None:
                arguments["RemoveFromVersionId"] = holder_id
            if targets[label] is not None:
                arguments["MoveToVersionId"] = targets[label]
            self._call("update_secret_version_stage", name, **arguments)
            secret = self._load(name)  # AWS may have moved AWSPREVIOUS too
        after = secret.labels
        moved = [label for label, number in wanted.items() if after.get(label) != number]
        if moved:
            raise ConflictError(
                f"labels {', '.join(label.value for label in moved)} of {name!r} were changed "
                "by another process while moving them", "read them again",
            )

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        self._apply_metadata(self._load(name), metadata)

    def _apply_metadata(self, secret: _Secret, metadata: MetadataUpdate) -> None:
        if metadata.description is not None and metadata.description != secret.description:
            self._call("update_secret", secret.name, SecretId=secret.secret_id,
                       Description=metadata.description)
        set_tags: dict[str, str] = {}
        remove: list[str] = []
        if metadata.tags is not None:
            new = self._check_user_tags(metadata.tags)
            old = {k: v for k, v in secret.tags.items() if not _is_reserved(k)}
            set_tags.update({k: v for k, v in new.items() if old.get(k) != v})
            remove += [k for k in old if k not in new]
        if metadata.rotation is not None:
            blob = _blob_tags(TAG_ROTATION, metadata.rotation.to_json())
            set_tags.update(blob)
            remove += [k for k in _blob_keys(TAG_ROTATION, secret.tags) if k not in blob]
        elif metadata.clear_rotation:
            remove += _blob_keys(TAG_ROTATION, secret.tags)
        self._retag(secret, set_tags, remove)

    def _retag(self, secret: _Secret, set_tags: Mapping[str, str], remove: list[str]) -> None:
        """Add/overwrite *set_tags*, then drop *remove* (never a moment without the new ones)."""
        final = {k: v for k, v in {**secret.tags, **set_tags}.items() if k not in remove}
        self._check_tag_count(final)
        if set_tags:
            self._call("tag_resource", secret.name, SecretId=secret.secret_id,
                       Tags=[{"Key": k, "Value": v} for k, v in set_tags.items()])
        if remove:
            self._call("untag_resource", secret.name, SecretId=secret.secret_id,
                       TagKeys=list(dict.fromkeys(remove)))

    @staticmethod
    def _check_user_tags(tags: Mapping[str, str]) -> dict[str, str]:
        for key in tags:
            if _is_reserved(key):
                raise UsageError(f"tag {key!r} is reserved",
                                 "tags starting with 'secretfs:' or 'aws:' are not yours to set")
        return dict(tags)

    @staticmethod
    def _check_tag_count(tags: Mapping[str, str]) -> None:
        if len(tags) > MAX_TAGS:
            raise UsageError(
                f"the secret would need {len(tags)} AWS tags, over AWS's limit of {MAX_TAGS}",
                "use fewer tags, or shorter rotation commands",
            )

    # -- rotation state -----------------------------------------------------------------------

    def rotation_state(self, name: str) -> RotationState | None:
        try:
            secret = self._load(name)
        except SecretNotFound:
            return None  # no secret, no rotation of it
        data = _read_blob(TAG_ROTATION_STATE, secret.tags)
        if not data:
            return None
        return RotationState(int(data["version"]), RotationStep(data["step"]), data["owner"],
                             float(data["started"]), float(data["updated"]))

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        secret = self._load(name)
        old = _blob_keys(TAG_ROTATION_STATE, secret.tags)
        if state is None:
            self._retag(secret, {}, old)
            return
        blob = _blob_tags(TAG_ROTATION_STATE, {
            "version": state.version, "step": state.step.value, "owner": state.owner,
            "started": state.started, "updated": state.updated,
        })
        self._retag(secret, blob, [k for k in old if k not in blob])

    # -- deleting -----------------------------------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> None:
        secret = self._load(name)
        if version is None:
            self._call("delete_secret", name, SecretId=secret.secret_id,
                       RecoveryWindowInDays=self.recovery_window)
            return
        self._version(secret, version)
        self._mark(secret, TAG_DELETED, secret.marked(TAG_DELETED) | {version})

    def undelete(self, name: str, version: int | None = None) -> None:
        if version is None:
            self._load(name, include_deleted=True)
            self._call("restore_secret", name, SecretId=self._id(name))
            return
        secret = self._load(name)
        self._version(secret, version)
        self._mark(secret, TAG_DELETED, secret.marked(TAG_DELETED) - {version})

    def destroy(self, name: str, version: int | None = None) -> None:
        if version is None:
            secret = self._load(name, include_deleted=True)
            self._call("delete_secret", name, SecretId=secret.secret_id,
                       ForceDeleteWithoutRecovery=True)
            with self._keys_lock:
                for v in secret.versions:
                    self._keys.pop(f"{secret.arn}\0{v.version_id}", None)
            return
        raise UsageError(
            "AWS Secrets Manager cannot erase one version of a secret",
            f"delete the version to hide it, or destroy the whole secret {name!r}",
        )

    def _mark(self, secret: _Secret, tag: str, numbers: set[int]) -> None:
        old = _blob_keys(tag, secret.tags)
        if not numbers:
            self._retag(secret, {}, old)
            return
        blob = _blob_tags(tag, sorted(numbers))
        self._retag(secret, blob, [k for k in old if k not in blob])

    # -- reading ------------------------------------------------------------------------------

    def read_metadata(self, name: str) -> SecretMetadata:
        return self._metadata(self._load(name))

    def _metadata(self, secret: _Secret) -> SecretMetadata:
        deleted = secret.marked(TAG_DELETED)
        versions = []
        for v in self._visible(secret):
            readable = v.number not in deleted
            is_map, keys, sizes = self._keys_of(secret, v) if readable else (False, (), ())
            versions.append(VersionInfo(
                version=v.number, created=v.created or secret.created or datetime.now(UTC),
                keys=keys, is_map=is_map, sizes=sizes, deleted=not readable,
            ))
        rotation = _read_blob(TAG_ROTATION, secret.tags)
        return SecretMetadata(
            name=secret.name, description=secret.description,
            tags={k: v for k, v in secret.tags.items() if not _is_reserved(k)},
            created=secret.created, updated=secret.updated, labels=secret.labels,
            versions=tuple(versions),
            rotation=RotationPolicy.from_json(rotation) if rotation else None,
            deleted=secret.deleted,
        )

    def _keys_of(self, secret: _Secret, version: _Version
                 ) -> tuple[bool, tuple[str, ...], tuple[int, ...]]:
        with self._keys_lock:
            known = self._keys.get(f"{secret.arn}\0{version.version_id}")
        if known is None:
            try:
                self._fetch(secret, version)
            except VersionNotFound:
                return False, (), ()
            with self._keys_lock:
                known = self._keys.get(f"{secret.arn}\0{version.version_id}",
                                       (False, (), ()))
        return known

    def _remember(self, arn: str, version_id: str, value: Value) -> None:
        """Cache the shape (not the value) of a version: by ARN, which a re-created secret
        of the same name does not share."""
        with self._keys_lock:
            self._keys[f"{arn}\0{version_id}"] = (
                not isinstance(value, bytes), value_keys(value), value_sizes(value))

    def _fetch(self, secret: _Secret, version: _Version) -> Value:
        from botocore.exceptions import ClientError

        try:
            response = self._call("get_secret_value", secret.name,
                                  passing=("ResourceNotFoundException",),
                                  SecretId=secret.secret_id, VersionId=version.version_id)
        except ClientError:
            raise VersionNotFound(
                f"secret {secret.name!r} has no version {version.number}") from None
        value = decode_aws_value(response)
        self._remember(secret.arn, version.version_id, value)
        return value

    def read_value(self, name: str, version: int) -> Value:
        secret = self._load(name)
        found = self._version(secret, version)
        if version in secret.marked(TAG_DELETED):
            raise VersionNotFound(
                f"version {version} of {name!r} is deleted",
                f"undelete it with 'secretfs secrets undelete {name} --version {version}'",
            )
        return self._fetch(secret, found)

    def list(self, prefix: str = "") -> list[SecretMetadata]:
        found = []
        for name in self.list_names(prefix):
            try:
                found.append(self.read_metadata(name))
            except SecretNotFound:
                continue  # deleted between listing and reading
        return found

    def list_names(self, prefix: str = "") -> list[str]:
        return sorted(self._names(prefix))

    def _names(self, prefix: str, *, include_deleted: bool = False,
               filters: list[str] | None = None) -> Iterator[str]:
        """Valid secretfs names under our prefix starting with *prefix* (AWS's name filter is
        a case-insensitive prefix match: the exact check is here)."""
        values = filters if filters is not None else (
            [self._id(prefix)] if self._id(prefix) else None)
        token: str | None = None
        while True:
            arguments: dict[str, Any] = {"MaxResults": 100,
                                         "IncludePlannedDeletion": include_deleted}
            if values:
                arguments["Filters"] = [{"Key": "name", "Values": values}]
            if token:
                arguments["NextToken"] = token
            page = self._call("list_secrets", None, **arguments)
            for entry in page.get("SecretList", []):
                full = entry.get("Name", "")
                if not full.startswith(self.prefix):
                    continue
                name = full[len(self.prefix):]
                if not name.startswith(prefix):
                    continue
                if entry.get("DeletedDate") is not None and not include_deleted:
                    continue
                try:
                    yield validate_name(name)
                except InvalidName:
                    continue  # not a secretfs name (another tool's secret): not shown
            token = page.get("NextToken")
            if not token:
                return

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        # No change feed in AWS: the first answer says "reload"; then nothing is ever known
        # to have changed, and the daemon polls metadata (capabilities has no change_feed).
        return (0, None) if cursor is None else (cursor, set())


def open_aws(config: Config, *, create: bool = False) -> AwsBackend:
    """The aws backend *config* names; with *create*, check AWS answers (nothing to make)."""
    settings = config.manager.backend
    options = settings.options
    backend = AwsBackend(
        region=options.get("region"), endpoint_url=options.get("endpoint_url"),
        prefix=options.get("prefix", ""), max_versions=settings.max_versions,
        timeout=options.get("timeout", DEFAULT_TIMEOUT),
    )
    if create:
        backend._call("list_secrets", None, MaxResults=1)
    return backend
