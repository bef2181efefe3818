"""Generated values: every promise a GeneratorSpec makes, checked over random specs.

The oracles here restate the rules independently of rotation/generate.py (which characters a
charset names, which class a character is in), so a bug there is not mirrored in the test.
"""

from __future__ import annotations

import ast
import base64
import binascii
import collections
import inspect
import json
import string
import uuid
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secretfs.errors import UsageError
from secretfs.model import GeneratorSpec
from secretfs.rotation import generate as generate_module
from secretfs.rotation.generate import (
    AMBIGUOUS,
    CHARSETS,
    MAX_LENGTH,
    alphabet,
    check_spec,
    generate,
)

# -- independent oracles ----------------------------------------------------------------------

CLASSES = {
    "lowercase": set(string.ascii_lowercase),
    "uppercase": set(string.ascii_uppercase),
    "digits": set(string.digits),
}


def class_of(character: str) -> str:
    return next((name for name, members in CLASSES.items() if character in members), "symbols")


def base_characters(charset: str) -> str:
    return CHARSETS[charset] if charset in CHARSETS else charset.removeprefix("custom:")


def excluded(spec: GeneratorSpec) -> set[str]:
    return set(spec.exclude) | (set(AMBIGUOUS) if spec.exclude_ambiguous else set())


def plainly_invalid(spec: GeneratorSpec) -> bool:
    """True when a rule anyone can check by hand rejects the spec (not the odds guard)."""
    base = base_characters(spec.charset)
    if spec.charset not in CHARSETS and (
        not spec.charset.startswith("custom:")
        or len(set(base)) < 2
        or not all(c.isprintable() for c in base)
    ):
        return True
    if not 1 <= spec.length <= 4096:
        return True
    left = set(base) - excluded(spec)
    if len(left) < 2:
        return True
    if spec.require_each:
        wanted = {class_of(c) for c in base}
        if len(wanted) > spec.length or wanted - {class_of(c) for c in left}:
            return True
    return False


# -- strategies -------------------------------------------------------------------------------

CUSTOM_POOL = string.ascii_letters + string.digits + string.punctuation + " éß€"
custom_charsets = st.text(st.sampled_from(CUSTOM_POOL + "\n\t"), max_size=12).map(
    lambda characters: "custom:" + characters
)
charsets = st.one_of(st.sampled_from(sorted(CHARSETS)), custom_charsets)


@st.composite
def text_specs(draw: st.DrawFn) -> GeneratorSpec:
    charset = draw(charsets)
    # Exclusions mostly from the charset itself (so they bite), sometimes from outside it.
    pool = base_characters(charset) + AMBIGUOUS + "~"
    return GeneratorSpec(
        kind="text",
        length=draw(st.integers(1, 200)),
        charset=charset,
        require_each=draw(st.booleans()),
        exclude=draw(st.text(st.sampled_from(pool), max_size=10)),
        exclude_ambiguous=draw(st.booleans()),
    )


def drawn(spec: GeneratorSpec) -> str | None:
    """A value of ``spec``, or None after checking that a rejected spec is rejected properly."""
    try:
        check_spec(spec)
    except UsageError as error:
        assert error.what, "a rejection must say what is wrong"
        assert error.fix, "a rejection must say how to fix it"
        assert error.exit_code == 2
        return None
    assert not plainly_invalid(spec), f"check_spec accepted {spec}"
    return generate(spec)


# -- properties over random text specs --------------------------------------------------------


@given(text_specs())
def test_check_spec_accepts_exactly_the_drawable_specs(spec: GeneratorSpec) -> None:
    try:
        check_spec(spec)
    except UsageError:
        # Only the odds guard may reject a spec the hand-checkable rules allow, and it only
        # ever concerns require_each.
        assert plainly_invalid(spec) or spec.require_each
    else:
        assert not plainly_invalid(spec)


@given(text_specs())
def test_value_has_exactly_the_asked_length(spec: GeneratorSpec) -> None:
    value = drawn(spec)
    if value is not None:
        assert len(value) == spec.length


@given(text_specs())
def test_value_uses_only_characters_of_the_alphabet(spec: GeneratorSpec) -> None:
    value = drawn(spec)
    if value is not None:
        characters = alphabet(spec)
        assert set(value) <= set(characters)
        assert characters == "".join(sorted(set(characters))), "sorted, no duplicates"
        assert set(characters) == set(base_characters(spec.charset)) - excluded(spec)


@given(text_specs())
def test_value_never_contains_an_excluded_or_ambiguous_character(spec: GeneratorSpec) -> None:
    value = drawn(spec)
    if value is not None:
        assert not set(value) & set(spec.exclude)
        if spec.exclude_ambiguous:
            assert not set(value) & set(AMBIGUOUS)


@given(text_specs().map(lambda spec: GeneratorSpec(**{**spec.to_json(), "require_each": True})))
def test_require_each_puts_every_class_of_the_charset_in_the_value(spec: GeneratorSpec) -> None:
    value = drawn(spec)
    if value is not None:
        wanted = {class_of(c) for c in base_characters(spec.charset)}
        assert {class_of(c) for c in value} == wanted


# -- fixed cases ------------------------------------------------------------------------------


def test_ambiguous_set_is_the_documented_one() -> None:
    assert set(AMBIGUOUS) == set("Il1O0o`'\"|")
    spec = GeneratorSpec(charset="symbols", exclude_ambiguous=True)
    assert not set(alphabet(spec)) & set(AMBIGUOUS)


def test_old_two_field_callers_draw_what_they_always_did() -> None:
    value = generate(GeneratorSpec(length=40, charset="hex"))
    assert len(value) == 40
    assert set(value) <= set("0123456789abcdef")
    assert GeneratorSpec(20, "numeric").length == 20  # positional order kept


def test_custom_charset_alphabet_is_sorted_and_deduplicated() -> None:
    assert alphabet(GeneratorSpec(charset="custom:bba1a:")) == "1:ab"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (GeneratorSpec(kind="words"), "unknown generator kind 'words'"),
        (GeneratorSpec(charset="emoji"), "unknown charset 'emoji'"),
        (GeneratorSpec(length=0), "length 0 is out of range"),
        (GeneratorSpec(length=MAX_LENGTH + 1), "out of range"),
        (GeneratorSpec(kind="bytes", length=0), "out of range"),
        (GeneratorSpec(charset="custom:"), "fewer than 2 distinct"),
        (GeneratorSpec(charset="custom:aaaa"), "fewer than 2 distinct"),
        (GeneratorSpec(charset="custom:ab\n"), "unprintable"),
        (GeneratorSpec(charset="numeric", exclude="0123456789"), "leaves 0 character(s)"),
        (GeneratorSpec(charset="custom:ab", exclude="b"), "leaves 1 character(s)"),
        (GeneratorSpec(charset="custom:aA1!", length=3, require_each=True), "length is 3"),
        (GeneratorSpec(charset="alnum", exclude=string.digits, require_each=True), "digits"),
        (
            GeneratorSpec(charset="custom:ab1", exclude_ambiguous=True, require_each=True),
            "require_each needs digits",
        ),
        (
            GeneratorSpec(charset="symbols", exclude=string.ascii_uppercase, require_each=True),
            "uppercase",
        ),
        (GeneratorSpec(charset="custom:a1é", length=2, require_each=True), "length is 2"),
        (
            GeneratorSpec(
                charset="custom:aA1" + "".join(chr(0x410 + i) for i in range(60)),
                length=4,
                require_each=True,
            ),
            "too unlikely",
        ),
        (GeneratorSpec(kind="uuid", exclude="a"), "exclude cannot apply"),
        (GeneratorSpec(kind="bytes", require_each=True), "require_each cannot apply"),
    ],
)
def test_check_spec_says_what_is_wrong(spec: GeneratorSpec, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_spec(spec)
    assert says in str(caught.value)
    with pytest.raises(UsageError):
        generate(spec)


def test_ten_thousand_default_values_are_all_different() -> None:
    values = [generate(GeneratorSpec()) for _ in range(10_000)]
    assert len(set(values)) == len(values)


def test_ten_thousand_uuids_are_all_different() -> None:
    values = [generate(GeneratorSpec(kind="uuid")) for _ in range(10_000)]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("spec", [GeneratorSpec(kind="uuid"), GeneratorSpec(kind="uuid", length=0)])
def test_uuid_values_are_random_version_4(spec: GeneratorSpec) -> None:
    for _ in range(100):
        value = generate(spec)
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert value == str(parsed), "canonical lower-case 8-4-4-4-12 form"
        assert set(value) <= set(alphabet(spec))


@given(st.one_of(st.integers(1, 300), st.sampled_from([MAX_LENGTH])))
@settings(max_examples=60)
def test_bytes_values_decode_to_exactly_length_bytes(length: int) -> None:
    spec = GeneratorSpec(kind="bytes", length=length)
    value = generate(spec)
    try:
        raw = base64.b64decode(value, validate=True)  # standard alphabet, padding required
    except binascii.Error:
        pytest.fail(f"not standard padded base64: {value!r}")
    assert len(raw) == length
    assert base64.b64encode(raw).decode() == value
    assert set(value) <= set(alphabet(spec))


def test_bytes_values_are_not_all_alike() -> None:
    values = {generate(GeneratorSpec(kind="bytes", length=16)) for _ in range(1000)}
    assert len(values) == 1000


# -- require_each does not bias ---------------------------------------------------------------


def test_require_each_is_uniform_over_the_six_permutations() -> None:
    # One character per class (lowercase, uppercase, digits), so the only valid values of
    # length 3 are the six permutations. (custom:ab1 would not do: a and b are one class.)
    spec = GeneratorSpec(charset="custom:aA1", length=3, require_each=True)
    counts = collections.Counter(generate(spec) for _ in range(6_000))
    assert set(counts) == {"".join(p) for p in permutations("aA1")}
    for value, count in counts.items():
        # expected 1,000, standard deviation ≈ 29: ±300 is over 10 σ, so never flaky
        assert 700 <= count <= 1_300, (value, count)


def test_require_each_does_not_favour_values_with_more_forced_characters() -> None:
    # custom:ab1, length 4, require_each: of the 64 valid values (at least one of a/b, at least
    # one 1), 24 have exactly two 1s, so a uniform draw has them 37.5% of the time. "Draw one of
    # each class, fill, shuffle" weights each value by (#letters × #digits) and gives 44.4%.
    spec = GeneratorSpec(charset="custom:ab1", length=4, require_each=True)
    draws = 8_000
    two_digits = sum(generate(spec).count("1") == 2 for _ in range(draws))
    # standard deviation of the share ≈ 0.0054: ±0.03 is 5.5 σ; the biased share is 12 σ away
    assert abs(two_digits / draws - 0.375) < 0.03, two_digits / draws


# -- storage ----------------------------------------------------------------------------------


def test_from_json_of_an_old_record_takes_defaults_for_new_fields() -> None:
    spec = GeneratorSpec.from_json({"length": 20, "charset": "hex"})
    assert spec == GeneratorSpec(
        length=20,
        charset="hex",
        kind="text",
        require_each=False,
        exclude="",
        exclude_ambiguous=False,
    )
    assert GeneratorSpec.from_json({}) == GeneratorSpec()


@given(
    st.builds(
        GeneratorSpec,
        length=st.integers(1, MAX_LENGTH),
        charset=charsets,
        kind=st.sampled_from(["text", "bytes", "uuid"]),
        require_each=st.booleans(),
        exclude=st.text(max_size=10),
        exclude_ambiguous=st.booleans(),
    )
)
def test_to_json_from_json_round_trip(spec: GeneratorSpec) -> None:
    stored = json.loads(json.dumps(spec.to_json()))
    assert set(stored) == {
        "kind", "length", "charset", "require_each", "exclude", "exclude_ambiguous"
    }
    assert GeneratorSpec.from_json(stored) == spec


# -- randomness source ------------------------------------------------------------------------


def test_generate_never_imports_random() -> None:
    tree = ast.parse(inspect.getsource(generate_module))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "random" not in imported
    assert "secrets" in imported
