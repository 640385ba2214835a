"""
The Rescale emulator for a client that starts its own jobs: input uploads, Rescale's job body, the
inputs in the working folder, the job list and its search. Over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from rescale_client import RescaleClient

from hpc_emulator import EmulatorServer

FILE_FIELDS = {
    "typeId", "name", "dateUploaded", "relativePath", "encodedEncryptionKey", "sharedWith",
    "decryptedSize", "owner", "path", "isUploaded", "viewInBrowser", "id", "md5",
}
SUMMARY_FIELDS = {
    "analysisNames", "clusterStatusDisplay", "dateInserted", "id", "isVisible", "jobStatus", "name",
    "owner", "sharedWith", "storage",
}
HARDWARE = {"coreType": "emerald", "coresPerSlot": 2}
USER_SOFTWARE = {"code": "user_included", "name": "Custom User-Defined Software", "version": "0", "versionName": ""}
COMMAND = (
    "cat input.txt > out.txt; echo $GREETING >> out.txt; "
    "test -f data.zip && ! test -e inside.txt && echo zip-kept >> out.txt; echo changed >> rewritten.txt"
)


def zip_of(name: str, content: bytes) -> bytes:
    """Return a zip archive holding one file."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def analysis(**fields: Any) -> dict[str, Any]:
    """Return one analysis in Rescale's shape, ``fields`` replacing its defaults."""
    return {"analysis": {"code": "user_included"}, "command": "true", "hardware": HARDWARE, **fields}


def refused(rescale: RescaleClient, body: dict[str, Any]) -> dict[str, Any]:
    """Post a job body the emulator must refuse; return its 400 answer."""
    answer = rescale.post("/jobs/", json=body)
    assert answer.status_code == 400, (body, answer.text)
    return answer.json()


def test_upload_answers_the_file_record_and_serves_its_bytes(rescale: RescaleClient) -> None:
    content = b"line one\n" * 1000
    record = rescale.upload("input.txt", content)
    assert set(record) == FILE_FIELDS
    assert record["typeId"] == 1 and record["isUploaded"] is True and record["viewInBrowser"] is False
    assert record["name"] == record["relativePath"] == "input.txt"
    assert record["decryptedSize"] == len(content) and record["md5"] == hashlib.md5(content).hexdigest()
    assert record["path"].startswith("user/user_emUla/input-") and record["path"].endswith(".txt")
    assert record["dateUploaded"].endswith("Z") and record["sharedWith"] == []
    assert len(record["id"]) == 6 and record["id"].isalnum()
    for version in ("/api", "/api/v2"):
        assert rescale.download(record["id"], version) == content
        assert rescale.get(f"/files/{record['id']}/", version).json() == record
    assert rescale.upload("inputs.zip", b"", "/api")["decryptedSize"] == 0  # v1 path, empty file
    for given, safe in (("../../etc/passwd", "passwd"), ("C:\\Users\\me\\model.dat", "model.dat")):
        assert rescale.upload(given, b"x")["name"] == safe
    assert rescale.get("/files/nofile/").status_code == 404


def test_upload_refusals(rescale: RescaleClient) -> None:
    no_file = rescale.post("/files/contents/", files={"other": ("a.txt", b"a")}, data={"name": "x"})
    assert no_file.status_code == 400
    assert no_file.json() == {"detail": "file: No file was submitted.", "file": ["No file was submitted."]}
    plain = rescale.post("/files/contents/", files={"file": (None, b"not a file")})
    assert plain.status_code == 400 and plain.json()["file"] == [
        "The submitted data was not a file. Check the encoding type on the form."
    ]
    assert rescale.post("/files/contents/", json={"file": "x"}).status_code == 415
    unauthenticated = requests.post(rescale.url("/files/contents/"), files={"file": ("a", b"a")}, timeout=10)
    assert unauthenticated.status_code == 401

    rescale.config.rescale_max_upload_bytes = 1000
    assert rescale.upload("fits.bin", b"x" * 1000)["decryptedSize"] == 1000
    for size in (1001, 3 * 1024 * 1024):  # found while streaming; announced by Content-Length
        answer = rescale.post("/files/contents/", files={"file": ("big.bin", b"x" * size)})
        assert answer.status_code == 413 and "1000 bytes" in answer.json()["detail"]
    uploads = rescale.config.data_dir / "rescale" / "files"
    assert sorted(path.name for path in uploads.rglob("*") if path.is_file()) == ["fits.bin"]


def test_rescale_job_runs_with_its_inputs_and_env_vars(rescale: RescaleClient) -> None:
    text = rescale.upload("input.txt", b"line one\n")
    archive = rescale.upload("data.zip", zip_of("inside.txt", b"inside"))
    rewritten = rescale.upload("rewritten.txt", b"original\n")
    inputs = [text, archive, rewritten]
    body = {
        "name": "full body",
        "isLowPriority": True,
        "jobanalyses": [
            {
                "analysis": {"code": "user_included", "version": "0"},
                "command": COMMAND,
                "hardware": {**HARDWARE, "slots": 1},
                "inputFiles": [{"id": item["id"]} for item in inputs],
                "envVars": {"GREETING": "hello world"},
                "useMpi": False,
            }
        ],
    }
    created = rescale.post("/jobs/", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert rescale.get(f"/jobs/{job['id']}/").json() == job
    echoed = job["jobanalyses"][0]
    assert echoed["analysis"] == USER_SOFTWARE
    assert echoed["hardware"] == {"coreType": "emerald", "coresPerSlot": 2, "slots": 1, "walltime": None}
    assert echoed["inputFiles"] == inputs
    assert echoed["envVars"] == {"GREETING": "hello world"} and echoed["command"] == COMMAND
    assert echoed["useMpi"] is False and echoed["templateTasks"] == []
    assert job["resourceFilters"] == [] and job["archiveFilters"] == [] and job["jobvariables"] == []
    assert job["isLowPriority"] is True and job["name"] == "full body"

    assert rescale.post(f"/jobs/{job['id']}/submit/").json() == {}
    second = rescale.post(f"/jobs/{job['id']}/submit/")
    assert second.status_code == 400 and second.json() == {"detail": "This job has already been submitted."}
    rescale.wait_run_completed(job["id"])
    assert rescale.wait_job_completed(job["id"])[-1]["statusReason"] == "Completed successfully"
    files = {entry["relativePath"]: entry for entry in rescale.all_files(job["id"])}
    # The inputs left as placed are not outputs; the one the command appended to is.
    assert set(files) == {"out.txt", "process_output.log", "rewritten.txt"}
    assert rescale.download(files["out.txt"]["id"]) == b"line one\nhello world\nzip-kept\n"
    assert rescale.download(files["rewritten.txt"]["id"]) == b"original\nchanged\n"
    assert files["rewritten.txt"]["typeId"] == 5
    assert rescale.download(rewritten["id"]) == b"original\n"  # the run had a copy, not the upload


def test_env_vars_belong_to_their_analysis(rescale: RescaleClient) -> None:
    body = {
        "name": "two analyses",
        "jobanalyses": [
            analysis(command='echo "first=$X" > out.txt', envVars={"X": "it's $HOME"}),
            {"command": 'echo "second=${X-unset}" >> out.txt'},
        ],
        "runs": [{"variables": {"X": 2}}],
    }
    created = rescale.post("/jobs/", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["jobanalyses"][1] == {"command": body["jobanalyses"][1]["command"]}
    job_id = created.json()["id"]
    assert rescale.post(f"/jobs/{job_id}/submit/").json() == {}
    rescale.wait_run_completed(job_id)
    out = next(entry for entry in rescale.all_files(job_id) if entry["relativePath"] == "out.txt")
    assert rescale.download(out["id"]) == b"first=it's $HOME\nsecond=2\n"


INTEGER_MIN = "Ensure this value is greater than or equal to 1."


@pytest.mark.parametrize(
    ("analysis_fields", "where", "message"),
    [
        ({"hardware": {**HARDWARE, "coresPerSlot": 0}}, ("hardware", "coresPerSlot"), INTEGER_MIN),
        ({"hardware": {**HARDWARE, "slots": "2"}}, ("hardware", "slots"), "A valid integer is required."),
        ({"hardware": {**HARDWARE, "slots": 0}}, ("hardware", "slots"), INTEGER_MIN),
        ({"hardware": {**HARDWARE, "walltime": 0}}, ("hardware", "walltime"), INTEGER_MIN),
        ({"hardware": {**HARDWARE, "walltime": 1.5}}, ("hardware", "walltime"), "A valid integer is required."),
        ({"hardware": {"coresPerSlot": 1}}, ("hardware", "coreType"), "This field is required."),
        ({"hardware": {"coreType": " ", "coresPerSlot": 1}}, ("hardware", "coreType"), "This field may not be blank."),
        ({"hardware": [1]}, ("hardware", "non_field_errors"), "Invalid data. Expected a dictionary, but got list."),
        ({"analysis": {"code": ""}}, ("analysis", "code"), "This field may not be blank."),
        ({"analysis": {"code": "user_included", "version": 1}}, ("analysis", "version"), "Not a valid string."),
        ({"envVars": {"A": 1}}, ("envVars", "A"), "Not a valid string."),
        ({"envVars": ["A"]}, ("envVars",), 'Expected a dictionary of items but got type "list".'),
        ({"useMpi": "yes"}, ("useMpi",), "Must be a valid boolean."),
    ],
)
def test_job_body_validation(
    rescale: RescaleClient, analysis_fields: dict[str, Any], where: tuple[str, ...], message: str
) -> None:
    body = {"name": "bad", "jobanalyses": [analysis(), analysis(**analysis_fields)]}
    errors: Any = [message]
    for key in reversed(where):
        errors = {key: errors}
    field = ".".join(key for key in where if key != "non_field_errors")
    assert refused(rescale, body) == {"detail": f"jobanalyses[1].{field}: {message}", "jobanalyses": [{}, errors]}
    assert rescale.get("/jobs/").json()["count"] == 0


def test_unknown_or_clashing_input_files_are_refused(rescale: RescaleClient) -> None:
    unknown = refused(rescale, {"name": "n", "jobanalyses": [analysis(inputFiles=[{"id": "nope42"}])]})
    message = 'Invalid pk "nope42" - object does not exist.'
    assert unknown == {
        "detail": f"jobanalyses[0].inputFiles[0].id: {message}",
        "jobanalyses": [{"inputFiles": [{"id": [message]}]}],
    }
    first, second = rescale.upload("same.txt", b"1"), rescale.upload("same.txt", b"2")
    clash = analysis(inputFiles=[{"id": first["id"]}, {"id": second["id"]}])
    assert "already named" in refused(rescale, {"name": "n", "jobanalyses": [clash]})["detail"]
    missing = refused(rescale, {"name": "n", "jobanalyses": [analysis(inputFiles=[{}])]})
    assert missing["jobanalyses"] == [{"inputFiles": [{"id": ["This field is required."]}]}]
    low = refused(rescale, {"name": "n", "jobanalyses": [analysis()], "isLowPriority": "no"})
    assert low == {"detail": "isLowPriority: Must be a valid boolean.", "isLowPriority": ["Must be a valid boolean."]}
    same_twice = analysis(inputFiles=[{"id": first["id"]}, {"id": first["id"]}])
    created = rescale.post("/jobs/", json={"name": "n", "jobanalyses": [same_twice]})
    assert created.status_code == 201 and created.json()["jobanalyses"][0]["inputFiles"] == [first]


def test_job_list_is_newest_first_and_searches_names(rescale: RescaleClient) -> None:
    ids = [rescale.create_job("true", name=name) for name in ("alpha-1", "Beta", "the ALPHA-2")]
    listed = rescale.get("/jobs/").json()
    assert listed["count"] == 3 and listed["next"] is None and listed["previous"] is None
    assert [job["id"] for job in listed["results"]] == ids[::-1]
    summary = listed["results"][0]
    assert set(summary) == SUMMARY_FIELDS
    assert summary["name"] == "the ALPHA-2" and summary["jobStatus"]["content"] == "Pending"
    assert summary["analysisNames"] == ["Custom User-Defined Software"] and summary["isVisible"] is True
    found = rescale.get("/jobs/", "/api", params={"search": "alpha", "page_size": 1}).json()
    assert found["count"] == 2 and [job["name"] for job in found["results"]] == ["the ALPHA-2"]
    assert parse_qs(urlsplit(found["next"]).query) == {"search": ["alpha"], "page": ["2"]}
    second = rescale.session.get(found["next"], params={"page_size": 1}, timeout=10).json()
    assert [job["name"] for job in second["results"]] == ["alpha-1"] and second["next"] is None
    assert rescale.get("/jobs/", params={"search": "gamma"}).json() == {
        "count": 0, "next": None, "previous": None, "results": [],
    }
    legacy = rescale.get(f"/jobs/{ids[0]}/").json()
    assert legacy["jobanalyses"] == [{"command": "true"}] and legacy["resourceFilters"] == []


def test_upload_and_job_stop_are_counted_under_their_routes(emulator: EmulatorServer) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {sorted(emulator.config.rescale_api_keys)[0]}"
    base = f"{emulator.rescale_url}/api/v2"
    upload = session.post(f"{base}/files/contents/", files={"file": ("in.txt", b"in")}, timeout=10)
    assert upload.status_code == 201, upload.text
    inputs = [{"id": upload.json()["id"]}]
    body = {"name": "stopped", "jobanalyses": [analysis(command="exec sleep 60", inputFiles=inputs)]}
    job_id = session.post(f"{base}/jobs/", json=body, timeout=10).json()["id"]
    assert session.post(f"{base}/jobs/{job_id}/submit/", timeout=10).json() == {}
    assert session.post(f"{base}/jobs/{job_id}/submit/", timeout=10).status_code == 400
    assert session.post(f"{base}/jobs/{job_id}/stop/", timeout=10).json() == {}
    assert session.get(f"{base}/jobs/", params={"page_size": 1}, timeout=10).json()["count"] == 1
    counters = session.get(f"{emulator.base_url}/_emulator/counters", timeout=10).json()
    requests_by_route = counters["requests"]
    assert requests_by_route["POST /api/v2/jobs/{job_id}/stop/"] == 1
    assert requests_by_route["POST /api/v2/jobs/{job_id}/submit/"] == 2
    assert requests_by_route["POST /api/v2/files/contents/"] == 1
    assert requests_by_route["GET /api/v2/jobs/"] == 1
    assert counters["rescale_job_stops"] == {job_id: 1} and counters["rescale_jobs_submitted"] == {job_id: 1}
    session.close()
