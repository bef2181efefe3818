"""`secretfs secrets check-access`: the seed's policy example gives the seed's answers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import SEED_POLICY, Store, make_store, one_line_error

INSIDE = ("--address", "10.1.2.3", "--at", "2026-01-05T10:00")


@pytest.fixture
def seeded(tmp_path: Path) -> Store:
    store = make_store(tmp_path / "s")
    store.config.write_text(store.config.read_text() + SEED_POLICY)
    return store


def check(store: Store, *args: str) -> tuple[int, str]:
    result = store.cli("secrets", "check-access", *args)
    return result.returncode, result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--action", "read", "--resource", "db_password", *INSIDE), 0, "allow: allow rule"),
        (("--action", "read", "--resource", "api_keys/x", *INSIDE), 0, "allow"),
        (("--action", "write", "--resource", "db_password", *INSIDE), 1, "deny: no allow rule"),
        (("--action", "delete", "--resource", "anything", *INSIDE), 1, "deny: deny rule"),
        (("--action", "read", "--resource", "db_password", "--address", "10.1.2.3",
          "--at", "2026-01-05T08:59"), 1, "time_window 09:00-17:00 not met"),
        (("--action", "read", "--resource", "db_password", "--address", "10.1.2.3",
          "--at", "2026-01-05T17:00"), 1, "time_window"),
        (("--action", "read", "--resource", "db_password", "--address", "192.168.1.5",
          "--at", "2026-01-05T10:00"), 1, "ip_range"),
    ],
)
def test_the_seed_policy_gives_the_seed_answers(seeded: Store, args: tuple[str, ...],
                                                code: int, says: str) -> None:
    got, text = check(seeded, "--principal", "service-a", *args)
    assert got == code, text
    assert says in text and "principal: service-a" in text


def test_a_uid_is_mapped_to_its_principal(seeded: Store) -> None:
    got, text = check(seeded, "--uid", "1001", "--action", "read", "--resource", "db_password",
                      *INSIDE)
    assert got == 0 and "principal: service-a" in text
    got, text = check(seeded, "--uid", "4242", "--action", "read", "--resource", "db_password",
                      *INSIDE)
    assert got == 1 and "principal: anonymous" in text


def test_a_running_process_is_evaluated_as_the_filesystem_would(seeded: Store) -> None:
    sleeper = subprocess.Popen(["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups",
                                "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until setpriv has exec'd sleep as uid 1001
            status = Path(f"/proc/{sleeper.pid}/status").read_text()
            if "sleep" in status.split("\n", 1)[0] and "\t1001\t" in status:
                break
            time.sleep(0.02)
        got, text = check(seeded, "--pid", str(sleeper.pid), "--action", "read",
                          "--resource", "api_keys/x", "--at", "2026-01-05T10:00")
        # the sleeper lives in the host's network namespace: not inside 10.0.0.0/8
        assert got == 1 and "ip_range" in text and "principal: service-a" in text
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_policies_the_builtin_one_answers(tmp_path: Path) -> None:
    store = make_store(tmp_path / "plain")
    got, _ = check(store, "--uid", str(os.geteuid()), "--action", "read", "--resource", "x")
    assert got == 0
    got, text = check(store, "--uid", "4242", "--action", "read", "--resource", "x")
    assert got == 1 and "deny" in text


def test_usage_errors(seeded: Store) -> None:
    result = seeded.cli("secrets", "check-access", "--action", "read", "--resource", "x")
    assert result.returncode == 2 and "exactly one of" in one_line_error(result)
    result = seeded.cli("secrets", "check-access", "--principal", "service-a", "--action",
                        "read", "--resource", "x", "--at", "noon")
    assert result.returncode == 2 and "ISO time" in one_line_error(result)
