"""A throw-away PostgreSQL server for tests that rotate a real role's password.

``running_postgres()`` makes a fresh cluster with Debian's binaries
(``/usr/lib/postgresql/<ver>/bin``) in a temp folder, listening on 127.0.0.1 on a free port
with SCRAM password auth, and always stops it (``pg_ctl stop -m immediate``) and removes the
folder. It never touches the package's own ``main`` cluster (port 5432) and works whether that
one runs or not.

PostgreSQL refuses to run as root: as root, ``initdb``/``pg_ctl`` run as the ``postgres`` system
user (``setpriv``), and the data folder lives in ``$TMPDIR`` (pytest's ``tmp_path`` is under a
root-only 0700 folder that user cannot enter). As any other user they run as that user.

Passwords travel only on psql's stdin or in ``PGPASSWORD`` in a child's environment, never on a
command line, and are never printed.

Use the ``postgres_server`` fixture (``from tests.postgres import postgres_server``) or the
context manager; tests skip when the binaries are missing (``requires_postgres``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port

SERVER_USER = "postgres"
"""The system user the server runs as when the tests run as root (made by Debian's package)."""

SUPERUSER = "postgres"
"""The cluster's bootstrap superuser."""

START_TIMEOUT = 30  # seconds for pg_ctl start -w


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding initdb, pg_ctl and psql, else None."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    found = [
        path for path in Path("/usr/lib/postgresql").glob("*/bin")
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql"))
    ]
    return max(found, key=version) if found else None


def why_unavailable() -> str | None:
    """Why a throw-away server cannot be run here (a skip reason), or None when it can."""
    if find_bindir() is None:
        return "PostgreSQL binaries not installed (apt-get install postgresql; make system-deps)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} system user to run the server"
        if shutil.which("setpriv") is None:
            return "running as root and setpriv (util-linux) is missing"
    return None


requires_postgres = pytest.mark.skipif(why_unavailable() is not None,
                                       reason=why_unavailable() or "")
"""Mark for tests that need a real server: they skip cleanly when it cannot run here."""


def sql_literal(text: str) -> str:
    """``text`` as an SQL string literal (standard_conforming_strings is on, the default)."""
    if "\0" in text:
        raise ValueError("PostgreSQL strings cannot hold NUL")
    return "'" + text.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    if "\0" in name:
        raise ValueError("PostgreSQL identifiers cannot hold NUL")
    return '"' + name.replace('"', '""') + '"'


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without libpq's PG* variables (so the caller's own settings,
    e.g. a PGPASSFILE or PGSERVICE, cannot change what a test connects to), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra or {})
    return env


@dataclass
class PostgresServer:
    """A running throw-away cluster. Connect over TCP to ``host``:``port`` with a password."""

    host: str
    port: int
    bindir: Path
    root: Path  # the temp folder: data/, sock/, server.log
    superuser: str
    superuser_password: str = field(repr=False)
    admin_passfile: Path | None = None  # a 0600 file holding superuser_password, if one was made

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def superuser_dsn(self) -> str:
        """A libpq URI for the superuser, *without* the password (give it as PGPASSWORD)."""
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/postgres"

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def psql(self, sql: str, *, user: str | None = None, password: str | None = None,
             dbname: str = "postgres", env: Mapping[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` (on psql's stdin, ON_ERROR_STOP on, unaligned tuples-only output) as
        ``user`` (default the superuser, with its password) over TCP; the password goes in
        PGPASSWORD in psql's environment. Returns the CompletedProcess; never raises on failure."""
        if user is None:
            user = self.superuser
            password = self.superuser_password if password is None else password
        extra = {"PGCONNECT_TIMEOUT": "5", **(env or {})}
        if password is not None:
            extra["PGPASSWORD"] = password
        return subprocess.run(
            [self.tool("psql"), "-X", "-q", "-w", "-At", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname],
            input=sql, capture_output=True, text=True, env=client_env(extra), timeout=timeout,
            check=False,
        )

    def query(self, sql: str) -> str:
        """Run ``sql`` as the superuser and return its output; raise (without echoing the SQL,
        which may hold a password) if it fails."""
        done = self.psql(sql)
        if done.returncode != 0:
            raise RuntimeError(f"psql as superuser failed: {last_line(done.stderr)}")
        return done.stdout.strip()

    def create_role(self, name: str, password: str, *, login: bool = True) -> None:
        """Create role ``name`` with ``password`` (CREATE ROLE ... PASSWORD, SQL on stdin)."""
        self.query(f"CREATE ROLE {sql_identifier(name)} {'LOGIN' if login else 'NOLOGIN'} "
                   f"PASSWORD {sql_literal(password)};")

    def can_login(self, user: str, password: str) -> bool:
        """Whether ``user`` can log in over TCP with ``password`` (and run ``select 1``)."""
        done = self.psql("select 1", user=user, password=password)
        return done.returncode == 0 and done.stdout.strip() == "1"

    def admin_env(self, *, passfile: bool = False) -> dict[str, str]:
        """The examples' admin variables: PGHOST, PGPORT, PGADMIN_USER and PGADMIN_PASSWORD
        (or PGADMIN_PASSFILE, when ``passfile`` and the server has one)."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGADMIN_USER": self.superuser}
        if passfile:
            if self.admin_passfile is None:
                raise RuntimeError("this server was started without an admin passfile")
            env["PGADMIN_PASSFILE"] = str(self.admin_passfile)
        else:
            env["PGADMIN_PASSWORD"] = self.superuser_password
        return env


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _as_server_user() -> list[str]:
    """The command prefix that runs a server tool as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups",
            "--inh-caps=-all", "--"]


def _server_env() -> dict[str, str]:
    env = client_env({"LC_ALL": "C", "LANG": "C", "TZ": "UTC"})
    if os.geteuid() == 0:
        env["HOME"] = pwd.getpwnam(SERVER_USER).pw_dir
        env["USER"] = env["LOGNAME"] = SERVER_USER
    return env


def _run_as_server(root: Path, argv: list[str], timeout: float = 60) -> None:
    done = subprocess.run(_as_server_user() + argv, cwd=root, env=_server_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): "
                           f"{last_line(done.stderr or done.stdout)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no server log)"


SERVER_CONF = """
# secretfs test cluster
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sock}'
unix_socket_permissions = 0700
max_connections = 20
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
# never write statements (which may hold passwords) to the server log
log_statement = 'none'
log_min_error_statement = panic
"""


@contextlib.contextmanager
def running_postgres(client_dir: Path | None = None, *, attempts: int = 3
                     ) -> Iterator[PostgresServer]:
    """Start a throw-away cluster and yield it; always stop it and remove its folder.

    ``client_dir`` (e.g. pytest's ``tmp_path``), when given, gets ``admin.pass``: a 0600 file
    holding the superuser password, for ``PGADMIN_PASSFILE``. Raises RuntimeError if the server
    cannot be started (callers that want to skip check ``why_unavailable()`` first)."""
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="secretfs-pg-"))  # 0700
    server: PostgresServer | None = None
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(root, user.pw_uid, user.pw_gid)
        password = secrets.token_urlsafe(24)
        # initdb as the server user; the superuser password via a 0600 file it removes after
        pwfile = root / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        (root / "sock").mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(root / "sock", user.pw_uid, user.pw_gid)
        try:
            _run_as_server(root, [
                str(bindir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER,
                f"--pwfile={pwfile}", "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256", "--no-locale", "--encoding=UTF8", "--no-sync",
                "--no-instructions",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        server = PostgresServer(host="127.0.0.1", port=0, bindir=bindir, root=root,
                                superuser=SUPERUSER, superuser_password=password)
        for attempt in range(1, attempts + 1):
            server.port = free_port()
            conf = server.datadir / "postgresql.conf"
            text = conf.read_text().split("\n# secretfs test cluster\n")[0]
            conf.write_text(text + SERVER_CONF.format(port=server.port, sock=server.socket_dir))
            try:
                _run_as_server(root, [
                    str(bindir / "pg_ctl"), "start", "-D", str(server.datadir), "-w",
                    "-t", str(START_TIMEOUT), "-l", str(server.log_file),
                ], timeout=START_TIMEOUT + 10)
                break
            except RuntimeError as error:
                # the port may have been taken between free_port() and the bind: try another
                if attempt == attempts or "could not bind" not in _tail(server.log_file, 20):
                    raise RuntimeError(f"{error}; server log: {_tail(server.log_file)}") from None
        _wait_accepting(server)
        if client_dir is not None:
            passfile = Path(client_dir) / "admin.pass"
            passfile.touch(mode=0o600)
            passfile.write_text(password + "\n")
            server.admin_passfile = passfile
        yield server
    finally:
        if server is not None and (server.datadir / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                _run_as_server(root, [str(bindir / "pg_ctl"), "stop", "-D",
                                      str(server.datadir), "-m", "immediate", "-w"])
        shutil.rmtree(root, ignore_errors=True)


def _wait_accepting(server: PostgresServer, timeout: float = START_TIMEOUT) -> None:
    """Wait until the superuser can really log in over TCP (pg_ctl -w only pings)."""
    deadline = time.monotonic() + timeout
    while True:
        done = server.psql("select 1")
        if done.returncode == 0 and done.stdout.strip() == "1":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on port {server.port} does not accept logins: "
                               f"{last_line(done.stderr)}")
        time.sleep(0.1)


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL server for one test; skips when it cannot run here."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_postgres(tmp_path) as server:
        yield server
