"""New secret values, drawn from the operating system's CSPRNG (the ``secrets`` module) only.

A ``GeneratorSpec`` names one of three kinds of value:

* ``text``: ``length`` characters, each drawn uniformly from an alphabet: a named charset or
  ``custom:<characters>``, minus ``exclude`` and (optionally) ``AMBIGUOUS``. With
  ``require_each`` the value also holds at least one character of every class the charset
  contains, and is still uniform over all such values (see ``generate``).
* ``bytes``: ``length`` random bytes, returned base64-encoded (standard alphabet, padded). A
  value is text: rotated single-value secrets are stored and compared as text, written to set
  and validate hooks on stdin, and injected into environment variables, which cannot hold NUL
  bytes. Base64 keeps every byte value possible and decodes back exactly.
* ``uuid``: a random (version 4) UUID in its usual 36-character form; ``length`` and
  ``charset`` are ignored.

``random`` is never used: its generator is predictable from its output.
"""

from __future__ import annotations

import base64
import itertools
import secrets
import string
import uuid

from secretfs.errors import UsageError
from secretfs.model import GeneratorSpec

CHARSETS: dict[str, str] = {
    "alnum": string.ascii_letters + string.digits,
    "alpha": string.ascii_letters,
    "numeric": string.digits,
    "hex": "0123456789abcdef",
    "symbols": string.ascii_letters + string.digits + "!#$%&()*+,-.:;<=>?@[]^_{|}~",
    "base64": string.ascii_letters + string.digits + "+/",
}
CUSTOM_PREFIX = "custom:"
KINDS = ("text", "bytes", "uuid")
MIN_LENGTH = 1
MAX_LENGTH = 4096

# Characters a person easily misreads or mistypes when a value is read off a screen or paper:
# capital I, lower-case l, digit 1 and the bar |; capital O, digit 0 and lower-case o; and the
# backtick and both quotes, which look alike and also break shell quoting when pasted.
AMBIGUOUS = "Il1|O0o`'\""

# The classes ``require_each`` asks for. They are ASCII classes because that is what password
# rules ("an upper-case letter, a digit, a symbol") check; every other character, including a
# non-ASCII letter, counts as a symbol.
CHARACTER_CLASSES: dict[str, str] = {
    "lowercase": string.ascii_lowercase,
    "uppercase": string.ascii_uppercase,
    "digits": string.digits,
}
SYMBOLS_CLASS = "symbols"

# ``require_each`` redraws until a value holds every class; refuse a spec where a single draw
# succeeds less often than this (on average more than 1,000 draws per value). Realistic specs
# are far above it: 32 ``symbols`` characters succeed with probability > 0.99.
MIN_REQUIRE_EACH_ODDS = 1e-3

_BASE64_CHARACTERS = string.ascii_letters + string.digits + "+/="
_UUID_CHARACTERS = "0123456789abcdef-"


def character_class(character: str) -> str:
    """The ``require_each`` class of one character (see ``CHARACTER_CLASSES``)."""
    for name, members in CHARACTER_CLASSES.items():
        if character in members:
            return name
    return SYMBOLS_CLASS


def _base_characters(charset: str) -> str:
    """The characters a charset names, before exclusions; UsageError if it names none."""
    if charset.startswith(CUSTOM_PREFIX):
        characters = charset[len(CUSTOM_PREFIX):]
        if len(set(characters)) < 2:
            raise UsageError(
                f"charset {charset!r} has fewer than 2 distinct characters",
                "list at least 2 characters after 'custom:', e.g. 'custom:abc123'",
            )
        unprintable = sorted({c for c in characters if not c.isprintable()})
        if unprintable:
            # Newlines, tabs and NULs in a secret break env vars, files read line by line and
            # shell quoting, and cannot be told apart on screen.
            raise UsageError(
                f"charset {charset!r} has unprintable characters {''.join(unprintable)!r}",
                "use printable characters only",
            )
        return characters
    if charset not in CHARSETS:
        raise UsageError(
            f"unknown charset {charset!r}",
            f"choose one of: {', '.join(CHARSETS)}, or custom:<characters>",
        )
    return CHARSETS[charset]


def _unknown_kind(kind: str) -> UsageError:
    return UsageError(f"unknown generator kind {kind!r}", f"choose one of: {', '.join(KINDS)}")


def _excluded(spec: GeneratorSpec) -> set[str]:
    return set(spec.exclude) | (set(AMBIGUOUS) if spec.exclude_ambiguous else set())


def alphabet(spec: GeneratorSpec) -> str:
    """Every character a value of ``spec`` may contain, sorted and without duplicates.

    For ``text`` that is the charset minus the exclusions, which may leave too few characters:
    ``check_spec`` decides whether the spec can draw. For ``bytes`` and ``uuid`` it is the
    characters of their encodings. UsageError for an unknown kind or charset.
    """
    if spec.kind == "bytes":
        return "".join(sorted(set(_BASE64_CHARACTERS)))
    if spec.kind == "uuid":
        return "".join(sorted(set(_UUID_CHARACTERS)))
    if spec.kind != "text":
        raise _unknown_kind(spec.kind)
    return "".join(sorted(set(_base_characters(spec.charset)) - _excluded(spec)))


def _required_classes(spec: GeneratorSpec, characters: str) -> dict[str, str]:
    """Class name -> its characters in ``characters``, for every class the charset contains.

    The classes come from the charset *before* exclusions, so excluding a whole class is an
    error rather than a silent weakening of ``require_each``; the characters are those left.
    """
    wanted = {character_class(c) for c in _base_characters(spec.charset)}
    present: dict[str, str] = {name: "" for name in (*CHARACTER_CLASSES, SYMBOLS_CLASS)}
    for c in characters:
        present[character_class(c)] += c
    return {name: members for name, members in present.items() if name in wanted}


def _odds_all_present(size: int, class_sizes: list[int], length: int) -> float:
    """Probability that ``length`` uniform draws from ``size`` characters hit every class.

    Inclusion–exclusion over the (at most four) classes: add or subtract the probability that
    every draw avoids a given set of classes.
    """
    odds = 0.0
    for count in range(len(class_sizes) + 1):
        for missed in itertools.combinations(class_sizes, count):
            odds += (-1) ** count * ((size - sum(missed)) / size) ** length
    return odds


def check_spec(spec: GeneratorSpec) -> GeneratorSpec:
    """Reject a spec that cannot draw a value, or could only draw one by breaking a promise.

    Called before a spec is stored (so a bad one fails at ``put``, not at 3 a.m. in a scheduled
    rotation) and again by ``generate``. Returns the spec unchanged.
    """
    if spec.kind not in KINDS:
        raise _unknown_kind(spec.kind)
    if spec.kind != "uuid" and not MIN_LENGTH <= spec.length <= MAX_LENGTH:
        raise UsageError(
            f"length {spec.length} is out of range", f"choose {MIN_LENGTH} to {MAX_LENGTH}"
        )
    if spec.kind != "text":
        # These options promise something about the characters; the encoding of bytes and
        # UUIDs fixes those, so accepting the options would be a promise not kept.
        options = [
            name
            for name in ("require_each", "exclude", "exclude_ambiguous")
            if getattr(spec, name)
        ]
        if options:
            raise UsageError(
                f"{', '.join(options)} cannot apply to generator kind {spec.kind!r}",
                "use kind 'text' to choose characters",
            )
        return spec

    characters = alphabet(spec)
    if len(characters) < 2:
        # One character left makes every value the same string: no secret at all.
        raise UsageError(
            f"charset {spec.charset!r} leaves {len(characters)} character(s) after exclusions",
            "exclude fewer characters; a value needs at least 2 to choose from",
        )
    if spec.require_each:
        classes = _required_classes(spec, characters)
        emptied = [name for name, members in classes.items() if not members]
        if emptied:
            raise UsageError(
                f"require_each needs {' and '.join(emptied)}, but the exclusions removed every "
                f"one from charset {spec.charset!r}",
                "exclude fewer characters, or turn off require_each",
            )
        if spec.length < len(classes):
            raise UsageError(
                f"require_each needs {len(classes)} classes ({', '.join(classes)}) "
                f"but length is {spec.length}",
                f"choose a length of at least {len(classes)}",
            )
        sizes = [len(members) for members in classes.values()]
        if _odds_all_present(len(characters), sizes, spec.length) < MIN_REQUIRE_EACH_ODDS:
            rare = min(classes, key=lambda name: len(classes[name]))
            raise UsageError(
                f"require_each is too unlikely to be met: charset {spec.charset!r} has only "
                f"{len(classes[rare])} of {len(characters)} characters in class {rare}",
                "choose a longer length or a more balanced charset",
            )
    return spec


def generate(spec: GeneratorSpec) -> str:
    """A fresh value drawn as ``spec`` says (see the module docstring); UsageError if bad.

    With ``require_each``, whole values are drawn uniformly and rejected until one holds every
    class. That is the uniform distribution over exactly the valid values. The shortcut of
    drawing one character per class and shuffling it into the rest is not: a value counts once
    for every way to pick its "forced" characters, so values with many characters of a class
    come out more often (for ``custom:ab1``, length 4, "ab11" is 4/3 as likely as "a111"),
    which an attacker can exploit. ``check_spec`` bounds the expected number of redraws.
    """
    check_spec(spec)
    if spec.kind == "uuid":
        # uuid.uuid4() reads os.urandom; building it from secrets keeps one source of randomness.
        return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
    if spec.kind == "bytes":
        return base64.b64encode(secrets.token_bytes(spec.length)).decode("ascii")

    characters = alphabet(spec)
    classes = list(_required_classes(spec, characters).values()) if spec.require_each else []
    while True:
        value = "".join(secrets.choice(characters) for _ in range(spec.length))
        drawn = set(value)
        if all(not drawn.isdisjoint(members) for members in classes):
            return value
