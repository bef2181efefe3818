"""References in environment values and dotenv files (injector.refs)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from injector.refs import bind, collect, parse_dotenv, references, render, template_refs
from secretfs.errors import UsageError
from secretfs.model import SecretRef

DB = SecretRef.parse("db/latest/password")


def test_a_whole_reference_is_replaced_and_plain_text_passes() -> None:
    whole = bind("DB", "secretfs://db/latest/password", "--env")
    assert whole.whole and whole.refs == (DB,)
    assert render(whole, {DB: "pw"}) == "pw"
    plain = bind("HOME", "/root", "environment")
    assert not plain.is_secret and render(plain, {}) == "/root"
    # mentioning the scheme in passing is not a reference
    assert not bind("DOC", "see secretfs:// docs", "environment").is_secret


def test_templates_fill_each_placeholder() -> None:
    text = "postgres://{{ secretfs://db/latest/user }}:{{secretfs://db/latest/password}}@db/app"
    binding = bind("DATABASE_URL", text, "--env")
    user = SecretRef.parse("db/latest/user")
    assert not binding.whole and binding.refs == (user, DB)
    assert render(binding, {user: "app", DB: "pw"}) == "postgres://app:pw@db/app"


def test_a_bad_reference_names_the_variable_and_its_source() -> None:
    with pytest.raises(UsageError) as caught:
        bind("DB", "secretfs://db//x", "app.env:3")
    assert caught.value.exit_code == 2 and "DB (app.env:3)" in str(caught.value)


def test_precedence_env_over_file_over_environment(tmp_path: Path) -> None:
    first = tmp_path / "a.env"
    first.write_text("A=secretfs://a\nB=from-a\n")
    second = tmp_path / "b.env"
    second.write_text("B=from-b\n")
    found = collect(["A=secretfs://z"], [first, second], {"A": "inherited", "C": "c"})
    assert found["A"].refs == (SecretRef.parse("z"),) and found["A"].source == "--env"
    assert found["B"].text == "from-b" and found["B"].source == f"{second}:1"
    assert found["C"].text == "c" and found["C"].source == "environment"
    assert references(found.values()) == (SecretRef.parse("z"),)


def test_dotenv_syntax() -> None:
    text = (
        "# a comment\n"
        "\n"
        "export A=plain value # trailing comment\n"
        "B='single # not a comment \\n'\n"
        'C="double\\nline \\"q\\" $HOME"\n'
        "D = spaced\n"
        'E="two\nlines"\n'
        "F=\n"
        "G=a#b\n"
    )
    assert parse_dotenv(text, "x.env") == [
        ("A", "plain value", 3), ("B", "single # not a comment \\n", 4),
        ("C", 'double\nline "q" $HOME', 5), ("D", "spaced", 6), ("E", "two\nlines", 7),
        ("F", "", 9), ("G", "a#b", 10),
    ]


@pytest.mark.parametrize("line", ["NOEQUALS", "1A=x", 'A="never closed', "A='x' junk"])
def test_dotenv_errors_name_the_file_and_line(line: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_dotenv(f"OK=1\n{line}\n", "app.env")
    assert "app.env:2" in str(caught.value)


def _double_quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
values = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r"),
                 max_size=30)


@given(st.lists(st.tuples(names, values), max_size=8), st.booleans())
def test_dotenv_round_trips_double_quoted_values(pairs: list[tuple[str, str]],
                                                 export: bool) -> None:
    text = "".join(f"{'export ' if export else ''}{name}={_double_quoted(value)}\n"
                   for name, value in pairs)
    assert [(n, v) for n, v, _ in parse_dotenv(text, "f")] == pairs


@given(st.lists(st.tuples(names, st.text(alphabet=string.ascii_letters + string.digits + "-_./:",
                                         max_size=20)), max_size=8))
def test_dotenv_unquoted_simple_values(pairs: list[tuple[str, str]]) -> None:
    text = "".join(f"{name}={value}\n" for name, value in pairs)
    assert [(n, v) for n, v, _ in parse_dotenv(text, "f")] == pairs


def test_template_refs_are_listed_once_with_the_line_of_a_bad_one() -> None:
    text = "a: {{ secretfs://db/latest/password }}\nb: {{ secretfs://db/latest/password }}\n"
    assert template_refs(text, "t.yaml") == (DB,)
    with pytest.raises(UsageError) as caught:
        template_refs("ok\n{{ secretfs://bad//ref }}\n", "t.yaml")
    assert "t.yaml:2" in str(caught.value)
