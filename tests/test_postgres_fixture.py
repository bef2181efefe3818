"""The throw-away PostgreSQL fixture, and examples/postgres' rotation hooks against a real server.

Passwords here are made per test run; assertions compare them only as booleans so that a failure
never prints one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.helpers import Store, free_port, make_store
from tests.postgres import (
    PostgresServer,
    client_env,
    postgres_server,  # noqa: F401  (a fixture)
    requires_postgres,
    running_postgres,
)

pytestmark = requires_postgres

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "postgres"
SET = EXAMPLES / "set-password.sh"
VALIDATE = EXAMPLES / "validate-login.sh"


def new_password(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(18)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with running_postgres(tmp_path_factory.mktemp("pg-client")) as server:
        yield server


@pytest.fixture
def role(pg: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh role name per test (the server is shared by the module)."""
    return "app_" + re.sub(r"\W", "_", request.node.name)[:40]


def hook(script: Path, value: str, env: Mapping[str, str], *, prefix: tuple[str, ...] = ()
         ) -> subprocess.CompletedProcess[str]:
    """Run a hook as secretfs does: a shell command, the value on stdin, SECRETFS_* in its env."""
    full = client_env({"SECRETFS_NAME": "db", "SECRETFS_VERSION": "2",
                       "SECRETFS_KEY": "password", **env})
    return subprocess.run([*prefix, "sh", "-c", str(script)], input=value, text=True,
                          capture_output=True, env=full, timeout=60, check=False)


def validate_env(pg: PostgresServer, role: str) -> dict[str, str]:
    return {"PGHOST": pg.host, "PGPORT": str(pg.port), "PGROLE": role}


def set_env(pg: PostgresServer, role: str, *, passfile: bool = False) -> dict[str, str]:
    return {**pg.admin_env(passfile=passfile), "PGROLE": role}


def one_clean_line(done: subprocess.CompletedProcess[str], *secret_values: str) -> bool:
    """The hook failed with exactly one stderr line, naming none of the secret values."""
    lines = done.stderr.strip().splitlines()
    return (done.returncode != 0 and len(lines) == 1
            and not any(value in done.stderr or value in done.stdout for value in secret_values))


# -- the fixture -------------------------------------------------------------------------------

def test_fixture_listens_on_loopback_with_password_auth(pg: PostgresServer) -> None:
    assert pg.host == "127.0.0.1" and pg.port != 5432
    assert pg.query("show listen_addresses") == "127.0.0.1"
    assert pg.query("show port") == str(pg.port)
    assert Path(pg.query("show unix_socket_directories")) == pg.socket_dir
    assert pg.socket_dir.is_relative_to(pg.root)
    assert pg.query("show password_encryption") == "scram-sha-256"
    hba = pg.query("select distinct type || ':' || auth_method from pg_hba_file_rules")
    assert set(hba.split()) == {"local:scram-sha-256", "host:scram-sha-256"}
    assert pg.superuser_dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert not pg.can_login(pg.superuser, new_password())  # a password is really required
    assert pg.admin_passfile is not None and pg.admin_passfile.stat().st_mode & 0o077 == 0


def test_fixture_runs_the_server_unprivileged(pg: PostgresServer) -> None:
    pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    owner = Path(f"/proc/{pid}").stat().st_uid
    assert owner != 0
    if os.geteuid() != 0:
        assert owner == os.geteuid()


def test_create_role_and_login(pg: PostgresServer, role: str) -> None:
    password = new_password()
    pg.create_role(role, password)
    assert pg.can_login(role, password)
    assert not pg.can_login(role, new_password())
    assert pg.psql("select current_user", user=role, password=password).stdout.strip() == role


def test_fixture_stops_the_server_and_removes_its_folder(tmp_path: Path) -> None:
    with running_postgres(tmp_path) as server:
        root, port = server.root, server.port
        assert root.is_dir()
    assert not root.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_the_pytest_fixture(postgres_server: PostgresServer) -> None:  # noqa: F811
    assert postgres_server.query("select 1") == "1"


# -- the example hooks -------------------------------------------------------------------------

def test_validate_login(pg: PostgresServer, role: str) -> None:
    good, bad = new_password(), new_password()
    pg.create_role(role, good)
    ok = hook(VALIDATE, good, validate_env(pg, role))
    assert ok.returncode == 0, ok.stderr
    wrong = hook(VALIDATE, bad, validate_env(pg, role))
    assert one_clean_line(wrong, good, bad), wrong.stderr
    assert "password authentication failed" in wrong.stderr
    assert hook(VALIDATE, good + "\n", validate_env(pg, role)).returncode == 0  # one \n dropped


def test_set_password_then_validate(pg: PostgresServer, role: str) -> None:
    old, new = new_password(), new_password()
    pg.create_role(role, old)
    done = hook(SET, new, set_env(pg, role))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert hook(VALIDATE, new, validate_env(pg, role)).returncode == 0
    assert hook(VALIDATE, old, validate_env(pg, role)).returncode != 0
    assert pg.can_login(role, new) and not pg.can_login(role, old)


@pytest.mark.parametrize("shape", [
    "it's",                          # a single quote
    "back\\slash\\",                 # backslashes, one at the end
    "q'\\'\"mix\"",                  # quotes and backslashes together
    ":'newpw' :\"role\" :role",      # psql variable syntax
    "$HOME `id` $(id) %s %% ;--",    # shell and printf syntax
    "two\nlines\r\tand tab",          # line breaks inside
    "ünïcødé ✓",
])
def test_set_password_quoting(pg: PostgresServer, role: str, shape: str) -> None:
    pg.create_role(role, new_password())
    password = new_password() + shape + new_password()
    done = hook(SET, password, set_env(pg, role))
    assert done.returncode == 0, done.stderr
    assert pg.can_login(role, password)
    assert hook(VALIDATE, password, validate_env(pg, role)).returncode == 0


def test_set_password_with_admin_passfile(pg: PostgresServer, role: str) -> None:
    pg.create_role(role, new_password())
    password = new_password()
    env = set_env(pg, role, passfile=True)
    assert "PGADMIN_PASSWORD" not in env
    done = hook(SET, password, env)
    assert done.returncode == 0, done.stderr
    assert pg.can_login(role, password)


def test_set_password_with_a_createrole_admin(pg: PostgresServer, role: str) -> None:
    admin, admin_password = role + "_admin", new_password()
    pg.query(f'CREATE ROLE "{admin}" LOGIN CREATEROLE PASSWORD \'{admin_password}\'')
    pg.create_role(role, new_password())
    if int(pg.query("show server_version_num")) >= 160000:  # 16+: CREATEROLE needs ADMIN OPTION
        pg.query(f'GRANT "{role}" TO "{admin}" WITH ADMIN OPTION')
    password = new_password()
    env = {"PGHOST": pg.host, "PGPORT": str(pg.port), "PGADMIN_USER": admin,
           "PGADMIN_PASSWORD": admin_password, "PGROLE": role}
    done = hook(SET, password, env)
    assert done.returncode == 0, done.stderr
    assert pg.can_login(role, password)


def test_set_password_failures_are_one_clean_line(pg: PostgresServer, role: str) -> None:
    old, new = new_password(), new_password()
    pg.create_role(role, old)
    bad_admin = hook(SET, new, {**set_env(pg, role), "PGADMIN_PASSWORD": new_password()})
    assert one_clean_line(bad_admin, new), bad_admin.stderr
    assert "password authentication failed" in bad_admin.stderr
    missing_role = hook(SET, new, set_env(pg, role + "_missing"))
    assert one_clean_line(missing_role, new), missing_role.stderr
    assert "does not exist" in missing_role.stderr
    no_role = hook(SET, new, {**set_env(pg, role), "PGROLE": ""})
    assert one_clean_line(no_role, new) and "PGROLE" in no_role.stderr
    empty = hook(SET, "", set_env(pg, role))
    assert one_clean_line(empty) and "stdin" in empty.stderr
    assert pg.can_login(role, old)  # nothing changed


def test_validate_login_failures_are_one_clean_line(pg: PostgresServer, role: str) -> None:
    password = new_password()
    pg.create_role(role, password)
    no_role = hook(VALIDATE, password, {**validate_env(pg, role), "PGROLE": ""})
    assert one_clean_line(no_role, password) and "PGROLE" in no_role.stderr
    down = hook(VALIDATE, password, {**validate_env(pg, role), "PGPORT": str(free_port())})
    assert one_clean_line(down, password), down.stderr
    # a PGPASSWORD or passfile in the caller's environment is not tried instead
    env = {**validate_env(pg, role), "PGPASSWORD": password}
    assert hook(VALIDATE, new_password(), env).returncode != 0


# -- the password never reaches a command line -------------------------------------------------

def test_scripts_never_put_the_password_in_argv_by_their_text() -> None:
    for script, variable in ((SET, "newpw"), (VALIDATE, "pw")):
        text = script.read_text()
        assert "set -x" not in text.replace("set +x", "")
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r'"\$psql"|\bpsql\s+-', line):
                assert not re.search(r"\$\{?" + variable + r"\b", line), f"{script.name}:{number}"
            if re.search(r"\$\{?" + variable + r"\b", line):
                # only builtins touch it: read, printf, [[ ]], [ ], assignments and functions
                assert not re.search(r"\b(echo|cat|env|tee|sed|awk)\b", line), \
                    f"{script.name}:{number}"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_scripts_never_put_the_password_in_argv_under_strace(pg: PostgresServer, role: str,
                                                             tmp_path: Path) -> None:
    """Trace every execve of both hooks (and their children): no argv holds the password."""
    old, new = new_password("Old'\\"), new_password("New'\\")
    pg.create_role(role, old)
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    runs = (
        (SET, new, set_env(pg, role)),
        (VALIDATE, new, validate_env(pg, role)),
        (VALIDATE, old, validate_env(pg, role)),  # the failing path too
        (SET, new, {**set_env(pg, role), "PGADMIN_PASSWORD": new_password()}),
    )
    for index, (script, value, env) in enumerate(runs):
        trace = tmp_path / f"trace{index}"
        hook(script, value, env,
             prefix=("strace", "-f", "-qq", "-s", "65536", "-e", "trace=execve", "-o", str(trace)))
        text = trace.read_text()  # may hold the password: never let it reach a failure message
        saw_psql = re.search(r'execve\("[^"]*/psql"', text) is not None
        assert saw_psql, f"{script.name} run {index}: the trace shows no psql"
        forms = (value, value.replace("\\", "\\\\").replace('"', '\\"'), value.replace("'", ""))
        leaked = any(form in text for form in forms)
        assert not leaked, f"{script.name} run {index}: the password is in an execve argv"
    assert pg.can_login(role, new)


# -- secretfs itself rotates the role's password with the hooks ------------------------------

def _hook_commands(pg: PostgresServer, role: str, admin: str) -> tuple[str, str]:
    """--set-cmd and --validate-cmd as the README writes them (the admin password by file)."""
    where = f"PGROLE={role} PGHOST={pg.host} PGPORT={pg.port}"
    return (f"{where} PGADMIN_USER=postgres PGADMIN_PASSFILE={shlex.quote(admin)} "
            f"{shlex.quote(str(SET))}",
            f"{where} {shlex.quote(str(VALIDATE))}")


def _stored_password(store: Store) -> str:
    done = store.cli("secrets", "get", "db", check=True)
    return json.loads(done.stdout)["password"]


def test_secretfs_rotates_a_real_role_password(pg: PostgresServer, role: str,
                                               tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    first = new_password()
    pg.create_role(role, first)
    assert pg.admin_passfile is not None
    set_cmd, validate_cmd = _hook_commands(pg, role, str(pg.admin_passfile))
    store.put("db", "--key", f"user={role}", "--key", f"password={first}",
              "--rotate-every", "30d", "--overlap", "1h",
              "--set-cmd", set_cmd, "--validate-cmd", validate_cmd)

    done = store.cli("secrets", "rotate", "db")
    assert done.returncode == 0, done.stderr
    second = _stored_password(store)
    assert second != first
    assert pg.can_login(role, second) and not pg.can_login(role, first)

    # a failing set hook: secretfs reports one line without the value, and nothing changes
    broken = tmp_path / "wrong-admin.pass"
    broken.write_text(new_password() + "\n")
    broken.chmod(0o600)
    set_cmd, validate_cmd = _hook_commands(pg, role, str(broken))
    store.put("db", "--key", f"user={role}", "--key", f"password={second}",
              "--rotate-every", "30d", "--set-cmd", set_cmd, "--validate-cmd", validate_cmd)
    failed = store.cli("secrets", "rotate", "db")
    assert failed.returncode != 0
    message = failed.stderr.decode()
    assert message.count("\n") == 1 and "password authentication failed" in message, message
    assert second not in message
    assert _stored_password(store) == second
    assert pg.can_login(role, second)
