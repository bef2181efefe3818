"""New secret values, drawn from the operating system's CSPRNG (the ``secrets`` module) only."""

from __future__ import annotations

import secrets
import string

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
MIN_LENGTH = 1
MAX_LENGTH = 4096


def check_spec(spec: GeneratorSpec) -> GeneratorSpec:
    """Reject a generator that cannot draw (unknown charset, length out of range)."""
    if spec.charset not in CHARSETS:
        raise UsageError(
            f"unknown charset {spec.charset!r}", f"choose one of: {', '.join(CHARSETS)}"
        )
    if not MIN_LENGTH <= spec.length <= MAX_LENGTH:
        raise UsageError(
            f"length {spec.length} is out of range", f"choose {MIN_LENGTH} to {MAX_LENGTH}"
        )
    return spec


def generate(spec: GeneratorSpec) -> str:
    """A fresh value of ``spec.length`` characters, each drawn uniformly from the charset."""
    alphabet = CHARSETS[check_spec(spec).charset]
    return "".join(secrets.choice(alphabet) for _ in range(spec.length))
