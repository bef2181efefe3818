"""A throw-away moto server, so the aws backend is tested over real HTTP (retries, errors, paging).

``running_moto()`` starts ``python -m moto.server`` on 127.0.0.1 at a free port, waits until it
answers, yields its URL and always stops it. The ``moto_endpoint`` fixture shares one server per
test session (it takes a second to start) and resets its state before each test
(``POST /moto-api/reset``), so every test starts with an empty account. Credentials are the fake
``testing`` ones and the region us-east-1, set in the environment for the test's duration.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.helpers import free_port

REGION = "us-east-1"
START_TIMEOUT = 30.0
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if not with 200
    except OSError:
        return False


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """A moto server's URL while the block runs; the server is stopped however it ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_CREDENTIALS},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer within {START_TIMEOUT:g}s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def reset(url: str) -> None:
    """Forget every secret (moto's own reset endpoint)."""
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10):
        pass


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    with running_moto() as url:
        yield url


@pytest.fixture
def moto_endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shared server's URL, emptied, with fake credentials in the environment."""
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    reset(moto_server)
    return moto_server
