"""`secretfs run` and `secretfs inject` end to end: the real CLI, the real store, a real mount."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Store, eventually, make_store, one_line_error
from tests.mounting import Mount, mounted

CONCEALED = b"<concealed by secretfs>"
needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root and /dev/fuse")


def fresh() -> str:
    return "pw-" + os.urandom(10).hex()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path / "store")


@pytest.fixture
def mount(store: Store) -> Iterator[Mount]:
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    folder.chmod(0o755)
    try:
        with mounted(store, folder / "mnt") as live:
            yield live
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(store: Store, *args: str, env: dict[str, str] | None = None,
        **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return store.cli("run", *args, env=env or store.env(), **kwargs)


# -- resolving ------------------------------------------------------------------------------------


def test_a_reference_reaches_the_child_from_the_store(store: Store) -> None:
    value = fresh()
    store.put("db", "--key", f"password={value}", "--key", "user=app")
    done = run(store, "--no-masking", "--env", "DB=secretfs://db/latest/password", "--",
               "printenv", "DB")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{value}\n".encode()


@needs_mount
def test_a_reference_reaches_the_child_through_a_mount(store: Store, mount: Mount) -> None:
    value = fresh()
    store.put("db", "--key", f"password={value}", "--key", "user=app")
    # no config at all: through a mount the injector needs no key and no store
    env = {**store.env(), "SECRETFS_CONFIG": "/nonexistent/config.yaml"}
    done = run(store, "--mount", str(mount.path), "--no-masking", "--env",
               "DB=secretfs://db/latest/password", "--", "printenv", "DB", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{value}\n".encode()

    def audited() -> bool:  # the daemon flushes its buffer every second
        lines = (store.root / "audit.log").read_text().splitlines()
        return any(r["event"] == "read" and r["resource"] == "db" and r["caller"]["exe"]
                   for r in map(json.loads, lines) if r["caller"]["pid"] != os.getpid())

    assert eventually(audited)


def test_env_files_and_templates(store: Store, tmp_path: Path) -> None:
    value = fresh()
    store.put("db", "--key", f"password={value}", "--key", "user=app")
    env_file = tmp_path / "app.env"
    env_file.write_text("# the app's settings\nexport DB_PASSWORD=secretfs://db/latest/password\n"
                        "DATABASE_URL='postgres://{{ secretfs://db/latest/user }}:"
                        "{{ secretfs://db/latest/password }}@db/app'\nPLAIN=kept\n")
    done = run(store, "--no-masking", "--env-file", str(env_file), "--", "sh", "-c",
               'printf "%s|%s|%s" "$DB_PASSWORD" "$DATABASE_URL" "$PLAIN"')
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"{value}|postgres://app:{value}@db/app|kept"


def test_plain_variables_reach_the_child_when_nothing_is_a_reference(store: Store,
                                                                     tmp_path: Path) -> None:
    env_file = tmp_path / "plain.env"
    env_file.write_text("FROM_FILE=file\n")
    done = run(store, "--env", "FROM_ENV=flag", "--env-file", str(env_file), "--", "sh", "-c",
               'printf "%s %s" "$FROM_ENV" "$FROM_FILE"')
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "flag file"


def test_inherited_references_are_resolved_and_env_wins(store: Store) -> None:
    a, b = fresh(), fresh()
    store.put("a", a)
    store.put("b", b)
    env = {**store.env(), "FROM_PARENT": "secretfs://a", "BOTH": "secretfs://a"}
    done = run(store, "--no-masking", "--env", "BOTH=secretfs://b", "--", "sh", "-c",
               'printf "%s %s" "$FROM_PARENT" "$BOTH"', env=env)
    assert done.stdout.decode() == f"{a} {b}"


def test_an_unknown_reference_exits_3_naming_the_variable_and_the_child_never_runs(
        store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = run(store, "--env", "API_KEY=secretfs://nope/latest", "--", "touch", str(marker))
    assert done.returncode == 3
    assert "API_KEY (--env)" in one_line_error(done)
    assert not marker.exists()


@needs_mount
def test_a_denied_reader_through_the_mount_gets_4_and_the_child_never_runs(
        store: Store, mount: Mount) -> None:
    store.put("db", fresh())
    marker = mount.path.parent / "ran"
    done = subprocess.run(
        ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", sys.executable, "-m",
         "secretfs", "run", "--mount", str(mount.path), "--env", "DB=secretfs://db", "--",
         "touch", str(marker)],
        capture_output=True, timeout=60, env={"PATH": os.environ["PATH"]}, cwd="/")
    assert done.returncode == 4, done.stderr
    assert "DB (--env)" in one_line_error(done) and "access denied" in one_line_error(done)
    assert not marker.exists()
    assert eventually(lambda: any(
        json.loads(line)["event"] == "denied" and json.loads(line)["caller"]["uid"] == 4242
        for line in (store.root / "audit.log").read_text().splitlines()))


def test_protected_variables_are_refused_unless_allowed(store: Store) -> None:
    store.put("p", "/opt/evil")
    refused = run(store, "--env", "LD_PRELOAD=secretfs://p", "--", "true")
    assert refused.returncode == 2 and "LD_PRELOAD" in one_line_error(refused)
    allowed = run(store, "--no-masking", "--allow-override", "PATH", "--env", "PATH=secretfs://p",
                  "--", "/usr/bin/env")
    assert b"PATH=/opt/evil\n" in allowed.stdout


def test_dry_run_lists_variables_and_references_without_values(store: Store) -> None:
    value = fresh()
    store.put("db", value)
    done = run(store, "--dry-run", "--env", "DB=secretfs://db/latest",
               "--env", "URL=x{{ secretfs://db }}y", "--", "true")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert "DB\tsecretfs://db/latest\t(--env)" in text and "URL\ttemplate of" in text
    assert value not in text


# -- the child ------------------------------------------------------------------------------------


def test_exit_codes_are_the_childs(store: Store) -> None:
    store.put("x", fresh())
    # supervised (output is a pipe): secretfs exits 128+N for a child killed by signal N
    assert run(store, "--env", "X=secretfs://x", "--", "sh", "-c", "exit 7").returncode == 7
    assert run(store, "--env", "X=secretfs://x", "--", "sh", "-c", "kill -9 $$"
               ).returncode == 137
    # exec'd (plain mode): the process *is* the command, so it dies of the signal itself, which
    # a shell reports as 137 too
    assert run(store, "--no-masking", "--env", "X=secretfs://x", "--", "sh", "-c", "exit 7"
               ).returncode == 7
    assert run(store, "--no-masking", "--env", "X=secretfs://x", "--", "sh", "-c", "kill -9 $$"
               ).returncode == -signal.SIGKILL
    shell = subprocess.run(["sh", "-c", f"{sys.executable} -m secretfs run --no-masking --env "
                            "X=secretfs://x -- sh -c 'kill -9 $$'; echo $?"],
                           env=store.env(), capture_output=True, timeout=60)
    assert shell.stdout == b"137\n"


def test_values_in_the_output_are_concealed_unless_asked(store: Store) -> None:
    value = fresh()
    store.put("x", value)
    script = (f'printf "%s\\n" "$X"; printf "{value[:7]}"; sleep 0.3; printf "{value[7:]}\\n"; '
              'printf "err %s" "$X" >&2')
    masked = run(store, "--env", "X=secretfs://x", "--", "sh", "-c", script)
    assert masked.returncode == 0
    assert value.encode() not in masked.stdout + masked.stderr
    # whole, and split across two writes 0.3 s apart: both concealed; stderr too
    assert masked.stdout == CONCEALED + b"\n" + CONCEALED + b"\n"
    assert masked.stderr == b"err " + CONCEALED
    shown = run(store, "--no-masking", "--env", "X=secretfs://x", "--", "sh", "-c",
                'printf "%s" "$X"')
    assert shown.stdout == value.encode()


def test_sigterm_to_the_supervisor_reaches_the_child(store: Store, tmp_path: Path) -> None:
    store.put("x", fresh())
    marker = tmp_path / "got-term"
    for mode in ([], ["--no-masking"]):
        marker.unlink(missing_ok=True)
        child = subprocess.Popen(
            [sys.executable, "-m", "secretfs", "run", *mode, "--env", "X=secretfs://x", "--",
             "sh", "-c", f'trap "touch {marker}; exit 0" TERM; touch {marker}.up; '
                         "while :; do sleep 0.1; done"],
            env=store.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert eventually(lambda: Path(f"{marker}.up").exists())
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=10) == 0
            assert marker.exists()
        finally:
            child.kill()
            child.wait()
            Path(f"{marker}.up").unlink(missing_ok=True)


# -- watching -------------------------------------------------------------------------------------


def _watched(store: Store, out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "secretfs", "run", "--watch", *args],
        env=store.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_watch_restarts_the_child_with_the_new_value_and_not_for_the_same_value(
        store: Store, tmp_path: Path) -> None:
    first, second = fresh(), fresh()
    store.put("w", first)
    out = tmp_path / "seen"
    child = _watched(store, out, "--env", "X=secretfs://w", "--", "sh", "-c",
                     f'echo "$X" >> {out}; trap "exit 0" TERM; while :; do sleep 0.1; done')
    try:
        assert eventually(lambda: out.exists() and out.read_text() == f"{first}\n")
        store.put("w", first)  # a new version, the same content: nothing happens
        time.sleep(1.5)
        assert out.read_text() == f"{first}\n"
        started = time.monotonic()
        store.put("w", second)
        assert eventually(lambda: out.read_text() == f"{first}\n{second}\n", timeout=5)
        assert time.monotonic() - started < 2.5
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=15)


@needs_mount
def test_watch_with_a_reload_signal_keeps_the_child_and_its_file_reads_the_new_value(
        store: Store, mount: Mount, tmp_path: Path) -> None:
    first, second = fresh(), fresh()
    store.put("w", first)
    out = tmp_path / "seen"
    child = _watched(store, out, "--reload-signal", "HUP", "--as-files", "--mount",
                     str(mount.path), "--env", "X=secretfs://w", "--", "sh", "-c",
                     f'trap "cat \\"$X_FILE\\" >> {out}; echo >> {out}" HUP; '
                     f'echo $$ > {out}.pid; cat "$X_FILE" >> {out}; echo >> {out}; '
                     "while :; do sleep 0.1; done")
    try:
        assert eventually(lambda: out.exists() and out.read_text() == f"{first}\n"), \
            (out.exists() and out.read_text(), child.poll(), child.poll() is not None
             and child.stderr.read())
        pid = Path(f"{out}.pid").read_text()
        store.put("w", second)
        assert eventually(lambda: out.read_text() == f"{first}\n{second}\n", timeout=5)
        assert Path(f"{out}.pid").read_text() == pid  # signalled, not restarted
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=15)


@needs_mount
def test_as_files_keeps_values_out_of_the_environment(store: Store, mount: Mount,
                                                      tmp_path: Path) -> None:
    value = fresh()
    store.put("db", value)
    environ = tmp_path / "environ"
    done = run(store, "--as-files", "--mount", str(mount.path), "--env", "DB=secretfs://db",
               "--", "sh", "-c", f'cat /proc/$$/environ > {environ}; cat "$DB_FILE"')
    assert done.returncode == 0, done.stderr
    assert value.encode() not in environ.read_bytes()
    assert f"DB_FILE={mount.path}/db/current/value".encode() in environ.read_bytes()
    assert CONCEALED in done.stdout  # what it printed from the file is masked too


def test_as_files_without_a_mount_is_refused(store: Store) -> None:
    store.put("db", fresh())
    done = run(store, "--as-files", "--env", "DB=secretfs://db", "--", "true")
    assert done.returncode == 2 and "--as-files needs a live secretfs mount" in \
        one_line_error(done)


# -- inject ---------------------------------------------------------------------------------------


def test_inject_renders_a_private_file_and_will_not_overwrite(store: Store,
                                                             tmp_path: Path) -> None:
    value = fresh()
    store.put("db", "--key", f"password={value}")
    template = tmp_path / "app.yaml.tpl"
    template.write_text("db:\n  password: {{ secretfs://db/latest/password }}\n")
    target = tmp_path / "app.yaml"
    done = store.cli("inject", "-i", str(template), "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_text() == f"db:\n  password: {value}\n"
    assert target.stat().st_mode & 0o777 == 0o600
    again = store.cli("inject", "-i", str(template), "-o", str(target))
    assert again.returncode == 2 and "--force" in one_line_error(again)
    target.write_text("old")
    assert store.cli("inject", "-i", str(template), "-o", str(target), "--force"
                     ).returncode == 0
    assert target.read_text() == f"db:\n  password: {value}\n"


def test_resolve_refs_in_a_loaded_config(store: Store) -> None:
    value = fresh()
    store.put("db", "--key", f"password={value}", "--key", "user=app")
    program = (
        "from secretfs import resolve_refs\n"
        "config = {'db': {'password': 'secretfs://db/latest/password',\n"
        "                 'url': 'pg://{{ secretfs://db/latest/user }}@h'}, 'n': [1, 'x']}\n"
        "got = resolve_refs(config)\n"
        "assert config['db']['password'].startswith('secretfs://')\n"
        f"assert got == {{'db': {{'password': {value!r}, 'url': 'pg://app@h'}}, 'n': [1, 'x']}}\n"
    )
    done = subprocess.run([sys.executable, "-c", program], env=store.env(), capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@needs_mount
def test_through_a_mount_run_imports_no_crypto_no_trio_no_fuse(store: Store, mount: Mount) -> None:
    store.put("x", fresh())
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "secretfs", "run", "--mount", str(mount.path),
         "--env", "X=secretfs://x", "--", "true"],
        env=store.env(), capture_output=True, timeout=60)
    assert done.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.decode().splitlines() if line.startswith("import time")}
    assert "injector" in imported  # the check sees the injector's own imports...
    assert not imported & {"cryptography", "trio", "pyfuse3", "keyring"}  # ...and none of these


def test_watch_restarts_the_child_after_a_rotation(store: Store, tmp_path: Path) -> None:
    store.put("w", fresh(), "--rotate-every", "30d")
    out = tmp_path / "seen"
    child = _watched(store, out, "--env", "X=secretfs://w", "--", "sh", "-c",
                     f'echo "$X" >> {out}; trap "exit 0" TERM; while :; do sleep 0.1; done')
    try:
        assert eventually(lambda: out.exists() and len(out.read_text().splitlines()) == 1)
        store.cli("secrets", "rotate", "w", check=True)
        assert eventually(lambda: len(out.read_text().splitlines()) == 2, timeout=5)
        assert out.read_text().splitlines()[1].encode() == store.get("w")
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=15)
