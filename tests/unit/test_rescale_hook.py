"""RescaleHook against the sample answers of the Rescale reference pages (``shared/api/rescale/*.md``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests_mock as rm
from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import InvalidIdentifierError, RescaleApiError, TransferIntegrityError
from airflow_provider_hpc.hooks.rescale import JobOutcome, JobStatus, OutputFile, RescaleHook, RescaleRun
from scripted_server import ScriptedServer

PLATFORM = "https://platform.rescale.com/"


def run_sample(run_id: str, order: int, y_velocity: float, cd: float, cl: float, **dates: Any) -> dict:
    """Return a run object shaped like the page's samples."""
    return {
        "dateCompleted": dates.get("completed", "2015-02-18T03:09:14.667000Z"),
        "dateStarted": dates.get("started", "2015-02-18T03:08:49.117000Z"),
        "displayOrder": order,
        "id": run_id,
        "isOptimal": False,
        "outputFileCount": 66,
        "outputFileSize": 8018226,
        "parent": None,
        "type": 3,
        "variables": [
            {"displayValue": "20", "isRelative": False, "name": "x_velocity", "value": 20.0},
            {"displayValue": str(y_velocity), "isRelative": False, "name": "y_velocity", "value": y_velocity},
            {"displayValue": str(cd), "isRelative": False, "name": "Cd", "value": cd},
            {"displayValue": str(cl), "isRelative": False, "name": "Cl", "value": cl},
        ],
    }


RUN_1 = run_sample("1", 1, 3.0, -0.0187556, 0.140742)
RUN_2 = run_sample(
    "2", 2, 3.5, -0.0248332, 0.157982, completed="2015-02-18T03:07:13.049000Z", started="2015-02-18T03:06:46.477000Z"
)
RUNS_PAGE = {
    "count": 121,
    "next": "https://platform.rescale.com/api/jobs/XXXXXX/runs/?page=2",
    "previous": None,
    "results": [RUN_1, RUN_2],
}


def file_sample(file_id: str, relative: str, size: int, md5: str) -> dict:
    """Return an output file object shaped like the page's samples."""
    return {
        "typeId": 5,
        "name": relative.rsplit("/", 1)[-1],
        "dateUploaded": "2014-11-12T22:56:50.641761Z",
        "relativePath": relative,
        "encodedEncryptionKey": "5BBRrtu98/BwNNTkPnJtgaHS2VZ0IzUwgQ+fFqc5rhk=",
        "sharedWith": [],
        "decryptedSize": size,
        "owner": "demouser@rescale.com",
        "path": f"user/user_OvdRk/output/job_XXXXX/run1/{relative}",
        "isUploaded": True,
        "viewInBrowser": True,
        "id": file_id,
        "md5": md5,
    }


FILES_PAGE_1 = {
    "count": 63,
    "previous": None,
    "results": [
        file_sample("dmpTse", "airFoil2D/0/nut", 1278, "c2e31d85a3af9272841a8b00f3c07498"),
        file_sample("fDhFDe", "airFoil2D/0/nuTilda", 1268, "24af84107af3a306e117b866b27b9c55"),
        file_sample("sOhFDe", "airFoil2D/0/p", 1166, "dfff0408d9e75c8f81dadeec9b248a46"),
        file_sample("RapTse", "airFoil2D/0/U", 1298, "66aa52fa89123a8f6c3751d935b919d5"),
        file_sample("LosKDe", "airFoil2D/100/uniform/time", 968, "62ac76eb8aae234370613d7350ac8685"),
    ],
    "next": "https://platform.rescale.com/api/jobs/XXXXX/runs/1/files/?page=2",
}
FILES_PAGE_2 = {
    "count": 63,
    "prev": "https://platform.rescale.com/api/jobs/XXXXX/runs/1/files/?page=1",
    "results": [file_sample("wMyXse", "airFoil2D/100/phi", 190707, "2fb30c6d0e3ea1125a361ce069c46a80")],
    "next": None,
}
DIRECTORY = [
    {"path": "airFoil2D/0/U", "resource": "/api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U"},
    {"path": "airFoil2D/0/nuTilda", "resource": "/api/jobs/XXXXX/runs/1/tail/airFoil2D/0/nuTilda"},
    {"path": "airFoil2D/0/nut", "resource": "/api/jobs/XXXXX/runs/1/tail/airFoil2D/0/nut"},
]
TAIL = {
    "fileType": "/home/job_fNjea/work/airFoil2D/0/U: ASCII English text",
    "lines": [
        "/*--------------------------------*- C++ -*----------------------------------*\\",
        "| =========                 |                                                 |",
        "| \\\\      /  F ield         | OpenFOAM: The Open Source CFD Toolbox           |",
        "FoamFile",
        "{",
        "    version     2.0;",
        "internalField   uniform (25.75 3.62 0);",
        "// ************************************************************************* //",
    ],
}
SNAPSHOT = {"data": "", "exitcode": 0, "lastSnapshotID": "gQLna", "reason": "Generating snapshot."}


def status(name: str, date: str, reason: str | None = None) -> dict:
    """Return one entry of ``GET /api/v2/jobs/{job_id}/statuses/``."""
    return {"status": name, "statusDate": date, "statusReason": reason}


# ----- runs --------------------------------------------------------------------------------------


def test_list_runs_reads_the_sample_page(rescale_hook: RescaleHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """The list sample: every run, its variables and dates; the API key goes as ``Authorization: Token``."""
    first = dict(RUNS_PAGE, next=None)
    route = requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/", json=first)

    runs = rescale_hook.list_runs("XXXXXX")

    assert [r.id for r in runs] == ["1", "2"]
    assert runs[0].variables_dict == {"x_velocity": 20.0, "y_velocity": 3.0, "Cd": -0.0187556, "Cl": 0.140742}
    assert runs[0].is_completed and runs[0].type == 3 and runs[0].output_file_count == 66
    assert runs[1].date_started == "2015-02-18T03:06:46.477000Z"
    assert route.last_request.headers["Authorization"] == f"Token {creds.api_key}"
    assert route.last_request.qs == {"page": ["1"], "page_size": ["100"]}


def test_list_runs_follows_next_and_carries_page_size(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The sample's ``next`` drops ``page_size``: it is carried over to every following page."""
    pages = {"1": RUNS_PAGE, "2": {"count": 121, "next": None, "prev": PLATFORM + "api/jobs/XXXXXX/runs/?page=1",
                                    "results": [run_sample("3", 3, 4.0, -0.03, 0.17)]}}

    def answer(request: Any, context: Any) -> dict:
        return pages[request.qs["page"][0]]

    route = requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/", json=answer)

    runs = rescale_hook.list_runs("XXXXXX", page_size=2)

    assert [r.id for r in runs] == ["1", "2", "3"]
    assert [r.qs for r in route.request_history] == [
        {"page": ["1"], "page_size": ["2"]},
        {"page": ["2"], "page_size": ["2"]},
    ]


def test_next_page_on_another_host_is_refused(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A ``next`` URL on another origin is not followed: the API key is never sent elsewhere."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/", json=dict(RUNS_PAGE, next="https://evil.test/api/jobs/XXXXXX/runs/?page=2"))
    elsewhere = requests_mock.get("https://evil.test/api/jobs/XXXXXX/runs/", json=dict(RUNS_PAGE, next=None))

    with pytest.raises(RescaleApiError, match="another origin"):
        rescale_hook.list_runs("XXXXXX")

    assert elsewhere.call_count == 0


def test_next_page_on_plain_http_is_refused(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A ``next`` URL that downgrades to http is another origin too."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/", json=dict(RUNS_PAGE, next="http://platform.rescale.com/api/jobs/XXXXXX/runs/?page=2"))
    with pytest.raises(RescaleApiError, match="another origin"):
        rescale_hook.list_runs("XXXXXX")
    assert requests_mock.call_count == 1


def test_next_page_repeating_itself_stops(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A server whose ``next`` points back to a page already read does not make the hook loop forever."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/", json=dict(RUNS_PAGE, next=PLATFORM + "api/jobs/XXXXXX/runs/?page=1"))
    with pytest.raises(RescaleApiError, match="repeats an earlier one"):
        rescale_hook.list_runs("XXXXXX")
    assert requests_mock.call_count == 1


def test_get_run(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The get sample becomes a :class:`RescaleRun` that round-trips through JSON."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/1/", json=RUN_1)

    run = rescale_hook.get_run("XXXXXX", "1")

    assert run.id == "1" and run.display_order == 1 and run.parent is None and run.is_optimal is False
    assert run.output_file_size == 8018226
    assert json.loads(json.dumps(run.to_dict()))["variables"]["Cl"] == 0.140742


def test_run_in_progress_is_not_completed(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """``dateCompleted`` is null until the run is done."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/1/", json=dict(RUN_1, dateCompleted=None))
    assert rescale_hook.get_run("XXXXXX", "1").is_completed is False


def test_run_without_id_is_a_clear_error() -> None:
    """A run object without an id is refused, not turned into a run called 'None'."""
    with pytest.raises(RescaleApiError, match="no id"):
        RescaleRun.from_api({"dateCompleted": None})


def test_stop_run(rescale_hook: RescaleHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """Stop answers ``{}``: a POST with the API key, nothing returned."""
    route = requests_mock.post(PLATFORM + "api/jobs/XXXXX/runs/1/stop/", json={})

    assert rescale_hook.stop_run("XXXXX", "1") is None

    assert route.call_count == 1
    assert route.last_request.headers["Authorization"] == f"Token {creds.api_key}"


def test_stop_run_is_retried_on_503(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """Stopping twice stops once: a stop is retried on a transient 503."""
    route = requests_mock.post(
        PLATFORM + "api/jobs/XXXXX/runs/1/stop/", [{"status_code": 503, "text": "busy"}, {"json": {}}]
    )
    rescale_hook.stop_run("XXXXX", "1")
    assert route.call_count == 2


def test_snapshot_run(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The snapshot sample: exit code 0 and the previous snapshot's file id."""
    route = requests_mock.post(PLATFORM + "api/jobs/XXXXX/runs/1/snapshot/", json=SNAPSHOT)

    result = rescale_hook.snapshot_run("XXXXX", "1")

    assert route.last_request.method == "POST"
    assert (result.exitcode, result.last_snapshot_id, result.reason, result.data) == (0, "gQLna", "Generating snapshot.", "")


def test_snapshot_is_not_repeated_on_a_500(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A snapshot may have been taken before a 500: it is not asked twice."""
    route = requests_mock.post(PLATFORM + "api/jobs/XXXXX/runs/1/snapshot/", status_code=500, json={"detail": "oops"})
    with pytest.raises(RescaleApiError, match="oops"):
        rescale_hook.snapshot_run("XXXXX", "1")
    assert route.call_count == 1


# ----- files -------------------------------------------------------------------------------------


def test_list_output_files_reads_every_page(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The output files sample (``next`` then a page with ``prev``): every file, with size and md5."""
    pages = {"1": FILES_PAGE_1, "2": FILES_PAGE_2}
    route = requests_mock.get(
        PLATFORM + "api/jobs/XXXXX/runs/1/files/", json=lambda request, context: pages[request.qs["page"][0]]
    )

    files = rescale_hook.list_output_files("XXXXX", "1", page_size=5)

    assert [f.id for f in files] == ["dmpTse", "fDhFDe", "sOhFDe", "RapTse", "LosKDe", "wMyXse"]
    first = files[0]
    assert first == OutputFile(
        id="dmpTse",
        name="nut",
        relative_path="airFoil2D/0/nut",
        decrypted_size=1278,
        md5="c2e31d85a3af9272841a8b00f3c07498",
        path="user/user_OvdRk/output/job_XXXXX/run1/airFoil2D/0/nut",
        date_uploaded="2014-11-12T22:56:50.641761Z",
        is_uploaded=True,
    )
    assert all(r.qs["page_size"] == ["5"] for r in route.request_history)


def test_page_without_results_is_a_clear_error(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A page that is not ``{"results": [...]}`` is refused with a message, not a KeyError."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/files/", json={"detail": "Not found."})
    with pytest.raises(RescaleApiError, match="no 'results' list"):
        rescale_hook.list_output_files("XXXXX", "1")


def test_directory_contents(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The directory-contents sample: a plain list of ``{path, resource}``."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/directory-contents/", json=DIRECTORY)

    entries = rescale_hook.get_directory_contents("XXXXX", "1")

    assert [e.path for e in entries] == ["airFoil2D/0/U", "airFoil2D/0/nuTilda", "airFoil2D/0/nut"]
    assert entries[0].resource == "/api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U"


def test_tail(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The tail sample: ``lines`` asked as a query parameter, the path kept as path segments."""
    route = requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U/", json=TAIL)

    lines = rescale_hook.tail("XXXXX", "1", "airFoil2D/0/U", lines=100)

    assert lines == TAIL["lines"]
    assert route.last_request.qs == {"lines": ["100"]}


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a//b", "", "a/./b"])
def test_tail_refuses_unsafe_paths(rescale_hook: RescaleHook, requests_mock: rm.Mocker, path: str) -> None:
    """A tail path that climbs out of the run's folder is refused before any request."""
    with pytest.raises(RescaleApiError, match="Refusing tail path"):
        rescale_hook.tail("XXXXX", "1", path)
    assert requests_mock.call_count == 0


def test_download_file_checks_md5_and_size(
    rescale_hook: RescaleHook,
    requests_mock: rm.Mocker,
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
) -> None:
    """``GET /api/files/{id}/contents/`` is streamed and kept when size and md5 match."""
    body = b"FoamFile { version 2.0; }\n" * 40
    route = requests_mock.get(PLATFORM + "api/files/dmpTse/contents/", content=body)
    file = OutputFile(id="dmpTse", name="nut", relative_path="airFoil2D/0/nut", decrypted_size=len(body),
                      md5=hashlib.md5(body).hexdigest())

    stored = rescale_hook.download_file(file, dest_dir / "airFoil2D" / "0" / "nut")

    assert stored.size == len(body) and stored.md5 == file.md5
    assert list_files(dest_dir) == ["airFoil2D/0/nut"]
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("size_delta", "md5"),
    [(0, "0" * 32), (1, None)],
    ids=["wrong-md5", "wrong-size"],
)
def test_download_file_mismatch_keeps_nothing(
    rescale_hook: RescaleHook,
    requests_mock: rm.Mocker,
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
    size_delta: int,
    md5: str | None,
) -> None:
    """A body whose md5 or size differs from the announced ones is retried, then refused; nothing stays."""
    body = b"truncated?"
    route = requests_mock.get(PLATFORM + "api/files/dmpTse/contents/", content=body)
    file = OutputFile(id="dmpTse", name="nut", relative_path="nut", decrypted_size=len(body) + size_delta, md5=md5)

    with pytest.raises(TransferIntegrityError):
        rescale_hook.download_file(file, dest_dir / "nut")

    assert list_files(dest_dir) == []
    assert route.call_count == 3  # the fast policy's three attempts


# ----- statuses ----------------------------------------------------------------------------------


def test_job_statuses_are_sorted_by_date(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """The statuses endpoint's order is not reliable: the hook sorts by ``statusDate``."""
    route = requests_mock.get(
        PLATFORM + "api/v2/jobs/XXXXX/statuses/",
        json={"results": [
            status("Completed", "2024-05-01T10:30:00.123456Z", "Completed successfully"),
            status("Pending", "2024-05-01T10:00:00Z"),
            status("Executing", "2024-05-01T10:05:00.5Z"),
            status("Queued", "2024-05-01T10:01:00+00:00"),
        ]},
    )

    statuses = rescale_hook.get_job_statuses("XXXXX")

    assert [s.status for s in statuses] == ["Pending", "Queued", "Executing", "Completed"]
    assert statuses[0].status_date == datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
    assert route.call_count == 1


def test_unreadable_status_date_is_a_clear_error(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A statusDate that is not ISO 8601 is reported with its value."""
    requests_mock.get(PLATFORM + "api/v2/jobs/XXXXX/statuses/", json={"results": [status("Pending", "yesterday")]})
    with pytest.raises(RescaleApiError, match="yesterday"):
        rescale_hook.get_job_statuses("XXXXX")


def history(*entries: tuple[str, str | None]) -> list[JobStatus]:
    """Return a date-sorted history, one minute apart."""
    return [
        JobStatus(name, datetime(2024, 5, 1, 10, minute, tzinfo=timezone.utc), reason)
        for minute, (name, reason) in enumerate(entries)
    ]


def test_outcome_success() -> None:
    """Completed with ``Completed successfully`` (or no reason) is a success."""
    outcome = JobOutcome.from_statuses(history(("Pending", None), ("Executing", None), ("Completed", "Completed successfully")))
    assert (outcome.completed, outcome.succeeded) == (True, True)
    assert outcome.history == ("Pending", "Executing", "Completed")
    assert JobOutcome.from_statuses(history(("Executing", None), ("Completed", None))).succeeded is True


def test_outcome_not_completed_yet() -> None:
    """No Completed status: not completed, not succeeded."""
    outcome = JobOutcome.from_statuses(history(("Pending", None), ("Executing", None)))
    assert (outcome.completed, outcome.succeeded) == (False, False)


def test_outcome_stopping_on_the_way_is_a_failure() -> None:
    """A ``Stopping`` before Completed means the job was stopped, whatever the final reason."""
    outcome = JobOutcome.from_statuses(
        history(("Executing", None), ("Stopping", "User requested stop"), ("Completed", "Completed successfully"))
    )
    assert (outcome.completed, outcome.succeeded) == (True, False)
    assert outcome.reason == "User requested stop"


@pytest.mark.parametrize(
    "reason",
    [
        "Exceeded max number of restarts",
        "Could not allocate compute resources from the compute provider",
        "Completed unsuccessfully",
        "Did not complete successfully",
    ],
)
def test_outcome_failure_reasons(reason: str) -> None:
    """Completed with a failure reason is not a success; the reason is kept for the error message."""
    outcome = JobOutcome.from_statuses(history(("Executing", None), ("Completed", reason)))
    assert (outcome.completed, outcome.succeeded, outcome.reason) == (True, False, reason)


# ----- versions, regions, links ------------------------------------------------------------------


def test_api_version_v2_paths(
    set_conn: Callable[..., str], fast_retry: Any, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath
) -> None:
    """``api_version: v2`` puts every runs and files path under ``/api/v2/``."""
    conn_id = set_conn("rescale_v2", conn_type="rescale", password="k" * 12, extra={"api_version": "v2"})
    hook = RescaleHook(conn_id, retry=fast_retry)
    get_run = requests_mock.get(PLATFORM + "api/v2/jobs/XXXXX/runs/1/", json=RUN_1)
    files = requests_mock.get(PLATFORM + "api/v2/jobs/XXXXX/runs/1/files/", json=dict(FILES_PAGE_2, next=None))
    contents = requests_mock.get(PLATFORM + "api/v2/files/wMyXse/contents/", content=b"phi")

    hook.get_run("XXXXX", "1")
    [file] = hook.list_output_files("XXXXX", "1")
    hook.download_file(OutputFile(id=file.id, name="phi", relative_path="phi"), dest_dir / "phi")

    assert (get_run.call_count, files.call_count, contents.call_count) == (1, 1, 1)


def test_unknown_api_version_is_refused(set_conn: Callable[..., str], requests_mock: rm.Mocker) -> None:
    """An api_version other than v1/v2 is a clear error, before any request."""
    conn_id = set_conn("rescale_v9", conn_type="rescale", password="k" * 12, extra={"api_version": "v9"})
    with pytest.raises(RescaleApiError, match="v9"):
        RescaleHook(conn_id).get_run("XXXXX", "1")
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(
    ("host", "base"),
    [
        (None, "https://platform.rescale.com/"),
        ("eu.rescale.com", "https://eu.rescale.com/"),
        ("https://kr.rescale.com", "https://kr.rescale.com/"),
        ("https://platform.rescale.jp/api/", "https://platform.rescale.jp/"),
        ("itar.rescale.com", "https://itar.rescale.com/"),
    ],
)
def test_region_hosts(
    set_conn: Callable[..., str], fast_retry: Any, requests_mock: rm.Mocker, host: str | None, base: str
) -> None:
    """The platform URL of the region is the origin every ``/api/`` path is joined to."""
    fields = {"conn_type": "rescale", "password": "k" * 12, **({"host": host} if host else {})}
    hook = RescaleHook(set_conn("rescale_region", **fields), retry=fast_retry)
    route = requests_mock.get(base + "api/jobs/QTVia/runs/1/", json=RUN_1)

    hook.get_run("QTVia", "1")

    assert hook.base_url == base
    assert route.call_count == 1
    assert hook.job_url("QTVia") == base + "jobs/QTVia/"


def test_missing_api_key_is_a_clear_error(set_conn: Callable[..., str], requests_mock: rm.Mocker) -> None:
    """A connection without an API key says where to put it, before any request."""
    conn_id = set_conn("rescale_nokey", conn_type="rescale")
    with pytest.raises(RescaleApiError, match="no API key"):
        RescaleHook(conn_id).get_run("XXXXX", "1")
    assert requests_mock.call_count == 0


BAD_IDS = ["../x", "a/b", "x?y", "#", "", "a b", "..", "x\n", "x#y"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_job_or_run_id_rejected_before_any_request(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath, bad: str
) -> None:
    """A job, run or file id that could change the URL is refused before a request is made."""
    calls: list[Callable[[], Any]] = [
        lambda: rescale_hook.list_runs(bad),
        lambda: rescale_hook.get_run(bad, "1"),
        lambda: rescale_hook.get_run("XXXXX", bad),
        lambda: rescale_hook.stop_run("XXXXX", bad),
        lambda: rescale_hook.snapshot_run(bad, "1"),
        lambda: rescale_hook.list_output_files("XXXXX", bad),
        lambda: rescale_hook.get_directory_contents(bad, "1"),
        lambda: rescale_hook.tail(bad, "1", "log.txt"),
        lambda: rescale_hook.get_job_statuses(bad),
        lambda: rescale_hook.download_file(OutputFile(id=bad or "-", name="x", relative_path="x"), dest_dir / "x"),
        lambda: rescale_hook.job_url(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifierError):
            call()
    assert requests_mock.call_count == 0


def test_integer_ids_are_accepted(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """Run ids are often given as numbers: ``1`` and ``"1"`` reach the same URL."""
    route = requests_mock.get(PLATFORM + "api/jobs/QTVia/runs/1/", json=RUN_1)
    rescale_hook.get_run("QTVia", 1)  # type: ignore[arg-type]
    assert route.call_count == 1


# ----- test_connection ---------------------------------------------------------------------------


def test_test_connection_ok(rescale_hook: RescaleHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """The UI's Test button: the jobs list answering with the key gives ``(True, ...)``."""
    route = requests_mock.get(PLATFORM + "api/jobs/", json={"count": 0, "next": None, "previous": None, "results": []})
    ok, message = rescale_hook.test_connection()
    assert ok is True and "platform.rescale.com" in message
    assert route.last_request.headers["Authorization"] == f"Token {creds.api_key}"


def test_test_connection_refused(rescale_hook: RescaleHook, requests_mock: rm.Mocker) -> None:
    """A refused key gives ``(False, message)`` with the server's words."""
    requests_mock.get(PLATFORM + "api/jobs/", status_code=401, json={"detail": "Invalid token."})
    ok, message = rescale_hook.test_connection()
    assert ok is False
    assert "Invalid token." in message and "401" in message


# ----- the reference page's samples, verbatim ------------------------------------------------------

# Every JSON sample of shared/api/rescale/runs.md, copied as is (job XXXXX / XXXXXX, run 1).
SAMPLES = json.loads((Path(__file__).parent / "samples" / "rescale_runs_md.json").read_text())


def test_verbatim_samples_sync(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath, creds: Any
) -> None:
    """Each sync method reads the page's own sample answer: runs, run, stop, snapshot, files, directory, tail."""
    last_runs_page = {"count": 121, "next": None, "previous": PLATFORM + "api/jobs/XXXXXX/runs/", "results": []}
    requests_mock.get(
        PLATFORM + "api/jobs/XXXXXX/runs/",
        json=lambda request, context: SAMPLES["runs_list"] if request.qs["page"] == ["1"] else last_runs_page,
    )
    requests_mock.get(PLATFORM + "api/jobs/XXXXXX/runs/1/", json=SAMPLES["run_get"])
    requests_mock.post(PLATFORM + "api/jobs/XXXXX/runs/1/stop/", json=SAMPLES["run_stop"])
    requests_mock.post(PLATFORM + "api/jobs/XXXXX/runs/1/snapshot/", json=SAMPLES["run_snapshot"])
    requests_mock.get(
        PLATFORM + "api/jobs/XXXXX/runs/1/files/",
        json=lambda request, context: SAMPLES["run_files"] if request.qs["page"] == ["1"] else dict(
            SAMPLES["run_files"], next=None, previous=PLATFORM + "api/jobs/XXXXX/runs/1/files/", results=[]
        ),
    )
    requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/directory-contents/", json=SAMPLES["directory_contents"])
    tail = requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U/", json=SAMPLES["tail"])

    runs = rescale_hook.list_runs("XXXXXX")
    assert [(r.id, r.display_order, r.variables_dict["y_velocity"]) for r in runs] == [("1", 1, 3.0), ("2", 2, 3.5)]
    run = rescale_hook.get_run("XXXXXX", "1")
    assert (run.date_completed, run.output_file_count, run.variables_dict["Cd"]) == ("2015-02-18T03:09:14.667000Z", 66, -0.0187556)
    assert rescale_hook.stop_run("XXXXX", "1") is None
    snapshot = rescale_hook.snapshot_run("XXXXX", "1")
    assert (snapshot.exitcode, snapshot.last_snapshot_id) == (0, "gQLna")
    files = rescale_hook.list_output_files("XXXXX", "1")
    assert len(files) == 10
    assert [(f.relative_path, f.decrypted_size) for f in files][-2:] == [("airFoil2D/100/U", 298228), ("airFoil2D/100/uniform/time", 968)]
    assert {f.md5 for f in files} == {s["md5"] for s in SAMPLES["run_files"]["results"]}
    assert [e.path for e in rescale_hook.get_directory_contents("XXXXX", "1")] == ["airFoil2D/0/U", "airFoil2D/0/nuTilda", "airFoil2D/0/nut"]
    lines = rescale_hook.tail("XXXXX", "1", "airFoil2D/0/U", lines=100)
    assert lines == SAMPLES["tail"]["lines"] and lines[-1].startswith("// ****")
    assert tail.last_request.qs == {"lines": ["100"]}
    assert {r.headers["Authorization"] for r in requests_mock.request_history} == {f"Token {creds.api_key}"}


async def test_verbatim_samples_async(set_conn: Callable[..., str], fast_retry: Any, creds: Any) -> None:
    """Each async method (the triggers' side) reads the same samples from a local aiohttp server."""
    server = await ScriptedServer().start()
    try:
        hook = RescaleHook(set_conn("rescale_async_samples", conn_type="rescale", host=server.url, password=creds.api_key), retry=fast_retry)
        server.script("GET", "/api/jobs/XXXXXX/runs/1/", {"json": SAMPLES["run_get"]})
        server.script("GET", "/api/jobs/XXXXX/runs/1/directory-contents/", {"json": SAMPLES["directory_contents"]})
        server.script("GET", "/api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U/", {"json": SAMPLES["tail"]})
        server.script("GET", "/api/jobs/XXXXX/runs/1/files/", {"json": dict(SAMPLES["run_files"], next=None)})
        server.script("POST", "/api/jobs/XXXXX/runs/1/stop/", {"json": SAMPLES["run_stop"]})
        server.script("GET", "/api/v2/jobs/XXXXX/statuses/", {"json": {"results": [
            status("Completed", "2024-05-01T10:30:00Z", "Completed successfully"),
            status("Executing", "2024-05-01T10:05:00Z"),
        ]}})

        assert (await hook.a_get_run("XXXXXX", "1")).to_dict() == RescaleRun.from_api(SAMPLES["run_get"]).to_dict()
        assert [e.path for e in await hook.a_get_directory_contents("XXXXX", "1")][0] == "airFoil2D/0/U"
        assert await hook.a_tail("XXXXX", "1", "airFoil2D/0/U", lines=50) == SAMPLES["tail"]["lines"]
        assert len(await hook.a_list_output_files("XXXXX", "1")) == 10
        assert await hook.a_stop_run("XXXXX", "1") is None
        assert [s.status for s in await hook.a_get_job_statuses("XXXXX")] == ["Executing", "Completed"]
        tail_request = next(r for r in server.requests if "/tail/" in r.path)
        assert tail_request.query == {"lines": "50"}
        assert {r.headers["Authorization"] for r in server.requests} == {f"Token {creds.api_key}"}
        with pytest.raises(RescaleApiError, match="Refusing tail path"):
            await hook.a_tail("XXXXX", "1", "../../etc/passwd")
        with pytest.raises(InvalidIdentifierError):
            await hook.a_get_run("XXXXX", "../1")
        assert len(server.requests) == 6
    finally:
        await server.close()


def test_tail_raw_streams_the_whole_file(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath
) -> None:
    """``tail`` without ``lines`` answers the raw bytes: they are streamed to the destination."""
    body = "\n".join(SAMPLES["tail"]["lines"]).encode()
    route = requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/tail/airFoil2D/0/U/", content=body)
    stored = rescale_hook.tail_raw("XXXXX", "1", "airFoil2D/0/U", dest_dir / "U")
    assert route.last_request.qs == {}
    assert stored.size == len(body) and (dest_dir / "U").read_bytes() == body


@pytest.mark.parametrize("listing_status", [404, 405])
def test_test_connection_where_the_jobs_list_is_not_served(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, listing_status: int
) -> None:
    """Without a jobs list, the key is checked on a job that does not exist: 404 means it was accepted."""
    requests_mock.get(PLATFORM + "api/jobs/", status_code=listing_status, json={"detail": "Method not allowed."})
    probe = requests_mock.get(PLATFORM + "api/jobs/airflow-connection-test/runs/", status_code=404, json={"detail": "Not found."})
    assert rescale_hook.test_connection()[0] is True
    probe.reset()
    requests_mock.get(PLATFORM + "api/jobs/airflow-connection-test/runs/", status_code=401, json={"detail": "Invalid token."})
    ok, message = rescale_hook.test_connection()
    assert not ok and "Invalid token." in message


# ----- malformed answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("next_link", [5, {"page": 2}, ["x"], True])
def test_a_next_link_that_is_not_a_url_is_a_clear_error(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, next_link: Any
) -> None:
    """A ``next`` that is not a string ends the listing with an error of the family, not a TypeError."""
    requests_mock.get(PLATFORM + "api/jobs/XXXXX/runs/1/files/", json=dict(FILES_PAGE_2, next=next_link))
    with pytest.raises(RescaleApiError, match="next link is not a URL"):
        rescale_hook.list_output_files("XXXXX", "1")


@pytest.mark.parametrize("reason", [True, 5, ["Completed successfully"], {"text": "x"}])
def test_a_status_reason_that_is_not_text_is_read_as_text(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, reason: Any
) -> None:
    """A ``statusReason`` of another JSON type is kept as its JSON text; the outcome is still decided."""
    requests_mock.get(
        PLATFORM + "api/v2/jobs/XXXXX/statuses/",
        json={"results": [status("Executing", "2024-05-01T10:05:00Z"), status("Completed", "2024-05-01T10:30:00Z", reason)]},
    )
    statuses = rescale_hook.get_job_statuses("XXXXX")
    assert statuses[-1].status_reason == json.dumps(reason)
    assert JobOutcome.from_statuses(statuses).completed


def test_malformed_run_and_file_objects() -> None:
    """Variables that are not a list are ignored; a file with neither relativePath nor name is refused."""
    assert RescaleRun.from_api(dict(RUN_1, variables=True)).variables == ()
    assert OutputFile.from_api({"id": "abc", "name": "U", "relativePath": {"x": 1}}).relative_path == "U"
    with pytest.raises(RescaleApiError, match="neither relativePath nor name"):
        OutputFile.from_api({"id": "abc", "relativePath": None})


def test_an_upload_the_platform_misreports_is_tried_again_then_refused(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, tmp_path: Any
) -> None:
    """The answer's size and md5 must be what was streamed; a mismatch uploads again, then fails."""
    from airflow_provider_hpc.exceptions import TransferIntegrityError

    source = tmp_path / "case.txt"
    source.write_bytes(b"4 5\n")
    wrong = {"id": "InPuT1", "name": "case.txt", "relativePath": "case.txt", "decryptedSize": 4, "md5": "0" * 32, "isUploaded": True}
    upload = requests_mock.post(PLATFORM + "api/v2/files/contents/", status_code=201, json=wrong)
    with pytest.raises(TransferIntegrityError, match="were sent"):
        rescale_hook.upload_file(source)
    assert upload.call_count == rescale_hook.transport.settings.retry.max_attempts
