"""How `secretfs run` runs its command: plain mode (exec) and the supervisor, with real processes.

A supervisor that handles signals is run in a separate Python process (DRIVER) so that the test
process's own signals, terminal and stdio stay out of it; the ones that only need an exit code
run in-process, which also checks that run() puts everything back.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from injector.supervise import CONCEALED, Launch, Masker, Supervisor
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import json, os, sys
from injector.supervise import Launch, Supervisor
from secretfs.errors import BackendUnavailable

cfg = json.loads(sys.argv[1])
if cfg.get("ctty"):  # make stdin (a pty) our controlling terminal, as a login shell has it
    import fcntl, termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
env = {**os.environ, **cfg.get("env", {})}
fired = []

def changed():
    with open(cfg["polls"], "a") as polls:
        polls.write("poll\\n")
    if cfg["watch"] == "error":
        raise BackendUnavailable("backend down", "try again")
    if cfg["watch"] == "once" and not fired and os.path.exists(cfg["when"]):
        fired.append(True)
        with open(cfg["polls"], "a") as polls:
            polls.write("fired\\n")
        return Launch({**env, **cfg["new_env"]}, tuple(s.encode() for s in cfg["new_secrets"]))
    return None

supervisor = Supervisor(
    cfg["argv"], Launch(env, tuple(s.encode() for s in cfg.get("secrets", ()))),
    mask=cfg.get("mask", True), changed=changed if "watch" in cfg else None,
    reload_signal=cfg.get("reload_signal"), grace=cfg.get("grace", 10.0),
    poll_interval=cfg.get("poll", 0.05))
code = supervisor.run()
if cfg.get("terminal"):
    with open(cfg["terminal"], "w") as out:
        out.write(str(os.tcgetpgrp(0) == os.getpgrp()))
sys.exit(code)
"""

PLAIN = "import os, sys; from injector.supervise import exec_child; exec_child(sys.argv[1:], {})"
LOOP = "ulimit -c 0; while :; do sleep 0.1; done"  # (SIGQUIT must not leave core files)


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (a container's init may not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Processes:
    """Everything a test starts, killed and reaped at its end whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []
        self.pid_files: list[Path] = []

    def supervise(self, argv: list[str], **cfg: object) -> subprocess.Popen[bytes]:
        """Start a supervisor in its own Python process (see DRIVER)."""
        popen = {k: cfg.pop(k) for k in ("stdin", "stdout", "stderr", "start_new_session")
                 if k in cfg}
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps({"argv": argv, **cfg})],
            cwd=self.tmp_path, env=python_env(), **popen)  # type: ignore[call-overload]
        self.started.append(process)
        return process

    def plain(self, argv: list[str], env: dict[str, str] | None = None,
              **popen: object) -> subprocess.Popen[bytes]:
        """Start `exec_child(argv, env)` in a fresh Python process."""
        code = PLAIN.format("dict(os.environ)" if env is None else repr(env))
        process = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=self.tmp_path,
                                   env=python_env(), **popen)  # type: ignore[call-overload]
        self.started.append(process)
        return process

    def pid_file(self, name: str) -> Path:
        """A file where a child writes its pid (first word of each line): killed at the end."""
        self.pid_files.append(self.tmp_path / name)
        return self.tmp_path / name

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)
        for path in self.pid_files:
            for pid in (int(line.split()[0]) for line in lines(path)):
                if not dead(pid):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


def finish(process: subprocess.Popen[bytes], timeout: float = 10) -> tuple[int, bytes, bytes]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out or b"", err or b""


# -- exit codes -----------------------------------------------------------------------------------


def test_supervisor_exits_with_the_childs_code_or_128_plus_its_signal() -> None:
    env = dict(os.environ)
    assert Supervisor(["sh", "-c", "exit 7"], Launch(env, ())).run() == 7
    assert Supervisor(["sh", "-c", "kill -9 $$"], Launch(env, ())).run() == 137
    assert Supervisor(["sh", "-c", "kill -TERM $$"], Launch(env, ()), mask=False).run() == 143


def test_a_command_that_cannot_start_exits_127_or_126_as_a_shell_does(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    env = dict(os.environ)
    assert Supervisor(["no-such-command-xyz"], Launch(env, ())).run() == 127
    assert capfd.readouterr().err == "secretfs: command not found: no-such-command-xyz\n"
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)  # no x bit: even root may not exec it
    assert Supervisor([str(script)], Launch(env, ())).run() == 126
    assert capfd.readouterr().err == f"secretfs: cannot run {script}: Permission denied\n"


def test_plain_mode_execs_with_the_childs_code(procs: Processes, tmp_path: Path) -> None:
    assert finish(procs.plain(["sh", "-c", "exit 5"]))[0] == 5
    code, _, err = finish(procs.plain(["no-such-command-xyz"], stderr=subprocess.PIPE))
    assert (code, err) == (127, b"secretfs: command not found: no-such-command-xyz\n")
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    code, _, err = finish(procs.plain([str(script)], stderr=subprocess.PIPE))
    assert (code, err) == (126, f"secretfs: cannot run {script}: Permission denied\n".encode())


def test_plain_mode_replaces_the_process_and_searches_the_given_path(
        procs: Processes, tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "only-here"
    tool.write_text("#!/bin/sh\necho $$ ran\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    process = procs.plain(["only-here"], env={"PATH": f"{folder}:/usr/bin:/bin"},
                          stdout=subprocess.PIPE)
    code, out, _ = finish(process)
    assert (code, out) == (0, f"{process.pid} ran\n".encode())  # no extra process in between


def test_plain_mode_restores_sigpipe_python_ignores(procs: Processes) -> None:
    # An ignored signal stays ignored across exec: `yes | head` would never end.
    code, out, _ = finish(procs.plain(["sh", "-c", "grep SigIgn /proc/$$/status"],
                                      stdout=subprocess.PIPE))
    ignored = int(out.split()[1], 16)
    assert code == 0 and not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))


# -- signals, process group, no orphan ------------------------------------------------------------


def test_sigterm_to_the_supervisor_reaches_the_child(procs: Processes, tmp_path: Path) -> None:
    marker, up = tmp_path / "got", tmp_path / "up"
    script = f'trap "echo got > {marker}; exit 0" TERM; touch {up}; {LOOP}'
    supervisor = procs.supervise(["sh", "-c", script])
    assert eventually(up.exists)
    supervisor.send_signal(signal.SIGTERM)
    assert finish(supervisor)[0] == 0
    assert marker.read_text() == "got\n"


def test_sigterm_in_plain_mode_reaches_the_command(procs: Processes, tmp_path: Path) -> None:
    marker, up = tmp_path / "got", tmp_path / "up"
    script = f'trap "echo got > {marker}; exit 0" TERM; touch {up}; {LOOP}'
    process = procs.plain(["sh", "-c", script])
    assert eventually(up.exists)
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 0
    assert marker.read_text() == "got\n"


def test_every_forwarded_signal_reaches_the_childs_group(procs: Processes, tmp_path: Path) -> None:
    marker, pgrp = tmp_path / "marker", tmp_path / "pgrp"
    names = ["INT", "HUP", "QUIT", "USR1", "USR2", "WINCH"]
    traps = "; ".join(f'trap "echo {name} >> {marker}" {name}' for name in names)
    # field 5 of /proc/PID/stat is the process group (comm, "sh", has no space)
    script = (f'{traps}; trap "echo TERM >> {marker}; exit 0" TERM; '
              f'echo $$ $(cut -d" " -f5 /proc/$$/stat) > {pgrp}; {LOOP}')
    supervisor = procs.supervise(["sh", "-c", script])
    assert eventually(pgrp.exists)
    child, group = map(int, pgrp.read_text().split())
    assert group == child and group != os.getpgid(supervisor.pid)  # it leads its own group
    for name in [*names, "TERM"]:
        supervisor.send_signal(getattr(signal, f"SIG{name}"))
        assert eventually(lambda name=name: name in lines(marker)), name
    assert finish(supervisor)[0] == 0
    assert lines(marker) == [*names, "TERM"]  # each exactly once


def test_killing_the_supervisor_kills_the_child(procs: Processes) -> None:
    pid_file = procs.pid_file("child.pid")
    supervisor = procs.supervise(["sh", "-c", f"echo $$ > {pid_file}; {LOOP}"])
    assert eventually(lambda: bool(lines(pid_file)))
    child = int(lines(pid_file)[0])
    assert not dead(child)
    supervisor.kill()  # SIGKILL: no cleanup code runs; only the kernel can act
    finish(supervisor)
    assert eventually(lambda: dead(child), timeout=2)


def test_stdin_is_passed_through(procs: Processes, tmp_path: Path) -> None:
    supervisor = procs.supervise(["sh", "-c", f"read line; echo \"[$line]\" > {tmp_path / 'in'}"],
                                 stdin=subprocess.PIPE)
    supervisor.communicate(b"typed\n", timeout=10)
    assert supervisor.returncode == 0
    assert (tmp_path / "in").read_text() == "[typed]\n"


def test_an_interactive_child_gets_the_terminal_and_gives_it_back(
        procs: Processes, tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        script = (f'[ -t 1 ] && echo tty > {tmp_path / "stdout"}; '
                  f'read line; echo "got:$line" > {tmp_path / "read"}')
        supervisor = procs.supervise(["sh", "-c", script], ctty=True, terminal=str(
            tmp_path / "foreground"), stdin=slave, stdout=slave, start_new_session=True)
        os.write(master, b"hello\n")
        # A background group reading its terminal would be stopped by SIGTTIN: no "read" file.
        assert eventually(lambda: lines(tmp_path / "read") == ["got:hello"])
        assert finish(supervisor)[0] == 0
        assert lines(tmp_path / "stdout") == ["tty"]  # a terminal is inherited, not piped
        assert (tmp_path / "foreground").read_text() == "True"  # and taken back at the end
    finally:
        os.close(master)
        os.close(slave)


# -- output ---------------------------------------------------------------------------------------


def test_values_in_stdout_and_stderr_are_concealed(procs: Processes) -> None:
    script = ('printf "%s\\n" "$X"; printf pass; sleep 0.2; printf "word1\\n"; '
              'printf "%s\\n" "$X" >&2; echo fine')
    cfg = {"env": {"X": "password1"}, "secrets": ["password1"]}
    code, out, err = finish(procs.supervise(["sh", "-c", script], **cfg))
    assert code == 0
    assert out == CONCEALED + b"\n" + CONCEALED + b"\nfine\n"
    assert err == CONCEALED + b"\n"
    code, out, err = finish(procs.supervise(["sh", "-c", script], mask=False, **cfg))
    assert (out, err) == (b"password1\npassword1\nfine\n", b"password1\n")


def test_a_grandchild_holding_the_pipe_does_not_keep_the_supervisor(procs: Processes) -> None:
    pid_file = procs.pid_file("grandchild.pid")
    started = time.monotonic()
    code, out, _ = finish(procs.supervise(
        ["sh", "-c", f"sleep 30 & echo $! > {pid_file}; echo done; exit 3"]))
    assert (code, out) == (3, b"done\n")
    assert time.monotonic() - started < 5  # drained at most 1 s after the exit, not 30 s
    assert not dead(int(lines(pid_file)[0]))  # and nothing was sent to the leftover


def test_a_closed_stdout_does_not_stop_supervision(procs: Processes) -> None:
    supervisor = procs.supervise(["sh", "-c", "echo a; sleep 0.3; echo b; sleep 0.3; exit 4"])
    assert supervisor.stdout is not None
    supervisor.stdout.close()  # EPIPE for the supervisor's writes from now on
    code, _, err = finish(supervisor)
    assert code == 4 and b"Traceback" not in err


def zombie_children() -> list[int]:
    """Children of this process that exited and were not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        if int(ppid) == os.getpid() and state == b"Z":
            found.append(int(entry))
    return found


def test_run_leaves_no_zombie_and_restores_signal_handling(
        capfd: pytest.CaptureFixture[str]) -> None:
    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGWINCH]
    before = {sig: signal.getsignal(sig) for sig in handled}
    launch = Launch({**os.environ, "X": "hunter22"}, (b"hunter22",))
    code = Supervisor(["sh", "-c", 'echo "$X"; sleep 0.2 & exit 0'], launch).run()
    assert code == 0 and capfd.readouterr().out == CONCEALED.decode() + "\n"
    assert not zombie_children()  # the child was reaped (other tests' servers may be running)
    assert {sig: signal.getsignal(sig) for sig in handled} == before
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)
    assert previous == -1


# -- watch ----------------------------------------------------------------------------------------


def test_watch_restarts_the_child_with_the_new_environment(
        procs: Processes, tmp_path: Path) -> None:
    out = procs.pid_file("out")
    script = f'trap "exit 0" TERM; echo "$$ $X" >> {out}; {LOOP}'
    supervisor = procs.supervise(["sh", "-c", script], env={"X": "old"}, watch="once",
                                 when=str(out), new_env={"X": "new"}, new_secrets=["new-value"],
                                 polls=str(tmp_path / "polls"))
    assert eventually(lambda: len(lines(out)) == 2)
    (first, old), (second, new) = (line.split() for line in lines(out))
    assert (old, new) == ("old", "new") and first != second
    assert eventually(lambda: dead(int(first)))
    assert eventually(lambda: len(lines(tmp_path / "polls")) >= 5)  # still watching
    assert len(lines(out)) == 2 and supervisor.poll() is None
    supervisor.send_signal(signal.SIGTERM)
    assert finish(supervisor)[0] == 0


def test_a_restart_kills_a_child_that_ignores_sigterm_after_the_grace(
        procs: Processes, tmp_path: Path) -> None:
    out = procs.pid_file("out")
    script = f'trap "" TERM; echo "$$ $X" >> {out}; {LOOP}'
    started = time.monotonic()
    supervisor = procs.supervise(["sh", "-c", script], env={"X": "old"}, watch="once",
                                 when=str(out), new_env={"X": "new"}, new_secrets=[],
                                 polls=str(tmp_path / "polls"), grace=0.5)
    assert eventually(lambda: len(lines(out)) == 2)
    assert time.monotonic() - started >= 0.5  # not before the grace period
    assert [line.split()[1] for line in lines(out)] == ["old", "new"]
    supervisor.send_signal(signal.SIGINT)
    assert finish(supervisor)[0] == 128 + signal.SIGINT


def test_a_stop_signal_during_a_restart_cancels_it(procs: Processes, tmp_path: Path) -> None:
    out, polls = procs.pid_file("out"), tmp_path / "polls"
    script = f'trap "" TERM; echo "$$ $X" >> {out}; {LOOP}'  # it outlives SIGTERM: grace runs
    supervisor = procs.supervise(["sh", "-c", script], env={"X": "old"}, watch="once",
                                 when=str(out), new_env={"X": "new"}, new_secrets=[],
                                 polls=str(polls), grace=3.0)
    assert eventually(lambda: "fired" in lines(polls))
    supervisor.send_signal(signal.SIGINT)  # the user wants it stopped, not restarted
    assert finish(supervisor)[0] == 128 + signal.SIGINT
    assert [line.split()[1] for line in lines(out)] == ["old"]


def test_watch_with_a_reload_signal_signals_instead_and_masks_the_new_value(
        procs: Processes, tmp_path: Path) -> None:
    pids, marker, value = procs.pid_file("pids"), tmp_path / "marker", tmp_path / "value"
    value.write_text("rotated-secret-2\n")  # what the child re-reads from its *_FILE
    script = (f'trap "cat {value}; echo hup >> {marker}" HUP; trap "exit 0" TERM; '
              f"echo $$ >> {pids}; {LOOP}")
    supervisor = procs.supervise(["sh", "-c", script], watch="once", when=str(pids),
                                 new_env={}, new_secrets=["rotated-secret-2"],
                                 polls=str(tmp_path / "polls"), reload_signal=signal.SIGHUP)
    assert eventually(lambda: lines(marker) == ["hup"])
    assert len(lines(pids)) == 1  # the same child: not restarted
    supervisor.send_signal(signal.SIGTERM)
    code, out, _ = finish(supervisor)
    assert code == 0 and out == CONCEALED + b"\n"


def test_a_watch_that_sees_no_change_does_nothing(procs: Processes, tmp_path: Path) -> None:
    pids, polls = procs.pid_file("pids"), tmp_path / "polls"
    supervisor = procs.supervise(["sh", "-c", f'trap "exit 0" TERM; echo $$ >> {pids}; {LOOP}'],
                                 watch="none", polls=str(polls))
    assert eventually(lambda: len(lines(polls)) >= 5)
    assert len(lines(pids)) == 1 and supervisor.poll() is None
    supervisor.send_signal(signal.SIGTERM)
    assert finish(supervisor)[0] == 0


def test_a_failing_watch_is_reported_once_and_the_child_keeps_running(
        procs: Processes, tmp_path: Path) -> None:
    pids, polls = procs.pid_file("pids"), tmp_path / "polls"
    supervisor = procs.supervise(["sh", "-c", f'trap "exit 0" TERM; echo $$ >> {pids}; {LOOP}'],
                                 watch="error", polls=str(polls))
    assert eventually(lambda: len(lines(polls)) >= 5)
    assert len(lines(pids)) == 1 and supervisor.poll() is None
    supervisor.send_signal(signal.SIGTERM)
    code, _, err = finish(supervisor)
    assert code == 0
    ours = [line for line in err.splitlines() if line.startswith(b"secretfs")]  # (sh says more)
    assert ours == [b"secretfs: watch: backend down (try again)"]


def test_a_watched_child_that_exits_ends_the_supervisor(procs: Processes, tmp_path: Path) -> None:
    supervisor = procs.supervise(["sh", "-c", "sleep 0.3; exit 3"], watch="none",
                                 polls=str(tmp_path / "polls"))
    assert finish(supervisor)[0] == 3  # its code, and no restart loop


# -- the masker -----------------------------------------------------------------------------------


def masked(values: list[bytes], *chunks: bytes) -> bytes:
    masker = Masker(values)
    return b"".join(masker.feed(chunk) for chunk in chunks) + masker.flush()


def test_a_value_split_across_writes_is_never_emitted() -> None:
    masker = Masker([b"password1"])
    assert masker.feed(b"login: pass") == b"login: "  # only the possible start is held back
    assert masker.feed(b"word1\n") == CONCEALED + b"\n"
    assert masker.feed(b"pass") == b""
    assert masker.feed(b"port\n") == b"passport\n"  # not the value after all: released
    assert masker.feed(b"pa") == b""
    assert masker.flush() == b"pa"


def test_short_values_are_not_masked_and_pem_lines_are() -> None:
    assert masked([b"yes", b"1"], b"yes 1\n") == b"yes 1\n"
    pem = b"-----BEGIN KEY-----\nMIIEvAIBADANBgkq\nabc\n-----END KEY-----\n"
    out = masked([pem], b"key line: MIIEvAIBADANBgkq\nabc\n")
    assert out == b"key line: " + CONCEALED + b"\nabc\n"  # "abc" is too short to mean anything
    assert masked([pem], b"x" + pem) == b"x" + CONCEALED


def test_overlapping_values_leak_no_part_and_old_values_stay_masked() -> None:
    assert masked([b"abcdef", b"efghij"], b"<abcdefghij>") == b"<" + CONCEALED + b">"
    assert masked([b"abcdef", b"efghij"], b"<abcd", b"ef", b"gh", b"ij>") == \
        b"<" + CONCEALED + b">"
    assert masked([b"abcd", b"abcdefgh"], b"abcdefgh abcd") == CONCEALED + b" " + CONCEALED
    masker = Masker([b"old-secret"])
    masker.update([b"new-secret"])
    assert masker.feed(b"old-secret new-secret\n") == CONCEALED + b" " + CONCEALED + b"\n"


# Values use bytes >= 0x80 and the text ASCII, so the text can hold no part of a value.
VALUE = st.lists(st.integers(0x80, 0xFF), min_size=4, max_size=16).map(bytes)
TEXT = st.lists(st.sampled_from(b"ab <>\n\x00"), max_size=40).map(bytes)
# From a two-letter alphabet, values overlap each other and the data all the time.
SMALL_VALUE = st.lists(st.sampled_from(b"ab"), min_size=4, max_size=8).map(bytes)
SMALL_DATA = st.lists(st.sampled_from(b"ab"), max_size=40).map(bytes)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(VALUE, min_size=1, max_size=4), which=st.integers(0, 3), before=TEXT,
       after=TEXT, cuts=st.lists(st.integers(0, 100), max_size=8))
def test_a_value_is_concealed_in_any_chunking(values: list[bytes], which: int, before: bytes,
                                              after: bytes, cuts: list[int]) -> None:
    value = values[which % len(values)]
    out = masked(values, *chunked(before + value + after, cuts))
    assert value not in out
    assert out == before + CONCEALED + after


@settings(max_examples=300, deadline=None)
@given(values=st.lists(VALUE, max_size=4), text=TEXT, cuts=st.lists(st.integers(0, 100)))
def test_text_without_secrets_passes_through_at_once(values: list[bytes], text: bytes,
                                                     cuts: list[int]) -> None:
    masker = Masker(values)
    for chunk in chunked(text, cuts):
        assert masker.feed(chunk) == chunk  # nothing held back: no delay for normal output
    assert masker.flush() == b""


@settings(max_examples=1000, deadline=None)
@given(values=st.lists(st.binary(min_size=1, max_size=10) | SMALL_VALUE, max_size=4),
       data=st.binary(max_size=60) | SMALL_DATA, cuts=st.lists(st.integers(0, 100), max_size=20))
@example(values=[b"aaaa", b"abba"], data=b"aaaaabb", cuts=[6])  # held back inside a concealed span
def test_masking_is_the_same_however_chunked(values: list[bytes], data: bytes,
                                             cuts: list[int]) -> None:
    whole = masked(values, data)
    assert masked(values, *chunked(data, cuts)) == whole
    if all(not set(v) & set(CONCEALED) for v in values):  # then CONCEALED cannot form a value
        assert not any(v in whole for v in values if len(v) >= 4)
