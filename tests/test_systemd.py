"""The systemd units in systemd/ and `make install`.

systemd is not PID 1 here, so no unit can be started. Instead every test takes its command
lines from the unit files themselves (ExecStart=, ExecReload=, ExecStopPost=, Environment=) and
runs them under as much of the unit's sandbox as can be reproduced without systemd: the
capability bounding set and no_new_privs (setpriv), the rlimits (prlimit), the umask, and the
seccomp filters behind SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=,
RestrictAddressFamilies= and RestrictNamespaces=, loaded through libseccomp as systemd loads them.
`systemd-analyze verify` checks the rest of each file.
"""

from __future__ import annotations

import ctypes.util
import errno
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from secretfs.config import load_config
from tests.helpers import Store, eventually, make_store
from tests.mounting import as_user, force_unmount, is_mounted

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
DAEMON_UNIT = UNITS / "secretfs.service"
ROTATE_UNIT = UNITS / "secretfs-rotate.service"
INSTALLED_BIN = "/usr/local/bin/secretfs"  # what the units run; make install puts it there
VENV_BIN = Path(sys.executable).with_name("secretfs")  # this checkout's console script
RUNTIME = "/run/secretfs"  # RuntimeDirectory=secretfs
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 60.0
OTHER_UID = 4242
# A seccomp errno no call of the daemon returns otherwise: a refused call shows by it in strace.
REFUSED = errno.ENOTRECOVERABLE

is_root = os.geteuid() == 0
needs_mount = pytest.mark.skipif(not is_root or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root and /dev/fuse")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze (Debian package systemd)")
needs_sandbox_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("setpriv", "prlimit", "strace"))
    or ctypes.util.find_library("seccomp") is None,
    reason="needs setpriv, prlimit, strace and libseccomp (systemd's own dependency)")

# Options that give a unit its own mount namespace: a FUSE mount made inside it is invisible to
# the host, so the daemon's unit must not use them (DESIGN.md, "FUSE facts").
MOUNT_NAMESPACE_OPTIONS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "BindPaths",
    "BindReadOnlyPaths", "TemporaryFileSystem", "PrivateMounts", "PrivateIPC", "PrivateNetwork",
    "MountFlags", "RootDirectory", "RootImage", "DynamicUser", "PrivateUsers",
)


# -- reading unit files ---------------------------------------------------------------------------


@dataclass
class Unit:
    """A unit file as systemd reads it: sections of ``Key=value`` assignments, in order."""

    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Unit:
        unit = cls(path)
        section = ""
        pending = ""
        for raw in path.read_text().splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):  # a continuation line
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                unit.sections.setdefault(section, [])
                continue
            key, _, value = line.partition("=")
            unit.sections[section].append((key.strip(), value.strip()))
        return unit

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, key: str, section: str = "Service") -> str:
        found = self.values(key, section)
        assert found, f"{self.path.name}: no {key}= in [{section}]"
        return found[-1]

    def command(self, key: str) -> tuple[str, list[str]]:
        """An Exec*= line: its prefix characters (``-``: failure ignored, …) and its argv."""
        line = self.value(key)
        prefix = ""
        while line and line[0] in "-@:+!":
            prefix, line = prefix + line[0], line[1:]
        return prefix, shlex.split(line)

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for assignments in self.values("Environment"):
            for item in shlex.split(assignments):
                name, _, value = item.partition("=")
                env[name] = value
        return env

    def capabilities(self) -> list[str]:
        return self.value("CapabilityBoundingSet").split()


def assignments_without_a_reason(path: Path) -> list[str]:
    """Lines setting something whose line above is not a comment (Description= and
    Documentation= say what they are)."""
    bare = []
    previous = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", ";", "[")):
            key = stripped.partition("=")[0]
            if key not in ("Description", "Documentation") and not previous.startswith("#"):
                bare.append(stripped)
        previous = stripped
    return bare


def unit_files() -> list[Path]:
    return sorted([*UNITS.glob("*.service"), *UNITS.glob("*.timer"),
                   *(UNITS / "examples").glob("*.service")])


# -- the daemon, from its unit file ------------------------------------------------------------


def substitute(argv: list[str], runtime: Path) -> list[str]:
    """The unit's command with this checkout's binary and a test runtime directory."""
    assert argv[0] == INSTALLED_BIN or not argv[0].startswith("/usr/local/"), argv
    return [str(VENV_BIN) if arg == INSTALLED_BIN else arg.replace(RUNTIME, str(runtime))
            for arg in argv]


def service_env(unit: Unit, config: Path, **extra: str) -> dict[str, str]:
    """The environment systemd gives a system service without User=: its PATH, the unit's
    Environment= (the config swapped for the test store's), nothing inherited."""
    env = unit.environment()
    assert env.get("SECRETFS_CONFIG") == "/etc/secretfs/config.yaml"
    env["SECRETFS_CONFIG"] = str(config)
    return {"PATH": SYSTEMD_PATH, **env, **extra}


def runtime_dir(unit: Unit, parent: Path) -> Path:
    """What RuntimeDirectory=secretfs creates, with its RuntimeDirectoryMode=."""
    assert unit.value("RuntimeDirectory") == "secretfs"
    runtime = parent / "run" / "secretfs"
    runtime.mkdir(parents=True)
    for folder in (parent, parent / "run"):
        folder.chmod(0o755)
    runtime.chmod(int(unit.value("RuntimeDirectoryMode"), 8))
    return runtime


class Notifications:
    """The datagram socket systemd listens on for sd_notify(); each message with its sender."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)

    def receive(self) -> tuple[bytes, int]:
        """The next message and the pid that sent it (NotifyAccess=main accepts only the main
        process's)."""
        message, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", data)[0] for level, kind, data in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return message, pid

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    mountpoint: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in self.log_text():
            assert time.monotonic() < deadline, f"no {text!r} in: {self.log_text()[-2000:]}"
            assert self.process.poll() is None, self.log_text()[-2000:]
            time.sleep(0.05)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; killed and unmounted whatever happens."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        force_unmount(daemon.mountpoint)


def start(daemons: list[Daemon], argv: list[str], env: dict[str, str], mountpoint: Path,
          unit: Unit) -> Daemon:
    log = mountpoint.parent.parent / f"daemon-{len(daemons)}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=out, umask=int(unit.value("UMask"), 8))
    daemon = Daemon(process, mountpoint, log)
    daemons.append(daemon)
    return daemon


@pytest.fixture
def folder() -> Iterator[Path]:
    """A world-traversable folder (pytest's tmp_path is 0700 root) for what other uids reach."""
    path = Path(tempfile.mkdtemp(prefix="secretfs-systemd-"))
    path.chmod(0o755)
    yield path
    force_unmount(path / "run" / "secretfs" / "mnt")
    shutil.rmtree(path, ignore_errors=True)


def fresh() -> str:
    return "pw-" + os.urandom(8).hex()


# -- the sandbox: what setpriv, prlimit and libseccomp can reproduce of the unit ----------------

# Loads the seccomp filters systemd would, then execs the command (argv[2:]). Written like
# systemd's seccomp-util.c: the address-family filter on socket(), RestrictNamespaces=yes (setns
# refused, unshare/clone with any CLONE_NEW* flag refused, clone3 answered ENOSYS so that glibc
# falls back to clone, whose flags can be inspected), and last the allow-list with
# SystemCallErrorNumber= as the default action, for the native architecture only.
SECCOMP_LOADER = r"""
import ctypes, json, os, sys

spec = json.loads(sys.argv[1])
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)


class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EQ, GT, LT, MASKED_EQ = 0x7FFF0000, 4, 6, 2, 7


def refuse(number):
    return 0x00050000 | number


def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a call of this architecture
        return
    array = (Cmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise OSError(-rc, "seccomp_rule_add " + name)


def load(ctx):
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")


if spec["families"]:
    ctx = lib.seccomp_init(ALLOW)
    families = sorted(spec["families"])
    nope = refuse(spec["eafnosupport"])
    if families[0] > 0:
        rule(ctx, nope, "socket", Cmp(0, LT, families[0], 0))
    rule(ctx, nope, "socket", Cmp(0, GT, families[-1], 0))
    for family in range(families[0], families[-1]):
        if family not in families:
            rule(ctx, nope, "socket", Cmp(0, EQ, family, 0))
    load(ctx)
if spec["no_namespaces"]:
    ctx = lib.seccomp_init(ALLOW)
    rule(ctx, refuse(spec["enosys"]), "clone3")
    rule(ctx, refuse(spec["eperm"]), "setns")
    for flag in spec["clone_flags"]:
        rule(ctx, refuse(spec["eperm"]), "unshare", Cmp(0, MASKED_EQ, flag, flag))
        rule(ctx, refuse(spec["eperm"]), "clone", Cmp(0, MASKED_EQ, flag, flag))
    load(ctx)
# The allow-list last, as systemd does: it does not allow seccomp() itself.
ctx = lib.seccomp_init(refuse(spec["errno"]))
for name in spec["allow"]:
    rule(ctx, ALLOW, name)
load(ctx)
os.execv(sys.argv[2], sys.argv[2:])
"""

CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)  # NS, CGROUP, UTS, IPC, USER, PID, NET, TIME


def syscall_groups() -> dict[str, list[str]]:
    """systemd's syscall groups (``systemd-analyze syscall-filter``): @name → entries."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                             capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
        elif line.startswith("#"):  # the unlisted calls at the end: in no group
            current = None
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        names |= expand(groups[item], groups) if item.startswith("@") else {item}
    return names


def seccomp_spec(unit: Unit, refused: int) -> dict[str, object]:
    """The filters of *unit*, for SECCOMP_LOADER; calls outside the allow-list fail with
    *refused* (the unit's SystemCallErrorNumber= in production, a telltale one in tests)."""
    assert unit.value("SystemCallArchitectures") == "native"  # libseccomp's default context
    assert unit.value("SystemCallErrorNumber") == "EPERM"
    allowed = expand(unit.value("SystemCallFilter").split(), syscall_groups())
    families = [getattr(socket, name) for name in unit.value("RestrictAddressFamilies").split()]
    return {"allow": sorted(allowed), "errno": refused, "families": families,
            "eafnosupport": errno.EAFNOSUPPORT, "eperm": errno.EPERM, "enosys": errno.ENOSYS,
            "no_namespaces": unit.value("RestrictNamespaces") == "yes",
            "clone_flags": list(CLONE_NEW_FLAGS)}


def can_raise_limits() -> bool:
    """Whether this process may raise hard rlimits (CAP_SYS_RESOURCE), as systemd can: some
    containers withhold it, and then LimitMEMLOCK=infinity cannot be reproduced."""
    effective = int(proc_status(os.getpid())["CapEff"], 16)
    return bool(effective & (1 << 24))


def limits(unit: Unit) -> list[str]:
    """prlimit options for the unit's Limit*= settings (those this process may set)."""
    options = []
    for key, option in (("LimitMEMLOCK", "memlock"), ("LimitCORE", "core"),
                        ("LimitNOFILE", "nofile")):
        for value in unit.values(key)[-1:]:
            value = value.replace("infinity", "unlimited")
            hard = resource.getrlimit(getattr(resource, f"RLIMIT_{option.upper()}"))[1]
            wanted = resource.RLIM_INFINITY if value == "unlimited" else int(value)
            raising = hard != resource.RLIM_INFINITY and (
                wanted == resource.RLIM_INFINITY or wanted > hard)
            if raising and not can_raise_limits():
                continue
            options.append(f"--{option}={value}:{value}")
    return options


def sandboxed(unit: Unit, argv: list[str], *, capabilities: list[str] | None = None,
              refused: int | None = None, trace: Path | None = None) -> list[str]:
    """*argv* under the unit's rlimits, capability bounding set and no_new_privs, and (with
    *refused*) its seccomp filters, optionally traced by strace into *trace*."""
    caps = unit.capabilities() if capabilities is None else capabilities
    bounding = "".join(f",+{cap.removeprefix('CAP_').lower()}" for cap in caps)
    assert unit.value("NoNewPrivileges") == "yes"
    assert unit.value("AmbientCapabilities") == ""
    command = ["prlimit", *limits(unit), "--",
               "setpriv", f"--bounding-set=-all{bounding}", "--inh-caps=-all", "--no-new-privs"]
    if refused is not None:
        command += [sys.executable, "-c", SECCOMP_LOADER, json.dumps(seccomp_spec(unit, refused))]
    command += argv
    if trace is not None:
        command = ["strace", "-f", "-qq", "-o", str(trace), *command]
    return command


def capability_mask(names: list[str]) -> int:
    numbers = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14,
               "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}
    return sum(1 << numbers[name] for name in names)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


# -- the files themselves ---------------------------------------------------------------------


def test_every_setting_says_why() -> None:
    for path in unit_files():
        assert assignments_without_a_reason(path) == [], path.name


def test_the_daemon_has_no_option_that_would_hide_its_mount() -> None:
    unit = Unit.read(DAEMON_UNIT)
    present = {key for _, settings in unit.sections.items() for key, _ in settings}
    assert present.isdisjoint(MOUNT_NAMESPACE_OPTIONS)
    comments = " ".join(line for line in DAEMON_UNIT.read_text().splitlines()
                        if line.startswith("#"))
    assert "Tempting but absent" in comments
    for option in MOUNT_NAMESPACE_OPTIONS:  # each one is named, with the reason, in a comment
        assert option in comments, option
    assert unit.value("Type") == "notify"
    assert unit.value("Restart") == "on-failure"
    assert unit.value("RuntimeDirectoryPreserve") == "yes"
    assert unit.value("StateDirectory") == "secretfs"
    assert unit.value("StateDirectoryMode") == "0700"
    assert unit.value("DeviceAllow") == "/dev/fuse rw"
    assert unit.value("DevicePolicy") == "closed"


@needs_analyze
def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that each ExecStart= binary exists: point them at this checkout's script and
    # at /bin/true for the example app. The copies sit in one folder, which verify adds to the
    # search path, so Requires=secretfs.service and the timer's Unit= resolve to ours.
    copies = []
    for path in unit_files():
        text = path.read_text().replace(INSTALLED_BIN, str(VENV_BIN))
        text = text.replace("/usr/local/bin/app", "/bin/true")
        copy = tmp_path / path.name
        copy.write_text(text)
        copies.append(str(copy))
    assert len(copies) >= 5
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_LOG_LEVEL"}
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *copies],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert ours == [], "\n".join(ours)

    # The check is not vacuous here: a misspelt key is reported on stderr.
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert "Unknown key" in result.stderr and "ProtectSytem" in result.stderr


# -- the daemon's lifecycle, as systemd drives it -----------------------------------------------


@needs_mount
def test_start_ready_reload_and_stop_as_the_unit_says(folder: Path, tmp_path: Path,
                                                      daemons: list[Daemon]) -> None:
    unit = Unit.read(DAEMON_UNIT)
    store = make_store(tmp_path / "store")
    value = fresh()
    store.put("db_password", value)
    store.put("other", fresh())
    runtime = runtime_dir(unit, folder)
    notify = Notifications(tmp_path / "notify.sock")
    try:
        _, argv = unit.command("ExecStart")
        mountpoint = runtime / "mnt"
        assert argv[-1] == f"{RUNTIME}/mnt" and "--foreground" in argv  # Type=notify: no fork
        assert not mountpoint.exists()  # the daemon makes it inside RuntimeDirectory=
        daemon = start(daemons, substitute(argv, runtime),
                       service_env(unit, store.config, NOTIFY_SOCKET=str(notify.path)),
                       mountpoint, unit)

        message, sender = notify.receive()
        # READY=1 only once the mount answers: at this moment it lists and reads.
        assert message == b"READY=1"
        assert sorted(os.listdir(mountpoint)) == [".secretfs", "db_password", "other"]
        assert (mountpoint / "db_password/latest/value").read_text() == value
        assert sender == daemon.process.pid  # NotifyAccess=main (the default) accepts it

        # ExecReload=: policies are re-read, and the daemon keeps serving.
        store.config.write_text(store.config.read_text() + (
            "principals:\n  root: { uid: 0 }\n"
            "policies:\n  root:\n    allow:\n      - { action: read, resources: [db_password] }\n"
        ))
        _, reload = unit.command("ExecReload")
        reload = [str(daemon.process.pid) if arg == "$MAINPID" else arg for arg in reload]
        subprocess.run(reload, check=True, timeout=10)
        daemon.wait_for_log("configuration reloaded")
        assert (mountpoint / "db_password/latest/value").read_text() == value
        with pytest.raises(PermissionError):
            (mountpoint / "other/latest/value").read_bytes()

        # systemctl stop: SIGTERM to the main process (KillMode=mixed), STOPPING=1, exit 0.
        assert unit.value("KillMode") == "mixed"
        daemon.process.send_signal(signal.SIGTERM)
        assert notify.receive()[0] == b"STOPPING=1"
        assert daemon.process.wait(TIMEOUT) == 0
        assert not is_mounted(mountpoint)

        # ExecStopPost= then finds nothing to unmount; its "-" makes that failure harmless.
        prefix, stop_post = unit.command("ExecStopPost")
        assert "-" in prefix
        assert subprocess.run(substitute(stop_post, runtime), capture_output=True,
                              timeout=30).returncode != 0
    finally:
        notify.close()
    assert value not in daemon.log_text()


@needs_mount
def test_exec_stop_post_clears_the_mount_of_a_crashed_daemon(folder: Path, tmp_path: Path,
                                                             daemons: list[Daemon]) -> None:
    unit = Unit.read(DAEMON_UNIT)
    store = make_store(tmp_path / "store")
    value = fresh()
    store.put("db_password", value)
    runtime = runtime_dir(unit, folder)
    mountpoint = runtime / "mnt"
    notify = Notifications(tmp_path / "notify.sock")
    try:
        _, argv = unit.command("ExecStart")
        env = service_env(unit, store.config, NOTIFY_SOCKET=str(notify.path))
        crashed = start(daemons, substitute(argv, runtime), env, mountpoint, unit)
        assert notify.receive()[0] == b"READY=1"
        crashed.process.kill()
        crashed.process.wait()
        with pytest.raises(OSError) as dead:
            os.listdir(mountpoint)
        assert dead.value.errno == errno.ENOTCONN  # what every reader sees until the cleanup

        _, stop_post = unit.command("ExecStopPost")
        subprocess.run(substitute(stop_post, runtime), check=True, timeout=30)
        assert not is_mounted(mountpoint)

        # Restart=on-failure then starts the same command, which mounts again.
        restarted = start(daemons, substitute(argv, runtime), env, mountpoint, unit)
        assert notify.receive()[0] == b"READY=1"
        assert (mountpoint / "db_password/latest/value").read_text() == value
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(TIMEOUT) == 0
    finally:
        notify.close()


# -- the daemon inside the unit's sandbox ------------------------------------------------------

EXE_POLICY = """\
principals:
  reader: {{ uid: {uid}, exe: "{exe}" }}
policies:
  reader:
    allow:
      - {{ action: [read, list], resources: [db_password] }}
"""


def private_program(folder: Path) -> Path:
    """A copy of cat in a 0700 folder of OTHER_UID: the daemon needs CAP_DAC_READ_SEARCH to stat
    it for the exe rule, and CAP_SYS_PTRACE to read /proc/PID/exe of a process of that uid."""
    home = folder / "home"
    home.mkdir()
    program = home / "cat"
    shutil.copy2("/usr/bin/cat", program)
    for path in (home, program):
        os.chown(path, OTHER_UID, OTHER_UID)
    home.chmod(0o700)
    program.chmod(0o755)
    return program


def policed_store(tmp_path: Path, program: Path) -> tuple[Store, str]:
    store = make_store(tmp_path / "store")
    value = fresh()
    store.put("db_password", value)
    store.config.write_text(store.config.read_text()
                            + EXE_POLICY.format(uid=OTHER_UID, exe=program))
    return store, value


def reads_of(store: Store, uid: int) -> list[dict[str, Any]]:
    """The audit log's read decisions for *uid* (the daemon flushes it at least every second)."""
    def records() -> list[dict[str, Any]]:
        lines = (store.root / "audit.log").read_text().splitlines()
        return [r for r in map(json.loads, lines)
                if r.get("action") == "read" and r.get("caller", {}).get("uid") == uid]
    return eventually(records, timeout=10)


@needs_mount
@needs_sandbox_tools
@needs_analyze
def test_the_daemon_serves_inside_the_units_sandbox(folder: Path, tmp_path: Path,
                                                    daemons: list[Daemon]) -> None:
    unit = Unit.read(DAEMON_UNIT)
    program = private_program(folder)
    store, value = policed_store(tmp_path, program)
    runtime = runtime_dir(unit, folder)
    mountpoint = runtime / "mnt"
    trace = tmp_path / "strace.txt"
    notify = Notifications(tmp_path / "notify.sock")
    try:
        _, argv = unit.command("ExecStart")
        command = sandboxed(unit, substitute(argv, runtime), refused=REFUSED, trace=trace)
        daemon = start(daemons, command,
                       service_env(unit, store.config, NOTIFY_SOCKET=str(notify.path)),
                       mountpoint, unit)
        message, pid = notify.receive()
        assert message == b"READY=1"

        # It runs with exactly the unit's capabilities, no_new_privs and the seccomp filters.
        status = proc_status(pid)
        assert int(status["CapBnd"], 16) == capability_mask(unit.capabilities())
        assert int(status["CapEff"], 16) == capability_mask(unit.capabilities())
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        if any(option.startswith("--memlock=unlimited") for option in limits(unit)):
            # mlockall without CAP_IPC_LOCK, thanks to LimitMEMLOCK=infinity.
            assert int(status["VmLck"].split()[0]) > 0
            assert "mlockall failed" not in daemon.log_text()

        # A reader of another uid is identified by its executable (in a folder root may not
        # search, run by a process root may not ptrace without the capabilities) and allowed...
        target = str(mountpoint / "db_password/latest/value")
        allowed = as_user(OTHER_UID, str(program), target)
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == value.encode()
        assert reads_of(store, OTHER_UID)[-1]["principal"] == "reader"
        # ...and another executable of the same uid is not.
        denied = as_user(OTHER_UID, "/usr/bin/cat", target)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr

        # SIGHUP and SIGTERM inside the sandbox as well.
        os.kill(pid, signal.SIGHUP)
        daemon.wait_for_log("configuration reloaded")
        assert as_user(OTHER_UID, str(program), target).returncode == 0
        os.kill(pid, signal.SIGTERM)
        assert notify.receive()[0] == b"STOPPING=1"
        assert daemon.process.wait(TIMEOUT) == 0
        assert not is_mounted(mountpoint)
    finally:
        notify.close()

    # Not one call of the daemon was refused by SystemCallFilter=, RestrictAddressFamilies= or
    # RestrictNamespaces= (clone3 answers ENOSYS by design; glibc falls back to clone).
    calls = trace.read_text().splitlines()
    refused = [line for line in calls
               if errno.errorcode[REFUSED] in line or "EAFNOSUPPORT" in line
               or ("EPERM" in line and ("unshare(" in line or "setns(" in line))]
    assert refused == []
    for traced in (" mount(", " umount2(", " pidfd_open(", " socket(AF_NETLINK"):  # all of it
        assert any(traced in line for line in calls), traced
    assert value not in daemon.log_text()


@needs_sandbox_tools
@needs_analyze
@pytest.mark.skipif(not is_root, reason="setpriv --bounding-set needs root")
def test_the_seccomp_emulation_refuses_what_the_unit_forbids(tmp_path: Path) -> None:
    """A negative control: the filters loaded in the test above really filter."""
    unit = Unit.read(DAEMON_UNIT)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ctypes, errno, os, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def code(rc):\n"
        "    return errno.errorcode[ctypes.get_errno()] if rc < 0 else 'ok'\n"
        "print('swapoff', code(libc.swapoff(b'/nonexistent')))\n"  # @swap: not allowed
        "print('unshare', code(libc.unshare(0x00020000)))\n"  # CLONE_NEWNS
        "try:\n"
        "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "except OSError as e:\n"
        "    print('packet', errno.errorcode[e.errno])\n"
        "socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM).close()\n"
        "print('netlink ok')\n"
    )
    result = subprocess.run(sandboxed(unit, [sys.executable, str(probe)], refused=REFUSED),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        f"swapoff {errno.errorcode[REFUSED]}", "unshare EPERM", "packet EAFNOSUPPORT",
        "netlink ok"]


@needs_mount
@needs_sandbox_tools
@pytest.mark.parametrize("dropped", Unit.read(DAEMON_UNIT).capabilities())
def test_each_capability_of_the_bounding_set_is_needed(dropped: str, folder: Path,
                                                       tmp_path: Path,
                                                       daemons: list[Daemon]) -> None:
    unit = Unit.read(DAEMON_UNIT)
    program = private_program(folder)
    store, _ = policed_store(tmp_path, program)
    runtime = runtime_dir(unit, folder)
    mountpoint = runtime / "mnt"
    notify = Notifications(tmp_path / "notify.sock")
    try:
        _, argv = unit.command("ExecStart")
        fewer = [cap for cap in unit.capabilities() if cap != dropped]
        daemon = start(daemons, sandboxed(unit, substitute(argv, runtime), capabilities=fewer),
                       service_env(unit, store.config, NOTIFY_SOCKET=str(notify.path)),
                       mountpoint, unit)
        if dropped == "CAP_SYS_ADMIN":  # no mount(2), and no setuid fusermount3 under NNP
            assert daemon.process.wait(TIMEOUT) != 0
            assert not is_mounted(mountpoint)
            return
        assert notify.receive()[0] == b"READY=1"
        reader = as_user(OTHER_UID, str(program), str(mountpoint / "db_password/latest/value"))
        assert reader.returncode != 0 and b"Permission denied" in reader.stderr
        # Denied because the program could not be identified, not for some other reason.
        record = reads_of(store, OTHER_UID)[-1]
        assert record["decision"] == "deny" and record["principal"] == "anonymous"
        if dropped == "CAP_SYS_PTRACE":  # /proc/PID/exe of another uid: not readable
            assert record["caller"].get("exe") is None
        else:  # readable, but the rule's path is in a folder root may not search
            assert record["caller"]["exe"] == str(program)
    finally:
        notify.close()


# -- the rotation unit and timer ---------------------------------------------------------------


@needs_sandbox_tools
@needs_analyze
@pytest.mark.skipif(not is_root, reason="runs the unit's command as root, as systemd would")
def test_the_rotation_unit_rotates_with_no_capability_at_all(tmp_path: Path) -> None:
    unit = Unit.read(ROTATE_UNIT)
    assert unit.value("Type") == "oneshot"
    assert unit.capabilities() == []  # CapabilityBoundingSet= (empty): none
    store = make_store(tmp_path / "store")
    store.put("token", "--generate", "--rotate-every", "1s")
    time.sleep(1.2)  # due (the per-name offset is at most a tenth of the period)
    _, argv = unit.command("ExecStart")
    assert argv[0] == INSTALLED_BIN and argv[1:] == ["rotation", "run-due"]
    command = sandboxed(unit, [str(VENV_BIN), *argv[1:]], refused=REFUSED)
    result = subprocess.run(command, env=service_env(unit, store.config), capture_output=True,
                            timeout=120, umask=int(unit.value("UMask"), 8))
    assert result.returncode == 0, result.stderr
    assert b"token: rotated (1 \xe2\x86\x92 2)" in result.stdout
    versions = json.loads(store.cli("secrets", "versions", "token", "--json", check=True).stdout)
    assert len(versions) == 2


def test_the_timer_starts_the_rotation_unit() -> None:
    timer = Unit.read(UNITS / "secretfs-rotate.timer")
    assert timer.value("Unit", "Timer") == ROTATE_UNIT.name
    assert timer.value("Persistent", "Timer") == "true"
    assert timer.value("WantedBy", "Install") == "timers.target"


# -- the consumer examples --------------------------------------------------------------------


@needs_mount
def test_the_example_consumers_find_the_secret(folder: Path, tmp_path: Path,
                                               daemons: list[Daemon]) -> None:
    unit = Unit.read(DAEMON_UNIT)
    app = Unit.read(UNITS / "examples/app.service")
    app_run = Unit.read(UNITS / "examples/app-run.service")
    for consumer in (app, app_run):
        assert consumer.value("Requires", "Unit") == "secretfs.service"
        assert consumer.value("After", "Unit") == "secretfs.service"
    store = make_store(tmp_path / "store")
    value = fresh()
    store.put("db_password", value)
    runtime = runtime_dir(unit, folder)
    mountpoint = runtime / "mnt"
    notify = Notifications(tmp_path / "notify.sock")
    try:
        _, argv = unit.command("ExecStart")
        start(daemons, substitute(argv, runtime),
              service_env(unit, store.config, NOTIFY_SOCKET=str(notify.path)), mountpoint, unit)
        assert notify.receive()[0] == b"READY=1"

        # LoadCredential=ID:PATH: systemd copies PATH at start; the path must be a file there.
        credential, _, source = app.value("LoadCredential").partition(":")
        assert credential == "db"
        assert Path(source.replace(RUNTIME, str(runtime))).read_text() == value
        assert "${CREDENTIALS_DIRECTORY}/db" in app.value("ExecStart")
        live = app.environment()["DB_PASSWORD_FILE"]
        assert Path(live.replace(RUNTIME, str(runtime))).read_text() == value

        # `secretfs run` from the example's ExecStart, the app swapped for a check of its
        # environment (the value is compared, never printed).
        _, command = app_run.command("ExecStart")
        assert command[0] == INSTALLED_BIN and command[-1] == "/usr/local/bin/app"
        command = [*substitute(command[:-1], runtime),
                   "/bin/sh", "-c", 'test "$DB_PASSWORD" = "$EXPECTED"']
        env = {"PATH": SYSTEMD_PATH, "EXPECTED": value,
               **{k: v.replace(RUNTIME, str(runtime)) for k, v in app_run.environment().items()}}
        assert env["SECRETFS_MOUNT"] == str(mountpoint)
        result = subprocess.run(command, env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
    finally:
        notify.close()


# -- make install ------------------------------------------------------------------------------


def make(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert any(arg.startswith("DESTDIR=/") for arg in args)  # never the real system
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=timeout)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_lays_out_units_config_and_link(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    first = make("install", f"DESTDIR={dest}", "INSTALL_VENV=no")
    assert first.returncode == 0, first.stderr

    link = dest / "usr/local/bin/secretfs"
    assert link.is_symlink() and os.readlink(link) == "/opt/secretfs/bin/secretfs"
    for name in ("secretfs.service", "secretfs-rotate.service", "secretfs-rotate.timer"):
        installed = dest / "etc/systemd/system" / name
        assert mode(installed) == 0o644
        assert installed.read_text() == (UNITS / name).read_text()  # PREFIX is /usr/local
    assert not (dest / "etc/systemd/system/app.service").exists()  # examples are docs
    docs = dest / "usr/local/share/doc/secretfs"
    assert (docs / "systemd.md").is_file() and (docs / "examples/app.service").is_file()

    config = dest / "etc/secretfs/config.yaml"
    assert mode(config.parent) == 0o700 and mode(config) == 0o600
    settings = load_config(str(config)).manager
    assert settings.backend.type == "local"
    assert settings.backend.path == Path("/var/lib/secretfs/store.db")
    assert settings.encryption.key_file == Path("/var/lib/secretfs/master.key")
    assert settings.audit.path == Path("/var/lib/secretfs/audit.log")
    assert settings.mount.path == Path(f"{RUNTIME}/mnt")
    # The daemon's unit mounts where the config says, and keeps its state where it points.
    _, argv = Unit.read(DAEMON_UNIT).command("ExecStart")
    assert argv[-1] == str(settings.mount.path)

    # A second install keeps an edited config, and fixes the folder's mode.
    config.write_text(config.read_text() + "# edited\n")
    config.parent.chmod(0o755)
    second = make("install", f"DESTDIR={dest}", "INSTALL_VENV=no")
    assert second.returncode == 0, second.stderr
    assert config.read_text().endswith("# edited\n")
    assert mode(config.parent) == 0o700

    # Another PREFIX: the link and every path in the units follow.
    other = tmp_path / "other"
    assert make("install", f"DESTDIR={other}", "PREFIX=/usr", "INSTALL_VENV=no").returncode == 0
    assert os.readlink(other / "usr/bin/secretfs") == "/opt/secretfs/bin/secretfs"
    service = (other / "etc/systemd/system/secretfs.service").read_text()
    assert "/usr/local" not in service and "ExecStart=/usr/bin/secretfs mount" in service

    # uninstall removes what install put there, never the config.
    removed = make("uninstall", f"DESTDIR={dest}")
    assert removed.returncode == 0, removed.stderr
    assert not link.is_symlink() and not (dest / "etc/systemd/system/secretfs.service").exists()
    assert config.read_text().endswith("# edited\n")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_builds_a_relocated_venv(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    # --no-deps keeps it quick; the build backend (setuptools) still comes from the index.
    result = make("install", f"DESTDIR={dest}", "PIP_FLAGS=--no-deps", "EXTRAS=", timeout=300)
    if result.returncode != 0 and any(
            sign in result.stdout + result.stderr for sign in (
                "Failed to establish a new connection", "Temporary failure in name resolution",
                "No matching distribution found for setuptools", "Network is unreachable")):
        pytest.skip("pip could not reach a package index for the build backend")
    assert result.returncode == 0, result.stderr[-3000:]
    # Installing again (an upgrade) works on the relocated venv.
    again = make("install", f"DESTDIR={dest}", "PIP_FLAGS=--no-deps", "EXTRAS=", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    venv = dest / "opt/secretfs"
    script = venv / "bin/secretfs"
    # The scripts name the final location, not the staging one.
    assert script.read_text().splitlines()[0] in ("#!/opt/secretfs/bin/python",
                                                  "#!/opt/secretfs/bin/python3")
    staged = [p.name for p in (venv / "bin").iterdir()
              if p.is_file() and not p.is_symlink() and str(dest) in p.read_text(errors="ignore")]
    assert staged == []
    assert mode(script) & 0o005 == 0o005  # readable and runnable by services' own users
    found = subprocess.run(
        [str(venv / "bin/python"), "-c", "import secretfs; print(secretfs.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(str(venv / "lib"))
