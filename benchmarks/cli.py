"""How much a one-shot CLI call costs, as a ratio to `python -c pass` measured in the same run.

A 1,000-secret embedded store is built in a temp folder; then `secretfs secrets get` and
`secretfs secrets list` are timed against the bare interpreter, interleaved round by round so
that noise on this shared machine hits every command alike. Medians are compared, never absolute
times. Targets (issue "Foundation"): get ≤ 4×, list ≤ 5×.

Also shows which heavy modules each path imports (there should be none).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("trio", "pyfuse3", "keyring", "croniter", "psutil", "yaml")
TARGETS = {"secrets get": 4.0, "secrets list": 5.0}


def build_store(root: Path, count: int) -> Path:
    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import Secret

    config = root / "config.yaml"
    config.write_text(
        "secrets_manager:\n"
        "  backend: { type: local, path: store.db }\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n"
    )
    with SyncSecretsManager.from_config(load_config(config), create=True) as manager:
        for i in range(count):
            manager.store(Secret(f"app{i % 10}/secret{i:04d}", secrets.token_hex(16),
                                 description="benchmark value", tags={"n": str(i)}))
    return config


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def heavy_imports(argv: list[str], env: dict[str, str],
                  heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The modules of the *heavy* packages that running *argv* imports."""
    python, *rest = argv
    result = subprocess.run([python, "-X", "importtime", *rest], env=env, capture_output=True,
                            check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines()}
    return sorted(name for name in names if name.split(".")[0] in heavy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--secrets", type=int, default=1000)
    options = parser.parse_args()

    python = sys.executable
    subprocess.run([python, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "secretfs")],
                   check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="secretfs-bench-") as folder:
        config = build_store(Path(folder), options.secrets)
        env = {**os.environ, "SECRETFS_CONFIG": str(config)}
        script = [python, "-m", "secretfs"]
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "secrets get": [*script, "secrets", "get", "app5/secret0505"],
            "secrets list": [*script, "secrets", "list"],
        }
        for argv in commands.values():  # warm the page cache
            time_once(argv, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(options.rounds):
            for name, argv in commands.items():
                samples[name].append(time_once(argv, env))

        base = statistics.median(samples["python -c pass"])
        print(f"CLI start-up, {options.secrets} secrets, median of {options.rounds} rounds "
              f"(baseline python -c pass = 1.00)")
        for name, values in samples.items():
            ratio = statistics.median(values) / base
            target = TARGETS.get(name)
            verdict = "" if target is None else (
                f"  target ≤ {target:.0f}×  {'met' if ratio <= target else 'MISSED'}")
            print(f"  {name:<16} {ratio:5.2f}×{verdict}")
        for name in TARGETS:
            found = heavy_imports(commands[name], env)
            print(f"  heavy imports on '{name}': {', '.join(found) or 'none'}")


if __name__ == "__main__":
    main()
