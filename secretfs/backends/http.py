"""JSON over HTTP/1.1 for the OpenBao backend and the Transit key, on the standard library.

Every request the daemon makes to OpenBao sits on the path of a cold open, so the client's own
cost per request counts. ``http.client`` spends about half of what httpx spends per request
(a kept-alive GET of a KV path on loopback: 0.55 ms against 1.1 ms on the CI machine, most of
httpx's being its own Python layers), and it leaves every host's daemon with no HTTP dependency
to install. What this module adds to ``http.client`` is what the backend needs from a client:

- **Kept-alive connections, pooled per origin**: one per concurrent caller (the daemon calls
  from worker threads), the most recently used first. A connection the server closed while it
  sat idle is readable (EOF): it is noticed before reuse and replaced, never sent a request.
- **Errors that say whether the request may have landed**: :class:`ConnectError` — the server
  was never reached, so the request can go to another address; any other
  :class:`TransportError` — it may have been received (a write must not be repeated blindly).
- **TLS** verified against the system's trust store, or against ``ca_file``.
- **Timeouts** on every socket operation (connect, send, each receive), set per request, and a
  separate one for connecting: a caller with several servers gives an unreachable one only its
  share of the request's budget.
- **Response headers** (lower-case names): OpenBao's ``Location`` and ``X-Vault-Index``.

Failover between addresses, retries and authentication are the caller's (backends/openbao.py).
"""

from __future__ import annotations

import http.client
import json as jsonlib
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit


class TransportError(Exception):
    """The exchange failed below HTTP: the request may or may not have reached the server."""


class ConnectError(TransportError):
    """No connection could be made: the server never saw the request."""


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not)."""
        return jsonlib.loads(self.content)


Connection = http.client.HTTPConnection
IDEMPOTENT = frozenset({"GET", "HEAD", "LIST", "PUT", "DELETE"})  # safe to send twice
# what a kept-alive connection the server has just closed fails with
HUNG_UP = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class HttpClient:
    """Requests to one or more origins (``scheme://host:port``), thread-safe."""

    def __init__(self, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                 ca_file: str | Path | None = None) -> None:
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._idle: dict[tuple[str, str], list[Connection]] = {}
        self._lock = threading.Lock()

    def request(self, method: str, url: str, *, json: Any = None,
                params: Mapping[str, str] | None = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None,
                connect_timeout: float | None = None) -> Response:
        """Send one request and read the whole response; TransportError if that failed.

        *timeout* bounds each socket operation of this request (default: the client's);
        *connect_timeout* bounds making a new connection (default: *timeout*), so a caller
        with several servers to try can give an unreachable one only its share.
        """
        timeout = self.timeout if timeout is None else timeout
        parts = urlsplit(url)
        origin = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        query = "&".join(part for part in (parts.query, urlencode(params or {})) if part)
        if query:
            target += "?" + query
        body = None
        sent_headers = {**self.headers, **(headers or {})}
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent_headers["Content-Type"] = "application/json"
        connection, reused = self._checkout(origin, connect_timeout or timeout)
        while True:
            try:
                connection.sock.settimeout(timeout)
                connection.request(method, target, body=body, headers=sent_headers)
                answer = connection.getresponse()
                content = answer.read()
                break
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                if reused and method in IDEMPOTENT and isinstance(error, HUNG_UP):
                    # The server closed a kept-alive connection as we sent on it (the race
                    # the readability check cannot close): once more, on a new connection.
                    connection, reused = self._connect(origin, connect_timeout or timeout), False
                    continue
                raise TransportError(f"{method} {parts.netloc}: {type(error).__name__}") from None
        if answer.will_close:
            connection.close()
        else:
            with self._lock:
                self._idle.setdefault(origin, []).append(connection)
        return Response(answer.status, content,
                        {name.lower(): value for name, value in answer.getheaders()})

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _checkout(self, origin: tuple[str, str], connect_timeout: float
                  ) -> tuple[Connection, bool]:
        """A kept-alive connection to *origin* still open at the server's end (True), or a
        new one (False)."""
        while True:
            with self._lock:
                pool = self._idle.get(origin)
                connection = pool.pop() if pool else None
            if connection is None:
                return self._connect(origin, connect_timeout), False
            if connection.sock is not None and not _readable(connection.sock):
                return connection, True
            connection.close()  # closed by the server while idle (or it sent something stray)

    def _connect(self, origin: tuple[str, str], timeout: float) -> Connection:
        scheme, netloc = origin
        connection: Connection
        if scheme == "https":
            connection = http.client.HTTPSConnection(netloc, timeout=timeout, context=self._tls)
        elif scheme == "http":
            connection = http.client.HTTPConnection(netloc, timeout=timeout)
        else:
            raise ConnectError(f"unsupported URL scheme {scheme!r}")
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as error:
            connection.close()
            raise ConnectError(f"the TLS certificate of {netloc} is not trusted "
                               f"({error.verify_message}; is ca_file its CA?)") from None
        except ssl.SSLError as error:
            connection.close()
            raise ConnectError(f"TLS with {netloc} failed: {error.reason or error}") from None
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ConnectError(f"cannot connect to {netloc}: {type(error).__name__}") from None
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: the server closed it (EOF)."""
    poller = select.poll()  # not select.select: a daemon may hold more than 1024 descriptors
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
