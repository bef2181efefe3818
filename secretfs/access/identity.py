"""What a caller is beyond what the kernel says with each request: names, unit, container.

Each function reads /proc (or the user and group databases) for one :class:`Caller` and returns
None when the answer cannot be read (the process exited, a kernel thread, EACCES). The policy
engine calls them to match principals (``user``, ``group``, ``unit``, ``container``,
``cmdline``, ``exe``, ``exe_sha256``); the audit log calls :func:`describe` to say who a caller
was. They are injectable in both, so tests can pin the answers.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from secretfs.access.principal import Caller


def stat_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at *path* now, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ExeDigests:
    """SHA-256 of a caller's running executable, read via /proc/PID/exe, cached per exe_id."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._known: dict[tuple[int, int], str] = {}

    def __call__(self, caller: Caller) -> str | None:
        if caller.exe_id is not None and caller.exe_id in self._known:
            return self._known[caller.exe_id]
        digest = hashlib.sha256()
        try:
            with open(f"{self.proc}/{caller.pid}/exe", "rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return None
        result = digest.hexdigest()
        if caller.exe_id is not None:
            if len(self._known) >= 10_000:
                self._known.clear()
            self._known[caller.exe_id] = result
        return result


def read_cmdline(caller: Caller) -> str | None:
    """/proc/PID/cmdline with NULs as spaces; chosen by the process itself, so spoofable."""
    try:
        with open(f"/proc/{caller.pid}/cmdline", "rb") as file:
            data = file.read(64 * 1024)
    except OSError:
        return None
    return data.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def user_name(caller: Caller) -> str | None:
    """The user name of the caller's uid (pwd), or None."""
    import pwd

    try:
        return pwd.getpwuid(caller.uid).pw_name
    except KeyError:
        return None


def group_name(caller: Caller) -> str | None:
    """The group name of the caller's primary gid (grp), or None."""
    import grp

    try:
        return grp.getgrgid(caller.gid).gr_name
    except KeyError:
        return None


def _cgroup_path(caller: Caller) -> str | None:
    try:
        with open(f"/proc/{caller.pid}/cgroup", "rb") as file:
            text = file.read(64 * 1024).decode(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()
    for line in lines:  # the unified (v2) hierarchy first: "0::/path"
        if line.startswith("0::"):
            return line[3:]
    return lines[-1].split(":", 2)[-1] if lines else None


def unit_from_cgroup(path: str) -> str | None:
    """The last component of a cgroup path ending in .service or .scope."""
    for part in reversed(path.split("/")):
        if part.endswith((".service", ".scope")):
            return part
    return None


def systemd_unit(caller: Caller) -> str | None:
    """The caller's systemd unit, from /proc/PID/cgroup."""
    path = _cgroup_path(caller)
    return unit_from_cgroup(path) if path else None


# A path segment that is a 64-hex container id, bare or as a runtime's scope name. The systemd
# cgroup drivers name it docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope or nerdctl-<id>.scope; the cgroupfs drivers use the bare id under the
# runtime's folder (/docker/<id>, kubelet's /kubepods/burstable/pod<uid>/<id>, containerd's
# /<namespace>/<id>) or libpod-<id> (podman). The first such segment is the container; what
# follows it (…/libpod-<id>.scope/container) is inside it.
_CONTAINER = re.compile(
    r"(?:^|/)(?:docker-|crio-|libpod-|cri-containerd-|containerd-|nerdctl-)?([0-9a-f]{64})"
    r"(?:\.scope)?(?=/|$)")


def container_from_cgroup(path: str) -> str | None:
    """The 64-hex container id in a cgroup path (docker, cri-o, podman, containerd, kubelet;
    systemd or cgroupfs drivers)."""
    match = _CONTAINER.search(path)
    return match[1] if match else None


def container_id(caller: Caller) -> str | None:
    """The caller's container id, from /proc/PID/cgroup."""
    path = _cgroup_path(caller)
    return container_from_cgroup(path) if path else None


def describe(caller: Caller) -> dict[str, Any]:
    """The names of *caller* worth recording: user, unit and container (absent when unknown)."""
    found = {"user": user_name(caller)}
    path = _cgroup_path(caller)  # read once for both
    if path is not None:
        found.update(unit=unit_from_cgroup(path), container=container_from_cgroup(path))
    return {name: value for name, value in found.items() if value is not None}


__all__ = [
    "ExeDigests", "container_from_cgroup", "container_id", "describe", "group_name",
    "read_cmdline", "stat_identity", "systemd_unit", "unit_from_cgroup", "user_name",
]
