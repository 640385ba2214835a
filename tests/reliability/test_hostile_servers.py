"""
Hostile and broken servers on loopback: bounded memory and time, no secret in any error, the
server never choosing where the client goes.

Each server here is a real socket on 127.0.0.1 and a free port, written byte by byte by the test's
own handler: a gzip bomb, a server dripping one byte at a time, an endless list, redirects to
another host, bodies quoting the token. Every behaviour is checked on the sync path (workers)
and, where one exists, the async path (triggers).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_hpc.exceptions import HpcApiError, MuseApiError, RescaleApiError
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import OutputFile, RescaleHook
from airflow_provider_hpc.links.muse import MuseJobStateLink, web_link
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

from reliability_support import MUSE_PASSWORD, MUSE_TOKEN, NO_WAIT_RETRY, RESCALE_KEY, assert_no_secret

KEY = "0b5c1b1e-2f7c-4c53-9f0a-3e1c2a9d4c11"
MIB = 1024 * 1024
Handler = Callable[[socket.socket, bytes], None]


class RawServer:
    """A loopback server whose every connection is answered by a handler writing raw bytes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head)
            self.handler(client, head)
        except OSError:
            pass
        finally:
            client.close()

    def stop(self) -> None:
        self.listener.close()
        for client in self.open:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def answer(status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None) -> Handler:
    """A handler answering one fixed HTTP/1.1 response (connection closed after it)."""

    def handle(client: socket.socket, _: bytes) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    return handle


def dripping(first: bytes = b'{"info": {"report": {"cr": "WAIT", "name": "') -> Handler:
    """A handler announcing a large JSON body, then sending one byte every 0.2 s, forever."""

    def handle(client: socket.socket, _: bytes) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n" + first)
        while True:
            client.sendall(b"x")
            time.sleep(0.2)

    return handle


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., RawServer]]:
    """Start raw servers and point ``muse_raw`` / ``rescale_raw`` at the last one, with the given extras."""
    servers: list[RawServer] = []

    def start(handler: Handler, **extra: Any) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        muse = {"conn_type": "muse", "host": f"{server.url}/api/", "extra": {"token": MUSE_TOKEN, **extra}}
        rescale = {"conn_type": "rescale", "host": server.url, "password": RESCALE_KEY, "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_MUSE_RAW", json.dumps(muse))
        monkeypatch.setenv("AIRFLOW_CONN_RESCALE_RAW", json.dumps(rescale))
        return server

    yield start
    for server in servers:
        server.stop()


def run_async(make: Callable[[], Any]) -> Any:
    """Run a coroutine on a fresh loop, closing the shared sessions after it."""

    async def main() -> Any:
        try:
            return await make()
        finally:
            await close_all_sessions()

    return asyncio.run(main())


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body that inflates to ``inflated`` zero bytes, built without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    return b"".join(packer.compress(zeros) for _ in range(inflated // MIB)) + packer.flush()


# ----- 1. memory: a gzip bomb ------------------------------------------------------------------------


def test_a_gzip_bomb_is_cut_at_the_json_limit_on_both_paths(serve: Callable[..., RawServer]) -> None:
    body = gzip_bomb(512 * MIB)
    assert len(body) < MIB  # about 509 KiB on the wire
    serve(answer(200, body, headers={"Content-Encoding": "gzip"}))

    tracemalloc.start()
    try:
        with pytest.raises(MuseApiError, match="larger than"):
            MuseHook("muse_raw", retry=NO_WAIT_RETRY).get_state("sw_example", KEY)
        _, sync_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(MuseApiError, match="larger than"):
            run_async(lambda: MuseHook("muse_raw", retry=NO_WAIT_RETRY).a_get_state("sw_example", KEY))
        _, async_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sync_peak < 200 * MIB and async_peak < 200 * MIB, (sync_peak // MIB, async_peak // MIB)


# ----- 2. time: a server that drips ------------------------------------------------------------------


def test_a_dripping_answer_fails_within_seconds_of_request_timeout_on_both_paths(serve: Callable[..., RawServer]) -> None:
    serve(dripping(), request_timeout=1.5, read_timeout=1)

    started = time.monotonic()
    with pytest.raises(MuseApiError, match="request_timeout"):
        MuseHook("muse_raw", retry=NO_WAIT_RETRY).get_state("sw_example", KEY)
    sync_took = time.monotonic() - started

    started = time.monotonic()
    with pytest.raises(MuseApiError, match="request_timeout"):
        run_async(lambda: MuseHook("muse_raw", retry=NO_WAIT_RETRY).a_get_state("sw_example", KEY))
    async_took = time.monotonic() - started
    assert 1.4 < sync_took < 4 and 1.4 < async_took < 4, (sync_took, async_took)


def test_a_dripping_download_is_cut_below_the_minimum_rate(serve: Callable[..., RawServer], tmp_path: Any) -> None:
    def slow_file(client: socket.socket, _: bytes) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n")
        while True:
            client.sendall(b"x" * 10)
            time.sleep(0.1)

    server = serve(slow_file, min_download_rate=1000, rate_window=1)
    file = OutputFile(id="AbCdEf", name="big.dat", relative_path="big.dat", decrypted_size=1_000_000)
    started = time.monotonic()
    with pytest.raises(RescaleApiError, match="min_download_rate"):
        RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).download_file(file, tmp_path / "big.dat")
    assert time.monotonic() - started < 6
    assert len(server.requests) == 2  # a slow transfer is retried like a dropped one, then given up
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_trigger_deadline_cuts_a_poll_in_flight(serve: Callable[..., RawServer]) -> None:
    serve(dripping(), request_timeout=600, read_timeout=60)
    trigger = MuseJobTrigger(
        muse_conn_id="muse_raw", name="sw_example", key=KEY, poll_interval=1, deadline=time.time() + 1,
    )

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    started = time.monotonic()
    event = run_async(first_event)
    assert event["status"] == "timeout"
    assert time.monotonic() - started < 1 + 5 + 2  # the deadline, the last poll's grace, slack


# ----- 3. endless paging -----------------------------------------------------------------------------


def endless_pages(results: list[Any], count: int | None) -> Handler:
    """Every page answers ``results`` and a fresh ``next`` link."""
    pages = iter(range(2, 10**9))

    def handle(client: socket.socket, head: bytes) -> None:
        base = head.split(b" ")[1].decode().split("?")[0]
        body = {"count": count, "next": f"{base}?page={next(pages)}", "previous": None, "results": results}
        answer(200, json.dumps(body).encode())(client, head)

    return handle


FILE = {"id": "AbCdEf", "name": "out.txt", "relativePath": "out.txt", "decryptedSize": 3, "md5": "0" * 32, "isUploaded": True}


@pytest.mark.parametrize(
    ("results", "count", "pages"),
    [pytest.param([], None, 1, id="empty-page"), pytest.param([], 0, 1, id="empty-list"), pytest.param([FILE], 3, 3, id="count-reached")],
)
def test_an_endless_list_stops_on_both_paths(serve: Callable[..., RawServer], results: list[Any], count: int, pages: int) -> None:
    server = serve(endless_pages(results, count))
    started = time.monotonic()
    files = RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).list_output_files("AbCdE", "1")
    assert len(files) == len(results) * pages and len(server.requests) == pages

    server.requests.clear()
    files = run_async(lambda: RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).a_list_output_files("AbCdE", "1"))
    assert len(files) == len(results) * pages and len(server.requests) == pages
    assert time.monotonic() - started < 5


def test_an_empty_page_short_of_the_announced_count_is_an_error_on_both_paths(serve: Callable[..., RawServer]) -> None:
    server = serve(endless_pages([], 10**6))
    with pytest.raises(RescaleApiError, match="empty page after 0 of the 1000000 items"):
        RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).list_output_files("AbCdE", "1")
    with pytest.raises(RescaleApiError, match="empty page after 0 of the 1000000 items"):
        run_async(lambda: RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).a_list_output_files("AbCdE", "1"))
    assert len(server.requests) == 2


# ----- 4. echoed fields ------------------------------------------------------------------------------


def in_turn(*handlers: Handler) -> Handler:
    """A handler answering each connection with the next of ``handlers``, the last one from then on."""
    served = itertools.count()

    def handle(client: socket.socket, head: bytes) -> None:
        handlers[min(next(served), len(handlers) - 1)](client, head)

    return handle


def test_huge_echoed_fields_stay_out_of_events_and_log_lines(serve: Callable[..., RawServer], capsys: Any) -> None:
    def report(cr: str, latest_cr: str) -> bytes:
        echoed = {
            "cr": cr, "name": "sw_example",
            "request": {"cmd": "python /add.py 4 5", "returned_type": "stdout", "pad": "p" * (30 * MIB)},
            "process": {"latest_cr": latest_cr, "latest_state": "S" * 100_000, "job_id": 12, "jobname": "j" * 100_000},
        }
        return json.dumps({"info": {"report": echoed}}).encode()

    # Pending, then running with a huge state (a change on the way: a log line), then ended well.
    pending = json.dumps({"info": {"report": {"cr": "WAIT", "name": "sw_example", "process": {"latest_state": "PENDING"}}}})
    serve(in_turn(answer(200, pending.encode()), answer(200, report("WAIT", "IN_PROGRESS")), answer(200, report("OK", "ENDED_OK"))))
    trigger = MuseJobTrigger(muse_conn_id="muse_raw", name="sw_example", key=KEY, poll_interval=0.01)

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    event = run_async(first_event)
    assert event["status"] == "ok" and event["report"]["request"] == {"cmd": "python /add.py 4 5", "returned_type": "stdout"}
    assert len(json.dumps(event)) < 4096
    lines = capsys.readouterr().out.splitlines()
    assert any("SSSS" in line for line in lines) and max(len(line) for line in lines) < 2000


def test_unknown_size_harvest_files_are_cut_at_max_file_size(serve: Callable[..., RawServer], tmp_path: Any) -> None:
    serve(answer(200, b"x" * (5 * MIB), content_type="application/octet-stream"))
    file = OutputFile(id="AbCdEf", name="big.dat", relative_path="big.dat", decrypted_size=None)
    with pytest.raises(HpcApiError, match="larger than the limit of 1000 bytes"):
        RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).download_file(file, tmp_path / "big.dat", max_bytes=1000)
    assert not list(tmp_path.iterdir())


# ----- 5, 6. secrets in errors -----------------------------------------------------------------------


def test_a_token_in_a_login_answer_never_reaches_the_error(serve: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    serve(answer(200, f"JWT: {MUSE_TOKEN}".encode(), content_type="text/plain"))
    login = {"conn_type": "muse", "host": monkeypatch_host(), "login": "alice", "password": MUSE_PASSWORD}
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_LOGIN_RAW", json.dumps(login))
    with pytest.raises(MuseApiError) as info:
        MuseHook("muse_login_raw", retry=NO_WAIT_RETRY).submit("sw_example")
    assert "neither JSON nor a token" in str(info.value)
    assert_no_secret(str(info.value))


def monkeypatch_host() -> str:
    """The base URL of the last raw server (read back from its connection)."""
    return json.loads(os.environ["AIRFLOW_CONN_MUSE_RAW"])["host"]


@pytest.mark.parametrize("suffix", ["\n", " \r\n", "\t"])
def test_an_api_key_with_a_stray_line_break_is_stripped_on_both_paths(
    serve: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, capsys: Any, suffix: str
) -> None:
    server = serve(answer(401, b'{"detail": "Invalid token."}'))
    monkeypatch.setenv("AIRFLOW_CONN_RESCALE_RAW", json.dumps({"conn_type": "rescale", "host": server.url, "password": RESCALE_KEY + suffix}))
    with pytest.raises(RescaleApiError) as sync_error:
        RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).get_run("AbCdE", "1")
    with pytest.raises(RescaleApiError) as async_error:
        run_async(lambda: RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).a_get_run("AbCdE", "1"))
    assert all(f"Token {RESCALE_KEY}\r\n".encode() in request for request in server.requests)  # sent stripped
    for text in (str(sync_error.value), str(async_error.value), capsys.readouterr().out):
        assert_no_secret(text)


def test_an_api_key_with_an_inner_control_character_is_refused_without_being_repeated(
    serve: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(answer(200, b"{}"))
    monkeypatch.setenv("AIRFLOW_CONN_RESCALE_RAW", json.dumps({"conn_type": "rescale", "host": server.url, "password": "rk-\n-SECRETPART"}))
    for call in (
        lambda: RescaleHook("rescale_raw").get_run("AbCdE", "1"),
        lambda: run_async(lambda: RescaleHook("rescale_raw").a_get_run("AbCdE", "1")),
    ):
        with pytest.raises(HpcApiError, match="control character") as info:
            call()
        assert "SECRETPART" not in str(info.value)
    assert server.requests == []


# ----- 7. redirects to another origin ----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_on_both_paths(serve: Callable[..., RawServer], status: int) -> None:
    elsewhere = serve(answer(200, b'{"id": "1", "dateStarted": "x", "dateCompleted": "y"}'))
    serve(answer(status, b"", headers={"Location": f"{elsewhere.url}/api/jobs/AbCdE/runs/1/"}))
    with pytest.raises(RescaleApiError, match="another origin"):
        RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).get_run("AbCdE", "1")
    with pytest.raises(RescaleApiError, match="another origin"):
        run_async(lambda: RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).a_get_run("AbCdE", "1"))
    assert elsewhere.requests == []


def test_a_redirect_on_the_same_origin_is_followed_on_the_async_path(serve: Callable[..., RawServer]) -> None:
    run = json.dumps({"id": "1", "dateStarted": "2024-01-01T00:00:00Z", "dateCompleted": None}).encode()

    def moved_then_served(client: socket.socket, head: bytes) -> None:
        if b"/moved/" in head:
            answer(200, run)(client, head)
        else:
            answer(307, b"", headers={"Location": "/moved/"})(client, head)

    serve(moved_then_served)
    fetched = run_async(lambda: RescaleHook("rescale_raw", retry=NO_WAIT_RETRY).a_get_run("AbCdE", "1"))
    assert fetched.id == "1" and fetched.date_completed is None


# ----- 8. the server never chooses the link ----------------------------------------------------------


def test_the_state_link_is_built_from_the_connection_not_the_answer(serve: Callable[..., RawServer]) -> None:
    server = serve(answer(200, json.dumps({"msg": "ok", "url": f"javascript:alert(document.cookie)//x/{KEY}/"}).encode()))
    submission = MuseHook("muse_raw", retry=NO_WAIT_RETRY).submit("sw_example")
    assert submission.key == KEY
    assert submission.state_url == f"{server.url}/api/software/muse/state/sw_example/{KEY}/"
    assert web_link("javascript:alert(1)") == "" and web_link(" data:text/html,x") == ""

    pushed: dict[str, Any] = {}
    ti = type("Ti", (), {"xcom_push": lambda self, key, value: pushed.__setitem__(key, value)})()
    MuseJobStateLink.persist({"ti": ti}, "javascript:alert(1)")
    assert set(pushed.values()) == {""}


# ----- 9, 10. TLS and masking ------------------------------------------------------------------------


def test_tls_off_or_credentials_over_http_are_said_once(serve: Callable[..., RawServer], capsys: Any) -> None:
    serve(answer(200, b"{}"), verify=False)
    hook = MuseHook("muse_raw", retry=NO_WAIT_RETRY)
    hook.state_url("sw_example", KEY)
    hook.state_url("sw_example", KEY)
    run_async(hook.async_transport)
    out = capsys.readouterr().out
    assert out.count("TLS certificates are not verified") == 1
    assert out.count("credentials go over plain http") == 1
    assert_no_secret(out)


def test_a_missing_ca_bundle_is_a_provider_error_on_both_paths(serve: Callable[..., RawServer], tmp_path: Any) -> None:
    serve(answer(200, b"{}"), ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(HpcApiError, match="does not exist"):
        MuseHook("muse_raw").get_state("sw_example", KEY)
    with pytest.raises(HpcApiError, match="does not exist"):
        run_async(lambda: MuseHook("muse_raw").a_get_state("sw_example", KEY))


def test_the_async_path_masks_secrets_without_blocking_the_loop(serve: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.sdk.log as sdk_log

    serve(answer(200, b"{}"))
    masked: list[str] = []

    async def amask_secret(secret: Any, name: Any = None) -> None:
        masked.append(secret)

    def mask(secret: Any) -> None:
        raise AssertionError("the provider called the sync masker on the event loop")

    monkeypatch.setattr(sdk_log, "amask_secret", amask_secret)
    # The provider's own registrations; Airflow's extra_dejson registers sensitive extras itself.
    monkeypatch.setattr("airflow_provider_hpc.hooks._base.mask", mask)
    monkeypatch.setattr("airflow_provider_hpc.hooks.muse.mask", mask)
    run_async(MuseHook("muse_raw").async_transport)
    assert MUSE_TOKEN in masked


# ----- 16. a new token only when the token was refused -----------------------------------------------


def test_an_error_that_only_mentions_expiry_is_not_taken_for_a_refused_token(serve: Callable[..., RawServer]) -> None:
    body = {"error": "The signature of the input file has expired", "more": [], "type": "ValidationError"}
    server = serve(answer(200, json.dumps(body).encode()))
    with pytest.raises(MuseApiError, match="has expired"):
        MuseHook("muse_raw", retry=NO_WAIT_RETRY).submit("sw_example")
    assert len(server.requests) == 1  # submitted once, never again with a new token


def test_gzip_bomb_helper_really_inflates() -> None:
    assert len(gzip.decompress(gzip_bomb(2 * MIB))) == 2 * MIB


# ----- 4 (runs in XCom) and 12 (a forgotten key without a 404) ----------------------------------------


def test_a_job_with_too_many_runs_is_refused_without_reading_them_all(serve: Callable[..., RawServer]) -> None:
    from airflow_provider_hpc.operators.rescale import RescaleListRunsOperator

    run = {"id": "1", "dateStarted": None, "dateCompleted": None}
    server = serve(endless_pages([run] * 10, 10**6))
    task = RescaleListRunsOperator(task_id="runs", job_id="AbCdE", rescale_conn_id="rescale_raw", max_runs=25, page_size=10)
    task.__dict__["hook"] = RescaleHook("rescale_raw", retry=NO_WAIT_RETRY)
    pushed: dict[str, Any] = {}
    ti = type("Ti", (), {"xcom_push": lambda self, key, value: pushed.__setitem__(key, value)})()
    with pytest.raises(HpcApiError, match="more than max_runs=25"):
        task.execute({"ti": ti})
    assert len(server.requests) == 3  # 30 runs read, one page past the cap at most


@pytest.mark.parametrize("status", [200, 400])
def test_a_forgotten_key_answered_without_a_404_is_submitted_anew(serve: Callable[..., RawServer], status: int) -> None:
    from airflow_provider_hpc.operators.muse import STATE_STORE_KEY, MuseRunOperator

    new_key = "9d6a1f0e-3b7c-4f2a-8e5d-1c2b3a4d5e6f"
    forgotten = json.dumps({"error": f"Unknown key value {KEY}.", "more": [], "type": "NotFound"}).encode()

    def service(client: socket.socket, head: bytes) -> None:
        if head.startswith(b"POST "):
            answer(200, json.dumps({"msg": "submitted", "url": f"http://x/api/software/muse/state/sw_example/{new_key}/"}).encode())(client, head)
        else:
            answer(status, forgotten)(client, head)

    server = serve(service)
    store = {STATE_STORE_KEY: {"name": "sw_example", "key": KEY}}
    state_store = type("Store", (), {
        "get": lambda self, key, default=None: store.get(key, default),
        "set": lambda self, key, value, **_: store.__setitem__(key, value),
    })()
    pushed: dict[str, Any] = {}
    ti = type("Ti", (), {"xcom_push": lambda self, key, value: pushed.__setitem__(key, value), "max_tries": 1})()
    task = MuseRunOperator(task_id="add", name="sw_example", muse_conn_id="muse_raw", deferrable=True)
    with pytest.raises(TaskDeferred):
        task.execute({"ti": ti, "task_state_store": state_store})
    assert store[STATE_STORE_KEY]["key"] == new_key and pushed["muse_key"] == new_key
    assert sum(request.startswith(b"POST ") for request in server.requests) == 1


# ----- what creates work is never cut half-way ---------------------------------------------------


def test_a_submit_whose_answer_comes_late_is_not_given_up(serve: Callable[..., RawServer]) -> None:
    submitted = json.dumps({"msg": "submitted", "url": f"http://x/api/software/muse/state/sw_example/{KEY}/"}).encode()

    def slow_service(client: socket.socket, head: bytes) -> None:
        time.sleep(1.5)  # the service works on the submit longer than request_timeout and rate_window
        answer(200, submitted)(client, head)

    server = serve(slow_service, request_timeout=0.5, rate_window=0.5, min_download_rate=10**9)
    submission = MuseHook("muse_raw", retry=NO_WAIT_RETRY).submit("sw_example", cmd="python /add.py 4 5")
    assert submission.key == KEY and len(server.requests) == 1


def test_credentials_in_the_host_url_are_refused_without_being_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_URLCREDS", json.dumps({"conn_type": "muse", "host": "http://me:hunter2pw@127.0.0.1:9/api/"}))
    with pytest.raises(HpcApiError, match="holds credentials") as info:
        MuseHook("muse_urlcreds").state_url("sw_example", KEY)
    assert "hunter2pw" not in str(info.value)
