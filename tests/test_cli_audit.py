"""One-shot commands are audited like the mount: one line each, same chain, fail closed."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import Store, make_store, one_line_error
from tests.mounting import mounted


def fresh() -> str:
    return "v-" + os.urandom(12).hex()


def records(store: Store) -> list[dict]:
    log = store.root / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_each_command_writes_exactly_one_line_and_never_a_value(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first, second = fresh(), fresh()
    commands = [
        (("secrets", "put", "db", first), "put", "write", "db"),
        (("secrets", "put", "db", "--", second), "put", "write", "db"),
        (("secrets", "get", "db"), "read", "read", "db"),
        (("secrets", "get", "db/1"), "read", "read", "db"),
        (("secrets", "list"), "list", "list", "/"),
        (("secrets", "info", "db"), "info", "list", "db"),
        (("secrets", "rm", "db", "--version", "1"), "delete", "delete", "db"),
        (("secrets", "undelete", "db", "--version", "1"), "undelete", "delete", "db"),
    ]
    for argv, event, action, resource in commands:
        before = len(records(store))
        store.cli(*argv, check=True)
        after = records(store)
        assert len(after) == before + 1, argv
        line = after[-1]
        assert (line["event"], line["action"], line["resource"]) == (event, action, resource)
        assert line["decision"] == "allow" and line["principal"] == "root"
        who = line["caller"]
        assert who["uid"] == os.geteuid() and who["pid"] > 0 and who["exe"]
        assert who["user"] == pwd.getpwuid(os.geteuid()).pw_name
    text = (store.root / "audit.log").read_text()
    assert first not in text and second not in text
    assert store.cli("audit", "verify").returncode == 0


POLICY = """\
principals:
  operator: { uid: 0 }
policies:
  operator:
    allow:
      - { action: [read, list], resources: ["*"] }
"""


def test_a_policy_that_matches_the_cli_user_decides_and_a_denial_is_one_line(
        tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.put("db", fresh())
    with store.config.open("a") as config:
        config.write(POLICY)
    before = len(records(store))
    refused = store.cli("secrets", "put", "db", fresh())
    assert refused.returncode == 4, refused.stderr
    assert "operator may not write 'db'" in one_line_error(refused)
    lines = records(store)[before:]
    assert [(r["event"], r["principal"], r["decision"]) for r in lines] == [
        ("denied", "operator", "deny")]
    assert store.cli("secrets", "get", "db").returncode == 0
    assert records(store)[-1]["event"] == "read"


def test_with_policies_for_others_the_key_holder_stays_administrator(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.config.open("a") as config:
        config.write("principals:\n  app: { uid: 4242 }\npolicies:\n"
                     "  app: { allow: [ { action: read, resources: [\"*\"] } ] }\n")
    store.cli("secrets", "put", "db", fresh(), check=True)
    line = records(store)[-1]
    assert (line["event"], line["principal"], line["decision"]) == ("put", "root", "allow")


def test_an_unwritable_audit_log_refuses_the_command_unless_fail_open(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    value = fresh()
    store.put("db", value)
    text = store.config.read_text()
    # the audit folder is a file: nothing can be written under it, not even by root
    (tmp_path / "blocked").write_text("")
    store.config.write_text(text.replace("audit: { path: audit.log }",
                                         "audit: { path: blocked/audit.log }"))
    refused = store.cli("secrets", "get", "db")
    assert refused.returncode == 1 and value.encode() not in refused.stdout
    assert "audit log" in one_line_error(refused)
    store.config.write_text(text.replace("audit: { path: audit.log }",
                                         "audit: { path: blocked/audit.log, fail_open: true }"))
    allowed = store.cli("secrets", "get", "db")
    assert allowed.returncode == 0 and allowed.stdout == value.encode()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="real mounts need root and /dev/fuse")
def test_the_daemon_and_cli_commands_append_to_one_intact_chain(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    store.put("db", fresh())
    start = len(records(store))
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            target = mount.path / "db/latest/value"
            for round_ in range(5):
                target.read_bytes()  # buffered in the daemon...
                store.cli("secrets", "put", f"other{round_}", fresh(), check=True)  # ...CLI too
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    new = records(store)[start:]
    assert sorted(r["event"] for r in new if r["event"] in ("read", "put")) == \
        ["put"] * 5 + ["read"] * 5
    verified = store.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout
