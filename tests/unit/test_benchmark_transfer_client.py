"""The transfer benchmark's download clients (``benchmarks/transfer.py``): one process per client, one download per line."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.transfer import DownloadClient, turn_order

BODY = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving ``file.bin`` (1 MiB) from a temporary folder."""
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "file.bin").write_bytes(BODY)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args):  # quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_one_process_serves_every_download_and_answers_each_with_its_figures(server: str, tmp_path: Path) -> None:
    with DownloadClient("bare", None, {}, tmp_path / "bare.log") as client:
        pid = client.process.pid
        for turn in range(2):
            dest = tmp_path / f"copy-{turn}.bin"
            figures = client.download("", f"{server}/file.bin", dest, tmp_path)
            assert figures["bytes"] == len(BODY) and dest.read_bytes() == BODY
            assert figures["md5"] == hashlib.md5(BODY).hexdigest()
            assert figures["seconds"] > 0 and figures["rss_peak"] >= figures["rss_base"] > 0
        assert client.process.pid == pid and client.process.poll() is None
    # Leaving the block ends the process (end of its input).
    assert client.process.returncode == 0


def test_a_client_that_fails_says_so_with_the_end_of_its_log(server: str, tmp_path: Path) -> None:
    with DownloadClient("bare-nomd5", None, {}, tmp_path / "nomd5.log") as client:
        with pytest.raises(RuntimeError, match="bare-nomd5 download client stopped") as failure:
            client.download("", f"{server}/missing.bin", tmp_path / "missing.bin", tmp_path)
        # The worker's traceback (the 404) is in the error, and the process is gone.
        assert "404" in str(failure.value)
        assert client.process.returncode not in (None, 0)
        # A second order to a client that is gone is the same clear error, not a broken pipe.
        with pytest.raises(RuntimeError, match="download client stopped"):
            client.download("", f"{server}/file.bin", tmp_path / "again.bin", tmp_path)


def test_each_repetition_starts_with_the_next_client() -> None:
    names = ["hook", "bare", "bare-nomd5", "curl"]
    orders = [turn_order(names, repetition) for repetition in range(5)]
    assert orders[0] == names and orders[4] == names
    # Every client is first once in four repetitions, and every order holds each client once.
    assert sorted(order[0] for order in orders[:4]) == sorted(names)
    assert all(sorted(order) == sorted(names) for order in orders)
