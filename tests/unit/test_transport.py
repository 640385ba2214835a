"""
The shared transport's edge cases, sync (``requests_mock``) and async (a scripted aiohttp server on
127.0.0.1): settings, Retry-After, 5xx, dropped connections, timeouts, HTML pages, redirects, and
which POSTs may be sent twice.

No test sleeps: the waits the retry loops ask for are recorded instead of slept (``sleeps`` and
``async_sleeps``), except the few hundredths of a second an async read timeout needs to fire.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import requests
import requests_mock as rm
import urllib3.exceptions
from airflow.sdk import Connection, ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, MuseApiError, RescaleApiError
from airflow_provider_hpc.hooks._base import settings_from_connection
from airflow_provider_hpc.transport import aio, retry
from airflow_provider_hpc.transport.retry import RetryPolicy, parse_retry_after
from airflow_provider_hpc.hooks.muse import MuseCr, MuseHook
from airflow_provider_hpc.hooks.rescale import OutputFile, RescaleHook
from scripted_server import HANG, RESET, ScriptedServer

API = "http://muse.test/api/"
KEY = "58ae6cea-df31-4059-9466-b817c337985d"
STATE_PATH = f"software/muse/state/sw_example/{KEY}/"
STATE_URL = API + STATE_PATH
SUBMIT_URL = API + "software/muse/run/sw_example/"
OBTAIN_URL = API + "jwt/obtain/"
PLATFORM = "https://platform.rescale.com/"
RUN_URL = PLATFORM + "api/jobs/QTVia/runs/1/"

REPORT = {
    "request": {"cmd": "python /add.py 4 5", "cmd_option": "", "ordered_filename_list": [], "returned_type": "stdout",
                "todownload": False, "sbatch_list": [], "module_list": []},
    "rsrc": {"identity": "muse"},
    "process": {"jobname": "114-ws-sw_example", "job_id": 2459394, "latest_cr": "ENDED_OK", "latest_state": "COMPLETED"},
    "name": "sw_example",
    "cr": "OK",
}
STATE_ANSWER = {"info": {"report": REPORT}, "msg": "End of job.", "url": API + f"software/muse/run/sw_example/{KEY}/"}
SUBMIT_ANSWER = {"msg": "GET ... to get cluster job state", "url": f"http://147.100.179.250/api/software/muse/state/sw_example/{KEY}/"}
RUN_1 = {
    "dateCompleted": "2015-02-18T03:09:14.667000Z", "dateStarted": "2015-02-18T03:08:49.117000Z", "displayOrder": 1,
    "id": "1", "isOptimal": False, "outputFileCount": 66, "outputFileSize": 8018226, "parent": None, "type": 3,
    "variables": [{"displayValue": "20", "isRelative": False, "name": "x_velocity", "value": 20.0}],
}
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
MUSE_ERROR = {"error": "Unknown key value", "more": ["no job for this key"], "type": "NotFound"}

#: Waits long enough to see whether ``Retry-After`` is honoured, short enough to see it capped.
POLICY = RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.004, max_retry_after=30.0)


def http_date(seconds_from_now: float) -> str:
    """Return an HTTP date (RFC 7231, GMT) ``seconds_from_now`` seconds away."""
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


def reset_error() -> requests.exceptions.ConnectionError:
    """What ``requests`` raises when the server resets the connection after the request was sent."""
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    )


def refused_error() -> requests.exceptions.ConnectionError:
    """What ``requests`` raises when the TCP connection cannot be opened (the request never left)."""
    reason = urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))


@pytest.fixture
def muse(set_conn: Callable[..., str], creds: Any) -> Iterator[MuseHook]:
    """A Muse hook (login/password) with :data:`POLICY`."""
    hook = MuseHook(set_conn("muse_tr", conn_type="muse", host=API, login=creds.login, password=creds.password), retry=POLICY)
    yield hook
    hook.close()


@pytest.fixture
def rescale(set_conn: Callable[..., str], creds: Any) -> Iterator[RescaleHook]:
    """A Rescale hook with :data:`POLICY`."""
    hook = RescaleHook(set_conn("rescale_tr", conn_type="rescale", host=PLATFORM, password=creds.api_key), retry=POLICY)
    yield hook
    hook.close()


# ----- settings ----------------------------------------------------------------------------------


def conn(**fields: Any) -> Connection:
    """Return an Airflow connection of type ``muse`` with ``fields``."""
    return Connection(conn_id="c", conn_type=fields.pop("conn_type", "muse"), **fields)


def test_settings_from_a_whole_url_and_extras() -> None:
    """Every transport extra is read; strings (as forms store them) become numbers and booleans."""
    settings = settings_from_connection(
        conn(host="http://147.100.179.250/api", extra='{"verify": "false", "connect_timeout": "2.5", "read_timeout": 7, "max_attempts": "4"}')
    )
    assert settings.base_url == "http://147.100.179.250/api/"
    assert (settings.verify, settings.connect_timeout, settings.read_timeout) == (False, 2.5, 7.0)
    assert settings.retry.max_attempts == 4


def test_settings_from_a_bare_host_uri() -> None:
    """A URI's bare host is completed by port, schema (the path) and the ``scheme`` extra."""
    uri_conn = Connection.from_uri("muse://me:secret@147.100.179.250:8000/api?scheme=http", conn_id="c")
    settings = settings_from_connection(uri_conn)
    assert settings.base_url == "http://147.100.179.250:8000/api/"
    assert settings_from_connection(conn(host="muse.example.org"), default_path="api").base_url == "https://muse.example.org/api/"


def test_settings_read_prefixed_extras_and_ca_bundle(tmp_path: Any) -> None:
    """Older forms stored ``extra__<type>__<field>``; a CA bundle replaces the default trust store."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = settings_from_connection(
        conn(host="https://muse.example.org/api/", extra=json.dumps({"extra__muse__read_timeout": "9", "extra__muse__ca_bundle": str(ca)}))
    )
    assert settings.read_timeout == 9.0
    assert settings.verify == str(ca)
    path_in_verify = settings_from_connection(conn(host="https://h/", extra=json.dumps({"verify": str(ca)})))
    assert path_in_verify.verify == str(ca)


def test_tls_settings_that_contradict_or_miss_their_file_are_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify false with a ca_bundle is a contradiction; a CA file that is not there is named before any request."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(HpcApiError, match="verify false and a ca_bundle"):
        settings_from_connection(conn(host="https://h/", extra=json.dumps({"verify": False, "ca_bundle": str(ca)})))
    with pytest.raises(HpcApiError, match="does not exist"):
        settings_from_connection(conn(host="https://h/", extra=json.dumps({"ca_bundle": str(tmp_path / "missing.pem")})))
    # One rule for both transports: the environment's CA bundle, when the connection names none.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    assert settings_from_connection(conn(host="https://h/")).verify == str(ca)
    assert settings_from_connection(conn(host="https://h/", extra='{"verify": false}')).verify is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "http://h/", "extra": '{"read_timeout": "soon"}'}, "not a number"),
        ({"host": "ftp://h/api/"}, "not an http"),
        ({}, "has no host"),
    ],
)
def test_settings_errors_are_clear(fields: dict, message: str) -> None:
    """A wrong extra, a non-HTTP URL or a missing host is refused with a message, before any request."""
    with pytest.raises(HpcApiError, match=message):
        settings_from_connection(conn(**fields))


# ----- retry policy ------------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    """``Retry-After`` in seconds or as an HTTP date (GMT even when the zone says ``-0000``)."""
    assert parse_retry_after("7") == 7.0
    assert 18.0 <= parse_retry_after(http_date(20)) <= 20.0
    naive = email.utils.formatdate(time.time() + 20, usegmt=False).rsplit(" ", 1)[0] + " -0000"
    assert 18.0 <= parse_retry_after(naive) <= 20.0
    assert parse_retry_after(http_date(-60)) == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_grows_and_stays_bounded() -> None:
    """Exponential backoff with jitter: never above ``max_wait``; ``Retry-After`` capped at ``max_retry_after``."""
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0, max_retry_after=300.0)
    for attempt in range(1, 40):
        wait = policy.backoff(attempt)
        assert min(30.0, 2 ** (attempt - 1)) <= wait <= 30.0
    assert policy.wait_for(HpcApiError("x", retry_after=3600), 1) == 300.0
    assert policy.wait_for(HpcApiError("x", retry_after=12), 1) == 12.0
    assert RetryPolicy.from_dict(policy.to_dict()) == policy


# ----- sync: GET retries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [("7", 7.0, 7.0), ("in 20 s", 17.0, 20.0), ("3600", 30.0, 30.0)],
    ids=["seconds", "http-date", "capped"],
)
def test_429_retry_after_is_honoured_capped_then_success(
    muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], retry_after: str, low: float, high: float
) -> None:
    """A 429 waits what ``Retry-After`` asks (seconds or date), at most ``max_retry_after``, then succeeds."""
    retry_after = http_date(20) if retry_after == "in 20 s" else retry_after
    route = requests_mock.get(
        STATE_URL, [{"status_code": 429, "headers": {"Retry-After": retry_after}, "json": {"detail": "slow down"}}, {"json": STATE_ANSWER}]
    )
    assert muse.get_state("sw_example", KEY).cr is MuseCr.OK
    assert route.call_count == 2
    assert len(sleeps) == 1 and low <= sleeps[0] <= high


def test_503_then_success(rescale: RescaleHook, requests_mock: rm.Mocker, sleeps: list[float]) -> None:
    """A 503 is transient: the GET is sent again after a short backoff."""
    route = requests_mock.get(RUN_URL, [{"status_code": 503, "text": "Service Unavailable"}, {"json": RUN_1}])
    assert rescale.get_run("QTVia", "1").id == "1"
    assert route.call_count == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= POLICY.max_wait


def test_repeated_500_ends_with_a_clear_error(rescale: RescaleHook, requests_mock: rm.Mocker, sleeps: list[float]) -> None:
    """Bounded attempts: three 500s make one error naming the endpoint, the status, the server's words and the attempts."""
    route = requests_mock.get(RUN_URL, status_code=500, json={"detail": "Internal server error"})
    with pytest.raises(RescaleApiError) as info:
        rescale.get_run("QTVia", "1")
    error = info.value
    assert route.call_count == POLICY.max_attempts == 3
    assert len(sleeps) == 2
    assert (error.status, error.endpoint, error.error, error.attempts) == (500, "GET /api/jobs/QTVia/runs/1/", "Internal server error", 3)
    assert "gave up after 3 attempts" in str(error)


@pytest.mark.parametrize(
    "failure",
    [reset_error, lambda: requests.exceptions.ReadTimeout("Read timed out. (read timeout=60)"), refused_error],
    ids=["connection-reset", "read-timeout", "connection-refused"],
)
def test_get_retries_dropped_connections_and_timeouts(
    muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], failure: Callable[[], Exception]
) -> None:
    """A GET changes nothing: it is sent again after a reset, a read timeout or a refused connection."""
    route = requests_mock.get(STATE_URL, [{"exc": failure()}, {"json": STATE_ANSWER}])
    assert muse.get_state("sw_example", KEY).is_successful
    assert route.call_count == 2


def test_read_timeout_every_time_is_a_timeout_error(muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float]) -> None:
    """When every attempt times out, the error says so (no ``requests`` exception leaks out)."""
    requests_mock.get(STATE_URL, exc=requests.exceptions.ReadTimeout("Read timed out."))
    with pytest.raises(MuseApiError, match="Request timed out") as info:
        muse.get_state("sw_example", KEY)
    assert info.value.status is None and info.value.attempts == 3


@pytest.mark.parametrize("status", [502, 200])
def test_html_page_is_a_clear_error_with_an_excerpt(
    muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], status: int
) -> None:
    """A proxy's HTML page (an error status or even 200) is an error with readable text, not a JSONDecodeError."""
    requests_mock.get(STATE_URL, status_code=status, text=HTML_502, headers={"Content-Type": "text/html"})
    with pytest.raises(MuseApiError) as info:
        muse.get_state("sw_example", KEY)
    assert info.value.excerpt == "502 Bad Gateway 502 Bad Gateway nginx"
    assert "<html>" not in str(info.value)
    assert not isinstance(info.value.__cause__, ValueError)


def test_muse_error_body_with_200_is_not_retried(muse: MuseHook, requests_mock: rm.Mocker) -> None:
    """Muse's ``{"error","more","type"}`` with status 200 is the server's answer: raised at once, all three kept."""
    route = requests_mock.get(STATE_URL, json=MUSE_ERROR)
    with pytest.raises(MuseApiError) as info:
        muse.get_state("sw_example", KEY)
    assert (info.value.error, info.value.error_type) == ("Unknown key value", "NotFound")
    assert "no job for this key" in str(info.value.more)
    assert route.call_count == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_other_4xx_fail_at_once(rescale: RescaleHook, requests_mock: rm.Mocker, status: int) -> None:
    """A 4xx other than 429 will not change by asking again: one request, the server's message."""
    route = requests_mock.get(RUN_URL, status_code=status, json={"detail": "Not found."})
    with pytest.raises(RescaleApiError, match="Not found.") as info:
        rescale.get_run("QTVia", "1")
    assert route.call_count == 1 and info.value.status == status and info.value.attempts is None


def test_paging_retries_a_page_and_keeps_page_size(rescale: RescaleHook, requests_mock: rm.Mocker, sleeps: list[float]) -> None:
    """A 429 on the second page retries that page, with ``page_size`` still carried over."""
    first = {"count": 2, "next": PLATFORM + "api/jobs/QTVia/runs/?page=2", "previous": None, "results": [RUN_1]}
    second = {"count": 2, "next": None, "previous": PLATFORM + "api/jobs/QTVia/runs/", "results": [dict(RUN_1, id="2")]}
    answers = iter([{"json": first}, {"status_code": 429, "headers": {"Retry-After": "1"}, "json": {}}, {"json": second}])

    def answer(request: Any, context: Any) -> Any:
        item = next(answers)
        context.status_code = item.get("status_code", 200)
        context.headers.update(item.get("headers", {}))
        return item["json"]

    route = requests_mock.get(PLATFORM + "api/jobs/QTVia/runs/", json=answer)
    assert [r.id for r in rescale.list_runs("QTVia", page_size=1)] == ["1", "2"]
    assert [r.qs for r in route.request_history] == [{"page": ["1"], "page_size": ["1"]}] + [{"page": ["2"], "page_size": ["1"]}] * 2
    assert sleeps == [1.0]


class DroppingBody(io.RawIOBase):
    """A response body that breaks after some bytes, as a dropped connection does mid-transfer."""

    def __init__(self, data: bytes, after: int) -> None:
        self.data, self.after, self.pos = data, after, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.after:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
        size = min(len(buffer), self.after - self.pos)
        buffer[:size] = self.data[self.pos : self.pos + size]
        self.pos += size
        return size


def test_download_dropped_mid_body_is_retried_whole(
    rescale: RescaleHook,
    requests_mock: rm.Mocker,
    sleeps: list[float],
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
) -> None:
    """A transfer that breaks half-way starts again from the beginning; only the whole file is kept."""
    data = bytes(range(256)) * 4096  # 1 MiB
    import hashlib

    route = requests_mock.get(
        PLATFORM + "api/files/dmpTse/contents/", [{"body": DroppingBody(data, 300_000)}, {"content": data}]
    )
    file = OutputFile(id="dmpTse", name="U", relative_path="U", decrypted_size=len(data), md5=hashlib.md5(data).hexdigest())
    stored = rescale.download_file(file, dest_dir / "U")
    assert route.call_count == 2
    assert stored.size == len(data) and (dest_dir / "U").read_bytes() == data
    assert list_files(dest_dir) == ["U"]


# ----- sync: a POST that creates work -------------------------------------------------------------


@pytest.mark.parametrize(
    "never_reached",
    [lambda: requests.exceptions.ConnectTimeout("Connection to muse.test timed out. (connect timeout=10)"), refused_error],
    ids=["connect-timeout", "connection-refused"],
)
def test_submit_is_retried_when_it_never_reached_the_server(
    muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], creds: Any, never_reached: Callable[[], Exception]
) -> None:
    """The connection could not be opened: the run cannot exist, so the submit is sent again."""
    requests_mock.post(OBTAIN_URL, json={"token": creds.jwt})
    submit = requests_mock.post(SUBMIT_URL, [{"exc": never_reached()}, {"json": SUBMIT_ANSWER}])
    assert muse.submit("sw_example", cmd="python /add.py 4 5").key == KEY
    assert submit.call_count == 2


@pytest.mark.parametrize(
    "maybe_reached",
    [
        {"exc": requests.exceptions.ReadTimeout("Read timed out.")},
        {"exc": reset_error()},
        {"status_code": 500, "json": {"error": "boom", "more": [], "type": "ServerError"}},
        {"status_code": 502, "text": HTML_502},
        {"status_code": 503, "text": "Service Unavailable"},
        {"status_code": 504, "text": "Gateway Timeout"},
    ],
    ids=["read-timeout", "connection-reset", "500", "502", "503", "504"],
)
def test_submit_is_not_repeated_when_it_may_have_reached_the_server(
    muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], creds: Any, maybe_reached: dict
) -> None:
    """A timeout after sending, a reset or a 5xx may hide a created run: never a second submit."""
    requests_mock.post(OBTAIN_URL, json={"token": creds.jwt})
    submit = requests_mock.post(SUBMIT_URL, [maybe_reached, {"json": SUBMIT_ANSWER}])
    with pytest.raises(MuseApiError) as info:
        muse.submit("sw_example")
    assert submit.call_count == 1
    assert info.value.retryable is False and sleeps == []


def test_submit_is_retried_after_429(muse: MuseHook, requests_mock: rm.Mocker, sleeps: list[float], creds: Any) -> None:
    """A 429 refused the submit before any work started: it is sent again after ``Retry-After``."""
    requests_mock.post(OBTAIN_URL, json={"token": creds.jwt})
    submit = requests_mock.post(
        SUBMIT_URL, [{"status_code": 429, "headers": {"Retry-After": "2"}, "json": {"detail": "Throttled"}}, {"json": SUBMIT_ANSWER}]
    )
    assert muse.submit("sw_example").key == KEY
    assert submit.call_count == 2 and sleeps == [2.0]


# ----- sync: redirects ---------------------------------------------------------------------------


def test_redirect_to_another_origin_is_not_followed(muse: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """A 307 would send the password again in the body: a redirect elsewhere is an error, nothing is sent there."""
    requests_mock.post(OBTAIN_URL, status_code=307, headers={"Location": "https://elsewhere.test/api/jwt/obtain/"})
    elsewhere = requests_mock.post("https://elsewhere.test/api/jwt/obtain/", json={"token": "x"})
    with pytest.raises(MuseApiError, match="redirected to another origin") as info:
        muse.submit("sw_example")
    assert "elsewhere.test" in str(info.value) and info.value.status == 307
    assert elsewhere.call_count == 0


def test_redirect_on_the_same_origin_is_followed(rescale: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A redirect that stays on the platform (a missing slash, a moved path) is followed."""
    requests_mock.get(RUN_URL, status_code=301, headers={"Location": "/api/v1/jobs/QTVia/runs/1/"})
    moved = requests_mock.get(PLATFORM + "api/v1/jobs/QTVia/runs/1/", json=RUN_1)
    assert rescale.get_run("QTVia", "1").id == "1"
    assert moved.call_count == 1


# ----- async ---------------------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    """A scripted aiohttp server on 127.0.0.1 and a free port."""
    scripted = await ScriptedServer().start()
    yield scripted
    await scripted.close()


@pytest.fixture
def async_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record, instead of sleeping, every wait the async retry loop asks for."""
    recorded: list[float] = []

    async def record(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(retry, "_async_sleep", record)
    return recorded


@pytest.fixture
def amuse(server: ScriptedServer, set_conn: Callable[..., str], creds: Any) -> MuseHook:
    """A Muse hook on the scripted server, with a short read timeout."""
    conn_id = set_conn(
        "muse_async", conn_type="muse", host=server.url + "api/", login=creds.login, password=creds.password,
        extra={"read_timeout": 0.2},
    )
    return MuseHook(conn_id, retry=POLICY)


@pytest.fixture
def arescale(server: ScriptedServer, set_conn: Callable[..., str], creds: Any) -> RescaleHook:
    """A Rescale hook on the scripted server."""
    return RescaleHook(set_conn("rescale_async", conn_type="rescale", host=server.url, password=creds.api_key), retry=POLICY)


ASYNC_STATE = f"/api/{STATE_PATH}"


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [("7", 7.0, 7.0), ("in 20 s", 17.0, 20.0), ("3600", 30.0, 30.0)],
    ids=["seconds", "http-date", "capped"],
)
async def test_async_429_retry_after_is_honoured_capped_then_success(
    server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float], retry_after: str, low: float, high: float
) -> None:
    """The trigger side honours ``Retry-After`` the same way, without blocking the loop."""
    retry_after = http_date(20) if retry_after == "in 20 s" else retry_after
    server.script("GET", ASYNC_STATE, {"status": 429, "headers": {"Retry-After": retry_after}, "json": {}}, {"json": STATE_ANSWER})
    assert (await amuse.a_get_state("sw_example", KEY)).is_successful
    assert server.calls("GET", ASYNC_STATE) == 2
    assert len(async_sleeps) == 1 and low <= async_sleeps[0] <= high


@pytest.mark.parametrize(
    "transient",
    [{"status": 503, "text": "Service Unavailable"}, {"status": 504, "text": HTML_502}, RESET, HANG],
    ids=["503", "504", "connection-reset", "read-timeout"],
)
async def test_async_get_retries_transient_failures(
    server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float], transient: Any
) -> None:
    """5xx, a dropped connection and a read timeout are retried; the next answer wins."""
    server.script("GET", ASYNC_STATE, transient, transient, {"json": STATE_ANSWER})
    assert (await amuse.a_get_state("sw_example", KEY)).cr is MuseCr.OK
    # aiohttp itself sends an idempotent request once more when a connection drops (RFC 9112 9.3.1);
    # the policy's own attempts come on top and are the ones that wait.
    assert server.calls("GET", ASYNC_STATE) == 3
    assert len(async_sleeps) == (1 if transient == RESET else 2)


async def test_async_connection_dropped_every_time(server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float]) -> None:
    """A server that always drops the connection ends in a clear error after the bounded attempts."""
    server.script("GET", ASYNC_STATE, RESET)
    with pytest.raises(MuseApiError, match="connection failed") as info:
        await amuse.a_get_state("sw_example", KEY)
    assert info.value.attempts == 3 and len(async_sleeps) == 2


async def test_async_repeated_500_ends_with_a_clear_error(
    server: ScriptedServer, arescale: RescaleHook, async_sleeps: list[float]
) -> None:
    """Bounded attempts on the async side too, ending in one clear error."""
    server.script("GET", "/api/jobs/QTVia/runs/1/", {"status": 500, "json": {"detail": "Internal server error"}})
    with pytest.raises(RescaleApiError) as info:
        await arescale.a_get_run("QTVia", "1")
    assert server.calls("GET", "/api/jobs/QTVia/runs/1/") == 3 and len(async_sleeps) == 2
    assert (info.value.status, info.value.error, info.value.attempts) == (500, "Internal server error", 3)
    assert "gave up after 3 attempts" in str(info.value)


async def test_async_read_timeout_every_time(server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float]) -> None:
    """A server that never answers ends in a timeout error after the bounded attempts."""
    server.script("GET", ASYNC_STATE, HANG)
    with pytest.raises(MuseApiError, match="Request timed out") as info:
        await amuse.a_get_state("sw_example", KEY)
    assert info.value.attempts == 3


@pytest.mark.parametrize("status", [502, 200])
async def test_async_html_page_is_a_clear_error(server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float], status: int) -> None:
    """An HTML page is an error with its text, whatever the status."""
    server.script("GET", ASYNC_STATE, {"status": status, "text": HTML_502})
    with pytest.raises(MuseApiError) as info:
        await amuse.a_get_state("sw_example", KEY)
    assert info.value.excerpt == "502 Bad Gateway 502 Bad Gateway nginx"


async def test_async_muse_error_body_with_200(server: ScriptedServer, amuse: MuseHook) -> None:
    """Muse's error shape with 200 on the trigger side: a :class:`MuseApiError`, not a report."""
    server.script("GET", ASYNC_STATE, {"json": MUSE_ERROR})
    with pytest.raises(MuseApiError) as info:
        await amuse.a_get_state("sw_example", KEY)
    assert info.value.error_type == "NotFound"
    assert server.calls("GET", ASYNC_STATE) == 1


async def test_async_other_4xx_fail_at_once(server: ScriptedServer, arescale: RescaleHook, async_sleeps: list[float]) -> None:
    """A 404 is the server's answer: one request, the server's words."""
    server.script("GET", "/api/jobs/QTVia/runs/1/", {"status": 404, "json": {"detail": "Not found."}})
    with pytest.raises(RescaleApiError, match="Not found."):
        await arescale.a_get_run("QTVia", "1")
    assert server.calls("GET", "/api/jobs/QTVia/runs/1/") == 1 and async_sleeps == []


@pytest.mark.parametrize(
    "maybe_reached",
    [{"status": 500, "json": {"detail": "boom"}}, {"status": 503, "text": "busy"}, RESET, HANG],
    ids=["500", "503", "connection-reset", "read-timeout"],
)
async def test_async_post_that_creates_work_is_not_repeated(
    server: ScriptedServer, amuse: MuseHook, async_sleeps: list[float], maybe_reached: Any
) -> None:
    """A non-idempotent POST is sent once when it may have reached the server."""
    server.script("POST", "/api/software/muse/run/sw_example/", maybe_reached, {"json": SUBMIT_ANSWER})
    transport = await amuse.async_transport()
    with pytest.raises(MuseApiError) as info:
        await transport.request_json("POST", "software/muse/run/sw_example/", idempotent=False)
    assert server.calls("POST", "/api/software/muse/run/sw_example/") == 1
    assert info.value.retryable is False and async_sleeps == []


async def test_async_post_is_retried_when_the_connection_cannot_open(
    set_conn: Callable[..., str], async_sleeps: list[float]
) -> None:
    """Nothing listens on the port: the request never left, so even a POST that creates work is tried again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hook = MuseHook(set_conn("muse_closed", conn_type="muse", host=f"http://127.0.0.1:{port}/api/", password="x" * 12), retry=POLICY)
    transport = await hook.async_transport()
    with pytest.raises(MuseApiError, match="connection failed") as info:
        await transport.request_json("POST", "software/muse/run/sw_example/", idempotent=False)
    assert info.value.attempts == 3 and len(async_sleeps) == 2


async def test_async_stop_is_retried_and_sends_the_key(
    server: ScriptedServer, arescale: RescaleHook, async_sleeps: list[float], creds: Any
) -> None:
    """Stopping twice stops once: the trigger's stop is retried on a 503, with ``Authorization: Token``."""
    path = "/api/jobs/QTVia/runs/1/stop/"
    server.script("POST", path, {"status": 503, "text": "busy"}, {"json": {}})
    await arescale.a_stop_run("QTVia", "1")
    assert server.calls("POST", path) == 2
    assert {r.headers["Authorization"] for r in server.requests} == {f"Token {creds.api_key}"}


async def test_async_pages_carry_page_size(server: ScriptedServer, arescale: RescaleHook) -> None:
    """The async listing follows ``next`` (which drops ``page_size``) with ``page_size`` carried over."""
    file = {"id": "dmpTse", "name": "nut", "relativePath": "airFoil2D/0/nut", "decryptedSize": 1278, "md5": "c2e31d85a3af9272841a8b00f3c07498"}
    path = "/api/jobs/QTVia/runs/1/files/"

    pages = iter([
        {"json": {"count": 2, "next": server.url.rstrip("/") + path + "?page=2", "previous": None, "results": [file]}},
        {"json": {"count": 2, "next": None, "prev": server.url + "api/jobs/QTVia/runs/1/files/", "results": [dict(file, id="fDhFDe")]}},
    ])
    server.script("GET", path, next(pages), next(pages))
    files = await arescale.a_list_output_files("QTVia", "1", page_size=1)
    assert [f.id for f in files] == ["dmpTse", "fDhFDe"]
    assert [r.query for r in server.requests] == [{"page": "1", "page_size": "1"}, {"page": "2", "page_size": "1"}]


async def test_async_session_is_shared_within_a_loop(server: ScriptedServer, amuse: MuseHook, arescale: RescaleHook) -> None:
    """Hooks on the same origin share one session in a loop; it closes when the last holder leaves."""
    muse_transport, rescale_transport = await amuse.async_transport(), await arescale.async_transport()
    async with muse_transport.session_lease() as first, rescale_transport.session_lease() as second:
        assert first is second and not first.closed
    assert first.closed
    assert not aio._SESSIONS[asyncio.get_running_loop()].sessions


def test_one_session_per_event_loop(set_conn: Callable[..., str]) -> None:
    """Two event loops never share a session (an aiohttp session belongs to its loop)."""
    hook = MuseHook(set_conn("muse_loops", conn_type="muse", host="http://127.0.0.1:9/api/", password="x" * 12))
    seen: list[Any] = []

    async def lease() -> None:
        transport = await hook.async_transport()
        async with transport.session_lease() as session:
            seen.append(session)
            assert session._loop is asyncio.get_running_loop()

    asyncio.run(lease())
    asyncio.run(lease())
    assert seen[0] is not seen[1] and all(s.closed for s in seen)


def test_a_redirect_loop_is_a_clear_error(rescale: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A server redirecting in circles ends in one error of the family, not a ``requests`` exception."""
    requests_mock.get(RUN_URL, status_code=302, headers={"Location": RUN_URL})
    with pytest.raises(RescaleApiError, match="TooManyRedirects"):
        rescale.get_run("QTVia", "1")


def test_a_connection_dropped_inside_an_error_answer(rescale: RescaleHook, requests_mock: rm.Mocker, sleeps: list[float]) -> None:
    """A 404 whose body is cut is a dropped connection: an error of the family, retried like one."""
    body = b'{"detail": "Not found."}' * 100
    route = requests_mock.get(RUN_URL, [{"status_code": 404, "body": DroppingBody(body, 10)}, {"json": RUN_1}])
    assert rescale.get_run("QTVia", "1").id == "1"
    assert route.call_count == 2
    requests_mock.get(RUN_URL, [{"status_code": 404, "body": DroppingBody(body, 10)} for _ in range(3)])
    with pytest.raises(RescaleApiError, match="connection failed") as info:
        rescale.get_run("QTVia", "1")
    assert info.value.retryable and info.value.attempts == 3


async def _count_connections_over_two_polls(keepalive_timeout: float, gap: float) -> int:
    """Two polls ``gap`` seconds apart through the async transport; return the TCP connections the server saw."""
    accepted = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = settings_from_connection(
        Connection(conn_id="c", conn_type="muse", host=f"http://127.0.0.1:{port}/", extra=json.dumps({"keepalive_timeout": keepalive_timeout}))
    )
    transport = aio.AsyncTransport(settings, error_class=MuseApiError)
    try:
        async with transport.session_lease():
            await transport.get_json("state")
            await asyncio.sleep(gap)
            await transport.get_json("state")
    finally:
        server.close()
        await server.wait_closed()
    return accepted


async def test_a_poll_after_an_idle_gap_reuses_its_connection_while_the_keepalive_lasts() -> None:
    # Two polls 1.6 s apart: within a 5 s keep-alive the second one reuses the connection; past a
    # 1 s one (the shortest allowed), it opens another, as aiohttp's 15 s default did at every 30 s poll.
    assert await _count_connections_over_two_polls(keepalive_timeout=5, gap=1.6) == 1
    assert await _count_connections_over_two_polls(keepalive_timeout=1, gap=1.6) == 2
    assert settings_from_connection(Connection(conn_id="c", conn_type="muse", host="http://h/")).keepalive_timeout == 75
    huge = Connection(conn_id="c", conn_type="muse", host="http://h/", extra='{"keepalive_timeout": 86400}')
    assert settings_from_connection(huge).keepalive_timeout == 600
