"""Integration tests of the Rescale side of the emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from urllib.parse import parse_qs, urlsplit

import requests
from emulator_client import wait_for
from rescale_client import RescaleClient

SUCCESS = "Completed successfully"


def test_auth_errors(rescale: RescaleClient) -> None:
    for version in ("/api", "/api/v2"):
        url = rescale.url("/jobs/nojob/runs/", version)
        missing = requests.get(url, timeout=5)
        assert missing.status_code == 401
        assert missing.json() == {"detail": "Authentication credentials were not provided."}
        wrong = requests.get(url, headers={"Authorization": "Token nope"}, timeout=5)
        assert wrong.status_code == 401
        assert wrong.json() == {"detail": "Invalid token."}
    assert rescale.get("/jobs/nojob/runs/").json() == {"detail": "Not found."}


def test_rejects_bad_job_bodies(rescale: RescaleClient) -> None:
    for body in (
        {"jobanalyses": [{"command": "true"}]},
        {"name": "n", "jobanalyses": []},
        {"name": "n", "jobanalyses": [{"command": "true"}], "runs": [{"variables": {"a b": 1}}]},
        {"name": "n", "jobanalyses": [{"command": "true"}], "runs": [{"variables": {"x": "one"}}]},
    ):
        answer = rescale.post("/jobs/", json=body)
        assert answer.status_code == 400 and "detail" in answer.json(), body
    bad_json = rescale.post("/jobs/", data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400


WRITER = (
    'echo "start x=$x run=$RESCALE_RUN_ID"; mkdir -p out/sub; '
    'printf "x=%s\\n" "$x" > out/sub/result.txt; head -c 3000 /dev/zero > out/zeros.bin; echo done'
)


def test_successful_job_runs_the_command_with_variables(rescale: RescaleClient) -> None:
    runs = [{"variables": {"x": 1.5}}, {"variables": {"x": 20}, "isOptimal": True}]
    job_id = rescale.create_job(WRITER, runs=runs)
    assert rescale.get(f"/jobs/{job_id}/", "/api").json()["jobanalyses"] == [{"command": WRITER}]
    before = rescale.run(job_id, "2")
    assert before["dateStarted"] is None and before["dateCompleted"] is None
    assert rescale.post(f"/jobs/{job_id}/submit/").json() == {}
    assert rescale.post(f"/jobs/{job_id}/submit/").status_code == 400
    assert rescale.counters.get("rescale_jobs_submitted", job_id) == 1

    run = rescale.wait_run_completed(job_id, "2")
    assert run["dateStarted"] and run["dateCompleted"].endswith("Z")
    assert run["id"] == "2" and run["displayOrder"] == 2 and run["isOptimal"] is True
    assert run["type"] == 3 and run["parent"] is None
    assert run["variables"] == [{"displayValue": "20", "isRelative": False, "name": "x", "value": 20.0}]
    files = {entry["relativePath"]: entry for entry in rescale.all_files(job_id, "2")}
    assert set(files) == {"out/sub/result.txt", "out/zeros.bin", "process_output.log"}
    assert run["outputFileCount"] == 3
    assert run["outputFileSize"] == sum(entry["decryptedSize"] for entry in files.values())
    result = files["out/sub/result.txt"]
    assert result["path"].endswith(f"/output/job_{job_id}/run2/out/sub/result.txt")
    assert result["name"] == "result.txt" and result["typeId"] == 5 and result["isUploaded"] is True
    for entry in files.values():
        content = rescale.download(entry["id"], "/api")
        assert hashlib.md5(content).hexdigest() == entry["md5"]
        assert len(content) == entry["decryptedSize"]
    assert rescale.download(files["process_output.log"]["id"]) == b"start x=20 run=2\ndone\n"
    assert rescale.download(files["out/sub/result.txt"]["id"]) == b"x=20\n"
    log_url = f"/files/{files['process_output.log']['id']}/contents/"
    partial = rescale.get(log_url, headers={"Range": "bytes=0-4"})
    assert partial.status_code == 206 and partial.content == b"start"
    assert 'filename="process_output.log"' in partial.headers["Content-Disposition"]

    rescale.wait_run_completed(job_id, "1")
    statuses = rescale.wait_job_completed(job_id)
    names = [entry["status"] for entry in statuses]
    assert names == ["Pending", "Queued", "Started", "Validated", "Executing", "Completed"]
    assert statuses[-1]["statusReason"] == SUCCESS
    raw = rescale.get(f"/jobs/{job_id}/statuses/", "/api").json()["results"]
    dates = [entry["statusDate"] for entry in raw]
    assert dates != sorted(dates) and dates != sorted(dates, reverse=True)


def test_runs_pagination_drops_page_size(rescale: RescaleClient) -> None:
    job_id = rescale.create_job("true", runs=[{"variables": {"i": i}} for i in range(10)])
    runs_path = f"/jobs/{job_id}/runs/"
    first = rescale.get(runs_path, params={"page_size": 3}).json()
    assert first["count"] == 10 and first["previous"] is None
    assert [run["id"] for run in first["results"]] == ["1", "2", "3"]
    assert parse_qs(urlsplit(first["next"]).query) == {"page": ["2"]}
    seen, url, pages = [], rescale.url(runs_path), 0
    while url:
        body = rescale.session.get(url, params={"page_size": 3}, timeout=5).json()
        seen += [run["displayOrder"] for run in body["results"]]
        url, pages = body["next"], pages + 1
    assert pages == 4 and seen == list(range(1, 11))
    last = rescale.get(runs_path, params={"page": 4, "page_size": 3}).json()
    assert parse_qs(urlsplit(last["previous"]).query) == {"page": ["3"]}
    assert rescale.get(runs_path, params={"page": 2}).status_code == 404  # 25 per page by default
    beyond = rescale.get(runs_path, params={"page": 5, "page_size": 3})
    assert beyond.status_code == 404 and beyond.json() == {"detail": "Invalid page."}


LIVE = (
    "for i in 1 2 3 4 5; do echo line $i; done > data.txt; ln -s /etc/passwd leak; "
    "echo ready > ready.flag; echo started; exec sleep 60"
)


def test_live_run_tail_snapshot_and_stop(rescale: RescaleClient) -> None:
    job_id = rescale.start_job(LIVE)
    run_path = f"/jobs/{job_id}/runs/1"

    def ready() -> bool:
        """Tell whether the run has written its ready flag."""
        answer = rescale.get(f"{run_path}/directory-contents/")  # 400 until the run starts
        return answer.ok and any(entry["path"] == "ready.flag" for entry in answer.json())

    wait_for(ready)
    listing = rescale.get(f"{run_path}/directory-contents/", "/api").json()
    assert [entry["path"] for entry in listing] == ["data.txt", "process_output.log", "ready.flag"]
    assert listing[0]["resource"] == f"/api/jobs/{job_id}/runs/1/tail/data.txt"
    assert rescale.all_files(job_id) == []  # outputs are uploaded when the run completes

    tail_url = f"{rescale.base_url}{listing[0]['resource']}"
    tailed = rescale.session.get(tail_url, params={"lines": 2}, timeout=5).json()
    assert tailed == {
        "fileType": f"/home/job_{job_id}/work/data.txt: ASCII text",
        "lines": ["line 4", "line 5"],
    }
    raw = rescale.get(f"{run_path}/tail/data.txt/")
    assert raw.content == b"line 1\nline 2\nline 3\nline 4\nline 5\n"
    assert raw.headers["Content-Length"] == str(len(raw.content))
    assert rescale.get(f"{run_path}/tail/missing.txt/", params={"lines": 1}).status_code == 404
    for escape in ("..%2F..%2F..%2F..%2Fetc%2Fpasswd", "leak"):
        assert rescale.get(f"{run_path}/tail/{escape}", params={"lines": 1}).status_code == 400

    first = rescale.post(f"{run_path}/snapshot/").json()
    assert first == {"data": "", "exitcode": 0, "lastSnapshotID": None, "reason": "Generating snapshot."}
    snapshot = wait_for(lambda: rescale.all_files(job_id))[0]
    assert snapshot["relativePath"] == f"snapshots/snapshot-{snapshot['id']}.zip"
    archive = zipfile.ZipFile(io.BytesIO(rescale.download(snapshot["id"])))
    assert archive.read("data.txt").startswith(b"line 1\n") and "leak" not in archive.namelist()
    assert rescale.post(f"{run_path}/snapshot/").json()["lastSnapshotID"] == snapshot["id"]

    started = time.monotonic()
    assert rescale.post(f"{run_path}/stop/").json() == {}
    run = rescale.wait_run_completed(job_id)
    assert time.monotonic() - started < 5  # killed, not waited for
    assert rescale.post(f"{run_path}/stop/").json() == {}
    assert rescale.counters.get("rescale_stops", f"{job_id}/1") == 2
    files = {entry["relativePath"] for entry in rescale.all_files(job_id)}
    assert {"data.txt", "ready.flag", "process_output.log"} <= files and "leak" not in files
    assert sum(name.startswith("snapshots/") for name in files) == 2
    assert run["outputFileCount"] == len(files)
    assert rescale.post(f"{run_path}/snapshot/").status_code == 400
    for path in ("/directory-contents/", "/tail/data.txt/"):
        answer = rescale.get(f"{run_path}{path}")
        assert answer.status_code == 400 and answer.json() == {"detail": "This run is not in progress."}
    statuses = rescale.wait_job_completed(job_id)
    assert [entry["status"] for entry in statuses][-2:] == ["Stopping", "Completed"]
    assert statuses[-2]["statusReason"] == "User requested stop"
    assert statuses[-1]["statusReason"] != SUCCESS


def test_failed_run_gives_a_failure_reason(rescale: RescaleClient) -> None:
    job_id = rescale.start_job("echo oops; exit 3")
    rescale.wait_run_completed(job_id)
    assert rescale.wait_job_completed(job_id)[-1]["statusReason"] == "Run 1 failed with exit code 3"


def test_forced_reason_and_job_stop(rescale: RescaleClient) -> None:
    reason = "Could not allocate compute resources from the compute provider"
    forced = rescale.start_job("true", emulator={"completedReason": reason})
    stopped = rescale.start_job("exec sleep 60", runs=[{}, {}])
    wait_for(lambda: rescale.run(stopped, "2")["dateStarted"])
    assert rescale.post(f"/jobs/{stopped}/stop/", "/api").json() == {}
    assert rescale.wait_job_completed(forced)[-1]["statusReason"] == reason
    stop_statuses = rescale.wait_job_completed(stopped)
    assert [entry["status"] for entry in stop_statuses][-2:] == ["Stopping", "Completed"]
    assert stop_statuses[-1]["statusReason"] == "Stopped by user"
    never_started = rescale.run(forced)
    assert never_started["dateStarted"] is None and never_started["dateCompleted"]
    assert all(rescale.run(stopped, run_id)["dateCompleted"] for run_id in ("1", "2"))


MANY = (
    "mkdir many; for i in $(seq 1 1200); do echo $i > many/f$i.txt; done; "
    "head -c 30000000 /dev/urandom > big.bin"
)


def test_many_files_list_fast_and_large_download_is_checked(rescale: RescaleClient) -> None:
    first, second = rescale.start_job(MANY), rescale.start_job("echo hello > a.txt")
    rescale.wait_run_completed(first)
    rescale.wait_run_completed(second)
    started = time.monotonic()
    files = rescale.all_files(first, page_size=500)
    assert time.monotonic() - started < 2 and len(files) == 1202
    ids = [entry["id"] for entry in files + rescale.all_files(second)]
    assert len(set(ids)) == len(ids)
    big = next(entry for entry in files if entry["relativePath"] == "big.bin")
    digest = hashlib.md5()
    with rescale.session.get(rescale.url(f"/files/{big['id']}/contents/"), stream=True, timeout=10) as answer:
        assert answer.headers["Content-Length"] == "30000000"
        for chunk in answer.iter_content(1024 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == big["md5"] and big["decryptedSize"] == 30_000_000
