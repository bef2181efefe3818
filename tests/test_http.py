"""secretfs.backends.http against a real HTTP/1.1 server on loopback (the standard library's)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from secretfs.backends.http import ConnectError, HttpClient
from tests.helpers import free_port


@dataclass
class Server:
    address: str
    peers: set[tuple[str, int]] = field(default_factory=set)  # one per TCP connection
    close_after_reply: bool = False  # reply, then hang up without saying so


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_POST(self) -> None:
            state.peers.add(self.client_address)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(200, {"echo": json.loads(body), "query": self.path.partition("?")[2],
                              "token": self.headers.get("X-Token")})

        def do_GET(self) -> None:
            state.peers.add(self.client_address)
            self._reply(404 if self.path.startswith("/missing") else 200, {"path": self.path})

        def _reply(self, status: int, document: dict) -> None:
            content = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            self.close_connection = state.close_after_reply

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.address = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_json_in_and_out_with_headers_and_query(server: Server) -> None:
    client = HttpClient(headers={"X-Token": "t"})
    response = client.request("POST", f"{server.address}/v1/x", json={"a": 1},
                              params={"version": "2"})
    assert response.status_code == 200
    assert response.json() == {"echo": {"a": 1}, "query": "version=2", "token": "t"}
    missing = client.request("GET", f"{server.address}/missing")
    assert missing.status_code == 404 and "missing" in missing.text
    client.close()


def test_requests_in_a_row_share_one_connection(server: Server) -> None:
    client = HttpClient()
    for _ in range(5):
        assert client.request("GET", f"{server.address}/v1/a").status_code == 200
    assert len(server.peers) == 1
    client.close()


def test_concurrent_callers_each_get_a_connection_then_reuse_them(server: Server) -> None:
    client = HttpClient()
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(10):
            assert client.request("GET", f"{server.address}/v1/b").status_code == 200

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= len(server.peers) <= 4  # never one per request
    client.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    client = HttpClient()
    server.close_after_reply = True  # keep-alive promised, then the server hangs up
    for _ in range(3):
        time.sleep(0.1)  # idle: the server's FIN has arrived
        assert client.request("POST", f"{server.address}/v1/c", json={}).status_code == 200
    assert len(server.peers) == 3  # a new connection each time, and no failed request
    client.close()


def test_a_read_sent_as_the_server_hangs_up_is_sent_again(server: Server) -> None:
    client = HttpClient()
    server.close_after_reply = True
    for _ in range(20):  # back to back: some go out before the server's FIN arrives
        assert client.request("GET", f"{server.address}/v1/d").status_code == 200
    client.close()


def test_nothing_listening_is_a_connect_error() -> None:
    client = HttpClient(timeout=2)
    with pytest.raises(ConnectError, match="cannot connect"):
        client.request("GET", f"http://127.0.0.1:{free_port()}/v1/x")
