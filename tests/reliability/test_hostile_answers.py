"""
Hostile and broken answers: whatever a server sends, the only exceptions that escape the hooks'
parsers and transports are the provider's own (:class:`HpcApiError` and its family), each with a
readable message.

The pure parsers are fed random JSON values and near-valid documents with one field broken; the
transports (sync ``requests`` and async ``aiohttp``) are fed random bodies, truncated JSON, HTML
pages and huge bodies by a scripted loopback server.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_hpc.exceptions import HpcApiError, MuseApiError, RescaleApiError
from airflow_provider_hpc.hooks.muse import MuseHook, MuseReport
from airflow_provider_hpc.hooks.rescale import JobOutcome, OutputFile, RescaleHook, RescaleRun
from airflow_provider_hpc.models.rescale import directory_from_answer, statuses_from_answer, tail_lines_from_answer
from airflow_provider_hpc.transport import errors
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.errors import decode_json, error_from_answer
from airflow_provider_hpc.transport.paging import page_results
from airflow_provider_hpc.transport.retry import parse_retry_after

from reliability_support import NO_WAIT_RETRY, HostileServer, assert_no_secret

# ----- strategies ---------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
# Values a field may take in a broken answer: any JSON value, or a plausible-looking wrong one.
odd_values = json_values | st.sampled_from(
    ["", "OK", "NOK", "WAIT", "ok", "CANCELLED", "2024-13-45", "Completed", "../../etc/passwd", "1e309", "-1", "\x00"]
)

MUSE_STATE = {
    "info": {
        "report": {
            "cr": "WAIT",
            "name": "sw_example",
            "request": {"cmd": "python /add.py 4 5", "returned_type": "stdout", "todownload": False},
            "rsrc": {},
            "process": {"latest_cr": "IN_PROGRESS", "latest_state": "RUNNING", "jobname": "1-ws-sw_example", "job_id": 12},
        }
    },
    "msg": "state",
    "url": "http://x/api/software/muse/state/sw_example/0b5c1b1e-2f7c-4c53-9f0a-3e1c2a9d4c11/",
}
RESCALE_RUN = {
    "id": "1", "dateStarted": "2024-01-01T00:00:00Z", "dateCompleted": None, "displayOrder": 1, "isOptimal": False,
    "outputFileCount": 0, "outputFileSize": 0, "parent": None, "type": 3,
    "variables": [{"name": "x", "value": 1.5, "displayValue": "1.5", "isRelative": False}],
}
RESCALE_FILE = {
    "id": "AbCdEf", "name": "out.txt", "relativePath": "results/out.txt", "path": "user/job/out.txt",
    "decryptedSize": 12, "md5": "0" * 32, "dateUploaded": "2024-01-01T00:00:00Z", "isUploaded": True,
}
RESCALE_STATUSES = {
    "results": [
        {"status": "Executing", "statusDate": "2024-01-01T00:00:02Z", "statusReason": None},
        {"status": "Completed", "statusDate": "2024-01-01T00:00:09Z", "statusReason": "Completed successfully"},
    ]
}


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Return every path (tuple of keys / indexes) inside a JSON document, the root included."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, prefix + (index,))
    return found


def _replace(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


def _delete(document: Any, path: tuple) -> Any:
    copy = json.loads(json.dumps(document))
    if not path:
        return copy
    target = copy
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return copy


@st.composite
def broken(draw: st.DrawFn, document: Any) -> Any:
    """A valid document with one field replaced by an odd value, or removed."""
    path = draw(st.sampled_from(_paths(document)))
    if path and draw(st.booleans()):
        return _delete(document, path)
    return _replace(document, path, draw(odd_values))


def near(document: Any) -> st.SearchStrategy[Any]:
    """The valid document, a broken one, or any JSON value."""
    return st.just(document) | broken(document) | json_values


FAMILY = (HpcApiError,)
PARSER_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _readable(exc: HpcApiError) -> None:
    """An error message is one readable line or a few: not empty, not a repr dump of megabytes."""
    text = str(exc)
    assert text.strip()
    assert len(text) < 5000, f"message of {len(text)} characters"


# ----- pure parsers -------------------------------------------------------------------------------


@PARSER_SETTINGS
@given(near(MUSE_STATE))
def test_muse_report_parser_raises_only_its_own_errors(answer: Any) -> None:
    try:
        report = MuseReport.from_answer(answer, "GET software/muse/state/x/y/")
    except MuseApiError as exc:
        _readable(exc)
        return
    # A parsed report is plain data: it survives the trip through an event payload.
    round_trip = MuseReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert round_trip.cr is report.cr
    assert report.is_terminal == (report.cr.value != "WAIT")


@pytest.mark.parametrize("cr", ["OK ", "ok", "", None, 0, "CANCELLED", "ENDED_OK", ["OK"], {"cr": "OK"}])
def test_unknown_cr_is_a_clear_error(cr: Any) -> None:
    answer = _replace(MUSE_STATE, ("info", "report", "cr"), cr)
    with pytest.raises(MuseApiError, match="cr"):
        MuseReport.from_answer(answer)


@PARSER_SETTINGS
@given(near(RESCALE_RUN))
def test_rescale_run_parser_raises_only_its_own_errors(data: Any) -> None:
    try:
        run = RescaleRun.from_api(data)
    except RescaleApiError as exc:
        _readable(exc)
        return
    json.dumps(run.to_dict(), allow_nan=True)  # trigger events and XCom need plain values
    assert isinstance(run.is_completed, bool)


@PARSER_SETTINGS
@given(near(RESCALE_FILE))
def test_output_file_parser_raises_only_its_own_errors(data: Any) -> None:
    try:
        file = OutputFile.from_api(data)
    except RescaleApiError as exc:
        _readable(exc)
        return
    assert isinstance(file.relative_path, str) and isinstance(file.id, str)
    assert file.decrypted_size is None or isinstance(file.decrypted_size, int)
    json.dumps(file.to_dict(), allow_nan=True)


def _reasons_are_text(answer: Any) -> bool:
    items = answer.get("results") if isinstance(answer, dict) else answer
    return not isinstance(items, list) or all(
        not isinstance(i, dict) or i.get("statusReason") is None or isinstance(i.get("statusReason"), str) for i in items
    )


@PARSER_SETTINGS
@given(near(RESCALE_STATUSES))
def test_job_statuses_parser_raises_only_its_own_errors(answer: Any) -> None:
    try:
        statuses = statuses_from_answer(answer)
    except RescaleApiError as exc:
        _readable(exc)
        return
    dates = [s.status_date for s in statuses]
    assert dates == sorted(dates)


@PARSER_SETTINGS
@given(near(RESCALE_STATUSES).filter(_reasons_are_text))
def test_job_outcome_is_decided_from_any_parsed_history(answer: Any) -> None:
    try:
        statuses = statuses_from_answer(answer)
    except RescaleApiError:
        return
    outcome = JobOutcome.from_statuses(statuses)
    assert isinstance(outcome.succeeded, bool)
    assert not outcome.succeeded or outcome.completed


@pytest.mark.parametrize("reason", [True, 5, ["Completed successfully"], {"text": "x"}])
def test_a_status_reason_that_is_not_text_is_read_or_refused_clearly(reason: Any) -> None:
    answer = _replace(RESCALE_STATUSES, ("results", 1, "statusReason"), reason)
    try:
        JobOutcome.from_statuses(statuses_from_answer(answer))
    except RescaleApiError as exc:
        _readable(exc)


@PARSER_SETTINGS
@given(json_values)
def test_directory_and_tail_parsers_raise_only_their_own_errors(answer: Any) -> None:
    for parse in (directory_from_answer, tail_lines_from_answer):
        try:
            parse(answer)
        except RescaleApiError as exc:
            _readable(exc)


@PARSER_SETTINGS
@given(json_values)
def test_page_parser_raises_only_its_own_errors(page: Any) -> None:
    try:
        results = page_results(page, RescaleApiError, "GET /api/jobs/x/runs/")
    except RescaleApiError as exc:
        _readable(exc)
        return
    assert isinstance(results, list)


@PARSER_SETTINGS
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_reader_raises_only_its_own_errors(body: bytes) -> None:
    for cut in (len(body), len(body) // 2):
        try:
            decode_json(body[:cut], endpoint="GET /api/x/", status=200, error_class=MuseApiError)
        except MuseApiError as exc:
            _readable(exc)


@PARSER_SETTINGS
@given(st.integers(min_value=400, max_value=599), st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_error_answers_become_errors_of_the_family(status: int, body: bytes) -> None:
    error = error_from_answer(
        status, body, endpoint="GET /api/x/", error_class=RescaleApiError, retry_after=None, idempotent=True
    )
    assert isinstance(error, RescaleApiError) and error.status == status
    _readable(error)


@given(st.text(max_size=60))
def test_retry_after_reader_never_raises(value: str) -> None:
    waited = parse_retry_after(value)
    assert waited is None or waited >= 0


def test_deeply_nested_json_is_a_clear_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MuseApiError):
        decode_json(body, endpoint="GET /api/x/", status=200, error_class=MuseApiError)


# ----- over HTTP: sync and async transports -------------------------------------------------------

HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"
KEY = "0b5c1b1e-2f7c-4c53-9f0a-3e1c2a9d4c11"


def _next_is_text(page: Any) -> bool:
    return not isinstance(page, dict) or page.get("next") is None or isinstance(page.get("next"), str)


def _bodies() -> st.SearchStrategy[tuple[int, bytes, str]]:
    # A non-text next link is covered by its own test below (an open bug).
    page = near({"count": 1, "next": None, "previous": None, "results": [RESCALE_FILE]}).filter(_next_is_text)
    documents = near(MUSE_STATE) | page | near(RESCALE_RUN)
    json_bodies = documents.map(lambda v: json.dumps(v).encode())
    truncated = json_bodies.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n]))
    raw = st.binary(max_size=200) | st.just(HTML_PAGE) | truncated | json_bodies
    statuses = st.sampled_from([200, 200, 200, 201, 204, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504])
    types = st.sampled_from(["application/json", "text/html; charset=utf-8", "application/octet-stream", "text/plain"])
    return st.tuples(statuses, raw, types)


def _sync_calls(muse: MuseHook, rescale: RescaleHook) -> list:
    return [
        lambda: muse.get_state("sw_example", KEY),
        lambda: rescale.get_run("AbCdE", "1"),
        lambda: rescale.list_output_files("AbCdE", "1", page_size=5),
        lambda: rescale.get_job_statuses("AbCdE"),
        lambda: rescale.get_directory_contents("AbCdE", "1"),
        lambda: rescale.tail("AbCdE", "1", "process_output.log", 5),
    ]


HTTP_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@HTTP_SETTINGS
@given(answer=_bodies())
def test_sync_transport_turns_any_answer_into_a_result_or_a_family_error(
    answer: tuple[int, bytes, str], hostile: HostileServer, hostile_conns: dict[str, str]
) -> None:
    status, body, content_type = answer
    hostile.script(status, body, content_type=content_type)
    muse, rescale = MuseHook("muse_hostile", retry=NO_WAIT_RETRY), RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
    try:
        for call in _sync_calls(muse, rescale):
            try:
                call()
            except HpcApiError as exc:
                _readable(exc)
                assert_no_secret(str(exc))
    finally:
        muse.close()
        rescale.close()


@HTTP_SETTINGS
@given(answer=_bodies())
def test_muse_result_reader_turns_any_answer_into_a_result_or_a_family_error(
    answer: tuple[int, bytes, str], hostile: HostileServer, hostile_conns: dict[str, str], tmp_path_factory: Any
) -> None:
    status, body, content_type = answer
    hostile.script(status, body, content_type=content_type)
    muse = MuseHook("muse_hostile", retry=NO_WAIT_RETRY)
    dest = tmp_path_factory.mktemp("result") / "stdout.txt"
    try:
        muse.get_result("sw_example", KEY, str(dest), max_bytes=10_000)
    except HpcApiError as exc:
        _readable(exc)
        assert_no_secret(str(exc))
    finally:
        muse.close()


@HTTP_SETTINGS
@given(answer=_bodies())
def test_async_transport_turns_any_answer_into_a_result_or_a_family_error(
    answer: tuple[int, bytes, str], hostile: HostileServer, hostile_conns: dict[str, str]
) -> None:
    status, body, content_type = answer
    hostile.script(status, body, content_type=content_type)

    async def poll_all() -> None:
        muse, rescale = MuseHook("muse_hostile", retry=NO_WAIT_RETRY), RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
        calls = [
            lambda: muse.a_get_state("sw_example", KEY),
            lambda: rescale.a_get_run("AbCdE", "1"),
            lambda: rescale.a_get_job_statuses("AbCdE"),
            lambda: rescale.a_list_output_files("AbCdE", "1", page_size=5),
            lambda: rescale.a_get_directory_contents("AbCdE", "1"),
            lambda: rescale.a_tail("AbCdE", "1", "process_output.log", 5),
        ]
        try:
            for call in calls:
                try:
                    await call()
                except HpcApiError as exc:
                    _readable(exc)
                    assert_no_secret(str(exc))
        finally:
            await close_all_sessions()

    asyncio.run(poll_all())




@pytest.mark.parametrize(
    "next_value",
    [
        pytest.param(5, id="int"),
        pytest.param({"page": 2}, id="dict"),
        pytest.param(["x"], id="list"),
        pytest.param(True, id="bool"),
        pytest.param("http://198.51.100.7/api/jobs/AbCdE/runs/1/files/?page=2", id="other-origin"),
        pytest.param("/api/jobs/AbCdE/runs/1/files/?page=1", id="loop"),
        pytest.param("", id="empty"),
    ],
)
def test_hostile_next_links_end_the_listing_with_a_family_error_or_stop(
    next_value: Any, hostile: HostileServer, hostile_conns: dict[str, str]
) -> None:
    hostile.script(200, {"count": 2, "next": next_value, "previous": None, "results": [RESCALE_FILE]})
    rescale = RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
    try:
        files = rescale.list_output_files("AbCdE", "1", page_size=5)
    except RescaleApiError as exc:
        _readable(exc)
    else:
        assert [f.id for f in files] == ["AbCdEf"]
    finally:
        rescale.close()
    # Never more than a handful of requests: a hostile next link cannot make the client loop.
    assert len(hostile.requests) <= 3

    async def listing() -> None:
        hook = RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
        try:
            await hook.a_list_output_files("AbCdE", "1", page_size=5)
        except RescaleApiError as exc:
            _readable(exc)
        finally:
            await close_all_sessions()

    hostile.script(200, {"count": 2, "next": next_value, "previous": None, "results": [RESCALE_FILE]})
    asyncio.run(listing())
    assert len(hostile.requests) <= 3


def test_a_body_larger_than_the_json_limit_is_refused_without_reading_it_all(
    hostile: HostileServer, hostile_conns: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit is 32 MiB; a smaller one keeps the test quick and checks the same code.
    monkeypatch.setattr(errors, "MAX_JSON_BYTES", 64 * 1024)
    monkeypatch.setattr("airflow_provider_hpc.hooks.muse.MAX_JSON_BYTES", 64 * 1024)
    huge = b'{"info": {"report": {"cr": "WAIT", "pad": "' + b"x" * (1024 * 1024) + b'"}}}'
    hostile.script(200, huge)
    muse = MuseHook("muse_hostile", retry=NO_WAIT_RETRY)
    try:
        with pytest.raises(MuseApiError, match="larger than"):
            muse.get_state("sw_example", KEY)
    finally:
        muse.close()

    async def poll() -> None:
        hook = MuseHook("muse_hostile", retry=NO_WAIT_RETRY)
        try:
            with pytest.raises(MuseApiError, match="larger than"):
                await hook.a_get_state("sw_example", KEY)
        finally:
            await close_all_sessions()

    asyncio.run(poll())


@pytest.mark.parametrize("status", [200, 502])
def test_an_html_page_is_an_error_with_an_excerpt_not_a_decode_error(
    status: int, hostile: HostileServer, hostile_conns: dict[str, str]
) -> None:
    hostile.script(status, HTML_PAGE, content_type="text/html")
    rescale = RescaleHook("rescale_hostile", retry=NO_WAIT_RETRY)
    try:
        with pytest.raises(RescaleApiError) as caught:
            rescale.get_run("AbCdE", "1")
    finally:
        rescale.close()
    assert "Bad Gateway" in str(caught.value)
    assert "GET /api/jobs/AbCdE/runs/1/" in str(caught.value)
