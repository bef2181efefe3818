"""What `secretfs run` costs before the command starts, as ratios to baselines in the same run.

`secretfs run --env X=REF -- true` is timed against `python -c pass` and against `true` alone,
through a live mount (the injector opens a file: no key, no store) and through the embedded
store (it opens the store and decrypts), interleaved round by round so that noise on this shared
machine hits each alike; medians are compared. Output goes to /dev/null, so masking is on and
the command runs under the supervisor — the default for services, whose output is a log, not a
terminal. The `--no-masking` rows show plain mode (exec, no supervisor).

Targets (issue "The injector"): through a mount ≤ 3× `python -c pass`, and importing none of
trio, pyfuse3, cryptography or keyring; through the store ≤ 5×.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cli as cli_bench  # benchmarks/cli.py: time_once, heavy_imports
from read import secretfs_daemon

HEAVY = ("trio", "pyfuse3", "cryptography", "keyring")
TARGETS = {"run via mount": 3.0, "run via store": 5.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    options = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks/run.py mounts a filesystem: run it as root with /dev/fuse")

    python = sys.executable
    root = Path(__file__).resolve().parents[1]
    subprocess.run([python, "-m", "compileall", "-q", str(root / "secretfs"),
                    str(root / "injector")], check=True, stdout=subprocess.DEVNULL)
    folder = Path(tempfile.mkdtemp(prefix="secretfs-bench-run-"))
    try:
        config = folder / "config.yaml"
        config.write_text(
            "secrets_manager:\n"
            "  backend: { type: local, path: store.db }\n"
            "  encryption: { provider: file, key_file: master.key }\n"
            "  audit: { path: audit.log }\n"
        )
        env = {**os.environ, "SECRETFS_CONFIG": str(config)}
        subprocess.run([python, "-m", "secretfs", "init"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([python, "-m", "secretfs", "secrets", "put", "x", "--stdin"], env=env,
                       input=secrets.token_hex(16).encode(), check=True,
                       stdout=subprocess.DEVNULL)
        mountpoint = folder / "mnt"
        with secretfs_daemon(mountpoint, env, mountpoint / "x" / "current" / "value"):
            script = [python, "-m", "secretfs", "run", "--env", "X=secretfs://x"]
            via_mount = [*script, "--mount", str(mountpoint)]
            commands = {
                "python -c pass": [python, "-c", "pass"],
                "true": ["true"],
                "run via mount": [*via_mount, "--", "true"],
                "run via store": [*script, "--", "true"],
                "run via mount, --no-masking": [*via_mount, "--no-masking", "--", "true"],
                "run via store, --no-masking": [*script, "--no-masking", "--", "true"],
            }
            for argv in commands.values():  # warm the page cache, and check each works
                cli_bench.time_once(argv, env)
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(options.rounds):
                for name, argv in commands.items():
                    samples[name].append(cli_bench.time_once(argv, env))
            base = statistics.median(samples["python -c pass"])
            true = statistics.median(samples["true"])
            print(f"`secretfs run` start-up, median of {options.rounds} rounds "
                  f"(baseline python -c pass = 1.00)")
            for name, values in samples.items():
                median = statistics.median(values)
                target = TARGETS.get(name)
                verdict = "" if target is None else (
                    f"  target ≤ {target:.0f}×  {'met' if median / base <= target else 'MISSED'}")
                print(f"  {name:<30} {median / base:5.2f}×  ({median / true:5.1f}× true)"
                      f"{verdict}")
            heavy = cli_bench.heavy_imports(commands["run via mount"], env, HEAVY)
            print(f"  heavy imports on 'run via mount': {', '.join(heavy) or 'none'} "
                  f"(looked for: {', '.join(HEAVY)})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
