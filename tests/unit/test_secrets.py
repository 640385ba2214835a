"""
No password, token or API key ever shows: not in a log record (stdlib or the structlog lines Airflow
prints), not in an exception's text, repr or attributes, not in a Test-button message, even when the
server echoes the secret back in its error bodies. And every secret is registered with Airflow's
secrets masker, which guards the task logs beyond the provider's own redaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import requests
import requests_mock as rm
from airflow.sdk._shared.secrets_masker import redact as airflow_redact

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.transport import retry
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import RescaleHook
from scripted_server import ScriptedServer

API = "http://muse.test/api/"
KEY = "58ae6cea-df31-4059-9466-b817c337985d"
OBTAIN_URL = API + "jwt/obtain/"
SUBMIT_URL = API + "software/muse/run/sw_example/"
STATE_URL = API + f"software/muse/state/sw_example/{KEY}/"
PLATFORM = "https://platform.rescale.com/"
RUN_URL = PLATFORM + "api/jobs/QTVia/runs/1/"


class Leaks:
    """Collects every text a secret could leak into, then checks none holds one."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self.secrets = secrets
        self.texts: list[str] = []
        self.failures = 0

    def run(self, call: Callable[[], Any]) -> Any:
        """Run ``call``; keep its error's text, repr and attributes, or its result's text."""
        try:
            result = call()
        except HpcApiError as exc:
            self.failures += 1
            self.keep(exc)
            return None
        self.texts.append(repr(result))
        return result

    async def arun(self, call: Callable[[], Any]) -> Any:
        """Await ``call()`` the same way."""
        try:
            result = await call()
        except HpcApiError as exc:
            self.failures += 1
            self.keep(exc)
            return None
        self.texts.append(repr(result))
        return result

    def keep(self, exc: BaseException) -> None:
        """Keep everything an exception shows: text, repr, args, attributes, and its causes."""
        self.texts += [str(exc), repr(exc), repr(exc.args), repr(vars(exc))]
        if exc.__cause__ is not None:
            self.keep(exc.__cause__)
        if exc.__context__ is not None and not exc.__suppress_context__:
            self.keep(exc.__context__)

    def check(self, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
        """Assert no kept text, log record or printed log line holds a secret."""
        captured = capsys.readouterr()
        records = [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records]
        everything = self.texts + records + [captured.out, captured.err]
        assert self.failures and self.texts and (records or captured.out)  # the paths really failed, and logged
        for secret in self.secrets:
            leaked = [text for text in everything if secret in text]
            assert not leaked, f"a secret leaked into: {leaked[0][:300]!r}"


@pytest.fixture
def leaks(creds: Any, caplog: pytest.LogCaptureFixture) -> Iterator[Leaks]:
    """A leak collector for the test's secrets, with every logger captured from DEBUG up."""
    caplog.set_level(logging.DEBUG)
    yield Leaks(creds.all)


def echo(*secrets: str) -> str:
    """An HTML page that repeats the secrets it was sent, as a careless proxy or error page might."""
    return "<html><body><h1>Error</h1><p>request: " + " ".join(f"jwt={s} password={s}" for s in secrets) + "</p></body></html>"


def test_sync_paths_never_show_a_secret(
    muse_hook: MuseHook,
    rescale_hook: RescaleHook,
    requests_mock: rm.Mocker,
    sleeps: list[float],
    creds: Any,
    leaks: Leaks,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Login refused, HTML pages, 5xx retries, timeouts, token renewal, odd answers: nothing shows a secret."""
    muse_secrets = (creds.password, creds.jwt, creds.new_jwt)  # what the Muse service was ever sent

    # Login answered by a page echoing the password, then refused with it in the JSON message.
    requests_mock.post(OBTAIN_URL, [
        {"status_code": 200, "text": echo(creds.password)},
        {"status_code": 401, "json": {"detail": f"No account for alice/{creds.password}"}},
        {"status_code": 502, "text": echo(creds.password)},
    ])
    leaks.run(lambda: muse_hook.submit("sw_example"))
    leaks.run(lambda: muse_hook.submit("sw_example"))
    leaks.run(lambda: muse_hook.submit("sw_example"))
    leaks.run(muse_hook.test_connection)

    # A token obtained, refused as expired (echoed), renewed, refused again; then 500 pages and a timeout.
    requests_mock.post(OBTAIN_URL, [{"json": {"token": creds.jwt}}, {"json": {"token": creds.new_jwt}}])
    requests_mock.post(SUBMIT_URL, [
        {"status_code": 401, "json": {"detail": f"Token {creds.jwt} has expired"}},
        {"status_code": 200, "json": {"error": f"Invalid token {creds.new_jwt}", "more": [creds.new_jwt], "type": "AuthenticationFailed"}},
        {"status_code": 500, "text": echo(*muse_secrets)},
        {"exc": requests.exceptions.ReadTimeout(f"Read timed out. (body jwt={creds.new_jwt})")},
        {"status_code": 200, "json": {"msg": f"accepted jwt={creds.new_jwt}", "url": "no key here"}},
    ])
    for _ in range(4):
        leaks.run(lambda: muse_hook.submit("sw_example", cmd="python /add.py 4 5"))

    # The state needs no token, but errors there must not show the ones the hook holds.
    requests_mock.get(STATE_URL, status_code=503, text=echo(*muse_secrets))
    leaks.run(lambda: muse_hook.get_state("sw_example", KEY))

    # Rescale: a refused key echoed back, a 429, 5xx pages and dropped connections naming it.
    requests_mock.get(RUN_URL, [
        {"status_code": 401, "json": {"detail": f"Invalid token {creds.api_key}."}},
        {"status_code": 429, "headers": {"Retry-After": "1"}, "json": {"detail": f"Request was throttled for {creds.api_key}."}},
        {"status_code": 503, "text": echo(creds.api_key)},
        {"exc": requests.exceptions.ConnectionError(f"Connection reset (Authorization: Token {creds.api_key})")},
    ])
    leaks.run(lambda: rescale_hook.get_run("QTVia", "1"))
    leaks.run(lambda: rescale_hook.get_run("QTVia", "1"))
    requests_mock.get(PLATFORM + "api/jobs/", status_code=403, json={"detail": f"key {creds.api_key} revoked"})
    leaks.texts.append(repr(rescale_hook.test_connection()))

    assert len(sleeps) >= 4  # the retry paths (and their log lines) were taken
    leaks.check(caplog, capsys)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    """A scripted aiohttp server on 127.0.0.1."""
    scripted = await ScriptedServer().start()
    yield scripted
    await scripted.close()


async def test_async_paths_never_show_a_secret(
    server: ScriptedServer,
    set_conn: Callable[..., str],
    fast_retry: Any,
    creds: Any,
    leaks: Leaks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The trigger side: refused keys, error pages and error bodies echoing secrets show none."""

    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(retry, "_async_sleep", no_wait)
    rescale = RescaleHook(set_conn("rescale_leak", conn_type="rescale", host=server.url, password=creds.api_key), retry=fast_retry)
    muse = MuseHook(
        set_conn("muse_leak", conn_type="muse", host=server.url + "api/", login=creds.login, password=creds.password),
        retry=fast_retry,
    )
    server.script("GET", "/api/jobs/QTVia/runs/1/", {"status": 401, "json": {"detail": f"Invalid token {creds.api_key}."}})
    server.script("GET", "/api/v2/jobs/QTVia/statuses/", {"status": 503, "text": echo(creds.api_key)})
    server.script("POST", "/api/jobs/QTVia/runs/1/stop/", {"status": 200, "text": echo(creds.api_key)})
    server.script("GET", f"/api/software/muse/state/sw_example/{KEY}/", {"json": {"error": f"bad login {creds.password}", "more": [creds.password], "type": "Auth"}})

    await leaks.arun(lambda: rescale.a_get_run("QTVia", "1"))
    await leaks.arun(lambda: rescale.a_get_job_statuses("QTVia"))
    await leaks.arun(lambda: rescale.a_stop_run("QTVia", "1"))
    await leaks.arun(lambda: muse.a_get_state("sw_example", KEY))

    assert {r.headers.get("Authorization") for r in server.requests if r.path.startswith("/api/jobs")} == {f"Token {creds.api_key}"}
    leaks.check(caplog, capsys)


def test_secrets_are_registered_with_airflows_masker(
    muse_hook: MuseHook, rescale_hook: RescaleHook, requests_mock: rm.Mocker, creds: Any
) -> None:
    """The password, the obtained token and the API key are masked by Airflow in every task log line."""
    requests_mock.post(OBTAIN_URL, json={"token": creds.jwt})
    muse_hook.get_token()
    rescale_hook.connection  # reading the connection registers its secrets
    line = f"user {creds.login} sent {creds.password} and {creds.jwt}, key {creds.api_key}"
    masked = airflow_redact(line)
    assert creds.login in masked
    assert all(secret not in masked for secret in (creds.password, creds.jwt, creds.api_key))


def test_a_ready_token_in_the_extra_is_masked(set_conn: Callable[..., str], creds: Any) -> None:
    """A ready JWT given as the ``token`` extra (or its older prefixed spelling) is a secret too."""
    hook = MuseHook(set_conn("muse_ready", conn_type="muse", host=API, extra={"extra__muse__token": creds.new_jwt}))
    assert hook.get_token() == creds.new_jwt
    assert creds.new_jwt in hook.transport.secrets
    assert creds.new_jwt not in airflow_redact(f"token {creds.new_jwt}")


def test_a_hook_parses_the_connection_s_extras_once(set_conn: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Each ``extra_dejson`` registers the sensitive extras with Airflow's masker, which in a triggerer is a
    round trip to its supervisor: a trigger's start parses them once, without the blocking call.
    """
    from airflow.sdk import Connection

    conn_id = set_conn(
        "rescale_extras", conn_type="rescale", host="https://platform.rescale.com", password="k" * 24,
        extra={"api_version": "v2", "read_timeout": 40, "keepalive_timeout": 90, "verify": True},
    )
    calls = {"sync": 0, "async": 0}
    parse = Connection.aextra_dejson

    async def counted(self: Connection) -> dict[str, Any]:
        calls["async"] += 1
        return await parse(self)

    def refused(self: Connection) -> dict[str, Any]:
        calls["sync"] += 1
        raise AssertionError("extra_dejson called on the event loop")

    monkeypatch.setattr(Connection, "aextra_dejson", counted)
    monkeypatch.setattr(Connection, "extra_dejson", property(refused))
    asyncio.run(RescaleHook.aget_connection(conn_id))
    airflows_own = calls["async"]  # reading a connection parses its extras too (for its URI)
    hook = RescaleHook(conn_id)
    transport = asyncio.run(hook.async_transport())
    assert calls == {"sync": 0, "async": 2 * airflows_own + 1}
    assert (transport.settings.read_timeout, transport.settings.keepalive_timeout) == (40.0, 90.0)
    assert hook._async_prefix == "api/v2/"
