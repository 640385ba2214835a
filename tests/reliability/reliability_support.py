"""
Helpers of the reliability tests: a scripted hostile HTTP server, the secrets it must never show,
and a retry policy without waits.

The hostile server answers whatever the test scripts (status, headers, body), or echoes the
request back into an error body, so the tests can check what the provider does with answers a
real service or a proxy may send: truncated JSON, HTML pages, wrong types, huge bodies. It serves
HTTP/1.0 on 127.0.0.1 and a free port, one connection per request, in a background thread.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from airflow_provider_hpc.transport.retry import RetryPolicy

#: Secrets of the hostile-server connections; no message or log may ever show one of them.
MUSE_PASSWORD = "muse-pw-7Qx2-SECRET"
MUSE_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1IjoiaG9zdGlsZSJ9.aG9zdGlsZS1zaWduYXR1cmUtU0VDUkVU"
RESCALE_KEY = "rk-hostile-5f3c9a-SECRET"
SECRETS = (MUSE_PASSWORD, MUSE_TOKEN, RESCALE_KEY)

#: Attempts in all, no waits: hostile answers are judged, not waited out.
NO_WAIT_RETRY = RetryPolicy(max_attempts=2, initial_wait=0.0, max_wait=0.0, max_retry_after=0.0)


@dataclass
class Answer:
    """What the hostile server sends for the next requests."""

    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    echo: bool = False


class HostileServer:
    """A loopback HTTP server answering a scripted :class:`Answer` to every request."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else b""
                with server._lock:
                    answer = server.answer
                    server.requests.append({"method": self.command, "path": self.path, "body": payload})
                body = answer.body
                if answer.echo:
                    # A careless server or proxy echoing the whole request back in its error page.
                    echoed = f"{self.command} {self.path}\n{self.headers}\n".encode() + payload
                    body = json.dumps({"error": echoed.decode("utf-8", "replace"), "type": "Echo"}).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                """Stay quiet: the tests read the recorded requests instead."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hostile-server", daemon=True)

    def script(self, status: int = 200, body: bytes | str | Any = b"{}", *, content_type: str = "application/json",
               headers: dict[str, str] | None = None, echo: bool = False) -> None:
        """Set the answer of the following requests; a non-bytes, non-str body is sent as JSON."""
        if isinstance(body, str):
            raw = body.encode()
        elif isinstance(body, (bytes, bytearray)):
            raw = bytes(body)
        else:
            raw = json.dumps(body).encode()
        with self._lock:
            self.answer = Answer(status, raw, content_type, dict(headers or {}), echo)
            self.requests.clear()

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def assert_no_secret(text: str, secrets: tuple[str, ...] = SECRETS) -> None:
    """Fail when ``text`` shows any of ``secrets``."""
    for secret in secrets:
        assert secret not in text, f"a secret leaked into: {text[:500]!r}"


class TcpProxy:
    """
    A loopback TCP forwarder that can go down and come back on the same port.

    While down, connections are refused and open ones are cut, as when a service's host
    restarts; the service behind it (the emulator) keeps its state.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy-accept").start()

    def down(self) -> None:
        """Stop listening and cut every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
