"""How one request of the OpenBao backend gets through a cluster with bad nodes in it: an
unreachable (black-holed) node and a hung one cost only their share of the request's timeout, a
write is never sent twice, standby redirects are followed (never from https to http), and the
node that answered is asked first next time. A real dev server is the good node; the bad ones
are sockets that never answer."""

from __future__ import annotations

import contextlib
import http.server
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from secretfs.backends.http import Response
from secretfs.backends.openbao import OpenBaoBackend
from secretfs.errors import BackendUnavailable
from tests.openbao import OpenBaoServer, openbao, requires_openbao

pytestmark = requires_openbao
__all__ = ["openbao"]

TIMEOUT = 3.0  # the backend's request timeout in these tests


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An address whose connects hang: a listener that never accepts, its backlog full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue; further SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """An address that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


@contextlib.contextmanager
def redirector(target: str) -> Iterator[Standby]:
    """A standby that answers every request with 307 to *target* (the active node)."""
    asked: list[str] = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            asked.append(self.path)
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = do_LIST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Standby(f"http://127.0.0.1:{server.server_address[1]}", asked)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Standby:
    address: str
    asked: list[str]  # the paths it was sent


def backend_for(addresses: list[str], openbao: OpenBaoServer) -> OpenBaoBackend:
    return OpenBaoBackend(addresses, token=openbao.root_token, timeout=TIMEOUT)


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.mark.parametrize("bad", [black_hole, hung_server], ids=["unreachable", "hung"])
def test_a_bad_first_node_costs_only_its_share_of_the_timeout(
        openbao: OpenBaoServer, bad: Any) -> None:
    value = secrets.token_bytes(16)
    writer = backend_for([openbao.address], openbao)
    writer.write_version("db", value)
    writer.close()
    with bad() as address:
        backend = backend_for([address, openbao.address], openbao)
        try:
            read, elapsed = timed(lambda: backend.read_value("db", 1))
            assert read == value
            assert TIMEOUT / 2 - 0.2 <= elapsed < TIMEOUT, elapsed  # its share, then the next
            read, elapsed = timed(lambda: backend.read_value("db", 1))
            assert read == value and elapsed < 0.5, elapsed  # the bad node is now asked last
        finally:
            backend.close()


def test_a_write_that_may_have_landed_is_not_sent_to_another_node(
        openbao: OpenBaoServer) -> None:
    with hung_server() as address:
        backend = backend_for([address, openbao.address], openbao)
        try:
            token = openbao.root_token
            with pytest.raises(BackendUnavailable):
                started = time.monotonic()
                backend._send("POST", "secret/data/once", {"data": {"a": "1"}}, None, token)
            assert time.monotonic() - started < TIMEOUT + 0.5
        finally:
            backend.close()
    assert openbao.api("GET", "secret/metadata/once", check=False).status_code == 404  # not resent


def test_standby_redirects_are_followed_and_the_active_node_stuck_to(
        openbao: OpenBaoServer) -> None:
    with redirector(openbao.address) as standby:
        backend = backend_for([standby.address, openbao.address], openbao)
        try:
            value = secrets.token_bytes(16)
            assert backend.write_version("db", value) == 1  # POST redirected with its body
            assert backend.read_value("db", 1) == value  # the query string survives
            assert len(standby.asked) == 1  # after one redirect: straight to the active node
        finally:
            backend.close()


def test_a_redirect_from_https_to_http_is_not_followed() -> None:
    class Client:
        """Answers every request with a redirect to plain http; records the URLs asked."""

        def __init__(self) -> None:
            self.asked: list[str] = []

        def request(self, method: str, url: str, **options: Any) -> Response:
            self.asked.append(url)
            return Response(307, b"", {"location": "http://elsewhere:8200/v1/secret/data/x"})

        def close(self) -> None:
            pass

    backend = OpenBaoBackend(["https://node:8200"], token="t", timeout=1)
    client = Client()
    backend._client = client  # type: ignore[assignment]
    try:
        response = backend._send("GET", "secret/data/x", None, None, "t")
        assert response.status_code == 307
        assert client.asked == ["https://node:8200/v1/secret/data/x"]  # the token stayed put
    finally:
        backend.close()


@pytest.mark.parametrize(("timeout", "backend_timeout", "expected"), [
    ("30s", "2s", 2.0), (None, "3s", 3.0), ("1s", "5s", 1.0), (None, None, 5.0)])
def test_one_request_fits_in_what_the_daemon_waits(timeout: str | None,
                                                   backend_timeout: str | None,
                                                   expected: float) -> None:
    """The request timeout (the failover budget) is at most ``backend_timeout``: otherwise the
    daemon gives up while the first node still has its share, and no other node is tried."""
    from secretfs.backends.openbao import open_openbao
    from secretfs.config import parse_config

    text = ("secrets_manager:\n  backend:\n    type: openbao\n"
            "    address: [http://a:8200, http://b:8200]\n    token: t\n")
    if timeout:
        text += f"    timeout: {timeout}\n"
    if backend_timeout:
        text += f"  backend_timeout: {backend_timeout}\n"
    backend = open_openbao(parse_config(text))
    try:
        assert backend.timeout == expected
    finally:
        backend.close()
