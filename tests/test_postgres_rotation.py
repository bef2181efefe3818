"""The real-world proof: secretfs rotates a real PostgreSQL role's password, and an app that reads
its password from the mount logs in before and after; the old password file stays readable as
`previous` during the overlap. Passwords are compared, never printed."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import make_store
from tests.mounting import mounted
from tests.postgres import requires_postgres, running_postgres

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "postgres"

pytestmark = [
    requires_postgres,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="real mounts need root and /dev/fuse"),
]


def test_an_app_reading_the_mount_logs_in_before_and_after_a_rotation(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    first = secrets.token_urlsafe(18)
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    folder.chmod(0o755)
    (tmp_path / "pg-client").mkdir()
    with running_postgres(tmp_path / "pg-client") as pg:
        pg.create_role("app", first)
        where = f"PGROLE=app PGHOST={pg.host} PGPORT={pg.port}"
        set_cmd = (f"{where} PGADMIN_USER=postgres "
                   f"PGADMIN_PASSFILE={shlex.quote(str(pg.admin_passfile))} "
                   f"{shlex.quote(str(EXAMPLES / 'set-password.sh'))}")
        validate_cmd = f"{where} {shlex.quote(str(EXAMPLES / 'validate-login.sh'))}"
        store.put("db", "--key", "user=app", "--key", f"password={first}",
                  "--rotate-every", "30d", "--overlap", "1h",
                  "--set-cmd", set_cmd, "--validate-cmd", validate_cmd)
        try:
            with mounted(store, folder / "mnt") as mount:
                password_file = mount.path / "db/latest/password"

                def app_logs_in() -> bool:
                    """What an app does: read the password file, log in with it."""
                    return pg.can_login((mount.path / "db/latest/user").read_text(),
                                        password_file.read_text())

                assert app_logs_in()
                rotated = store.cli("secrets", "rotate", "db")
                assert rotated.returncode == 0, rotated.stderr
                deadline = time.monotonic() + 5  # the daemon follows changes within 0.5 s
                while password_file.read_text() == first:
                    assert time.monotonic() < deadline, "the mount still shows the old password"
                    time.sleep(0.05)
                second = password_file.read_text()
                assert app_logs_in()  # the file follows current: the new password works
                assert not pg.can_login("app", first)  # the role has only the new one
                # during the overlap, the old password is still readable as `previous`
                same = (mount.path / "db/previous/password").read_text() == first
                assert same, "previous is not the old password"
                # and a failed rotation leaves the app logging in with what it has
                store.cli("secrets", "put", "db", "--key", "user=app", "--key",
                          f"password={second}", "--rotate-every", "30d", "--overlap", "1h",
                          "--set-cmd", set_cmd, "--validate-cmd", "cat > /dev/null; exit 1",
                          check=True)
                failed = store.cli("secrets", "rotate", "db")
                assert failed.returncode == 6
                time.sleep(1)  # what the daemon would have picked up by now
                unchanged = password_file.read_text() == second
                assert unchanged and app_logs_in()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
