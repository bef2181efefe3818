"""References in environment values: where they come from, which ones a value holds, rendering.

A child's environment is assembled from three sources, highest precedence first: ``--env
NAME=TEXT``, ``--env-file F`` (dotenv syntax; a later file wins over an earlier one), and the
inherited environment. Each variable's text is then one of:

- a whole reference, ``secretfs://db/latest/password``: replaced by the value;
- a template holding ``{{ secretfs://… }}`` placeholders: each placeholder replaced;
- anything else: passed through unchanged.

Pure text handling: nothing here reads a secret (resolve.py does), so it is cheap to import and
easy to test.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from secretfs.errors import UsageError
from secretfs.model import SecretRef

PREFIX = "secretfs://"
MAX_ENV_FILE_BYTES = 1024 * 1024  # far above what an environment can hold (execve: ~2 MiB total)
PLACEHOLDER = re.compile(r"\{\{\s*(secretfs://[^\s{}]*)\s*\}\}")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Binding(NamedTuple):
    """One variable of the child's environment as written, before any secret is read."""

    name: str
    text: str
    source: str  # "--env", "FILE:LINE" or "environment": said in every error about it
    refs: tuple[SecretRef, ...]  # the references it holds, in order (empty: passes through)
    whole: bool  # the text is one reference, replaced entirely

    @property
    def is_secret(self) -> bool:
        return bool(self.refs)


def _parse_ref(text: str, name: str, source: str) -> SecretRef:
    try:
        return SecretRef.parse(text)
    except UsageError as error:
        raise UsageError(f"{name} ({source}): {error.what}", error.fix) from None


def bind(name: str, text: str, source: str) -> Binding:
    """Classify *text*: a whole reference, a template, or plain text."""
    stripped = text.strip()
    if stripped.startswith(PREFIX) and "{{" not in stripped:
        return Binding(name, text, source, (_parse_ref(stripped, name, source),), True)
    refs = tuple(_parse_ref(m[1], name, source) for m in PLACEHOLDER.finditer(text))
    return Binding(name, text, source, refs, False)


def render(binding: Binding, values: Mapping[SecretRef, str]) -> str:
    """The text the child gets: the value, the template filled in, or the text as it was."""
    if binding.whole:
        return values[binding.refs[0]]
    if not binding.refs:
        return binding.text
    return PLACEHOLDER.sub(lambda m: values[SecretRef.parse(m[1])], binding.text)


def render_template(text: str, values: Mapping[SecretRef, str]) -> str:
    """Fill the ``{{ secretfs://… }}`` placeholders of a template file's text."""
    return PLACEHOLDER.sub(lambda m: values[SecretRef.parse(m[1])], text)


def template_refs(text: str, source: str) -> tuple[SecretRef, ...]:
    """The references of a template file's placeholders, in order, each once."""
    found: dict[SecretRef, None] = {}
    line, counted = 1, 0  # lines are counted as the matches go: linear, not quadratic
    for match in PLACEHOLDER.finditer(text):
        line += text.count("\n", counted, match.start())
        counted = match.start()
        found[_parse_ref(match[1], "placeholder", f"{source}:{line}")] = None
    return tuple(found)


# -- dotenv ---------------------------------------------------------------------------------------

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def parse_dotenv(text: str, source: str) -> list[tuple[str, str, int]]:
    """``(name, value, line)`` for each assignment of a dotenv file, in file order.

    The syntax docker compose, python-dotenv and direnv agree on: ``NAME=value``, optional
    ``export`` before the name, blank lines and ``#`` comments; an unquoted value ends at
    `` #`` and is stripped; ``'single'`` quotes are literal; ``"double"`` quotes understand
    ``\\n \\r \\t \\" \\\\ \\$`` and may span lines. No variable expansion: a ``$`` is a ``$``.
    A line that is none of these is an error naming *source* and the line.
    """
    out: list[tuple[str, str, int]] = []
    pos, line, end = 0, 1, len(text)
    while pos < end:
        newline = text.find("\n", pos)
        stop = end if newline < 0 else newline
        raw = text[pos:stop]
        start_line = line
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            pos, line = stop + 1, line + 1
            continue
        body = raw.lstrip()
        if body.startswith("export") and body[6:7] in (" ", "\t"):
            body = body[6:].lstrip()
        match = NAME.match(body)
        if match is None or "=" not in body[match.end():].lstrip()[:1]:
            raise UsageError(f"{source}:{start_line}: not a NAME=value line",
                             "dotenv syntax: NAME=value, # comments, optional 'export'")
        name = match[0]
        rest = body[match.end():].lstrip()[1:].lstrip(" \t")
        offset = stop - len(rest)  # where the value starts in *text*
        if rest.startswith(("'", '"')):
            quote = rest[0]
            value, after = _quoted(text, offset + 1, quote, source, start_line)
            tail_end = text.find("\n", after)
            tail_end = end if tail_end < 0 else tail_end
            tail = text[after:tail_end].strip()
            if tail and not tail.startswith("#"):
                raise UsageError(f"{source}:{start_line}: text after the closing quote of {name}")
            line += text.count("\n", pos, tail_end) + 1
            pos = tail_end + 1
        else:
            comment = rest.find(" #")
            value = (rest if comment < 0 else rest[:comment]).strip()
            pos, line = stop + 1, line + 1
        out.append((name, value, start_line))
    return out


def _quoted(text: str, at: int, quote: str, source: str, line: int) -> tuple[str, int]:
    """The value of a quoted string whose body starts at *at*, and the index after its close."""
    chars: list[str] = []
    i = at
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(chars), i + 1
        if c == "\\" and quote == '"' and i + 1 < len(text):
            chars.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
            i += 2
            continue
        chars.append(c)
        i += 1
    raise UsageError(f"{source}:{line}: the quote opened here is never closed")


# -- assembling the child's environment -----------------------------------------------------------


def _assignment(item: str) -> tuple[str, str]:
    name, sep, text = item.partition("=")
    if not sep or NAME.fullmatch(name) is None:
        raise UsageError(f"--env {name.split('=')[0][:40]!r}: expected NAME=REFERENCE",
                         "e.g. --env DB_PASSWORD=secretfs://db/latest/password")
    return name, text


def collect(env: Sequence[str], env_files: Sequence[Path | str],
            environ: Mapping[str, str]) -> dict[str, Binding]:
    """Every variable of the child's environment, each from its highest-precedence source."""
    bindings = {name: bind(name, text, "environment") for name, text in environ.items()}
    for file in env_files:
        path = Path(file)
        try:
            with open(path, "rb") as handle:  # bounded: --env-file /dev/zero must not eat memory
                data = handle.read(MAX_ENV_FILE_BYTES + 1)
        except OSError as error:
            raise UsageError(f"--env-file {path}: {error.strerror or error}") from None
        if len(data) > MAX_ENV_FILE_BYTES:
            raise UsageError(f"--env-file {path}: larger than 1 MiB",
                             "an environment cannot hold that much; is it the right file?")
        try:  # newlines translated as read_text() does
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError:
            raise UsageError(f"--env-file {path}: not UTF-8 text") from None
        for name, value, line in parse_dotenv(text, str(path)):
            bindings[name] = bind(name, value, f"{path}:{line}")
    for item in env:
        name, text = _assignment(item)
        bindings[name] = bind(name, text, "--env")
    return bindings


def references(bindings: Iterable[Binding]) -> tuple[SecretRef, ...]:
    """Every reference the bindings hold, each once, in order of first appearance."""
    found: dict[SecretRef, None] = {}
    for binding in bindings:
        for ref in binding.refs:
            found[ref] = None
    return tuple(found)


__all__ = [
    "PREFIX", "Binding", "bind", "collect", "parse_dotenv", "references", "render",
    "render_template", "template_refs",
]
