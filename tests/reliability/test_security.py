"""
Security checks: TLS verification is on unless the connection says otherwise, on both transports;
no token, password or API key shows in trigger kwargs, exception messages or logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow.sdk import ObjectStoragePath
from reliability_support import MUSE_TOKEN, NO_WAIT_RETRY, RESCALE_KEY, HostileServer, assert_no_secret

from hpc_emulator import DEMO_API_KEY, DEMO_PASSWORD, EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser
from airflow_provider_hpc.exceptions import HpcApiError, MuseApiError, RescaleApiError
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor
from airflow_provider_hpc.triggers.muse import MuseJobTrigger
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger

ONE_ATTEMPT = RetryPolicy(max_attempts=1, initial_wait=0.0, max_wait=0.0)
FAST_RETRY = RetryPolicy(max_attempts=4, initial_wait=0.05, max_wait=0.2, max_retry_after=0.2)
UNKNOWN_KEY = "0b5c1b1e-2f7c-4c53-9f0a-3e1c2a9d4c11"
EMULATOR_PASSWORD = "emu-pw-Zr81-SECRET"
EMULATOR_KEY = "emu-rk-44aa91-SECRET"


def _set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    return conn_id


# ----- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_emulator(tmp_path: Path) -> Any:
    """The emulator serving HTTPS with a certificate of its own CA, which nothing trusts by default."""
    config = EmulatorConfig(data_dir=tmp_path / "emulator", tls=True, time_scale=0.05, pending_seconds=0.1, seed=3)
    with EmulatorServer(config) as server:
        assert server.base_url.startswith("https://")
        yield server


def _tls_conns(monkeypatch: pytest.MonkeyPatch, server: EmulatorServer, extra: dict[str, Any]) -> tuple[str, str]:
    # A fresh id per test: Airflow may cache a connection it has read once.
    suffix = uuid.uuid4().hex[:8]
    muse = _set_conn(monkeypatch, f"muse_tls_{suffix}", conn_type="muse", host=server.muse_url, login="demo",
                     password=DEMO_PASSWORD, extra=extra)
    rescale = _set_conn(monkeypatch, f"rescale_tls_{suffix}", conn_type="rescale", host=server.rescale_url,
                        password=DEMO_API_KEY, extra=extra)
    return muse, rescale


def _reached_server(exc: HpcApiError) -> bool:
    """A 4xx/404 answer means the TLS handshake succeeded; no status means it did not."""
    return exc.status is not None


@pytest.mark.parametrize("extra", [{}, {"verify": True}, {"verify": "true"}], ids=["no-extra", "true", "true-text"])
def test_a_self_signed_certificate_is_refused_by_default_sync(
    extra: dict[str, Any], tls_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    muse_conn, rescale_conn = _tls_conns(monkeypatch, tls_emulator, extra)
    muse, rescale = MuseHook(muse_conn, retry=ONE_ATTEMPT), RescaleHook(rescale_conn, retry=ONE_ATTEMPT)
    for call in (lambda: muse.get_state("sw_example", UNKNOWN_KEY), lambda: rescale.get_run("AbCdE", "1")):
        with pytest.raises(HpcApiError) as caught:
            call()
        assert not _reached_server(caught.value)
        assert "certificate" in str(caught.value).lower() or "ssl" in str(caught.value).lower(), str(caught.value)
    # The login never left the client: no token was asked over an unverified channel.
    with pytest.raises(HpcApiError):
        muse.get_token()
    assert tls_emulator.counters.get("requests", "POST /api/jwt/obtain/") == 0


@pytest.mark.parametrize("extra", [{}, {"verify": True}], ids=["no-extra", "true"])
def test_a_self_signed_certificate_is_refused_by_default_async(
    extra: dict[str, Any], tls_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    muse_conn, rescale_conn = _tls_conns(monkeypatch, tls_emulator, extra)

    async def poll() -> list[HpcApiError]:
        muse, rescale = MuseHook(muse_conn, retry=ONE_ATTEMPT), RescaleHook(rescale_conn, retry=ONE_ATTEMPT)
        errors = []
        try:
            for call in (lambda: muse.a_get_state("sw_example", UNKNOWN_KEY), lambda: rescale.a_get_run("AbCdE", "1")):
                with pytest.raises(HpcApiError) as caught:
                    await call()
                errors.append(caught.value)
        finally:
            await close_all_sessions()
        return errors

    for error in asyncio.run(poll()):
        assert not _reached_server(error)
        assert "certificate" in str(error).lower() or "ssl" in str(error).lower(), str(error)


@pytest.mark.parametrize("trust", ["ca", "off", "off-text"])
def test_the_connection_can_trust_the_certificate_or_turn_verification_off(
    trust: str, tls_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"ca": {"verify": str(tls_emulator.ca_path)}, "off": {"verify": False}, "off-text": {"verify": "false"}}[trust]
    muse_conn, rescale_conn = _tls_conns(monkeypatch, tls_emulator, extra)
    muse, rescale = MuseHook(muse_conn, retry=ONE_ATTEMPT), RescaleHook(rescale_conn, retry=ONE_ATTEMPT)
    assert muse.get_token()
    with pytest.raises(MuseApiError) as muse_error:
        muse.get_state("sw_example", UNKNOWN_KEY)
    assert _reached_server(muse_error.value) or muse_error.value.error
    with pytest.raises(RescaleApiError) as rescale_error:
        rescale.get_run("AbCdE", "1")
    assert rescale_error.value.status == 404

    async def poll() -> tuple[HpcApiError, HpcApiError]:
        a_muse, a_rescale = MuseHook(muse_conn, retry=ONE_ATTEMPT), RescaleHook(rescale_conn, retry=ONE_ATTEMPT)
        try:
            with pytest.raises(MuseApiError) as first:
                await a_muse.a_get_state("sw_example", UNKNOWN_KEY)
            with pytest.raises(RescaleApiError) as second:
                await a_rescale.a_get_run("AbCdE", "1")
        finally:
            await close_all_sessions()
        return first.value, second.value

    first, second = asyncio.run(poll())
    assert _reached_server(first) or first.error
    assert second.status == 404


# ----- secrets: trigger kwargs ----------------------------------------------------------------------


def test_serialized_trigger_kwargs_hold_no_secret(hostile_conns: dict[str, str]) -> None:
    operator = MuseRunOperator(task_id="run", name="sw_example", cmd="python /add.py 1 2", muse_conn_id="muse_hostile_login")
    sensor = RescaleRunSensor(task_id="wait", job_id="AbCdE", run_id="1", rescale_conn_id="rescale_hostile", timeout=60)
    triggers = [
        operator._trigger(UNKNOWN_KEY),
        sensor.make_trigger(),
        MuseJobTrigger(muse_conn_id="muse_hostile", name="sw_example", key=UNKNOWN_KEY, retry=FAST_RETRY.to_dict()),
        RescaleRunTrigger(job_id="AbCdE", run_id="1", rescale_conn_id="rescale_hostile", tail_path="log.txt"),
    ]
    for trigger in triggers:
        classpath, kwargs = trigger.serialize()
        text = json.dumps(kwargs)  # plain values only: it must go into the database as JSON
        assert_no_secret(text)
        # Rebuilt from its kwargs, as the triggerer does, it still holds none.
        rebuilt = type(trigger)(**json.loads(text))
        assert_no_secret(json.dumps(rebuilt.serialize()[1]))


# ----- secrets: error messages from a server echoing the request ------------------------------------


def test_an_error_echoing_the_request_shows_no_secret(hostile: HostileServer, hostile_conns: dict[str, str], tmp_path: Path) -> None:
    hostile.script(400, b"", echo=True)
    muse_login, muse_token = MuseHook("muse_hostile_login", retry=NO_WAIT_RETRY), MuseHook("muse_hostile", retry=NO_WAIT_RETRY)
    rescale = RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("1 2")
    calls = [
        muse_login.get_token,
        lambda: muse_token.submit("sw_example", cmd="python /add.py", files=[str(stdin)]),
        lambda: muse_token.get_state("sw_example", UNKNOWN_KEY),
        lambda: rescale.get_run("AbCdE", "1"),
        lambda: rescale.stop_run("AbCdE", "1"),
    ]
    for call in calls:
        with pytest.raises(HpcApiError) as caught:
            call()
        assert_no_secret(f"{caught.value} {caught.value.error} {caught.value.excerpt} {caught.value.more}")


@pytest.mark.parametrize("status", [200, 500])
def test_a_non_json_answer_echoing_the_secret_shows_no_secret(
    status: int, hostile: HostileServer, hostile_conns: dict[str, str]
) -> None:
    hostile.script(status, f"<html>jwt={MUSE_TOKEN} Authorization: Token {RESCALE_KEY}</html>", content_type="text/html")
    muse, rescale = MuseHook("muse_hostile", retry=NO_WAIT_RETRY), RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
    muse.get_token()
    # Each hook redacts the secrets of its own connection.
    for call, secret in ((lambda: muse.get_state("sw_example", UNKNOWN_KEY), MUSE_TOKEN),
                         (lambda: rescale.get_run("AbCdE", "1"), RESCALE_KEY)):
        with pytest.raises(HpcApiError) as caught:
            call()
        assert_no_secret(f"{caught.value} {caught.value.excerpt}", (secret,))


# ----- secrets: logs and errors of whole runs against the emulator ----------------------------------


@pytest.fixture
def secret_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The emulator with a distinctive Muse password and Rescale key, short-lived tokens, some faults."""
    config = EmulatorConfig(
        data_dir=tmp_path / "emulator",
        muse_users={"alice": MuseUser(EMULATOR_PASSWORD, "user")},
        rescale_api_keys=frozenset({EMULATOR_KEY}),
        token_lifetime=1.0,
        time_scale=0.05,
        pending_seconds=0.1,
        seed=11,
        faults=[
            {"route": "GET /api/software/muse/state/*", "sequence": ["pass", {"status": 502}, {"status": 429, "retry_after": 0}]},
            {"route": "GET /api/jobs/*/runs/*/", "sequence": [{"status": 500}, {"drop": True}]},
        ],
    )
    with EmulatorServer(config) as server:
        _set_conn(monkeypatch, "muse_secret", conn_type="muse", host=server.muse_url, login="alice", password=EMULATOR_PASSWORD)
        _set_conn(monkeypatch, "muse_wrong", conn_type="muse", host=server.muse_url, login="alice", password=EMULATOR_PASSWORD + "x")
        _set_conn(monkeypatch, "rescale_secret", conn_type="rescale", host=server.rescale_url, password=EMULATOR_KEY)
        _set_conn(monkeypatch, "rescale_wrong", conn_type="rescale", host=server.rescale_url, password=EMULATOR_KEY + "x")
        yield server


def _start_rescale_job(server: EmulatorServer, command: str) -> str:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {EMULATOR_KEY}"
    created = session.post(f"{server.rescale_url}/api/v2/jobs/", json={"name": "t", "jobanalyses": [{"command": command}]}, timeout=10)
    created.raise_for_status()
    job_id = created.json()["id"]
    session.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/", timeout=10).raise_for_status()
    return job_id


def test_no_secret_in_logs_or_errors_of_runs_against_the_emulator(
    secret_emulator: EmulatorServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    muse = MuseHook("muse_secret", retry=FAST_RETRY)
    tokens: list[str] = []

    # A good Muse run, its wait through faults, and its result.
    ok = muse.submit("sw_example", cmd="python /add.py 4 5")
    tokens.append(muse._token or "")
    event = asyncio.run(MuseJobTrigger(muse_conn_id="muse_secret", name="sw_example", key=ok.key, poll_interval=0.1,
                                       max_poll_interval=0.3, retry=FAST_RETRY.to_dict(), deadline=time.time() + 60).wait())
    assert event["status"] == "ok", event
    messages.append(json.dumps(event))
    time.sleep(1.2)  # the token expires: the next call obtains a new one
    result = muse.get_result("sw_example", ok.key, ObjectStoragePath(f"file://{tmp_path}/stdout.txt"))
    assert (result.stdout or "").strip() == "9.0"
    bad = muse.submit("sw_example", cmd="python /add.py not-a-number")
    tokens.append(muse._token or "")
    event = asyncio.run(MuseJobTrigger(muse_conn_id="muse_secret", name="sw_example", key=bad.key, poll_interval=0.1,
                                       max_poll_interval=0.3, retry=FAST_RETRY.to_dict(), deadline=time.time() + 60).wait())
    assert event["status"] == "nok", event
    messages.append(json.dumps(event))
    muse.get_content("sw_example", bad.key, ObjectStoragePath(f"file://{tmp_path}/content.zip"))

    # Errors: a refused login, a refused API key, a result asked too early.
    for call in (
        lambda: MuseHook("muse_wrong", retry=FAST_RETRY).submit("sw_example", cmd="python /add.py 1 1"),
        lambda: RescaleHook("rescale_wrong", retry=FAST_RETRY).get_job_statuses("AbCdE"),
        lambda: muse.get_result("sw_example", UNKNOWN_KEY, ObjectStoragePath(f"file://{tmp_path}/x.txt")),
    ):
        with pytest.raises(HpcApiError) as caught:
            call()
        messages.append(f"{caught.value!s} {caught.value!r}")

    # A Rescale wait and harvest through faults.
    job_id = _start_rescale_job(secret_emulator, "echo hello > out.txt")
    event = asyncio.run(RescaleRunTrigger(job_id=job_id, run_id="1", rescale_conn_id="rescale_secret", poll_interval=0.1,
                                          max_poll_interval=0.3, retry=FAST_RETRY.to_dict(), outcome_wait=5,
                                          deadline=time.time() + 60).wait())
    assert event["status"] == "success", event
    messages.append(json.dumps(event))
    rescale = RescaleHook("rescale_secret", retry=FAST_RETRY)
    for file in rescale.list_output_files(job_id, "1"):
        rescale.download_file(file, ObjectStoragePath(f"file://{tmp_path}/harvest/{file.relative_path}"))

    secrets = (EMULATOR_PASSWORD, EMULATOR_KEY, *{t for t in tokens if t}, *({muse._token} if muse._token else set()))
    assert len(secrets) >= 3
    # Hook logs go through Airflow's structured logging to the process's output, others to logging.
    out, err = capfd.readouterr()
    everything = "\n".join(messages + [r.getMessage() + repr(r.args) for r in caplog.records] + [out, err])
    assert "retry" in everything.lower()  # the faults were met and logged
    assert_no_secret(everything, secrets)
