"""The `secretfs` command as users script it: values, references, errors, exit codes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Store, make_store, one_line_error


def fresh() -> str:
    """A value generated for this test only."""
    return secrets.token_hex(16)


def snapshot(store: Store) -> str:
    """Everything a user can observe about the store, values included (compared, never shown)."""
    listing = json.loads(store.cli("secrets", "list", "--json", check=True).stdout)
    state = []
    for item in listing:
        versions = json.loads(
            store.cli("secrets", "versions", item["name"], "--json", check=True).stdout
        )
        state.append((item, versions, store.get(item["name"] + "/latest").hex()))
    return json.dumps(state, sort_keys=True)


def test_put_and_get_a_string(store: Store) -> None:
    value = fresh()
    result = store.cli("secrets", "put", "db_password", value, check=True)
    assert result.stdout == b"db_password: version 1\n"
    assert store.get("db_password") == value.encode()  # exact bytes, no newline added


def test_a_value_starting_with_a_dash_goes_after_double_dash(store: Store) -> None:
    value = "-" + fresh()
    refused = store.cli("secrets", "put", "dash", value)
    assert refused.returncode == 2
    assert "after '--'" in one_line_error(refused) and value not in refused.stderr.decode()
    store.put("dash", "--", value)
    assert store.get("dash") == value.encode()


def test_put_bytes_from_a_file_with_nul_bytes(store: Store, tmp_path: Path) -> None:
    data = b"\x00" + os.urandom(300) + b"\x00\n"
    source = tmp_path / "blob"
    source.write_bytes(data)
    store.put("tls/key", "--from-file", str(source))
    assert store.get("tls/key/latest/value") == data


def test_put_from_stdin_drops_one_trailing_newline(store: Store) -> None:
    value = fresh()
    store.put("from_stdin", "--stdin", input=value.encode() + b"\n")
    assert store.get("from_stdin") == value.encode()


def test_map_values_by_key_and_by_json(store: Store) -> None:
    password = fresh()
    store.put("db", "--key", "user=app", "--key", f"password={password}")
    assert store.get("db/latest/user") == b"app"
    assert store.get("secretfs://db/latest/password") == password.encode()
    assert json.loads(store.get("db")) == {"user": "app", "password": password}
    store.put("svc", "--json-value", "--stdin",
              input=json.dumps({"token": password, "port": 443}).encode())
    assert store.get("svc/1/port") == b"443"


def test_each_put_is_a_new_version_and_labels_resolve(store: Store) -> None:
    first, second, third = fresh(), fresh(), fresh()
    for value in (first, second, third):
        store.put("db", value)
    assert store.get("db/1/value") == first.encode()
    assert store.get("db/latest") == third.encode()
    assert store.get("db/current/value") == third.encode()
    assert store.get("secretfs://db/previous") == second.encode()
    versions = json.loads(store.cli("secrets", "versions", "db", "--json", check=True).stdout)
    assert [v["version"] for v in versions] == [1, 2, 3]
    table = store.cli("secrets", "versions", "db", check=True).stdout.decode()
    assert "current" in table and "previous" in table


def test_generate_draws_a_value_of_the_asked_length(store: Store) -> None:
    store.put("gen", "--generate", "--length", "40", "--charset", "hex")
    value = store.get("gen")
    assert len(value) == 40 and set(value.decode()) <= set("0123456789abcdef")


def test_list_info_and_json(store: Store) -> None:
    store.put("api_keys/stripe", fresh(), "--description", "Stripe key", "--tag", "env=prod",
              "--rotate-every", "90d", "--overlap", "1h")
    store.put("db_password", fresh())
    assert store.cli("secrets", "list", check=True).stdout == b"api_keys/stripe\ndb_password\n"
    assert store.cli("secrets", "list", "--prefix", "api_keys/", check=True).stdout == (
        b"api_keys/stripe\n")
    listing = json.loads(store.cli("secrets", "list", "--json", check=True).stdout)
    assert listing[0]["tags"] == {"env": "prod"} and listing[0]["current_version"] == 1
    info = json.loads(store.cli("secrets", "info", "api_keys/stripe", "--json", check=True).stdout)
    assert info["description"] == "Stripe key"
    assert info["rotation"]["interval"] == 90 * 86400 and info["rotation"]["overlap"] == 3600
    assert info["next_rotation"] is not None and info["backend"] == "local"
    text = store.cli("secrets", "info", "api_keys/stripe", check=True).stdout.decode()
    assert "every 90d, overlap 1h" in text and "env=prod" in text


def test_info_never_shows_the_value(store: Store) -> None:
    value = fresh()
    store.put("db", value, "--description", "d")
    for args in (("info", "db"), ("info", "db", "--json"), ("list", "--json"),
                 ("versions", "db", "--json")):
        assert value.encode() not in store.cli("secrets", *args, check=True).stdout


def test_metadata_only_update_makes_no_version(store: Store) -> None:
    store.put("db", fresh())
    result = store.cli("secrets", "put", "db", "--description", "now described", check=True)
    assert b"no new version" in result.stdout
    info = json.loads(store.cli("secrets", "info", "db", "--json", check=True).stdout)
    assert info["description"] == "now described" and len(info["versions"]) == 1


def test_rm_undelete_and_destroy(store: Store) -> None:
    value = fresh()
    store.put("db", value)
    store.put("db", fresh())
    store.cli("secrets", "rm", "db", check=True)
    gone = store.cli("secrets", "get", "db")
    assert gone.returncode == 3 and "undelete" in one_line_error(gone)
    assert store.cli("secrets", "list", check=True).stdout == b""
    store.cli("secrets", "undelete", "db", check=True)
    store.cli("secrets", "rm", "db", "--version", "1", "--destroy", check=True)
    destroyed = store.cli("secrets", "get", "db/1")
    assert destroyed.returncode == 3 and "destroyed" in one_line_error(destroyed)
    store.cli("secrets", "rm", "db", "--destroy", check=True)
    assert store.cli("secrets", "get", "db").returncode == 3
    assert value.encode() not in b"".join(p.read_bytes() for p in store.files())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("secrets", "put", "../x", "v"), 2, "'..' is not allowed"),
        (("secrets", "put", "a//b", "v"), 2, "empty segment"),
        (("secrets", "put", "", "v"), 2, "it is empty"),
        (("secrets", "put", "n" * 600, "v"), 2, "longer than 512 bytes"),
        (("secrets", "get", "nope"), 3, "secret 'nope' not found"),
        (("secrets", "get", "db_password/7"), 3, "has no version 7"),
        (("secrets", "get", "db_password/latest/user"), 3, "has no key 'user'"),
        (("secrets", "get", "db_password/pending"), 3, "has no pending version"),
        (("secrets", "get", "db/1/a/b"), 2, "more than one key"),
        (("secrets", "put", "x", "v", "--key", "a=b"), 2, "not VALUE and --key"),
        (("secrets", "put", "x", "--rotate-every", "soon", "--generate"), 2, "not a duration"),
        (("secrets", "put", "x", "--rotate-schedule", "61 * * * *", "--generate"), 2,
         "invalid cron expression"),
        (("secrets", "put", "db_password", "v", "--cas", "5"), 1, "check-and-set failed"),
        (("secrets", "frobnicate"), 2, "invalid choice"),
        (("secrets", "info", "db_pasword"), 3, "did you mean 'db_password'?"),
    ],
)
def test_bad_input_gets_its_exit_code_and_one_line(
    store: Store, args: tuple[str, ...], code: int, message: str
) -> None:
    store.put("db_password", fresh())
    before = snapshot(store)
    result = store.cli(*args)
    assert result.returncode == code, result.stderr
    assert message in one_line_error(result)
    assert snapshot(store) == before


def test_a_nul_byte_in_a_name_is_refused(store: Store) -> None:
    # argv cannot carry NUL, so go through the Python API the CLI uses.
    code = ("import sys; from secretfs.cli import main; "
            "sys.exit(main(['secrets', 'put', 'a\\x00b', 'v']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=store.env())
    assert result.returncode == 2 and "NUL" in one_line_error(result)


def test_a_value_over_one_mebibyte_is_refused(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    before = snapshot(store)
    result = store.cli("secrets", "put", "big", "--from-file", str(big))
    assert result.returncode == 2 and "over the 1048576-byte limit" in one_line_error(result)
    assert snapshot(store) == before
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * (1024 * 1024))
    store.put("big", "--from-file", str(exact))
    assert len(store.get("big")) == 1024 * 1024


def test_a_malformed_config_names_the_line(store: Store) -> None:
    store.put("db", fresh())
    before = snapshot(store)
    good = store.config.read_text()
    store.config.write_text(good + "  cache: { ttl: soon }\n")
    result = store.cli("secrets", "get", "db")
    assert result.returncode == 7
    message = one_line_error(result)
    assert f"{store.config}:5:" in message and "ttl" in message
    store.config.write_text(good)
    assert snapshot(store) == before


def test_a_group_readable_key_file_is_refused(store: Store) -> None:
    store.put("db", fresh())
    store.key_file.chmod(0o640)
    result = store.cli("secrets", "get", "db")
    assert result.returncode == 8
    assert f"chmod 600 {store.key_file}" in one_line_error(result)
    store.key_file.chmod(0o600)


def test_a_wrong_master_key_exits_8_naming_the_key(store: Store, tmp_path: Path) -> None:
    value = fresh()
    store.put("db", value)
    original = store.key_file.read_bytes()
    store.key_file.unlink()
    other = make_store(tmp_path / "other")  # a store with a key of its own
    store.key_file.write_bytes(other.key_file.read_bytes())
    store.key_file.chmod(0o600)
    for args in (("secrets", "get", "db"), ("secrets", "put", "db", "v2")):
        result = store.cli(*args)
        assert result.returncode == 8
        message = one_line_error(result)
        assert "master key 'mk-" in message and value not in message
    store.key_file.write_bytes(original)
    assert store.get("db") == value.encode()
    assert store.cli("secrets", "versions", "db", "--json", check=True).stdout.count(
        b'"version"') == 1


def test_commands_before_init_say_how_to_start(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", init=False)
    result = store.cli("secrets", "get", "db")
    assert result.returncode == 8 and "secretfs init" in one_line_error(result)
    assert b"created store" in store.cli("init", check=True).stdout
    assert b"already initialised" in store.cli("init", check=True).stdout


def test_concurrent_puts_from_many_processes_lose_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path / "busy", max_versions=1000)
    script = (
        'for i in $(seq 50); do "$PYTHON" -m secretfs secrets put shared "w$W-$i" '
        '>/dev/null || exit 1; done'
    )
    workers = [
        subprocess.Popen(["bash", "-c", script],
                         env=store.env(PYTHON=sys.executable, W=str(w)), stderr=subprocess.PIPE)
        for w in range(8)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    versions = json.loads(store.cli("secrets", "versions", "shared", "--json", check=True).stdout)
    assert [v["version"] for v in versions] == list(range(1, 401))
    values = {store.get(f"shared/{n}") for n in (1, 200, 400)}
    assert len(values) == 3


def test_cas_rejects_a_stale_version(store: Store) -> None:
    store.put("db", fresh(), "--cas", "0")
    store.put("db", fresh(), "--cas", "1")
    result = store.cli("secrets", "put", "db", fresh(), "--cas", "1")
    assert result.returncode == 1
    assert "current version of 'db' is 2, not 1" in one_line_error(result)


def test_get_and_list_import_nothing_heavy(store: Store) -> None:
    store.put("db", fresh())
    for args in (("secrets", "get", "db"), ("secrets", "list")):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "secretfs", *args],
            capture_output=True, env=store.env(), check=True,
        )
        imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines()}
        for heavy in ("trio", "pyfuse3", "keyring", "croniter", "psutil", "yaml"):
            assert heavy not in imported, f"{' '.join(args)} imported {heavy}"


def test_the_passphrase_provider_end_to_end(tmp_path: Path) -> None:
    store = make_store(tmp_path / "pp", init=False)
    store.config.write_text(store.config.read_text().replace("provider: file",
                                                             "provider: passphrase"))
    passphrase = fresh()
    good = store.env(SECRETFS_PASSPHRASE=passphrase)
    store.cli("init", env=good, check=True)
    value = fresh()
    store.cli("secrets", "put", "db", value, env=good, check=True)
    assert store.cli("secrets", "get", "db", env=good, check=True).stdout == value.encode()
    wrong = store.cli("secrets", "get", "db", env=store.env(SECRETFS_PASSPHRASE=fresh()))
    assert wrong.returncode == 8 and "master key 'mk-" in one_line_error(wrong)
    missing = store.cli("secrets", "get", "db", env=store.env())
    assert missing.returncode == 8 and "SECRETFS_PASSPHRASE" in one_line_error(missing)
    assert passphrase.encode() not in b"".join(p.read_bytes() for p in store.root.iterdir())


@pytest.mark.parametrize("argv", [
    ["secrets", "get", "db/2/user"],
    ["--config", "secrets", "secrets", "put", "x", "--tag", "a=b", "--json"],
    ["secrets", "put", "x", "--", "-v"],
    ["--config=c.yaml", "secrets", "rm", "x", "--version", "2"],
    ["secrets", "check-access", "--uid", "5", "--action", "read", "--resource", "db"],
    ["audit", "tail", "-n", "3"],
    ["mount", "/mnt", "--foreground"],
])
def test_the_parser_built_for_one_command_parses_it_like_the_full_one(argv: list[str]) -> None:
    from secretfs.cli import build_parser

    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))
