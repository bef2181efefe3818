"""``secretfs doctor``: the pre-flight and health check an operator runs on a host.

Each check is one small function that looks at one thing and answers ``ok``, ``warn`` or
``fail``, what it found, and for warn/fail the fix: a command or a config change the operator
can act on. The CLI prints one line per check (or a JSON list with ``--json``) and exits 1 when
any check failed; warnings alone exit 0. docs/doctor.md says what each check looks at.

Rules this module keeps:

- **Never a value.** No check reads a secret's value; backend errors are shown as secretfs
  words them (those messages carry no values) and unexpected exceptions by type name only.
- **Nothing hangs.** Network probes run with a short per-request timeout, and every probe that
  can block (a backend, a FUSE mount whose daemon is stopped) runs in a daemon thread that is
  abandoned after a deadline: a stuck mount must not make the doctor stuck too.
- **Nothing heavy unless needed.** Only the configured backend's check imports its client
  (boto3, keyring); trio and pyfuse3 are never imported.
- **One cause, one fail.** When the configuration does not load, the checks that need it say
  so as a warning instead of failing again; a master key that does not load is reported by
  ``key-file`` and the backend check then does not repeat it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from secretfs.errors import SecretfsError

if TYPE_CHECKING:
    from secretfs.config import Config
    from secretfs.crypto.keys import MasterKey

T = TypeVar("T")

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

FUSE_DEVICE = "/dev/fuse"
FUSE_MAJOR, FUSE_MINOR = 10, 229
FUSE_CONF = "/etc/fuse.conf"
MOUNT_TYPE = "fuse.secretfs"
NETWORK_TIMEOUT = 3.0  # seconds per backend request (connect, send, each receive)
BACKEND_DEADLINE = 10.0  # seconds for a whole backend check (a cluster, AWS's retries)
MOUNT_DEADLINE = 3.0  # seconds a mount gets to answer a listdir
AUDIT_TAIL_LINES = 100  # the newest lines whose chain and MACs the audit check verifies
AUDIT_TAIL_BYTES = 1 << 20  # read at most this much from the end of the log for them
EARLIEST_SANE = datetime(2024, 1, 1, tzinfo=UTC)  # a clock before this is simply wrong
SKIPPED = "not checked: the configuration did not load (see the config check)"
PASSPHRASE_ENV = "SECRETFS_PASSPHRASE"


# -- results ----------------------------------------------------------------------------------


class Outcome(NamedTuple):
    status: str
    detail: str
    fix: str | None = None


def ok(detail: str) -> Outcome:
    return Outcome(OK, detail)


def warn(detail: str, fix: str) -> Outcome:
    return Outcome(WARN, detail, fix)


def fail(detail: str, fix: str) -> Outcome:
    return Outcome(FAIL, detail, fix)


def worst(found: list[Outcome], all_ok: str) -> Outcome:
    """One outcome for several findings: the worst status; the problems' details and fixes
    joined (the ok details are dropped then: the line is about what needs doing)."""
    problems = [item for item in found if item.status != OK]
    if not problems:
        return ok(all_ok)
    status = max((item.status for item in problems), key=_RANK.__getitem__)
    fixes = list(dict.fromkeys(item.fix for item in problems if item.fix))
    return Outcome(status, "; ".join(item.detail for item in problems), "; ".join(fixes) or None)


@dataclass(frozen=True)
class Result:
    check: str
    status: str
    detail: str
    fix: str | None

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "detail": self.detail,
                "fix": self.fix}

    def line(self, width: int) -> str:
        text = f"{self.status:<4}  {self.check:<{width}}  {self.detail}"
        return f"{text} (fix: {self.fix})" if self.fix else text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _one_line(text: str) -> str:
    """Control characters (newlines from an OS message, escapes in a path) as one space: each
    check is one line of output, and a terminal must not be steered by a file name."""
    return _CONTROL.sub(" ", text).strip()


# -- shared state -----------------------------------------------------------------------------


@dataclass
class Context:
    """What the checks share: the configuration (or why it did not load), and the master key
    once key-file has loaded it, so later checks neither load it twice nor fail twice."""

    config_source: str | None
    euid: int
    config: Config | None = None
    config_error: SecretfsError | None = None
    master_key: MasterKey | None = None
    master_key_failed: bool = False

    @classmethod
    def load(cls, config_source: str | None) -> Context:
        from secretfs.config import load_config

        context = cls(config_source, os.geteuid())
        try:
            context.config = load_config(config_source)
        except SecretfsError as error:
            context.config_error = error
        return context


def _within(seconds: float, work: Callable[[], T]) -> T:
    """*work()*'s result, run in a daemon thread; TimeoutError if it takes longer than
    *seconds* (the thread is abandoned: a listdir on a stopped FUSE daemon cannot be
    interrupted, and the process exits without waiting for a daemon thread)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as error:  # handed to the caller's thread below
            box["error"] = error

    thread = threading.Thread(target=run, name="secretfs-doctor-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["result"]


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def _quote(path: str | os.PathLike[str]) -> str:
    return shlex.quote(str(path))


def _yaml_line(source: str | None, *keys: str) -> int | None:
    """The line of the key ``keys[0].keys[1]…`` in the config file *source* (a Config keeps
    no positions, and a policy problem is only actionable with its line)."""
    if not source or source.startswith("<"):
        return None
    import yaml

    try:
        text = Path(source).read_text(encoding="utf-8-sig")
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if node is None or node.id != "mapping":
            return line
        for key_node, value_node in node.value:
            if key_node.id == "scalar" and key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return line
    return line


def _where(config: Config, *keys: str) -> str:
    """``file:line: a.b`` for messages (just the dotted key when the line is unknown)."""
    dotted = ".".join(keys)
    line = _yaml_line(config.source, *keys)
    return f"{config.source}:{line}: {dotted}" if line else dotted


# -- fuse-device ------------------------------------------------------------------------------

_DEVICE_FIX = ("on a host: modprobe fuse (the kernel then creates it); in a container: run it "
               "with --device /dev/fuse")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a device"


def check_fuse_device(context: Context) -> Outcome:
    """/dev/fuse is the FUSE character device (10:229) and opens read-write for this user."""
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return fail(f"{FUSE_DEVICE} does not exist: nothing can be mounted", _DEVICE_FIX)
    except OSError as error:
        return fail(f"cannot stat {FUSE_DEVICE}: {error.strerror}", _DEVICE_FIX)
    replace = ("remove it and create the device: rm /dev/fuse && mknod -m 0666 /dev/fuse c 10 "
               "229; in a container: run it with --device /dev/fuse")
    if not stat.S_ISCHR(st.st_mode):
        return fail(f"{FUSE_DEVICE} is {_kind(st.st_mode)}, not the FUSE character device",
                    replace)
    found = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if found != (FUSE_MAJOR, FUSE_MINOR):
        return fail(f"{FUSE_DEVICE} is character device {found[0]}:{found[1]}, not FUSE "
                    f"({FUSE_MAJOR}:{FUSE_MINOR})", replace)
    try:
        # Opening the device without mounting anything is harmless: the kernel allocates a
        # connection only at mount time. It is the one test that sees cgroup device rules.
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        why = f"uid {context.euid} cannot open {FUSE_DEVICE} read-write ({error.strerror})"
        if error.errno == errno.EPERM:  # the device cgroup (systemd DevicePolicy, a container)
            return fail(why, "systemd: add DeviceAllow=/dev/fuse rw to the unit; a container: "
                             "run it with --device /dev/fuse")
        if error.errno == errno.EACCES:  # its mode bits
            return fail(why, "mount as root (the systemd unit does), or let users open it: "
                             "chmod 0666 /dev/fuse (Debian's default)")
        return fail(why, "modprobe fuse; in a container: run it with --device /dev/fuse")
    return ok(f"{FUSE_DEVICE} is the FUSE device ({FUSE_MAJOR}:{FUSE_MINOR}) and opens read-write")


# -- fusermount -------------------------------------------------------------------------------


def check_fusermount(context: Context) -> Outcome:
    """fusermount3 on PATH and setuid root: non-root mounts need it; root uses it to unmount."""
    import shutil

    found = shutil.which("fusermount3")
    root = context.euid == 0
    if found is None:
        if root:
            return warn("fusermount3 is not on PATH: root mounts work without it, but "
                        "'secretfs umount' and clearing a dead mount use it", "apt install fuse3")
        return fail(f"fusermount3 is not on PATH: uid {context.euid} cannot mount",
                    "apt install fuse3")
    st = os.stat(found)
    if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
        return ok(f"{found} is setuid root")
    if root:
        return ok(f"{found} is not setuid root: only root can mount (this is root)")
    return fail(f"{found} is not setuid root: mounts by uid {context.euid} fail",
                f"chmod u+s {_quote(found)} (or: apt install --reinstall fuse3)")


# -- config and policy ------------------------------------------------------------------------


def check_config(context: Context) -> Outcome:
    """The configuration loads and validates, as every command and the daemon would load it."""
    error = context.config_error
    if error is not None:
        return fail(error.what, error.fix or "fix the file, then run 'secretfs doctor' again")
    config = context.config
    assert config is not None
    settings = config.manager
    where = config.source or "embedded default (no config file)"
    return ok(f"{where}: backend {settings.backend.type}, encryption "
              f"{settings.encryption.provider}, {_count(len(config.principals), 'principal')}, "
              f"{_count(len(config.policies), 'policy', 'policies')}")


def _needs_config(check: Callable[[Context, Config], Outcome]) -> Callable[[Context], Outcome]:
    """A check of the configured setup: a warning (not a second fail) when there is none."""

    def run(context: Context) -> Outcome:
        if context.config is None:
            return warn(SKIPPED, "fix the configuration first")
        return check(context, context.config)

    run.__name__ = check.__name__
    run.__doc__ = check.__doc__
    return run


@_needs_config
def check_policy(context: Context, config: Config) -> Outcome:
    """The access control the daemon would use loads; every policy belongs to a principal."""
    import difflib

    from secretfs.access.policy import ANONYMOUS, AccessPolicy, access_control

    if not config.policies:
        owner = f" and uid {context.euid}" if context.euid else ""
        return ok(f"no policies configured: the built-in policy (root{owner} may do "
                  "everything through the mount, others nothing)")
    found: list[Outcome] = []
    for name, spec in config.policies.items():
        if name not in config.principals and name != ANONYMOUS:
            close = difflib.get_close_matches(name, list(config.principals), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            found.append(fail(
                f"{_where(config, 'policies', name)}: no principal is named {name!r}, so this "
                "policy never applies",
                f"{hint}a policy applies to the principal of the same name: add "
                f"principals.{name} (e.g. {{ uid: 1001 }}) or rename the policy "
                f"('{ANONYMOUS}' is every caller no principal matches)"))
        try:
            AccessPolicy.from_spec(spec)
        except (ValueError, LookupError) as error:  # a condition the engine cannot evaluate
            found.append(fail(f"{_where(config, 'policies', name)}: {error}",
                              "fix the condition (docs/policies.md), e.g. time_window "
                              "'09:00-17:00 Mon-Fri tz=Europe/Berlin'"))
    found.extend(_unknown_names(config))
    if not any(item.status == FAIL for item in found):
        try:
            access_control(config, context.euid)  # exactly what the daemon builds
        except (ValueError, LookupError) as error:
            found.append(fail(f"the policies do not load: {error}",
                              "fix the policies section (docs/policies.md)"))
    unused = [name for name in config.principals if name not in config.policies]
    note = (f"; principal {', '.join(unused)} has no policy (denied everything)"
            if unused else "")
    return worst(found, f"{_count(len(config.principals), 'principal')} and "
                        f"{_count(len(config.policies), 'policy', 'policies')} load as the "
                        f"daemon loads them{note}")


def _unknown_names(config: Config) -> list[Outcome]:
    """Principals matching a user or group this host does not have: they never match, so
    their callers fall through to a later principal or to anonymous (a typo, usually)."""
    import grp
    import pwd

    found = []
    for name, spec in config.principals.items():
        for kind, value, lookup in (("user", spec.user, pwd.getpwnam),
                                    ("group", spec.group, grp.getgrnam)):
            if value is None:
                continue
            try:
                lookup(value)
            except KeyError:
                found.append(warn(
                    f"{_where(config, 'principals', name, kind)}: no {kind} {value!r} on this "
                    f"host, so principal {name} never matches by {kind}",
                    f"create the {kind} or correct the name"))
    return found


# -- allow-other ------------------------------------------------------------------------------


def _fuse_conf_allows_other() -> bool:
    try:
        with open(FUSE_CONF, encoding="utf-8", errors="replace") as conf:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


@_needs_config
def check_allow_other(context: Context, config: Config) -> Outcome:
    """Whether other users (services, containers) can reach a mount made by this user.

    Asks the daemon's own mount_options(), so the answer follows what the daemon really passes
    (today: allow_other only for mounts made by root, when mount.allow_other is true)."""
    from secretfs.fs.daemon import mount_options

    euid = context.euid
    wanted = config.manager.mount.allow_other
    passes = "allow_other" in mount_options(config)
    if passes and euid != 0 and not _fuse_conf_allows_other():
        return fail(f"a mount by uid {euid} passes allow_other, which {FUSE_CONF} does not "
                    "allow (no user_allow_other line): the mount fails",
                    f"add the line user_allow_other to {FUSE_CONF}, or set "
                    "secrets_manager.mount.allow_other: false")
    if passes:
        return ok("the mount passes allow_other: other users and containers reach it, and the "
                  "policy decides each open")
    # Principals for other callers are pointless if those callers cannot reach the mount.
    others = [name for name, spec in config.principals.items() if spec.uid != euid]
    if not wanted:
        reach = f"only uid {euid} reads through the mount (mount.allow_other: false)"
        fix = "set secrets_manager.mount.allow_other: true and mount as root"
    else:
        conf = "has" if _fuse_conf_allows_other() else "has no"
        reach = (f"a mount by uid {euid} is readable by uid {euid} alone: secretfs passes "
                 f"allow_other only to mounts made by root ({FUSE_CONF} {conf} "
                 "user_allow_other)")
        fix = "mount as root (the systemd unit does) to serve other users"
    if others:
        return warn(f"{reach}, so principal {', '.join(others)} cannot use it", fix)
    return ok(reach)


# -- key-file ---------------------------------------------------------------------------------


def _private_file(path: Path, euid: int, what: str) -> Outcome | None:
    """Why *path* is not a file only this user can read and write (ssh's rules), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # the caller knows whether missing is a problem
    except OSError as error:
        return fail(f"cannot stat {what} {path}: {error.strerror}",
                    "run secretfs as the user that owns it")
    quoted = _quote(path)
    if stat.S_ISLNK(st.st_mode):
        return fail(f"{what} {path} is a symbolic link (refused)",
                    "replace the link with the file itself, owned by you, mode 0600")
    if not stat.S_ISREG(st.st_mode):
        return fail(f"{what} {path} is {_kind(st.st_mode)}, not a regular file",
                    "point the configuration at the file secretfs created")
    if st.st_uid != euid:
        return fail(f"{what} {path} is owned by uid {st.st_uid}, not uid {euid} running "
                    "secretfs (refused)", f"run secretfs as its owner, or: chown {euid} {quoted}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        how = ("readable by group or others" if mode & 0o044 else
               "writable by group or others" if mode & 0o022 else "open to group or others")
        return fail(f"{what} {path} is {how} (mode {mode:04o}; refused)", f"chmod 600 {quoted}")
    return None


def _open_folder(folder: Path) -> Outcome | None:
    """A folder others may write into could have the key or store replaced: refuse it."""
    try:
        st = os.stat(folder)
    except OSError:
        return None  # missing: created 0700 by init
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return fail(f"data folder {folder} is writable by group or others (mode {mode:04o})",
                    f"chmod go-w {_quote(folder)} (secretfs creates its folders 0700)")
    return None


@_needs_config
def check_key_file(context: Context, config: Config) -> Outcome:
    """The master key's file: present, a regular file of this user, mode 0600, in folders
    nobody else can write; for remote providers, which service holds the key."""
    from secretfs.crypto.keys import REMOTE_PROVIDERS, load_master_key

    encryption = config.manager.encryption
    provider, path = encryption.provider, encryption.key_file
    backend = config.manager.backend
    found: list[Outcome] = []
    folders = [path.parent]
    if backend.type == "local":
        folders.append(backend.path.parent)
        store_mode = _mode(backend.path)
        if store_mode is not None and store_mode & 0o077:
            # values are sealed, but names, tags and metadata are not
            found.append(warn(f"store {backend.path} is open to group or others (mode "
                              f"{store_mode:04o}): secret names and metadata are readable",
                              f"chmod 600 {_quote(backend.path)}"))
    for folder in dict.fromkeys(folders):
        problem = _open_folder(folder)
        if problem is not None:
            found.append(problem)
    if provider == "keyring":
        # Nothing on disk to check; the backend check loads it (and imports keyring) then.
        done = ("keyring provider: the master key is in the OS keychain (service secretfs, "
                f"entry master-key:{path})")
        return worst(found, done)
    what = {"file": "key file", "passphrase": "passphrase salt file"}.get(
        provider, "wrapped root key file")
    problem = _private_file(path, context.euid, what)
    if problem is None and not path.exists():
        problem = fail(f"no {what} at {path}", "a new store: run 'secretfs init'; an existing "
                       "store: restore the key from its backup (a new key cannot read it)")
    if problem is not None:
        context.master_key_failed = True
        found.append(problem)
        return worst(found, "")
    if provider in REMOTE_PROVIDERS:
        setting = REMOTE_PROVIDERS[provider]
        service = "OpenBao Transit" if provider == "openbao_transit" else "AWS KMS"
        name = encryption.key_name or encryption.key_id
        return worst(found, f"{provider} provider: the master key stays in {service} "
                            f"({setting} {name}); {path} (0600) holds the wrapped audit root key")
    if provider == "passphrase" and not os.environ.get(PASSPHRASE_ENV):
        return worst(found, f"passphrase provider: {path} is 0600; the passphrase is not "
                            f"checked ({PASSPHRASE_ENV} is unset and doctor never prompts)")
    try:
        context.master_key = load_master_key(provider, path, create=False)
    except SecretfsError as error:
        context.master_key_failed = True
        found.append(fail(error.what, error.fix or "restore the key file from its backup"))
        return worst(found, "")
    return worst(found, f"{provider} provider: {path}, owned by uid {context.euid}, mode 0600, "
                        f"key id {context.master_key.key_id}")


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


# -- backend ----------------------------------------------------------------------------------


def _with_timeout(config: Config) -> Config:
    """*config* with the backend's request timeout cut to NETWORK_TIMEOUT: a doctor answers in
    seconds, where the daemon would rather wait out a slow server."""
    from dataclasses import replace
    from types import MappingProxyType

    backend = config.manager.backend
    options = dict(backend.options)
    options["timeout"] = min(float(options.get("timeout") or NETWORK_TIMEOUT), NETWORK_TIMEOUT)
    backend = replace(backend, options=MappingProxyType(options))
    return replace(config, manager=replace(config.manager, backend=backend))


def _probe_local(context: Context, config: Config) -> Outcome:
    from secretfs.backends.local import LocalBackend
    from secretfs.crypto.keys import configured_master_key

    settings = config.manager
    path = settings.backend.path
    if context.master_key_failed:
        return warn(f"store {path} not opened: the master key did not load",
                    "fix the key-file problem first")
    if settings.encryption.provider == "passphrase" and not os.environ.get(PASSPHRASE_ENV):
        return warn(f"store {path} not opened: the passphrase provider needs "
                    f"{PASSPHRASE_ENV} (doctor never prompts)",
                    f"export {PASSPHRASE_ENV} (read -rs {PASSPHRASE_ENV}) and run it again")
    master = context.master_key or configured_master_key(settings.encryption, create=False)
    backend = LocalBackend.open(path, master, create=False,
                                max_versions=settings.backend.max_versions)
    try:
        if master.key_id != backend.store_key_id:
            return fail(f"store {path} is sealed by master key {backend.store_key_id}, but the "
                        f"configured key is {master.key_id} (wrong master key; other commands "
                        "exit 8)", "point encryption.key_file (or the provider) at the key "
                        "that created this store, e.g. restored from its backup")
        count = len(backend.list_names())
    finally:
        backend.close()
    return ok(f"store {path} opens with master key {master.key_id}: {_count(count, 'secret')}")


def _token_fix(options: Any) -> str:
    if options.get("approle"):
        secret_id = options["approle"].get("secret_id_file")
        where = f" and the secret_id in {secret_id}" if secret_id else ""
        return (f"check approle.role_id{where}: issue a new one with "
                "'bao write -f auth/approle/role/ROLE/secret-id'")
    if options.get("token_file"):
        return (f"put a valid token in {options['token_file']} (e.g. from 'bao token create "
                "-policy=POLICY'), readable only by this user")
    if options.get("token"):
        return "set secrets_manager.backend.token to a valid token (better: token_file)"
    return "set BAO_TOKEN to a valid token, or configure token_file or approle"


def _probe_openbao(context: Context, config: Config) -> Outcome:
    from secretfs.backends.openbao import open_openbao
    from secretfs.errors import AccessDenied, BackendUnavailable

    options = config.manager.backend.options
    backend = open_openbao(_with_timeout(config))  # ConfigError: no address, no credentials
    address = ", ".join(backend.addresses)
    unreachable = (f"check address {address} (secrets_manager.backend.address): is the server "
                   "running, and reachable from this host (port, firewall, TLS, ca_file)?")
    try:
        nodes = backend.node_status()
        roles = _roles(nodes)
        serving = [node for node in nodes if node.serving]
        if not serving:
            if all(node.role == "unreachable" for node in nodes):
                problems = "; ".join(f"{node.address}: {node.detail}" for node in nodes)
                return fail(f"backend unreachable: no OpenBao node answers ({problems})",
                            unreachable)
            if all(node.role == "uninitialized" for node in nodes if node.role != "unreachable"):
                return fail(f"OpenBao at {address} is not initialized", "bao operator init")
            return fail(f"no OpenBao node can serve ({roles})",
                        "unseal the sealed nodes (bao operator unseal, each key holder); start "
                        "the unreachable ones")
        version = next((node.version for node in serving if node.version), "?")
        # Backend internals on purpose: the same transport, failover and authentication the
        # daemon uses, asked the questions a health check needs.
        try:
            lookup = backend._request("GET", "auth/token/lookup-self")
        except AccessDenied as error:  # an AppRole login refused
            return fail(f"OpenBao refused the credentials: {error.what}", _token_fix(options))
        if lookup.status_code in (401, 403):
            return _refused_lookup(backend, lookup.status_code, address, options)
        if lookup.status_code != 200:
            return fail(f"OpenBao at {address} answered auth/token/lookup-self with HTTP "
                        f"{lookup.status_code}", "check the server's log")
        token = _describe_token(lookup)
        try:
            entries = len(backend._list_folder(""))
        except AccessDenied:
            return fail(f"OpenBao {version} at {address}: the token ({token}) may not list "
                        f"{backend.mount}/", f"grant list on {backend.mount}/metadata/* (and "
                        f"read/create/update on {backend.mount}/data/*) in the token's policy")
        except SecretfsError as error:
            return fail(f"KV v2 mount {backend.mount}/: {error.what}",
                        f"enable it (bao secrets enable -path={backend.mount} kv-v2) or set "
                        "secrets_manager.backend.mount")
    except BackendUnavailable as error:  # every node went away between the questions
        return fail(f"backend unreachable: {error.what}", unreachable)
    finally:
        backend.close()
    detail = (f"OpenBao {version} at {address}: token accepted ({token}); {backend.mount}/ "
              f"lists {_count(entries, 'entry', 'entries')}")
    if len(nodes) == 1:
        return ok(detail)
    detail += f"; nodes: {roles}"
    if len(serving) < len(nodes):
        return warn(detail, "the cluster runs degraded: start or unseal the nodes that do not "
                    "serve (see docs/scaling.md)")
    if not any(node.role == "active" for node in nodes):
        return warn(detail, "no active node (an election under way, or quorum lost: more than "
                    "half the nodes must be up): reads are served by standbys, writes fail")
    return ok(detail)


def _roles(nodes: list[Any]) -> str:
    """"http://a:8200 active, http://b:8200 standby, …" (for the doctor's line)."""
    return ", ".join(f"{node.address} {node.role}" for node in nodes)


def _refused_lookup(backend: Any, status: int, address: str, options: Any) -> Outcome:
    """lookup-self refused: a bad token, or a good one created without the default policy
    (which is what grants lookup-self). A list of the KV mount tells the two apart."""
    from secretfs.errors import AccessDenied

    try:
        backend._list_folder("")
    except (AccessDenied, SecretfsError):
        return fail(f"OpenBao at {address} refused the token (HTTP {status} on "
                    "auth/token/lookup-self): it is wrong, expired or revoked",
                    _token_fix(options))
    return warn(f"OpenBao at {address}: the token lists {backend.mount}/ but may not look "
                "itself up (created without the default policy?), so its expiry is unknown",
                "give the token the default policy, or watch its TTL yourself")


def _describe_token(lookup: Any) -> str:
    """Policies and time left: what an operator needs, never the token or its accessor."""
    try:
        data = lookup.json().get("data") or {}
    except (ValueError, AttributeError):
        return "details unknown"
    policies = ",".join(data.get("policies") or []) or "none"
    ttl = data.get("ttl")
    if not ttl:
        return f"policies {policies}, no expiry"
    from secretfs.model import format_duration

    renew = "renewable" if data.get("renewable") else "not renewable"
    return f"policies {policies}, expires in {format_duration(float(ttl))}, {renew}"


def _probe_aws(context: Context, config: Config) -> Outcome:
    from secretfs.backends.aws import open_aws

    # create=True is open_aws's own reachability test: one ListSecrets with MaxResults=1.
    backend = open_aws(_with_timeout(config), create=True)
    try:
        return ok(f"AWS Secrets Manager ({backend.where}) answers ListSecrets with these "
                  "credentials")
    finally:
        backend.close()


def _probe_other(context: Context, config: Config) -> Outcome:
    """The keyring backend and plugins: open, and list the names (no values)."""
    from secretfs.backends import open_backend

    backend = open_backend(config)
    try:
        count = len(backend.list_names())
    finally:
        backend.close()
    kind = config.manager.backend.type
    return ok(f"{kind} backend opens and lists {_count(count, 'secret')}")


_PROBES: dict[str, Callable[[Context, Config], Outcome]] = {
    "local": _probe_local, "openbao": _probe_openbao, "aws": _probe_aws,
}


@_needs_config
def check_backend(context: Context, config: Config) -> Outcome:
    """Reach the configured backend and authenticate, as the daemon would, within seconds."""
    kind = config.manager.backend.type
    probe = _PROBES.get(kind, _probe_other)
    try:
        return _within(BACKEND_DEADLINE, lambda: probe(context, config))
    except TimeoutError:
        return fail(f"backend unreachable: the {kind} backend did not answer within "
                    f"{BACKEND_DEADLINE:g}s", "check that the service is up and reachable from "
                    "this host (address, DNS, firewall, credentials)")
    except SecretfsError as error:
        return fail(error.what, error.fix or f"check secrets_manager.backend ({kind})")


# -- mount ------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def secretfs_mounts() -> list[str]:
    """Every secretfs mount point this process sees (fstype fuse.secretfs), in mount order."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                try:
                    fstype = fields[fields.index("-") + 1]
                except (ValueError, IndexError):
                    continue
                if fstype == MOUNT_TYPE:
                    found.append(_unescape(fields[4]))
    except OSError:
        pass
    return list(dict.fromkeys(found))


def _probe_mount(path: str, euid: int) -> Outcome:
    quoted = _quote(path)
    try:
        entries = _within(MOUNT_DEADLINE, lambda: os.listdir(path))  # reaches the daemon
    except TimeoutError:
        return fail(f"{path} does not answer within {MOUNT_DEADLINE:g}s (its daemon is stopped "
                    "or stuck)", f"look at the daemon (journalctl -u secretfs); to detach the "
                    f"mount: fusermount3 -uz {quoted}")
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            return fail(f"{path} is a dead mount (transport endpoint not connected: its daemon "
                        "is gone)", f"fusermount3 -uz {quoted} (or secretfs umount {quoted}), "
                        f"then start it again: secretfs mount {quoted} or systemctl restart "
                        "secretfs")
        if error.errno in (errno.EACCES, errno.EPERM):
            return warn(f"{path} is not readable by uid {euid} (mounted by another user "
                        "without allow_other)", "run 'secretfs doctor' as root or as the "
                        "user who mounted it")
        return fail(f"{path} answers {errno.errorcode.get(error.errno or 0, '?')} "
                    f"({error.strerror})", "see the daemon's log (journalctl -u secretfs)")
    if euid != 0:
        return ok(f"{path} answers ({len(entries)} entries)")
    try:  # root only: the daemon refuses the status files to everyone else
        health = _within(MOUNT_DEADLINE, lambda: json.loads(
            (Path(path) / ".secretfs" / "health").read_text()))
        state = str(health.get("status", "?"))
        secrets = health.get("secrets", "?")
    except (TimeoutError, OSError, ValueError, AttributeError) as error:
        why = type(error).__name__ if not isinstance(error, OSError) else error.strerror
        return warn(f"{path} answers, but .secretfs/health does not ({why})",
                    "see the daemon's log (journalctl -u secretfs)")
    if state != "ok":
        return warn(f"{path} answers, health says {state!r}", "see the daemon's log")
    count = _count(secrets, "secret") if isinstance(secrets, int) else f"{secrets} secrets"
    return ok(f"{path} answers, health ok ({count})")


def check_mount(context: Context) -> Outcome:
    """Every live secretfs mount answers; the configured mount.path is mounted if expected.

    Expected means its folder exists: `secretfs mount` and the unit's RuntimeDirectory create
    it under /run (a tmpfs, emptied at boot), so a folder with nothing mounted on it is a
    daemon that stopped or died since boot; no folder means no daemon was ever set up here."""
    found: list[Outcome] = []
    mounts = secretfs_mounts()
    for path in mounts:
        found.append(_probe_mount(path, context.euid))
    if context.config is not None:
        # normpath, not realpath: resolving would stat the path, and a stuck mount there
        # would hang the doctor outside any deadline
        configured = os.path.normpath(os.path.abspath(context.config.manager.mount.path))
        if configured not in mounts:
            try:
                found.append(_within(MOUNT_DEADLINE, lambda: _expected_mount(Path(configured))))
            except TimeoutError:
                found.append(fail(f"mount.path {configured} does not answer within "
                                  f"{MOUNT_DEADLINE:g}s (a stuck mount above it?)",
                                  "look for a stuck FUSE mount on its parents: findmnt -T "
                                  f"{_quote(configured)}"))
    if all(item.status == OK for item in found):
        # all well: say what was seen, every mount included
        return ok("; ".join(item.detail for item in found) or "no secretfs mounts on this host")
    return worst(found, "")


def _expected_mount(path: Path) -> Outcome:
    quoted = _quote(path)
    if path.is_dir():
        if os.path.ismount(path):
            return warn(f"mount.path {path} has another filesystem mounted on it",
                        "unmount it, or set secrets_manager.mount.path to a free folder")
        return warn(f"nothing is mounted at mount.path {path}, though the folder exists (the "
                    "daemon stopped or never started)",
                    f"systemctl start secretfs, or: secretfs mount {quoted}")
    return ok(f"nothing mounted at mount.path {path} (none expected: no folder there; "
              f"'secretfs mount {path}' serves files)")


# -- audit ------------------------------------------------------------------------------------


def _tail_lines(path: Path, count: int) -> list[bytes]:
    """The last *count* complete lines of *path*, without their newlines."""
    with open(path, "rb") as log:
        size = log.seek(0, os.SEEK_END)
        start = max(0, size - AUDIT_TAIL_BYTES)
        log.seek(start)
        data = log.read()
    # Without the final newline the last line is a write in progress (writers append under
    # their own lock, which a reader does not take) or a crash: left to 'audit verify'.
    lines = data.split(b"\n")[:-1]
    if start > 0:
        lines = lines[1:]  # it began mid-line
    return lines[-count:]


def _chain_problem(path: Path, key: bytes | None) -> tuple[int, str | None]:
    """(lines checked, None) when the newest lines of the log verify, else (line number
    counted from the end, the problem). The links are checked always; the MACs when the audit
    key is at hand."""
    import hmac

    from secretfs.auditlog import _mac, canonical, line_hash

    lines = _tail_lines(path, AUDIT_TAIL_LINES + 1)
    previous: str | None = None
    for index, raw in enumerate(lines):
        back = len(lines) - index
        try:
            text = raw.decode("utf-8")
            body = json.loads(text)
        except (UnicodeDecodeError, ValueError):
            return back, "not a JSON line (incomplete or edited)"
        if not isinstance(body, dict) or not isinstance(body.get("prev"), str) \
                or not isinstance(body.get("mac"), str):
            return back, "no prev/mac"
        if previous is not None and body["prev"] != previous:
            return back, "prev mismatch: a line before it was removed, or lines reordered"
        if key is not None:
            if canonical(body) != text:
                return back, "not in canonical form (altered)"
            mac = body.pop("mac")
            try:
                # the log's own MAC function, so the two can never disagree on the format
                expected = _mac(key, body["prev"], body)
            except ValueError:
                return back, "bad prev hash"
            if not hmac.compare_digest(mac, expected):
                return back, "MAC mismatch: line altered or forged"
        previous = line_hash(text)
    return len(lines), None


def _line_number(path: Path, back: int) -> int:
    """The 1-based line number of the *back*-th line from the end (only for a problem)."""
    with open(path, "rb") as log:
        total = sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))
    return max(1, total - back + 1)


@_needs_config
def check_audit(context: Context, config: Config) -> Outcome:
    """The audit log's folder is writable; the log is 0600, appendable, and its newest lines
    chain (and carry valid MACs when the master key is at hand)."""
    settings = config.manager.audit
    if not settings.enabled:
        return warn("auditing is disabled: opens and changes are not recorded",
                    "set secrets_manager.audit.enabled: true")
    path = settings.path
    folder = path.parent
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return fail(f"audit folder {existing} is not writable by uid {context.euid}: every "
                    "audited operation will be refused (fail-closed)",
                    f"chown {context.euid} {_quote(existing)}, or point "
                    "secrets_manager.audit.path at a folder this user owns")
    if not path.exists():
        where = "" if existing == folder else f" ({folder} will be created 0700)"
        return ok(f"no audit log yet at {path}; its folder is writable{where}")
    found: list[Outcome] = []
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    quoted = _quote(path)
    if not stat.S_ISREG(st.st_mode):
        return fail(f"audit log {path} is {_kind(st.st_mode)}, not a regular file",
                    "move it away; secretfs creates the log itself")
    if mode & 0o022:
        found.append(fail(f"audit log {path} is writable by group or others (mode {mode:04o})",
                          f"chmod 600 {quoted}"))
    elif mode & 0o044:
        found.append(warn(f"audit log {path} is readable by group or others (mode {mode:04o}): "
                          "it shows who read which secret", f"chmod 600 {quoted}"))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))  # appends nothing
    except OSError as error:
        found.append(fail(f"audit log {path} cannot be appended to by uid {context.euid} "
                          f"({error.strerror}): audited operations will be refused",
                          f"chown {context.euid} {quoted}; check 'lsattr {quoted}' for the "
                          "immutable flag"))
    key = None
    if context.master_key is not None:
        from secretfs.auditlog import audit_key

        key = audit_key(context.master_key)
    lines = 0
    try:
        lines, problem = _chain_problem(path, key)
    except OSError as error:
        found.append(fail(f"cannot read audit log {path}: {error.strerror}",
                          f"chown {context.euid} {quoted}"))
        problem = None
    if problem is not None:
        found.append(fail(f"audit log {path}:{_line_number(path, lines)}: {problem}",
                          "run 'secretfs audit verify' for the whole chain; keep a copy of the "
                          "log and find out who edited it"))
    checked = "links and MACs" if key is not None else "links only: MACs need the master key"
    return worst(found, f"{path}: mode {mode:04o}, appendable; its last "
                        f"{_count(lines, 'line')} verified ({checked})")


# -- clock ------------------------------------------------------------------------------------


def _clock_synchronized() -> bool | None:
    """The kernel's NTP state (adjtimex, as ntpstat reads it), else timedatectl's; None when
    neither can tell."""
    import ctypes

    class Timeval(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

    class Timex(ctypes.Structure):  # struct timex of <sys/timex.h>, read-only (modes = 0)
        _fields_ = [
            ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
            ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
            ("constant", ctypes.c_long), ("precision", ctypes.c_long),
            ("tolerance", ctypes.c_long), ("time", Timeval), ("tick", ctypes.c_long),
            ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
            ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
            ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
            ("padding", ctypes.c_int * 11),
        ]

    time_error, sta_unsync = 5, 0x0040
    try:
        timex = Timex()
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(timex))
        if state >= 0:
            return state != time_error and not timex.status & sta_unsync
    except (OSError, AttributeError):
        pass
    import subprocess

    try:
        answer = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                                capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    value = answer.stdout.strip()
    return {"yes": True, "no": False}.get(value) if answer.returncode == 0 else None


def _time_windows(config: Config) -> list[tuple[str, str]]:
    return [(name, condition.value) for name, policy in config.policies.items()
            for condition in policy.conditions if condition.type == "time_window"]


def check_clock(context: Context) -> Outcome:
    """The clock is plausible, and synchronized when time_window conditions depend on it;
    the time zones those windows name resolve."""
    from zoneinfo import ZoneInfo

    now = datetime.now(UTC)
    sync_fix = ("enable NTP: timedatectl set-ntp true, or run chrony or systemd-timesyncd "
                "(in a container: on the host)")
    if now < EARLIEST_SANE:
        return fail(f"the system clock says {now:%Y-%m-%d %H:%M} UTC, before "
                    f"{EARLIEST_SANE:%Y}: it is wrong (time windows, rotation schedules and "
                    "TLS all depend on it)", f"set the time, then {sync_fix}")
    windows = _time_windows(context.config) if context.config is not None else []
    found: list[Outcome] = []
    zones = set()
    for name, window in windows:
        zone = window.partition("tz=")[2]
        if zone:
            try:
                ZoneInfo(zone)
                zones.add(zone)
            except (KeyError, ValueError, OSError):
                found.append(fail(f"policy {name}: time zone {zone!r} does not resolve",
                                  "apt install tzdata, or correct the tz= name "
                                  "(e.g. Europe/Berlin)"))
        else:
            zones.add("local")
    if "local" in zones:
        tz = os.environ.get("TZ", "").lstrip(":")
        if tz and not tz.startswith("/"):
            try:
                ZoneInfo(tz)
            except (KeyError, ValueError, OSError):
                found.append(warn(f"TZ={tz} is not a known time zone: windows without tz= are "
                                  "evaluated in UTC", "unset TZ, or set it to e.g. "
                                  "Europe/Berlin; or add tz= to the windows"))
    synchronized = _clock_synchronized()
    local = datetime.now().astimezone()
    said = f"{local:%Y-%m-%d %H:%M %Z}"
    uses = ""
    if windows:
        uses = (f"{_count(len(windows), 'time_window condition')} (zones: "
                f"{', '.join(sorted(zones))})")
    if synchronized is False:
        unsynced = "the kernel reports the clock as not synchronized (NTP)"
        if windows:
            found.append(warn(f"{unsynced}; access under {uses} depends on it", sync_fix))
        else:
            said += f"; {unsynced}: no time_window conditions depend on it"
    elif synchronized:
        said += ", synchronized"
    else:
        said += ", synchronization unknown"
    if windows:
        said += f"; {uses}"
    return worst(found, said)


# -- running ----------------------------------------------------------------------------------

Check = Callable[[Context], Outcome]
CHECKS: tuple[tuple[str, Check], ...] = (
    ("fuse-device", check_fuse_device),
    ("fusermount", check_fusermount),
    ("config", check_config),
    ("policy", check_policy),
    ("allow-other", check_allow_other),
    ("key-file", check_key_file),
    ("backend", check_backend),
    ("mount", check_mount),
    ("audit", check_audit),
    ("clock", check_clock),
)
"""The checks, in the order they run and print (later ones reuse what earlier ones found)."""


def run_checks(config_source: str | None) -> list[Result]:
    context = Context.load(config_source)
    results = []
    for name, check in CHECKS:
        try:
            outcome = check(context)
        except SecretfsError as error:
            outcome = fail(error.what, error.fix or "see docs/doctor.md")
        except Exception as error:
            if os.environ.get("SECRETFS_DEBUG") == "1":
                raise
            # the type only: an exception's text could quote anything, a value included
            outcome = fail(f"internal error: {type(error).__name__}",
                           "a bug: rerun with SECRETFS_DEBUG=1 for a traceback and report it")
        results.append(Result(name, outcome.status, _one_line(outcome.detail),
                              _one_line(outcome.fix) if outcome.fix else None))
    return results


def doctor(config_source: str | None, *, as_json: bool = False) -> int:
    """Run every check and print the results; 1 if any failed, else 0 (warnings allowed)."""
    results = run_checks(config_source)
    if as_json:
        print(json.dumps([result.to_json() for result in results], indent=2))
    else:
        width = max(len(result.check) for result in results)
        sys.stdout.write("".join(result.line(width) + "\n" for result in results))
    sys.stdout.flush()
    failed = [result.check for result in results if result.status == FAIL]
    if failed:
        print(f"secretfs: doctor: {len(failed)} check{'s' if len(failed) > 1 else ''} failed: "
              f"{', '.join(failed)} (apply the fixes shown, then run 'secretfs doctor' again)",
              file=sys.stderr)
        return 1
    return 0
