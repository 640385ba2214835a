"""
Reading a download's body over a real socket (``transport/sync.py``, ``body_chunks``): a plain body
of known length is read straight into one reused buffer; anything else (compressed, chunked) takes
urllib3's own reads. Either way the bytes, the retries of a body cut short, the pace limit and the
reuse of the connection are the same.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from airflow_provider_hpc.storage_sink import write_atomically
from airflow_provider_hpc.transport.base import TransportSettings
from airflow_provider_hpc.transport.errors import TransportError
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.transport.sync import SyncTransport, body_chunks

BODY = bytes(range(256)) * 12_000 + b"end"  # about 3 MiB: several chunks of the reused buffer


class _Handler(BaseHTTPRequestHandler):
    """Answers ``/plain``, ``/gzip``, ``/chunked``, ``/short`` (cut half-way) and ``/drip``."""

    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be seen
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Keep the test output quiet."""

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        """Answer the scripted route."""
        self.server.connections.add(self.client_address)
        route = self.path.split("?")[0].strip("/")
        self.server.calls[route] = self.server.calls.get(route, 0) + 1
        if route == "gzip":
            body = gzip.compress(BODY)
            self._head(len(body), {"Content-Encoding": "gzip"})
            self.wfile.write(body)
        elif route == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(BODY), 100_000):
                piece = BODY[start : start + 100_000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif route == "short" and self.server.calls[route] <= self.server.short_times:
            self._head(len(BODY))
            self.wfile.write(BODY[: len(BODY) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif route == "drip":
            self._head(len(BODY))
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
            self.close_connection = True
        else:
            self._head(len(BODY))
            self.wfile.write(BODY)

    def _head(self, length: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    """A plain HTTP/1.1 server on 127.0.0.1 and a free port, in a thread."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.connections, httpd.calls, httpd.short_times = set(), {}, 1  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def transport_for(server: ThreadingHTTPServer, attempts: int = 3, **settings: Any) -> SyncTransport:
    """A sync transport on the test server, retrying at once (no real waits)."""
    policy = RetryPolicy(max_attempts=attempts, initial_wait=0.0, max_wait=0.0)
    return SyncTransport(TransportSettings(f"http://127.0.0.1:{server.server_port}/", retry=policy, **settings))


def collect(chunks: Callable[[], Any]) -> bytes:
    """Join a body's chunks, copying each before the next is read (the buffer is reused)."""
    return b"".join(bytes(chunk) for chunk in chunks())


@pytest.mark.parametrize("route", ["plain", "gzip", "chunked"])
def test_every_body_arrives_whole_and_the_connection_is_reused(server: ThreadingHTTPServer, route: str) -> None:
    """Plain, compressed and chunked bodies give the same bytes; the next request reuses the connection."""
    transport = transport_for(server)
    first = transport.download(route, lambda chunks: b"".join(bytes(c) for c in chunks))
    second = transport.download(route, lambda chunks: hashlib.md5(b"".join(bytes(c) for c in chunks)).hexdigest())
    assert first == BODY
    assert second == hashlib.md5(BODY).hexdigest()
    assert len(server.connections) == 1  # type: ignore[attr-defined]
    transport.close()


def test_a_plain_body_is_read_into_one_reused_buffer(server: ThreadingHTTPServer) -> None:
    """The chunks of a plain body are views of one buffer, of at most the chunk size each."""
    transport = transport_for(server)
    seen: list[tuple[int, int]] = []

    def sink(chunks: Iterator[Any]) -> bytes:
        body = bytearray()
        for chunk in chunks:
            assert isinstance(chunk, memoryview)
            seen.append((id(chunk.obj), len(chunk)))
            body += chunk
        return bytes(body)

    assert transport.download("plain", sink) == BODY
    assert len({buffer for buffer, _ in seen}) == 1
    assert max(size for _, size in seen) <= 1024 * 1024 and len(seen) == 3
    transport.close()


def test_a_body_cut_short_is_retried_whole(server: ThreadingHTTPServer, tmp_path: Any) -> None:
    """A plain body that ends before its Content-Length is a dropped connection: the transfer starts again."""
    from airflow.sdk import ObjectStoragePath

    transport = transport_for(server)
    dest = ObjectStoragePath(f"file://{tmp_path}/out.bin")
    stored = transport.download("short", lambda chunks: write_atomically(chunks, dest))
    assert stored.size == len(BODY) and stored.md5 == hashlib.md5(BODY).hexdigest()
    assert server.calls["short"] == 2  # type: ignore[attr-defined]
    assert sorted(p.name for p in ObjectStoragePath(f"file://{tmp_path}").iterdir()) == ["out.bin"]
    transport.close()


def test_a_body_always_cut_short_fails_clearly(server: ThreadingHTTPServer) -> None:
    """When every attempt is cut short, the error says the connection broke, after the attempts."""
    server.short_times = 99  # type: ignore[attr-defined]
    transport = transport_for(server)
    with pytest.raises(TransportError, match="short of its Content-Length") as caught:
        transport.download("short", lambda chunks: collect(lambda: chunks))
    assert caught.value.retryable
    assert server.calls["short"] == 3  # type: ignore[attr-defined]
    transport.close()


def test_a_dripping_plain_body_is_cut_by_the_pace_limit(server: ThreadingHTTPServer) -> None:
    """A byte at a time is seen at every socket read: the pace limit cuts it, as on urllib3's reads."""
    transport = transport_for(server, attempts=1, min_download_rate=1e6, rate_window=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError, match="min_download_rate"):
        transport.download("drip", lambda chunks: collect(lambda: chunks))
    assert time.monotonic() - started < 2.0  # cut after the window, not at the end of the 2.5 s drip
    transport.close()


def test_body_chunks_of_a_plain_json_answer_read_capped(server: ThreadingHTTPServer) -> None:
    """The small-buffer reader of JSON answers goes through the same path (bounded, then the rest dropped)."""
    transport = transport_for(server)
    received = transport.fetch("GET", "plain", lambda response: bytes(next(iter(body_chunks(response, 64 * 1024)))))
    assert received == BODY[: 64 * 1024]
    transport.close()
