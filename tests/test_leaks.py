"""No secret value where it does not belong (docs/security.md, "No values in logs, argv, env or
core dumps").

Two parts:

* **argv.** `secrets put NAME VALUE` and `--key K=V` put the value where `ps` and shell history
  show it: refused when standard input is a terminal (a real pseudo-terminal here), unless
  `--insecure-argv`; accepted from scripts (stdin not a terminal). `--stdin` at a terminal reads
  one line without echo.
* **A whole session, then grep.** Unique random values are stored every way there is, read
  (CLI, a real mount as root, a denied read as another uid), rotated, injected (`run`,
  `inject`), and made to fail on purpose (bad reference, missing secret, failed check-and-set,
  denied read, a rotation whose validate hook fails and echoes the value it got). Then every
  file of the store's folder (store.db and its WAL, the key, audit.log, mount.log), the
  daemon's log, its /proc environ and cmdline (read while it runs) and the stderr of every
  command — and the stdout of every command but those whose job is to print a value — are
  searched for every value, raw, hex and base64: zero hits. The daemon is also checked to be
  hardened: no core dumps, not dumpable, memory locked.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import Store, eventually, make_store, one_line_error
from tests.mounting import force_unmount, wait_until_answering

needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root and /dev/fuse")
OTHER_UID = 4242  # no principal, no policy: every read through the mount is denied
DAEMON_GID = 4242  # the daemon runs as root with this gid: see test_the_daemon_is_hardened


def token(label: str) -> str:
    """A value made for this test only, distinctive enough that a hit cannot be chance."""
    return f"LEAK-{label}-{secrets.token_hex(16)}"


# -- argv: refused at a terminal ------------------------------------------------------------------


@dataclass
class TerminalRun:
    code: int
    stdout: bytes
    stderr: bytes
    screen: bytes  # what the terminal displayed (the echo of what was typed, if any)


def on_terminal(store: Store, *args: str, typed: bytes | None = None) -> TerminalRun:
    """Run `secretfs ARGS` with a pseudo-terminal as its standard input (as when a person types
    the command); stdout and stderr are pipes. *typed* is typed once the prompt is shown."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "secretfs", *args], stdin=slave, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=store.env(), start_new_session=True,
        )
        os.close(slave)
        slave = -1
        stderr = b""
        if typed is not None:
            assert process.stderr is not None
            deadline = time.monotonic() + 30
            while b": " not in stderr and time.monotonic() < deadline:  # wait for the prompt
                ready, _, _ = select.select([process.stderr], [], [], 1)
                if ready:
                    stderr += os.read(process.stderr.fileno(), 4096)
            assert b"not shown" in stderr, stderr
            os.write(master, typed)
        out, err = process.communicate(timeout=60)
        screen = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            screen += chunk
        return TerminalRun(process.returncode, out, stderr + err, screen)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


@pytest.mark.parametrize("how", ["value", "key", "json"])
def test_a_value_on_the_command_line_is_refused_at_a_terminal(store: Store, how: str) -> None:
    value = token("argv")
    args = {
        "value": ["secrets", "put", "db", value],
        "key": ["secrets", "put", "db", "--key", "user=app", "--key", f"password={value}"],
        "json": ["secrets", "put", "db", json.dumps({"password": value}), "--json-value"],
    }[how]
    refused = on_terminal(store, *args)
    assert refused.code == 2
    message = one_line_error(subprocess.CompletedProcess(args, 2, refused.stdout,
                                                         refused.stderr))
    assert "shell history" in message and "--stdin" in message and "--insecure-argv" in message
    if how == "key":
        assert "--json-value" in message
    assert value.encode() not in refused.stderr + refused.stdout + refused.screen
    assert store.cli("secrets", "get", "db").returncode == 3  # nothing was stored
    allowed = on_terminal(store, *args, "--insecure-argv")
    assert allowed.code == 0, allowed.stderr
    assert value.encode() in store.get("db/latest/password" if how != "value" else "db")


def test_scripts_may_pass_a_value_on_the_command_line(store: Store) -> None:
    # stdin is a pipe (CI, a script, `make demo` piped): the documented decision is to accept,
    # since no person is typing into a shell history; `ps` still shows it (docs/cli.md).
    value = token("script")
    done = store.cli("secrets", "put", "db", value)
    assert done.returncode == 0 and done.stderr == b""
    assert store.get("db") == value.encode()
    store.cli("secrets", "put", "map", "--key", f"password={value}", check=True)
    assert store.get("map/latest/password") == value.encode()


def test_stdin_at_a_terminal_reads_one_line_without_echo(store: Store) -> None:
    value = token("typed")
    done = on_terminal(store, "secrets", "put", "db", "--stdin", typed=value.encode() + b"\n")
    assert done.code == 0, done.stderr
    assert done.stdout == b"db: version 1\n"
    assert value.encode() not in done.screen + done.stderr  # the terminal never showed it
    assert store.get("db") == value.encode()
    # a map, typed as JSON, likewise
    typed = json.dumps({"user": "app", "password": value}).encode() + b"\n"
    done = on_terminal(store, "secrets", "put", "map", "--stdin", "--json-value", typed=typed)
    assert done.code == 0, done.stderr
    assert value.encode() not in done.screen and store.get("map/latest/password") == \
        value.encode()


def test_stdin_at_a_terminal_restores_echo_and_refuses_an_empty_line(store: Store) -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO
        process = subprocess.Popen(
            [sys.executable, "-m", "secretfs", "secrets", "put", "db", "--stdin"], stdin=slave,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=store.env(),
            start_new_session=True)
        assert process.stderr is not None
        seen = b""
        while b"not shown" not in seen:
            seen += os.read(process.stderr.fileno(), 4096)
        os.write(master, b"\n")
        _, err = process.communicate(timeout=60)
        assert process.returncode == 2 and b"no value typed" in err
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # echo is back on
    finally:
        os.close(slave)
        os.close(master)
    assert store.cli("secrets", "get", "db").returncode == 3


# -- the session ----------------------------------------------------------------------------------


def forms(value: bytes) -> list[bytes]:
    """*value* as it could be written: raw, hex (both cases) and base64 at any byte alignment
    (the middle of a longer base64 text: the edge blocks, which mix in other bytes, dropped)."""
    found = [value, value.hex().encode(), value.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + value)
        found.append(encoded[4 if shift else 0:-4])
    return found


def test_the_search_finds_a_value_in_any_of_its_forms() -> None:
    value = token("x").encode()
    session = Session(Store(Path("/nonexistent"), Path("/nonexistent")), {"x": value})
    for shift in range(3):  # base64 of a longer text, the value at any byte offset
        text = base64.b64encode(os.urandom(5 + shift) + value + os.urandom(7))
        assert session.hits("b64", text), shift
    assert session.hits("hex", b"..." + value.hex().upper().encode() + b"...")
    assert session.hits("raw", b"\0" + value + b"\0")
    assert not session.hits("other", base64.b64encode(token("y").encode()))


@dataclass
class Session:
    """Every command run, with what it printed, and every value used."""

    store: Store
    values: dict[str, bytes] = field(default_factory=dict)
    runs: list[tuple[tuple[str, ...], subprocess.CompletedProcess[bytes], bool]] = \
        field(default_factory=list)

    def new(self, label: str) -> str:
        value = token(label)
        self.values[label] = value.encode()
        return value

    def cli(self, *args: str, code: int = 0, prints_value: bool = False,
            input: bytes | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        """Run a command; *prints_value*: its stdout is meant to hold a value (get, run, …)."""
        result = self.store.cli(*args, input=input, env=env)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        if code:
            one_line_error(result)
        self.runs.append((args, result, prints_value))
        return result

    def hits(self, where: str, data: bytes) -> list[str]:
        return [f"{label} ({form[:12]!r}…) in {where}" for label, value in self.values.items()
                for form in forms(value) if form in data]


def scan_folder(session: Session, folder: Path) -> list[str]:
    """Every regular file under *folder*, read raw."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            found += session.hits(str(path), path.read_bytes())
    return found


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder other uids can enter (the mount point lives in it)."""
    folder = Path(tempfile.mkdtemp(prefix="secretfs-leaks-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_daemon(store: Store, mountpoint: Path, log: Path) -> subprocess.Popen[bytes]:
    """`secretfs mount --foreground` as root but with gid DAEMON_GID, and core dumps allowed by
    its parent (so that the limits the daemon ends up with are its own doing)."""
    mountpoint.mkdir()

    def allow_core_dumps() -> None:
        resource.setrlimit(resource.RLIMIT_CORE,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    with open(log, "ab") as out:
        process = subprocess.Popen(
            ["setpriv", f"--regid={DAEMON_GID}", "--clear-groups", sys.executable, "-m",
             "secretfs", "mount", str(mountpoint), "--foreground"],
            env=store.env(), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            preexec_fn=allow_core_dumps,
        )
    try:
        wait_until_answering(mountpoint, process, log)
    except BaseException:
        process.kill()
        process.wait()
        force_unmount(mountpoint)
        raise
    return process


def stop_daemon(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    force_unmount(mountpoint)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def check_daemon_hardening(pid: int) -> None:
    """No core dumps (RLIMIT_CORE 0 though its parent allowed them), not dumpable, memory
    locked. PR_SET_DUMPABLE 0 is visible from outside: the kernel then gives the process's
    /proc files to root:root instead of its own uid:gid — here gid DAEMON_GID → 0."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    core = next(line for line in limits if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    status = proc_status(pid)
    assert status["Gid"].split()[0] == str(DAEMON_GID)
    assert os.stat(f"/proc/{pid}/environ").st_gid == 0, "the daemon is dumpable"
    assert int(status["VmLck"].split()[0]) > 0, "the daemon's memory is not locked (mlockall)"


def control_process_is_dumpable() -> None:
    """The same launch without secretfs: its /proc files keep gid DAEMON_GID (so the check
    above is not vacuous)."""
    control = subprocess.Popen(["setpriv", f"--regid={DAEMON_GID}", "--clear-groups",
                                "sleep", "30"])
    try:
        assert eventually(lambda: proc_status(control.pid)["Name"] == "sleep")
        assert os.stat(f"/proc/{control.pid}/environ").st_gid == DAEMON_GID
    finally:
        control.kill()
        control.wait()


@needs_mount
def test_a_whole_session_leaves_no_value_anywhere(world: Path) -> None:
    store = make_store(world / "store")
    session = Session(store)
    outside = world / "outside"  # files the test itself writes values into: not scanned
    outside.mkdir()

    # -- store, every way -------------------------------------------------------------------------
    session.cli("secrets", "put", "app/stdin", "--stdin",
                input=session.new("stdin").encode() + b"\n")
    source = outside / "value"
    source.write_bytes(session.new("file").encode())
    session.cli("secrets", "put", "app/file", "--from-file", str(source))
    document = {"user": session.new("user"), "password": session.new("password")}
    session.cli("secrets", "put", "app/map", "--stdin", "--json-value",
                input=json.dumps(document).encode())
    session.cli("secrets", "put", "app/gen", "--generate", "--rotate-every", "30d")
    captured = outside / "pending"  # where the failing hook leaves the value it was given
    session.cli("secrets", "put", "app/hooked", "--stdin", "--rotate-every", "30d",
                "--validate-cmd", f"tee {captured} >&2; exit 1",
                input=session.new("hooked").encode())
    session.cli("secrets", "put", "app/script", "--", session.new("script"))  # argv, no tty

    # -- read -------------------------------------------------------------------------------------
    for name, label in (("app/stdin", "stdin"), ("app/file", "file"), ("app/hooked", "hooked"),
                        ("app/map/latest/password", "password"), ("app/script", "script")):
        got = session.cli("secrets", "get", name, prints_value=True).stdout
        assert got == session.values[label], name  # the values are real, so is the search
    session.values["gen"] = session.cli("secrets", "get", "app/gen", prints_value=True).stdout
    for args in (("secrets", "info", "app/map"), ("secrets", "info", "app/gen", "--json"),
                 ("secrets", "list", "--json"), ("secrets", "versions", "app/map"),
                 ("audit", "tail", "-n", "100"), ("audit", "tail", "--json")):
        session.cli(*args)

    # -- rotate -----------------------------------------------------------------------------------
    session.cli("secrets", "rotate", "app/gen")
    session.values["gen-2"] = session.cli("secrets", "get", "app/gen",
                                          prints_value=True).stdout
    assert session.values["gen-2"] != session.values["gen"]
    failed = session.cli("secrets", "rotate", "app/hooked", code=6)
    session.values["pending"] = captured.read_bytes()  # the value the hook saw, then echoed
    assert len(session.values["pending"]) >= 16
    assert b"<concealed>" in failed.stderr  # the hook's echo reached the message, concealed

    # -- fail on purpose --------------------------------------------------------------------------
    session.cli("secrets", "get", "app//stdin", code=2)  # wrong reference
    session.cli("secrets", "get", "app/missing", code=3)
    session.cli("secrets", "get", "app/stdin/7", code=3)
    session.cli("secrets", "put", "app/stdin", "--stdin", "--cas", "7", code=1,
                input=session.new("cas").encode())  # a failed check-and-set
    session.cli("secrets", "put", "app/big", "--stdin", code=2,
                input=session.new("big").encode() * (1024 * 1024 // 40 + 1))
    session.cli("secrets", "put", "app/map2", "--stdin", "--json-value", code=2,
                input=json.dumps({"ok": session.new("badkey"), "a b": "x"}).encode())
    session.cli("run", "--env", "X=secretfs://app/missing", "--", "true", code=3)
    session.cli("run", "--env", "X=secretfs://app/map/latest/nokey", "--", "true", code=3)
    template = outside / "bad.tmpl"
    template.write_text("{{ secretfs://app/missing }}")
    session.cli("inject", "-i", str(template), "-o", str(outside / "never"), code=3)

    # -- inject -----------------------------------------------------------------------------------
    ok = session.cli("run", "--env", "X=secretfs://app/stdin", "--", "sh", "-c", "echo ok")
    assert ok.stdout == b"ok\n"
    # masking (stdout is not a terminal): what the child prints of a value is concealed
    session.cli("run", "--env", "X=secretfs://app/stdin", "--env",
                "URL=postgres://app:{{ secretfs://app/map/latest/password }}@db/app",
                "--", "sh", "-c", 'echo "$X $URL"; echo "$X" >&2')
    dump = outside / "child-env.json"
    session.cli("run", "--no-masking", "--env", "X=secretfs://app/stdin", "--env",
                "Y=secretfs://app/map/latest/password", "--", sys.executable, "-c",
                f"import json, os; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))")
    child_env = json.loads(dump.read_text())
    assert child_env["X"] == session.values["stdin"].decode()
    assert child_env["Y"] == session.values["password"].decode()
    stray = [name for name, text in child_env.items() if name not in ("X", "Y")
             and session.hits(name, text.encode())]
    assert stray == [], f"values in variables nobody asked for: {stray}"
    template = outside / "app.tmpl"
    template.write_text("password={{ secretfs://app/map/latest/password }}\n")
    rendered = outside / "app.conf"
    session.cli("inject", "-i", str(template), "-o", str(rendered))
    assert rendered.stat().st_mode & 0o777 == 0o600
    assert rendered.read_bytes() == b"password=" + session.values["password"] + b"\n"
    session.cli("inject", "-i", str(template), prints_value=True)  # to stdout: its job

    # -- the supervisor of `run` holds values only in its child -----------------------------------
    supervised = subprocess.Popen(
        [sys.executable, "-m", "secretfs", "run", "--env", "X=secretfs://app/stdin", "--",
         "sleep", "30"], env=store.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def child_of_supervisor() -> int | None:
            children = Path(f"/proc/{supervised.pid}/task/{supervised.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            return int(pids[0]) if pids else None

        child = eventually(child_of_supervisor, timeout=30)
        assert child is not None
        assert eventually(lambda: proc_status(child)["Name"] == "sleep", timeout=30)
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        assert b"X=" + session.values["stdin"] in environ  # the child has it, where asked…
        for pid in (supervised.pid, child):  # …and no argv, nor the supervisor's environ
            assert session.hits(f"{pid} cmdline", Path(f"/proc/{pid}/cmdline").read_bytes()) \
                == []
        assert session.hits("supervisor environ",
                            Path(f"/proc/{supervised.pid}/environ").read_bytes()) == []
    finally:
        supervised.send_signal(signal.SIGTERM)
        supervised.communicate(timeout=30)

    # -- through a real mount ---------------------------------------------------------------------
    mountpoint = world / "mnt"
    daemon_log = world / "daemon-output.log"
    control_process_is_dumpable()
    daemon = start_daemon(store, mountpoint, daemon_log)
    live_hits: list[str] = []
    try:
        check_daemon_hardening(daemon.pid)
        file = mountpoint / "app/stdin/latest/value"
        assert file.read_bytes() == session.values["stdin"]  # root reads through the mount
        assert (mountpoint / "app/map/latest/password").read_bytes() == \
            session.values["password"]
        denied = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}",
                                 "--clear-groups", "cat", str(file)], capture_output=True,
                                timeout=30)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert session.hits("denied reader", denied.stdout + denied.stderr) == []
        missing = mountpoint / "app/missing/latest/value"
        assert not missing.exists()
        via_mount = session.cli("run", "--mount", str(mountpoint), "--no-masking", "--env",
                                "X=secretfs://app/file", "--", "printenv", "X",
                                prints_value=True)
        assert via_mount.stdout == session.values["file"] + b"\n"
        refused = subprocess.run(  # `run` as a reader the policy denies: exit 4, no child
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             sys.executable, "-m", "secretfs", "run", "--mount", str(mountpoint), "--env",
             "X=secretfs://app/stdin", "--", "true"],
            capture_output=True, env=store.env(), timeout=60)
        assert refused.returncode == 4, refused.stderr
        session.runs.append((("run (uid 4242)",), refused, False))
    finally:
        try:
            for what in ("environ", "cmdline"):
                live_hits += session.hits(f"daemon {what}",
                                          Path(f"/proc/{daemon.pid}/{what}").read_bytes())
            live_hits += scan_folder(session, store.root)  # the WAL as it is while serving
        finally:
            stop_daemon(daemon, mountpoint)

    # -- the background daemon, as a user starts it: its log is mount.log beside audit.log --------
    session.cli("mount", str(mountpoint))
    try:
        assert (mountpoint / "app/hooked/latest/value").read_bytes() == \
            session.values["hooked"]
        assert not (mountpoint / "app/nothing").exists()
    finally:
        session.cli("umount", str(mountpoint))
        force_unmount(mountpoint)

    # -- the search -------------------------------------------------------------------------------
    leaks = list(live_hits)
    leaks += scan_folder(session, store.root)
    leaks += session.hits("daemon output", daemon_log.read_bytes())
    for args, result, prints_value in session.runs:
        leaks += session.hits(f"stderr of {' '.join(args)[:60]}", result.stderr)
        if not prints_value:
            leaks += session.hits(f"stdout of {' '.join(args)[:60]}", result.stdout)
    assert leaks == []
    # …and the search looked at what it should have: the audit log recorded the session
    audit = (store.root / "audit.log").read_text()
    assert '"app/stdin"' in audit and '"rotate"' in audit and '"deny"' in audit
    names = {path.name for path in store.root.iterdir()}
    assert {"store.db", "master.key", "audit.log", "mount.log"} <= names
