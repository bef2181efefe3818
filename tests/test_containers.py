"""Containers reading a host's secretfs mount, without docker: "containers" made with unshare
(own mount, pid and network namespaces) and, where a principal must recognise one, a real cgroup
named like docker's scope. What docs/containers.md promises, measured here:

- one secret folder bind-mounted into a container reads through (the daemon decides each open);
- a ``container`` principal admits that container's processes and not a host process of the same
  uid, and the audit log names the container;
- a bind of the mountpoint's *parent* with rslave propagation follows a daemon restart, a bind of
  the mountpoint itself goes dead;
- the Compose and Kubernetes examples parse and carry the propagation settings the guide names.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cgroups import cgroups
from tests.helpers import Store, make_store
from tests.mounting import Mount, as_user, force_unmount, is_mounted, mounted, start, stop

__all__ = ["cgroups"]  # the fixture, re-exported for pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

real_mounts = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse")
    or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="real mounts and namespaces need root, /dev/fuse, unshare and nsenter")

READER_UID = 4242


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def folder() -> Iterator[Path]:
    """A temp folder every uid may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="secretfs-containers-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def db_store(tmp_path: Path) -> tuple[Store, str]:
    """A store holding a map-valued secret ``db`` (user, password); returns the password."""
    store = make_store(tmp_path / "store")
    password = "pw-" + os.urandom(8).hex()
    store.put("db", "--key", "user=app", "--key", f"password={password}")
    return store, password


# -- a container made with unshare ------------------------------------------------------------


def run_container(secret_folder: Path, reader: list[str], *, cgroup: Path | None = None
                  ) -> subprocess.CompletedProcess[bytes]:
    """Run *reader* in a fresh "container": its own mount, pid and network namespaces and /proc,
    a tmpfs over /run (so nothing is created on the host's /run), *secret_folder* bind-mounted
    read-only at /run/secrets — what ``docker run -v <mount>/db:/run/secrets:ro`` does. With
    *cgroup*, the container's processes live in that cgroup, as docker puts them in
    ``docker-<id>.scope``."""
    inner = ("mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/secrets && "
             f"mount --bind {shlex.quote(str(secret_folder))} /run/secrets && "
             "mount -o remount,bind,ro /run/secrets && "
             f"exec {shlex.join(reader)}")
    container = ["unshare", "--mount", "--propagation", "private", "--pid", "--net", "--fork",
                 "--mount-proc", "sh", "-c", inner]
    if cgroup is not None:
        enter = f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && exec "
        container = ["sh", "-c", enter + shlex.join(container)]
    return subprocess.run(container, capture_output=True, timeout=30)


def as_uid(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def audit_records(store: Store) -> list[dict]:
    return [json.loads(line) for line in (store.root / "audit.log").read_text().splitlines()]


# -- a. one secret folder bound into a container ----------------------------------------------


@real_mounts
def test_a_container_reads_a_secret_folder_bound_at_run_secrets(folder, db_store) -> None:
    store, password = db_store
    host_run_secrets = Path("/run/secrets").exists()
    with mounted(store, folder / "mnt") as mount:
        inside = run_container(mount.path / "db",
                               ["sh", "-c", "echo $$ >&2; cat /run/secrets/latest/password"])
        assert inside.returncode == 0, inside.stderr.decode(errors="replace")[-500:]
        assert inside.stdout == password.encode()
        # it really was another pid namespace: the reader's shell was pid 1 or 2 in there
        assert int(inside.stderr.split()[0]) <= 2
    assert Path("/run/secrets").exists() == host_run_secrets  # the host's /run was left alone
    records = [r for r in audit_records(store) if r["event"] == "read"]
    assert records, "the container's read was not audited"
    assert records[-1]["resource"] == "db"
    assert records[-1]["caller"]["pid"] > 2  # the daemon saw the host pid, not the inner one
    assert records[-1]["caller"]["pid_ns"] != os.stat("/proc/self/ns/pid").st_ino


# -- b. a container principal: the container's uid 4242 reads, the host's uid 4242 does not --

CONTAINER_POLICY = """\
principals:
  app: {{ container: "{container}" }}
policies:
  app:
    allow:
      - {{ action: read, resources: [db] }}
"""


@real_mounts
def test_a_container_principal_admits_the_container_not_the_same_uid_on_the_host(
        folder, db_store, cgroups) -> None:
    store, password = db_store
    container_id = os.urandom(32).hex()
    store.config.write_text(store.config.read_text()
                            + CONTAINER_POLICY.format(container=container_id))
    scope = cgroups(f"system.slice/docker-{container_id}.scope")
    with mounted(store, folder / "mnt") as mount:
        inside = run_container(mount.path / "db",
                               as_uid(READER_UID, "cat", "/run/secrets/latest/password"),
                               cgroup=scope)
        assert inside.returncode == 0, inside.stderr.decode(errors="replace")[-500:]
        assert inside.stdout == password.encode()

        host = as_user(READER_UID, "cat", str(mount.path / "db/latest/password"))
        assert host.returncode != 0
        assert os.strerror(errno.EACCES).encode() in host.stderr
        assert host.stdout == b""
    records = [r for r in audit_records(store)
               if r["event"] in ("read", "denied") and r["caller"]["uid"] == READER_UID]
    allowed = [r for r in records if r["decision"] == "allow"]
    denied = [r for r in records if r["decision"] == "deny"]
    assert len(allowed) == 1 and len(denied) == 1, records
    assert allowed[0]["caller"]["container"] == container_id
    assert allowed[0]["caller"]["unit"] == f"docker-{container_id}.scope"
    assert allowed[0]["principal"] == "app"
    assert allowed[0]["caller"]["pid_ns"] != os.stat("/proc/self/ns/pid").st_ino
    assert "container" not in denied[0]["caller"]
    assert denied[0]["principal"] == "anonymous"
    assert denied[0]["resource"] == "db"


# -- c. a daemon restart: the parent bound rslave follows, the mountpoint's bind goes dead -----


def nsenter(pid: int, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *argv], capture_output=True,
                          timeout=30)


def shared_folder(path: Path) -> None:
    """Make *path* a mount of its own with shared propagation (what /run is under systemd)."""
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)


def start_sleeper() -> subprocess.Popen[bytes]:
    """A long-lived "container": its own mount namespace, every mount a slave of the host's
    (so the host's mounts and unmounts reach it, its own stay inside)."""
    sleeper = subprocess.Popen(["unshare", "--mount", "--propagation", "slave",
                                "sleep", "infinity"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    ours = os.readlink("/proc/self/ns/mnt")
    while time.monotonic() < deadline:
        try:
            comm = Path(f"/proc/{sleeper.pid}/comm").read_text().strip()
            if comm == "sleep" and os.readlink(f"/proc/{sleeper.pid}/ns/mnt") != ours:
                return sleeper
        except OSError:
            pass
        time.sleep(0.02)
    sleeper.kill()
    raise AssertionError("the container did not start")


class Host:
    """The recommended layout on a host (in a temp folder): ``run`` is the host's /run, a shared
    mount as systemd makes it; ``parent`` its plain folder /run/secretfs; ``path`` the daemon's
    mountpoint /run/secretfs/mnt. With *own_mount*, ``run`` is a plain folder and ``parent`` is
    made a shared mount of its own instead (the recipe for a host whose /run is private).

    A long-lived container (``sleeper``) binds the parent at ``c1`` with rslave propagation,
    read-only, as ``docker run --mount type=bind,src=/run/secretfs,dst=/run/secretfs,readonly,
    bind-propagation=rslave`` does; it also binds the mountpoint itself at ``c2`` and one secret's
    folder ``<mount>/db`` at ``c3`` (``-v /run/secretfs/mnt/db:/run/secrets/db``)."""

    def __init__(self, folder: Path, store: Store, *, own_mount: bool = False) -> None:
        self.folder, self.store, self.own_mount = folder, store, own_mount
        self.run = folder / "run"
        self.parent = self.run / "secretfs"
        self.path = self.parent / "mnt"
        self.c1, self.c2, self.c3 = folder / "c1", folder / "c2", folder / "c3"
        self.mount: Mount | None = None
        self.sleeper: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start_daemon(self) -> None:
        self.starts += 1
        log = self.folder / f"mnt-{self.starts}.log"
        self.mount = Mount(self.path, start(self.store, self.path, log), log)

    def kill_daemon(self) -> None:
        assert self.mount is not None
        self.mount.process.kill()
        self.mount.process.wait()

    def read(self, where: str) -> subprocess.CompletedProcess[bytes]:
        """`cat` the password inside the container, through c1 (the parent), c2 (the
        mountpoint) or c3 (the secret's folder)."""
        assert self.sleeper is not None
        inside = {"c1": f"{self.c1}/mnt/db", "c2": f"{self.c2}/db", "c3": str(self.c3)}[where]
        return nsenter(self.sleeper.pid, "cat", f"{inside}/latest/password")

    def __enter__(self) -> Host:
        try:
            for folder in (self.c1, self.c2, self.c3):
                folder.mkdir()
            if self.own_mount:
                self.run.mkdir()
                shared_folder(self.parent)
            else:
                shared_folder(self.run)
                self.parent.mkdir()
            self.start_daemon()
            self.sleeper = start_sleeper()
            bound = nsenter(self.sleeper.pid, "sh", "-c",
                            f"mount --rbind {self.parent} {self.c1} && "
                            f"mount --make-rslave {self.c1} && "
                            f"mount -o remount,bind,ro {self.c1} && "
                            f"mount --bind {self.path} {self.c2} && "
                            f"mount --bind {self.path}/db {self.c3}")
            assert bound.returncode == 0, bound.stderr
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.sleeper is not None:
            self.sleeper.kill()  # its mount namespace, with c1, c2 and c3, goes with it
            self.sleeper.wait()
        if self.mount is not None:
            stop(self.mount)
        force_unmount(self.path)
        for shared in (self.parent, self.run):
            if is_mounted(shared):
                subprocess.run(["umount", "-l", str(shared)], capture_output=True)


@real_mounts
@pytest.mark.parametrize("own_mount", [False, True], ids=["run-shared", "parent-own-mount"])
@pytest.mark.parametrize("cleanup", ["fusermount3", "daemon"])
def test_a_parent_bound_rslave_follows_a_daemon_restart_the_mountpoint_bind_does_not(
        folder, db_store, cleanup, own_mount) -> None:
    store, password = db_store
    with Host(folder, store, own_mount=own_mount) as host:
        for bind in ("c1", "c2", "c3"):
            assert not is_mounted(getattr(host, bind))  # the container's binds stay inside it
            assert host.read(bind).stdout == password.encode(), bind

        host.kill_daemon()
        dead = host.read("c1")
        assert dead.returncode != 0 and dead.stdout == b""
        assert os.strerror(errno.ENOTCONN).encode() in dead.stderr
        if cleanup == "fusermount3":  # by hand; else the new daemon clears the dead mount itself
            subprocess.run(["fusermount3", "-uz", str(host.path)], check=True)
            cleared = host.read("c1")  # the unmount reached the container: an empty folder
            assert os.strerror(errno.ENOENT).encode() in cleared.stderr
        host.start_daemon()

        through_parent = host.read("c1")
        assert through_parent.returncode == 0, through_parent.stderr
        assert through_parent.stdout == password.encode()
        for bind in ("c2", "c3"):  # the mountpoint's bind and a secret folder's: dead for good
            pinned = host.read(bind)
            assert pinned.returncode != 0 and pinned.stdout == b"", bind
            assert os.strerror(errno.ENOTCONN).encode() in pinned.stderr, bind


@real_mounts
def test_a_parent_folder_recreated_on_the_host_is_no_longer_the_one_the_container_bound(
        folder, db_store) -> None:
    """Why /run/secretfs must outlive the daemon (systemd: RuntimeDirectoryPreserve=yes)."""
    store, password = db_store
    with Host(folder, store) as host:
        assert host.read("c1").stdout == password.encode()
        host.kill_daemon()
        subprocess.run(["fusermount3", "-uz", str(host.path)], check=True)
        shutil.rmtree(host.parent)  # what RuntimeDirectory= does on stop without Preserve
        host.parent.mkdir()
        host.start_daemon()
        assert (host.path / "db/latest/password").read_bytes() == password.encode()  # on the host
        gone = host.read("c1")
        assert gone.returncode != 0 and gone.stdout == b""
        assert os.strerror(errno.ENOENT).encode() in gone.stderr


# -- d. the examples --------------------------------------------------------------------------


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def check_secretfs_config(text: str, source: str) -> None:
    """*text* is a valid secretfs configuration whose principal ``app`` may read ``db``, mounted
    at /run/secretfs/mnt with allow_other."""
    from secretfs.access.policy import PolicyEngine
    from secretfs.config import parse_config

    config = parse_config(text, source)
    assert str(config.manager.mount.path) == "/run/secretfs/mnt"
    assert config.manager.mount.allow_other is True
    assert PolicyEngine.from_config(config).check_access("app", "read", "db").allowed


def test_the_compose_example_binds_the_parent_read_only_with_rslave() -> None:
    (compose,) = load_all(EXAMPLES / "containers" / "compose.yaml")
    binds = [(name, volume) for name, service in compose["services"].items()
             for volume in service.get("volumes", []) if isinstance(volume, dict)]
    secretfs_binds = [(name, v) for name, v in binds if v.get("source") == "/run/secretfs"]
    assert secretfs_binds, "no service binds /run/secretfs"
    for name, volume in secretfs_binds:
        assert volume["type"] == "bind"
        assert volume["target"] == "/run/secretfs"
        assert volume["read_only"] is True
        assert volume["bind"]["propagation"] == "rslave"
        service = compose["services"][name]
        assert service["read_only"] is True
        assert "/run/secretfs/mnt/" in json.dumps(service)  # it reads under the mount
    assert not any(v.get("source", "").startswith("/run/secretfs/mnt") for _, v in binds)
    config = EXAMPLES / "containers" / "config.yaml"
    check_secretfs_config(config.read_text(), str(config))


def containers_of(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_the_kubernetes_examples_name_hostpid_and_mount_propagation() -> None:
    docs = load_all(EXAMPLES / "kubernetes" / "daemonset.yaml")
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod_spec = daemonset["spec"]["template"]["spec"]
    assert pod_spec["hostPID"] is True
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    (daemon,) = pod_spec["containers"]
    assert daemon["securityContext"]["privileged"] is True  # Bidirectional requires it
    (run_mount,) = [m for m in daemon["volumeMounts"] if m["mountPath"] == "/run/secretfs"]
    assert run_mount["mountPropagation"] == "Bidirectional"
    assert volumes[run_mount["name"]]["hostPath"]["path"] == "/run/secretfs"
    assert daemon["command"] == ["secretfs", "mount", "--foreground", "/run/secretfs/mnt"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    check_secretfs_config(config_map["data"]["config.yaml"], "daemonset.yaml ConfigMap")

    (pod,) = [d for d in load_all(EXAMPLES / "kubernetes" / "app-pod.yaml") if d["kind"] == "Pod"]
    pod_volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert pod["spec"]["securityContext"]["runAsUser"] == 4242  # principal app: { uid: 4242 }
    for container in containers_of(pod):
        (secrets,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/secretfs"]
        assert secrets["mountPropagation"] == "HostToContainer"
        assert secrets["readOnly"] is True
        assert pod_volumes[secrets["name"]]["hostPath"]["path"] == "/run/secretfs"
        assert "/run/secretfs/mnt/" in json.dumps(container)
