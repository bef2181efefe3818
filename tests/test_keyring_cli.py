"""The keyring backend through the real CLI: the OS keychain (keyrings.alt's file keyring here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import make_store


def test_put_get_and_info_on_the_keychain(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", init=False)
    store.config.write_text(
        "secrets_manager:\n"
        "  backend: { type: keyring, service: secretfs-test }\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n")
    env = store.env(PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring",
                    XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path))
    store.cli("init", check=True, env=env)
    first, second = os.urandom(8).hex(), os.urandom(8).hex()
    store.cli("secrets", "put", "api/token", first, check=True, env=env)
    store.cli("secrets", "put", "api/token", second, check=True, env=env)
    assert store.cli("secrets", "get", "api/token", check=True, env=env).stdout == \
        second.encode()
    info = store.cli("secrets", "info", "api/token", check=True, env=env).stdout.decode()
    assert "keyring (keeps only the newest version)" in info
    listed = json.loads(store.cli("secrets", "list", "--json", check=True, env=env).stdout)
    assert [entry["name"] for entry in listed] == ["api/token"]
    assert first not in (tmp_path / "store" / "audit.log").read_text()
