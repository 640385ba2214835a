"""
Every URL the provider writes into a log line or an error message is one the Airflow log view can follow.

The Airflow 3 log view links ``https?://...`` preceded by whitespace (or the line's start) and running
to the next whitespace (``airflow/ui/dist``, the log line renderer's ``linkify``): a URL followed by
``)``, ``;`` or ``,`` is linked with that character and leads to a 404. So a URL ends its line or is
followed by whitespace; these tests run each message through the same rule.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests_mock as rm

from airflow_provider_hpc.exceptions import JobTimeout, MuseApiError, RescaleApiError
from airflow_provider_hpc.hooks.muse import MuseHook, MuseReport
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.models.muse import MuseCr
from airflow_provider_hpc.muse_results import failure_message
from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.muse import MuseJobSensor
from airflow_provider_hpc.storage import StoredFile
from airflow_provider_hpc.transport.paging import PageWalk

KEY = "58ae6cea-df31-4059-9466-b817c337985d"
STATE_URL = f"http://muse.test/api/software/muse/state/sw_example/{KEY}/"
#: The Airflow 3 log view's URL rule (its log line renderer), in Python's syntax.
AIRFLOW_LOG_LINK = re.compile(r"(?P<space>\s|^)(?P<url>https?://(?:www\.|(?!www))[^\s.]+\.\S{2,}|www\.\S+\.\S{2,})")


def linked(text: str) -> list[str]:
    """Return what the Airflow log view links in ``text``, line by line."""
    return [m.group("url") for line in text.splitlines() for m in AIRFLOW_LOG_LINK.finditer(line)]


def assert_links_exactly(text: str, *urls: str) -> None:
    """Assert each URL in ``text`` is linked as it is, with nothing after it."""
    found = linked(text)
    for url in urls:
        assert url in found, f"{url} is not linked as such in {text!r} (linked: {found})"
    assert not [u for u in found if u[-1] in ").,;:'\"]>"], found


def test_the_rule_is_airflow_s_own_and_catches_the_old_format() -> None:
    # The former "(state: URL)" form: the log view linked the URL with its ")".
    assert linked(f"key {KEY} (state: {STATE_URL})") == [STATE_URL + ")"]
    assert linked(f"key {KEY}; state: {STATE_URL}") == [STATE_URL]


def test_the_submit_log_line_ends_with_the_state_url(
    muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    requests_mock.post("http://muse.test/api/jwt/obtain/", json={"token": creds.jwt})
    requests_mock.post(
        "http://muse.test/api/software/muse/run/sw_example/", json={"msg": "ok", "url": f"http://x.test/state/sw_example/{KEY}/"}
    )
    muse_hook.submit("sw_example", cmd="true")
    line = next(line for line in capsys.readouterr().out.splitlines() if "Submitted sw_example to Muse" in line)
    assert_links_exactly(line, STATE_URL)


def test_the_failure_message_is_short_first_then_details_each_url_alone() -> None:
    report = MuseReport(cr=MuseCr.NOK, name="sw_example", latest_cr="ENDED_NOK", latest_state="FAILED", job_id=12)
    stored = StoredFile(path="s3://bucket/runs/content.zip", size=10, md5="0" * 32)
    message = failure_message("sw_example", KEY, report, stored, None, STATE_URL)
    first, *details = message.splitlines()
    assert first == f"Muse run sw_example/{KEY} ended badly: latest_state FAILED; content zip at s3://bucket/runs/content.zip"
    assert details == ["SLURM job 12, latest_cr ENDED_NOK", f"state: {STATE_URL}"]
    assert_links_exactly(message, STATE_URL)

    missing = failure_message("sw_example", KEY, None, None, "HTTP 500 " + "x" * 5000, STATE_URL)
    lines = missing.splitlines()
    assert lines[0] == f"Muse run sw_example/{KEY} ended badly: latest_state unknown; the content zip could not be fetched"
    assert all(len(line) < 400 for line in lines) and lines[-1] == f"state: {STATE_URL}"


def test_timeout_and_error_messages_end_with_the_state_url(muse_conn: str) -> None:
    task = MuseRunOperator(task_id="run", name="sw_example", muse_conn_id=muse_conn)
    event = {"name": "sw_example", "key": KEY, "report": None, "message": "Timed out waiting"}
    with pytest.raises(JobTimeout) as timeout:
        task.execute_complete({}, {**event, "status": "timeout"})
    with pytest.raises(MuseApiError) as error:
        task.execute_complete({}, {**event, "status": "error"})
    sensor = MuseJobSensor(task_id="wait", name="sw_example", key=KEY, muse_conn_id=muse_conn)
    with pytest.raises(MuseApiError) as sensed:
        sensor.execute_complete({}, {**event, "status": "error"})
    for caught in (timeout, error, sensed):
        assert str(caught.value).rstrip().endswith(STATE_URL)
        assert_links_exactly(str(caught.value), STATE_URL)


def test_origin_and_paging_errors_put_the_url_last(rescale_hook: RescaleHook) -> None:
    transport = rescale_hook.transport
    with pytest.raises(RescaleApiError) as elsewhere:
        transport.url("https://elsewhere.example.com/api/")
    redirected = transport._redirect_error(307, "https://new.example.com/api/", "GET /api/jobs/")
    walk = PageWalk("https://platform.rescale.com/api/jobs/", resolve=transport.url, error_class=RescaleApiError)
    walk.next_url()
    page = {"count": 10, "next": "https://platform.rescale.com/api/jobs/?page=1&page_size=100", "results": [{}]}
    with pytest.raises(RescaleApiError) as repeated:
        walk.take(page)
    assert_links_exactly(str(elsewhere.value), "https://elsewhere.example.com")
    assert_links_exactly(str(redirected), "https://new.example.com")
    assert_links_exactly(str(repeated.value), "https://platform.rescale.com/api/jobs/?page=1&page_size=100")


def test_the_plain_http_warning_ends_with_the_host(muse_hook: MuseHook, capsys: pytest.CaptureFixture[str]) -> None:
    muse_hook.transport  # reading the connection says it once
    line = next(line for line in capsys.readouterr().out.splitlines() if "credentials go over plain http" in line)
    assert_links_exactly(line, "http://muse.test/api/")
