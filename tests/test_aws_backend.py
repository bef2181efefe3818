"""The aws backend against a moto server over HTTP: the layout AWS tools see, and conformance.

Values are random tokens and never printed: pytest shows both sides of a failed ``==``, so values
are compared through ``digest`` (a failure shows hashes, not values).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import boto3
import pytest

from secretfs.backends.aws import (
    CAPABILITIES,
    AwsBackend,
    open_aws,
    token_number,
    version_token,
)
from secretfs.backends.base import MetadataUpdate
from secretfs.config import BackendConfig, Config, ManagerConfig
from secretfs.errors import (
    BackendUnavailable,
    ConflictError,
    SecretNotFound,
    UsageError,
    VersionNotFound,
)
from secretfs.model import GeneratorSpec, Label, RotationPolicy
from secretfs.testing.backend_conformance import BackendConformance
from tests.moto_server import REGION, free_port, moto_endpoint, moto_server  # noqa: F401

PREFIX = "team/"


def digest(value: Any) -> str:
    """A value's fingerprint, safe to show in a failed assertion."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def token() -> bytes:
    return secrets.token_hex(16).encode()


@pytest.fixture
def aws(moto_endpoint: str) -> Any:  # noqa: F811
    """A plain boto3 client: what other AWS tools see."""
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_endpoint)
    yield client
    client.close()


@pytest.fixture
def backend(moto_endpoint: str) -> Iterator[AwsBackend]:  # noqa: F811
    backend = AwsBackend(region=REGION, endpoint_url=moto_endpoint, prefix=PREFIX, max_versions=5)
    yield backend
    backend.close()


def stages(aws: Any, name: str) -> dict[int, set[str]]:
    """Version number → staging labels, as DescribeSecret reports them."""
    described = aws.describe_secret(SecretId=PREFIX + name)
    return {token_number(vid): set(st) for vid, st in described["VersionIdsToStages"].items()
            if st}


class TestAwsConformance(BackendConformance):
    """The shared suite; ``backend`` is the fixture above (fresh, empty: the server is reset)."""


def test_capabilities() -> None:
    assert "change_feed" not in CAPABILITIES and "destroy" not in CAPABILITIES
    assert {"versions", "labels", "cas", "soft_delete", "metadata"} <= CAPABILITIES


def test_version_ids_carry_the_number() -> None:
    assert token_number(version_token(1)) == 1
    assert token_number(version_token(123456)) == 123456
    assert token_number("a1b2c3d4-0000-4000-8000-000000000001") is None
    assert 32 <= len(version_token(2**40)) <= 64


def test_bytes_are_secret_binary_and_maps_secret_string(backend: AwsBackend, aws: Any) -> None:
    single = secrets.token_bytes(32)
    creds = {"user": "app", "password": token().decode()}
    backend.write_version("raw", single)
    backend.write_version("db", creds)
    raw = aws.get_secret_value(SecretId=PREFIX + "raw")
    assert "SecretString" not in raw and digest(raw["SecretBinary"]) == digest(single)
    stored = aws.get_secret_value(SecretId=PREFIX + "db")
    # readable by the console, jq, …
    assert digest(json.loads(stored["SecretString"])) == digest(creds)
    assert digest(backend.read_value("raw", 1)) == digest(single)
    assert digest(backend.read_value("db", 1)) == digest(creds)


def test_secrets_written_by_other_tools(backend: AwsBackend, aws: Any) -> None:
    plain, pairs = token().decode(), {"user": "svc", "port": 5432, "tls": True}
    aws.create_secret(Name=PREFIX + "plain", SecretString=plain)
    aws.create_secret(Name=PREFIX + "pairs", SecretString=json.dumps(pairs))
    assert digest(backend.read_value("plain", 1)) == digest(plain.encode())
    expected = {"user": "svc", "port": "5432", "tls": "true"}
    assert digest(backend.read_value("pairs", 1)) == digest(expected)
    info = backend.read_metadata("pairs").version_info(1)
    assert info is not None and info.is_map and info.keys == ("user", "port", "tls")
    # a foreign version is numbered after the last, and secretfs continues from there
    aws.put_secret_value(SecretId=PREFIX + "plain", SecretString=token().decode())
    assert backend.read_metadata("plain").current_version == 2
    assert backend.write_version("plain", token()) == 3
    assert stages(aws, "plain")[3] == {"AWSCURRENT"}


def test_labels_are_staging_labels(backend: AwsBackend, aws: Any) -> None:
    for _ in range(3):
        backend.write_version("db", token())
    assert stages(aws, "db") == {3: {"AWSCURRENT"}, 2: {"AWSPREVIOUS"}}
    pending = backend.write_version("db", token(), label=Label.PENDING)
    assert pending == 4
    assert stages(aws, "db") == {3: {"AWSCURRENT"}, 2: {"AWSPREVIOUS"}, 4: {"AWSPENDING"}}
    current = aws.get_secret_value(SecretId=PREFIX + "db")  # what an AWS client reads
    assert token_number(current["VersionId"]) == 3
    with pytest.raises(ConflictError):
        backend.write_version("db", token(), label=Label.PENDING)


def test_a_rotation_promotes_pending(backend: AwsBackend, aws: Any) -> None:
    backend.write_version("db", token())
    backend.write_version("db", token())
    new = token()
    pending = backend.write_version("db", new, label=Label.PENDING)
    backend.update_labels("db", {Label.CURRENT: pending, Label.PREVIOUS: 2, Label.PENDING: None},
                          expect={Label.CURRENT: 2, Label.PENDING: pending})
    assert stages(aws, "db") == {3: {"AWSCURRENT"}, 2: {"AWSPREVIOUS"}}
    assert digest(aws.get_secret_value(SecretId=PREFIX + "db", VersionStage="AWSCURRENT")[
        "SecretBinary"]) == digest(new)
    # moving current alone leaves previous where it was (AWS would move it: it is put back)
    backend.update_labels("db", {Label.CURRENT: 1})
    assert backend.read_metadata("db").labels == {Label.CURRENT: 1, Label.PREVIOUS: 2}
    with pytest.raises(ConflictError):
        backend.update_labels("db", {Label.CURRENT: 3}, expect={Label.CURRENT: 3})
    with pytest.raises(UsageError):
        backend.update_labels("db", {Label.CURRENT: None})


def test_check_and_set(backend: AwsBackend) -> None:
    assert backend.write_version("db", token(), cas=0) == 1
    with pytest.raises(ConflictError):
        backend.write_version("db", token(), cas=0)
    assert backend.write_version("db", token(), cas=1) == 2
    with pytest.raises(ConflictError):
        backend.write_version("db", token(), cas=1)


def test_delete_restore_and_destroy(backend: AwsBackend, aws: Any) -> None:
    value = token()
    backend.write_version("db", value)
    backend.delete("db")
    assert "DeletedDate" in aws.describe_secret(SecretId=PREFIX + "db")  # recoverable in AWS
    assert backend.list_names() == []
    with pytest.raises(SecretNotFound):
        backend.read_value("db", 1)
    backend.undelete("db")
    assert digest(backend.read_value("db", 1)) == digest(value)
    backend.destroy("db")
    with pytest.raises(aws.exceptions.ResourceNotFoundException):
        aws.describe_secret(SecretId=PREFIX + "db")
    with pytest.raises(SecretNotFound):
        backend.read_metadata("db")


def test_one_version_is_hidden_not_erased(backend: AwsBackend, aws: Any) -> None:
    backend.write_version("db", token())
    backend.write_version("db", token())
    backend.delete("db", 1)
    with pytest.raises(VersionNotFound):
        backend.read_value("db", 1)
    with pytest.raises(UsageError):
        backend.destroy("db", 2)
    backend.undelete("db", 1)
    assert backend.read_value("db", 1)


def test_metadata_is_native_and_internal_tags_reserved(backend: AwsBackend, aws: Any) -> None:
    policy = RotationPolicy(interval=86400.0, generator=GeneratorSpec(length=64),
                            set_cmd="/usr/local/bin/apply " + "x" * 400)  # > one tag value
    backend.write_version("db", token(), metadata=MetadataUpdate(
        description="the db", tags={"env": "prod"}, rotation=policy))
    described = aws.describe_secret(SecretId=PREFIX + "db")
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert described["Description"] == "the db" and tags["env"] == "prod"
    assert "secretfs:rotation.1" in tags  # split over several tag values
    assert backend.read_metadata("db").rotation == policy
    assert dict(backend.read_metadata("db").tags) == {"env": "prod"}
    with pytest.raises(UsageError):
        backend.update_metadata("db", MetadataUpdate(tags={"secretfs:rotation": "x"}))


def test_old_versions_beyond_max_are_hidden(backend: AwsBackend) -> None:
    for _ in range(8):
        backend.write_version("db", token())
    assert [v.version for v in backend.read_metadata("db").versions] == [4, 5, 6, 7, 8]
    with pytest.raises(VersionNotFound):
        backend.read_value("db", 2)


def test_list_with_prefix(backend: AwsBackend, aws: Any) -> None:
    aws.create_secret(Name="elsewhere/db", SecretString="x")  # outside the prefix: unseen
    aws.create_secret(Name=PREFIX + "bad name", SecretString="x")  # not a secretfs name
    for name in ("db", "api/a", "api/b", "API/c"):
        backend.write_version(name, token())
    assert backend.list_names() == ["API/c", "api/a", "api/b", "db"]
    assert backend.list_names("api/") == ["api/a", "api/b"]  # AWS matches case-insensitively
    assert [m.name for m in backend.list("api")] == ["api/a", "api/b"]


def test_unreachable_endpoint_is_backend_unavailable() -> None:
    backend = AwsBackend(region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}",
                         timeout=1.0)
    with pytest.raises(BackendUnavailable) as caught:
        backend.read_metadata("db")
    assert caught.value.exit_code == 5
    assert "\n" not in str(caught.value)
    with pytest.raises(BackendUnavailable):
        backend.write_version("db", b"never-shown")
    assert "never-shown" not in str(caught.value)


def test_factory(moto_endpoint: str) -> None:  # noqa: F811
    config = Config(manager=ManagerConfig(backend=BackendConfig(
        type="aws", max_versions=3, options=MappingProxyType(
            {"region": REGION, "endpoint_url": moto_endpoint, "prefix": "p/"}))))
    backend = open_aws(config, create=True)
    assert backend.kind == "aws" and backend.prefix == "p/" and backend.max_versions == 3
    backend.write_version("x", token())
    assert backend.list_names() == ["x"]
