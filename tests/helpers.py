"""Test helpers: a throw-away embedded store and a way to run the real CLI against it; waiting
for something to happen; a free port; installing a backend plugin."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SEED_POLICY = """\
principals:
  service-a: { uid: 1001 }
policies:
  service-a:
    allow:
      - { action: read, resources: [db_password, "api_keys/*"] }
    deny:
      - { action: delete, resources: ["*"] }
    conditions:
      - { type: ip_range, value: 10.0.0.0/8 }
      - { type: time_window, value: "09:00-17:00" }
"""
"""The seed's access-policy example (SEED.md, CONTRACT.md), appended to a store's config."""

CONFIG_TEMPLATE = """\
secrets_manager:
  backend: {{ type: local, path: store.db, max_versions: {max_versions} }}
  encryption: {{ provider: file, key_file: master.key }}
  audit: {{ path: audit.log }}
"""


@dataclass
class Store:
    """An embedded store in a temp folder, with its config, and the CLI pointed at it."""

    root: Path
    config: Path

    @property
    def db(self) -> Path:
        return self.root / "store.db"

    @property
    def key_file(self) -> Path:
        return self.root / "master.key"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETFS_")}
        env["SECRETFS_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def cli(self, *args: str, input: bytes | None = None, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run `secretfs ARGS` as a user would, in a fresh process."""
        result = subprocess.run(
            [sys.executable, "-m", "secretfs", *args], input=input or b"", capture_output=True,
            env=env or self.env(), timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"secretfs {' '.join(args)} exited {result.returncode}: {result.stderr!r}"
            )
        return result

    def put(self, name: str, *args: str, input: bytes | None = None) -> None:
        self.cli("secrets", "put", name, *args, input=input, check=True)

    def get(self, ref: str) -> bytes:
        return self.cli("secrets", "get", ref, check=True).stdout

    def files(self) -> list[Path]:
        """The store file and whatever journal files SQLite keeps beside it."""
        return [p for p in self.root.iterdir() if p.name.startswith("store.db")]


def make_store(root: Path, *, max_versions: int = 10, init: bool = True) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(CONFIG_TEMPLATE.format(max_versions=max_versions))
    store = Store(root, config)
    if init:
        store.cli("init", check=True)
    return store


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed command (asserting it is one line, no traceback)."""
    text = result.stderr.decode()
    assert text.startswith("secretfs: "), text
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text.strip()



def eventually(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Retry *check* until it returns a truthy value or *timeout* seconds are up; its last
    result (so ``assert eventually(…)`` fails with what was seen last)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (bind port 0, read it, close)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# For a test plugin that wraps the real local backend (a backend failing, hanging or silent on
# demand): append to its source; its factory calls local_backend(config, create=create).
LOCAL_BACKEND_IN_PLUGIN = '''

def local_backend(config, *, create=False):
    """The built-in local backend at this plugin's `path` option."""
    import dataclasses
    from pathlib import Path

    from secretfs.backends import BUILT_IN

    options = config.manager.backend.options
    backend = dataclasses.replace(config.manager.backend, type="local",
                                  path=Path(options["path"]), options={})
    local = dataclasses.replace(config, manager=dataclasses.replace(config.manager,
                                                                    backend=backend))
    return BUILT_IN["local"](local, create=create)
'''


def install_plugin(folder: Path, module: str, source: str, entry_point: str) -> Path:
    """*source* as module *module* in *folder*, registered as backend *entry_point* the way an
    installed distribution is (a dist-info with entry_points.txt): put *folder* on PYTHONPATH."""
    folder.mkdir()
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[secretfs.backends]\n{entry_point} = {module}:factory\n")
    return folder
