"""The grammar: names, keys, versions, references, values, durations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secretfs.errors import InvalidName, InvalidReference, KeyNotFound, UsageError, ValueTooLarge
from secretfs.model import (
    MAX_VALUE_BYTES,
    Label,
    RotationPolicy,
    Secret,
    SecretRef,
    format_duration,
    normalize_value,
    parse_duration,
    validate_name,
    value_of_key,
)

segment_chars = st.sampled_from("abcXYZ019._-")
segments = st.text(segment_chars, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.isdigit()
    and s not in ("latest", "current", "previous", "pending") and s != ".secretfs"
)
names = st.lists(segments, min_size=1, max_size=4).map("/".join)
versions = st.one_of(st.integers(1, 10**6), st.sampled_from(list(Label)))
keys = st.one_of(st.none(), segments)


@pytest.mark.parametrize("name", ["db_password", "api_keys/stripe", "a.b-c_d/E.9", "x" * 128])
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../x", "'..' is not allowed"),
        ("a//b", "empty segment"),
        ("", "empty"),
        ("/a", "empty segment"),
        ("a/", "empty segment"),
        ("x" * 600, "longer than 512 bytes"),
        ("a/" + "y" * 129, "longer than 128 bytes"),
        ("a\x00b", "NUL"),
        ("a b", "character ' ' is not allowed"),
        ("ünïcode", "is not allowed"),
        ("apps/2024/key", "segment '2024' is reserved"),
        ("db/latest", "segment 'latest' is reserved"),
        (".secretfs/health", "'.secretfs' is reserved"),
    ],
)
def test_invalid_names_say_why(name: str, why: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    assert why in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "name", "version", "key"),
    [
        ("db", "db", Label.CURRENT, None),
        ("db/1/value", "db", 1, "value"),
        ("db/latest", "db", Label.CURRENT, None),
        ("db/current/password", "db", Label.CURRENT, "password"),
        ("secretfs://db/previous", "db", Label.PREVIOUS, None),
        ("secretfs://db/pending/value", "db", Label.PENDING, "value"),
        ("secretfs://api_keys/stripe/latest/secret", "api_keys/stripe", Label.CURRENT, "secret"),
        ("api_keys/stripe/12", "api_keys/stripe", 12, None),
    ],
)
def test_references_parse(text: str, name: str, version: object, key: str | None) -> None:
    ref = SecretRef.parse(text)
    assert (ref.name, ref.version, ref.key) == (name, version, key)


@pytest.mark.parametrize(
    "text", ["", "secretfs://", "db/1/a/b", "vault://db", "db/0", "db/01/value", "latest",
             "db//1", "secretfs://../x/latest", "db/1/..", "db/latest/a\x00"],
)
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        SecretRef.parse(text)
    assert caught.value.exit_code == 2


@given(names, versions, keys)
def test_reference_round_trips(name: str, version: int | Label, key: str | None) -> None:
    ref = SecretRef(name, version, key)
    assert SecretRef.parse(str(ref)) == ref
    assert SecretRef.parse(ref.path) == ref


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_usage_error(text: str) -> None:
    try:
        ref = SecretRef.parse(text)
    except InvalidReference as error:
        assert error.exit_code == 2
    else:  # whatever parses has one canonical form
        assert SecretRef.parse(str(ref)) == ref


def test_latest_is_written_as_latest() -> None:
    assert str(SecretRef.parse("secretfs://db/current/password")) == "secretfs://db/latest/password"


def test_values_normalize_and_respect_limits() -> None:
    assert normalize_value("pw") == b"pw"
    assert normalize_value(b"\x00\xff") == b"\x00\xff"
    assert normalize_value({"user": "app", "port": 5432, "tls": True}) == {
        "user": "app", "port": "5432", "tls": "true"}
    with pytest.raises(ValueTooLarge):
        normalize_value(b"x" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(ValueTooLarge):
        normalize_value({f"k{i}": "v" for i in range(257)})
    with pytest.raises(UsageError, match="nested"):
        normalize_value({"a": {"b": "c"}})
    with pytest.raises(InvalidName):
        normalize_value({"bad key": "v"})


def test_keys_of_values() -> None:
    assert value_of_key(b"pw", None, "db") == b"pw"
    assert value_of_key(b"pw", "value", "db") == b"pw"
    assert value_of_key({"user": "app"}, "user", "db") == b"app"
    assert value_of_key({"user": "app"}, None, "db") == b'{"user":"app"}'
    with pytest.raises(KeyNotFound, match="its keys are: user"):
        value_of_key({"user": "app"}, "password", "db")
    with pytest.raises(KeyNotFound):
        value_of_key(b"pw", "password", "db")


def test_secret_repr_hides_the_value() -> None:
    secret = Secret("db", "hunter2-not-shown")
    assert "hunter2" not in repr(secret)
    assert secret.text() == "hunter2-not-shown"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300s", 300), ("15m", 900), ("1h", 3600), ("90d", 7776000), ("1h30m", 5400),
     ("2w", 1209600), ("500ms", 0.5), ("45", 45), (30, 30)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "1x", "h", "-5s", "1h 30m", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)  # type: ignore[arg-type]


@given(st.integers(0, 10**9))
def test_duration_format_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_rotation_policy_round_trips_through_json() -> None:
    policy = RotationPolicy(interval=86400.0, overlap=3600.0, set_cmd="apply", key="password")
    assert RotationPolicy.from_json(policy.to_json()) == policy
