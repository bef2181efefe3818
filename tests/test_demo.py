"""`make demo` is the first thing a new user runs: it must work and leak nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_the_demo_tour_runs_and_its_store_holds_no_plaintext(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETFS_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["SECRETFS_DEMO_DIR"] = str(demo)
    result = subprocess.run(["bash", str(REPO / "examples" / "demo.sh")], env=env,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "did you mean 'db_password'?" in result.stderr.decode()
    for shown in ("api_keys/stripe", "current → 2, previous → 1", "every 90d, overlap 1h",
                  "no match"):
        assert shown in out
    env["SECRETFS_CONFIG"] = str(demo / "config.yaml")
    for ref in ("db_password", "api_keys/stripe", "api_keys/github/latest/token"):
        value = subprocess.run([sys.executable, "-m", "secretfs", "secrets", "get", ref],
                               env=env, capture_output=True, check=True).stdout
        assert value and value not in result.stdout and value not in result.stderr
