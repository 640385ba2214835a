"""
The Muse side of the emulator over real HTTP: every example of the reference pages, and the errors.

Each test runs against its own emulator (``emulator`` fixture) with plain ``requests``, and checks
the answers against the texts and shapes the reference pages show, values computed for real:
``python /add.py 4 5`` gives ``9.0``, the example ``stdin.txt`` gives ``70.0``.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import requests

from hpc_emulator import DEMO_PASSWORD, EmulatorConfig, EmulatorServer, MuseUser
from hpc_emulator.muse import parse_walltime

from emulator_client import EXAMPLE_DIR, SOFTWARE, MuseClient, key_of, wait_for

# The reference pages' own texts, with the host and keys they were recorded with.
REF_BASE = "http://147.100.179.250/api/"
REF_KEY_A = "58ae6cea-df31-4059-9466-b817c337985d"
REF_SUBMIT_MSG_A = (
    "GET http://147.100.179.250/api/software/muse/state/sw_example/58ae6cea-df31-4059-9466-b817c337985d/ "
    "request to get cluster job state, while waiting for results (the GET "
    "http://147.100.179.250/api/software/muse/run/sw_example/58ae6cea-df31-4059-9466-b817c337985d/ request "
    "to get results will be possible once job finished). Keep the software name value=sw_example and the "
    "key value=58ae6cea-df31-4059-9466-b817c337985d in order to be able to follow your POST request. "
    "Notifications will be sent during process running if mail-user given into sbatch_list option. "
    "(__todo__: add information about temps imparti...)"
)
REF_STATE_OK_MSG_A = (
    "End of job. You can now get results by GET "
    "http://147.100.179.250/api/software/muse/run/sw_example/58ae6cea-df31-4059-9466-b817c337985d/ request "
    "or ask for content (to investigate) by GET "
    "http://147.100.179.250/api/software/muse/content/sw_example/58ae6cea-df31-4059-9466-b817c337985d/ request."
)
REF_DOWNLOAD_KEY_D = "20210119_130603_a20ce46e-849e-4674-ab2d-b3927a758024"
REF_DOWNLOAD_MSG_D = (
    "The response content can be downloaded at : "
    "http://147.100.179.250/api/download/?key=20210119_130603_a20ce46e-849e-4674-ab2d-b3927a758024 *** The "
    "resource to download the response content is 'GET download' with 'key' option (key value : "
    "20210119_130603_a20ce46e-849e-4674-ab2d-b3927a758024) *** Keep this key value in order to be able to "
    "download the response content later on : key=20210119_130603_a20ce46e-849e-4674-ab2d-b3927a758024"
)
DOWNLOAD_KEY = re.compile(r"^\d{8}_\d{6}_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
JOBNAME = re.compile(rf"^\d+-ws-{SOFTWARE}$")
ERROR_KEYS = {"error", "more", "type"}


def as_reference(text: str, muse: MuseClient, key: str, ref_key: str = REF_KEY_A) -> str:
    """Return a reference text with its host and key replaced by this emulator's and this run's."""
    return text.replace(REF_BASE, muse.base).replace(ref_key, key)


def request_echo(
    cmd: str, returned_type: str = "stdout", todownload: bool = False, files: list[str] | None = None
) -> dict[str, Any]:
    """Return ``report.request`` as the reference examples show it for a cluster run."""
    return {
        "cmd": cmd,
        "cmd_option": "",
        "ordered_filename_list": files or [],
        "returned_type": returned_type,
        "todownload": todownload,
        "sbatch_list": [],
        "module_list": [],
    }


def check_report(report: dict[str, Any], request: dict[str, Any], state: str = "COMPLETED") -> None:
    """Check a cluster report field by field against the reference examples' shape."""
    assert list(report) == ["request", "rsrc", "process", "name", "cr"]
    assert report["request"] == request
    assert report["rsrc"] == {"identity": "muse"}
    process = report["process"]
    assert set(process) == {"jobname", "job_id", "latest_cr", "latest_state"}
    assert JOBNAME.match(process["jobname"]) and isinstance(process["job_id"], int)
    cr = {"COMPLETED": "OK", "PENDING": "WAIT", "RUNNING": "WAIT"}.get(state, "NOK")
    assert process["latest_state"] == state
    assert process["latest_cr"] == {"OK": "ENDED_OK", "WAIT": "IN_PROGRESS", "NOK": "ENDED_NOK"}[cr]
    assert report["name"] == SOFTWARE and report["cr"] == cr


def check_submitted(muse: MuseClient, answer: dict[str, Any]) -> str:
    """Check a submission answer word for word against example A's; return the key."""
    key = key_of(answer)
    assert UUID4.match(key)
    assert set(answer) <= {"msg", "url", "urls"}
    assert answer["url"] == f"{muse.base}software/muse/state/{SOFTWARE}/{key}/"
    assert answer["msg"] == as_reference(REF_SUBMIT_MSG_A, muse, key)
    return key


def wait_ok(muse: MuseClient, key: str, request: dict[str, Any]) -> dict[str, Any]:
    """Wait for a run to end well; check the state answer as example A shows it; return it."""
    state = muse.wait_ended(key)
    check_report(state["info"]["report"], request)
    assert list(state) == ["info", "msg", "url"] and list(state["info"]) == ["report"]
    assert state["msg"] == as_reference(REF_STATE_OK_MSG_A, muse, key)
    assert state["url"] == f"{muse.base}software/muse/run/{SOFTWARE}/{key}/"
    return state


def check_error(answer: requests.Response, status: int, error_type: str) -> dict[str, Any]:
    """Check an answer has the documented error shape; return its body."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == ERROR_KEYS, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["more"], list) and body["type"] == error_type
    return body


def example_file(name: str) -> tuple[str, bytes]:
    """Return a file of sw_example (stdin.txt, usrcmd.sh) as a multipart part."""
    return name, (EXAMPLE_DIR / name).read_bytes()


# ---------------------------------------------------------------------------------------- tokens


def test_jwt_obtain_and_verify(muse: MuseClient) -> None:
    obtained = muse.post("jwt/obtain/", data={"username": "demo", "password": DEMO_PASSWORD})
    assert obtained.status_code == 200 and list(obtained.json()) == ["token"]
    token = obtained.json()["token"]
    as_json = muse.post("jwt/obtain/", json={"username": "demo", "password": DEMO_PASSWORD})
    assert as_json.status_code == 200 and as_json.json()["token"]

    verified = muse.post("jwt/verify/", data={"jwt": token}).json()
    assert verified["valid"] is True and verified["username"] == "demo" and verified["level"] == "user"
    assert muse.post("jwt/verify/", json={"jwt": token}).json()["valid"] is True
    forged = muse.post("jwt/verify/", data={"jwt": token[:-4] + "AAAA"}).json()
    assert forged["valid"] is False and "Invalid token" in forged["error"]
    check_error(muse.post("jwt/verify/", data={}), 400, "ValidationError")

    refused = check_error(
        muse.post("jwt/obtain/", data={"username": "demo", "password": "nope"}), 401, "AuthenticationFailed"
    )
    assert refused["error"] == "Unable to log in with provided credentials."
    check_error(muse.post("jwt/obtain/", data={"username": "demo"}), 400, "ValidationError")


def test_missing_invalid_expired_and_low_level_tokens(emulator_config: EmulatorConfig) -> None:
    users = {"demo": MuseUser(DEMO_PASSWORD), "guest": MuseUser("guest", "visitor")}
    config = replace(emulator_config, token_lifetime=0.3, muse_users=users)
    with EmulatorServer(config) as server:
        muse = MuseClient(server)
        run_path = f"software/muse/run/{SOFTWARE}/"
        params = {"cmd": "python /add.py 4 5"}
        missing = check_error(muse.post(run_path, json=params), 401, "NotAuthenticated")
        assert "jwt" in missing["error"]
        check_error(muse.post(run_path, json={**params, "jwt": "not-a-token"}), 401, "AuthenticationFailed")

        token = muse.token()
        guest = muse.post("jwt/obtain/", data={"username": "guest", "password": "guest"}).json()["token"]
        check_error(muse.post(run_path, json={**params, "jwt": guest}), 403, "PermissionDenied")
        check_error(muse.post(f"software/run/{SOFTWARE}/", json={**params, "jwt": guest}), 403, "PermissionDenied")

        wait_for(lambda: muse.post("jwt/verify/", data={"jwt": token}).json()["valid"] is False)
        expired = check_error(muse.post(run_path, json={**params, "jwt": token}), 401, "AuthenticationFailed")
        assert "expired" in expired["error"]
        assert "expired" in muse.post("jwt/verify/", data={"jwt": token}).json()["error"]
        assert muse.counters().get("muse_submissions", {}) == {}
        muse.session.close()


# ------------------------------------------------------------------------------------ examples


def test_example_a_json_stdout(muse: MuseClient) -> None:
    answer = muse.submit_json(cmd="python /add.py 4 5", returned_type="stdout", todownload="no")
    key = check_submitted(muse, answer)
    request = request_echo("python /add.py 4 5")
    state = wait_ok(muse, key, request)
    # A fresh emulator numbers its first job as the reference's example A.
    assert state["info"]["report"]["process"]["jobname"] == "114-ws-sw_example"
    assert state["info"]["report"]["process"]["job_id"] == 2459394

    result = muse.result(key)
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    body = result.json()
    assert list(body) == ["info"] and list(body["info"]) == ["stdout", "report"]
    assert body["info"]["stdout"] == "9.0"
    assert body["info"]["report"] == state["info"]["report"]

    counts = muse.counters()
    assert counts["requests"]["POST /api/software/muse/run/{name}/"] == 1
    assert counts["requests"]["GET /api/software/muse/run/{name}/{key}/"] == 1
    assert counts["muse_submissions"] == {"": 1, "python /add.py 4 5": 1}
    assert counts["muse_jobs"] == {"COMPLETED": 1}


def test_example_b_run_zip(muse: MuseClient) -> None:
    key = check_submitted(muse, muse.submit_json(cmd="python /add.py 4 55", returned_type="run.zip", todownload="no"))
    wait_ok(muse, key, request_echo("python /add.py 4 55", "run.zip"))
    result = muse.result(key)
    assert result.status_code == 200 and result.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(result.content))
    assert {"__WS__stdout.txt", "__WS__stderr.txt"} <= set(archive.namelist())
    assert archive.read("__WS__stdout.txt") == b"59.0\n"
    assert archive.read("__WS__stderr.txt") == b""
    assert muse.result(key).content == result.content  # the result does not change once made


def test_example_c_form_urlencoded_stdout_txt(muse: MuseClient) -> None:
    form = {"cmd": "python /add.py 4 55", "returned_type": "stdout.txt", "todownload": "no", "jwt": muse.token()}
    submitted = muse.post(f"software/muse/run/{SOFTWARE}/", data=form)
    assert submitted.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    key = check_submitted(muse, submitted.json())
    wait_ok(muse, key, request_echo("python /add.py 4 55", "stdout.txt"))
    result = muse.result(key)
    assert result.status_code == 200 and result.headers["content-type"].startswith("text/plain")
    assert result.content == b"59.0\n"


def test_example_d_todownload_gives_a_download_key(muse: MuseClient) -> None:
    key = check_submitted(muse, muse.submit_json(cmd="python /add.py 4 55", returned_type="run.zip", todownload="yes"))
    wait_ok(muse, key, request_echo("python /add.py 4 55", "run.zip", todownload=True))

    body = muse.result(key).json()
    assert list(body) == ["msg", "url"]
    download_key = body["url"].rsplit("key=", 1)[-1]
    assert DOWNLOAD_KEY.match(download_key)
    assert body["url"] == f"{muse.base}download/?key={download_key}"
    assert body["msg"] == as_reference(REF_DOWNLOAD_MSG_D, muse, download_key, REF_DOWNLOAD_KEY_D)
    assert muse.result(key).json() == body  # asked again: the same key, still valid

    downloaded = requests.get(body["url"], timeout=10)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(downloaded.content))
    assert archive.read("__WS__stdout.txt") == b"59.0\n" and "__WS__stderr.txt" in archive.namelist()


def test_todownload_stdout_txt_and_download_errors(muse: MuseClient) -> None:
    key = key_of(muse.submit_json(cmd="python /add.py 1 2", returned_type="stdout.txt", todownload="yes"))
    wait_ok(muse, key, request_echo("python /add.py 1 2", "stdout.txt", todownload=True))
    url = muse.result(key).json()["url"]
    downloaded = requests.get(url, timeout=10)
    assert downloaded.status_code == 200 and downloaded.content == b"3.0\n"
    assert downloaded.headers["content-type"].startswith("text/plain")

    check_error(muse.get("download/"), 400, "ValidationError")
    check_error(muse.get("download/", params={"key": REF_DOWNLOAD_KEY_D}), 404, "NotFound")
    check_error(muse.get("download/", params={"key": "../../etc/passwd"}), 404, "NotFound")
    # stdout results are always the JSON answer: todownload applies to files only.
    stdout_key = key_of(muse.submit_json(cmd="python /add.py 2 2", todownload="yes"))
    muse.wait_ended(stdout_key)
    assert muse.result(stdout_key).json()["info"]["stdout"] == "4.0"


def test_example_e_multipart_stdin_gives_70(muse: MuseClient) -> None:
    form = {"cmd": "python /add.py", "returned_type": "stdout", "todownload": "no", "jwt": muse.token()}
    submitted = muse.post(f"software/muse/run/{SOFTWARE}/", data=form, files=[("file", example_file("stdin.txt"))])
    assert submitted.request.headers["Content-Type"].startswith("multipart/form-data")
    key = check_submitted(muse, submitted.json())
    request = request_echo("python /add.py", files=["stdin.txt"])
    wait_ok(muse, key, request)
    body = muse.result(key).json()
    assert body["info"]["stdout"] == "70.0"
    check_report(body["info"]["report"], request)


def test_example_f_files_order_and_script_give_70(muse: MuseClient) -> None:
    form = {
        "cmd": "usrcmd.sh",
        "returned_type": "stdout",
        "todownload": "no",
        "files_order": '["stdin.txt","usrcmd.sh"]',
        "jwt": muse.token(),
    }
    files = [("file", example_file("usrcmd.sh")), ("file", example_file("stdin.txt"))]
    key = check_submitted(muse, muse.post(f"software/muse/run/{SOFTWARE}/", data=form, files=files).json())
    request = request_echo("usrcmd.sh", files=["stdin.txt", "usrcmd.sh"])
    wait_ok(muse, key, request)
    body = muse.result(key).json()
    assert body["info"]["stdout"] == "70.0"
    check_report(body["info"]["report"], request)

    content = muse.get(f"software/muse/content/{SOFTWARE}/{key}/")
    assert content.status_code == 200 and content.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(content.content))
    assert set(archive.namelist()) == {"stdin.txt", "usrcmd.sh", "__WS__stdout.txt", "__WS__stderr.txt"}
    assert archive.read("stdin.txt") == (EXAMPLE_DIR / "stdin.txt").read_bytes()
    assert archive.read("__WS__stdout.txt") == b"70.0\n"


def test_uploaded_zip_is_unzipped_and_files_order_is_checked(muse: MuseClient) -> None:
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("numbers/stdin.txt", "1 2 3\n")
    form = {"cmd": "python /add.py 1 2 3 4", "jwt": muse.token()}
    files = [("file", ("in.zip", bundle.getvalue()))]
    key = key_of(muse.post(f"software/muse/run/{SOFTWARE}/", data=form, files=files).json())
    assert muse.wait_ended(key)["info"]["report"]["request"]["ordered_filename_list"] == ["in.zip"]
    content = zipfile.ZipFile(io.BytesIO(muse.get(f"software/muse/content/{SOFTWARE}/{key}/").content))
    assert content.read("numbers/stdin.txt") == b"1 2 3\n"

    unsafe = io.BytesIO()
    with zipfile.ZipFile(unsafe, "w") as archive:
        archive.writestr("../escape.txt", "no")
    refused = muse.post(f"software/muse/run/{SOFTWARE}/", data=form, files=[("file", ("bad.zip", unsafe.getvalue()))])
    check_error(refused, 400, "ValidationError")
    order = {**form, "files_order": '["missing.txt"]'}
    missing = muse.post(f"software/muse/run/{SOFTWARE}/", data=order, files=[("file", example_file("stdin.txt"))])
    check_error(missing, 400, "ValidationError")
    assert muse.counters()["muse_submissions"][""] == 1


# --------------------------------------------------------------------------- states and errors


def test_results_asked_too_early_and_cancel(muse: MuseClient) -> None:
    key = key_of(muse.submit_json(cmd="sleep 30"))
    state = muse.state(key)
    check_report(state["info"]["report"], request_echo("sleep 30"), state["info"]["report"]["process"]["latest_state"])
    assert state["info"]["report"]["cr"] == "WAIT"
    assert state["url"] == f"{muse.base}software/muse/state/{SOFTWARE}/{key}/"

    early = check_error(muse.result(key), 200, "NotReady")
    assert "cr is 'WAIT'" in early["error"]
    wait_for(lambda: muse.state(key)["info"]["report"]["process"]["latest_state"] == "RUNNING")
    check_error(muse.result(key), 200, "NotReady")

    # The real API has no cancel: the emulator's admin side stands for scancel.
    pid = next(job["pid"] for job in muse.jobs() if job["key"] == key)
    cancelled = muse.session.post(f"{muse.admin}muse/cancel/{key}", timeout=10).json()
    assert cancelled == {"key": key, "latest_state": "CANCELLED", "cr": "NOK"}
    check_report(muse.state(key)["info"]["report"], request_echo("sleep 30"), "CANCELLED")
    check_error(muse.result(key), 200, "JobEndedNOK")
    wait_for(lambda: not pid_alive(pid))


def test_failed_run_is_nok_with_its_stderr(muse: MuseClient) -> None:
    key = key_of(muse.submit_json(cmd="python /add.py 4 x"))
    state = muse.wait_ended(key)
    check_report(state["info"]["report"], request_echo("python /add.py 4 x"), "FAILED")
    assert state["url"] == f"{muse.base}software/muse/content/{SOFTWARE}/{key}/"
    assert f"GET {muse.base}software/muse/content/{SOFTWARE}/{key}/" in state["msg"]
    failed = check_error(muse.result(key), 200, "JobEndedNOK")
    assert "cr is 'NOK'" in failed["error"]
    archive = zipfile.ZipFile(io.BytesIO(muse.get(f"software/muse/content/{SOFTWARE}/{key}/").content))
    assert b"'x' is not a number" in archive.read("__WS__stderr.txt")
    assert muse.counters()["muse_jobs"] == {"FAILED": 1}


def test_wall_time_of_sbatch_list_ends_in_timeout(muse: MuseClient) -> None:
    started = time.monotonic()
    key = key_of(muse.submit_json(cmd="echo begun; sleep 30", sbatch_list=["--time=0:1"]))
    state = muse.wait_ended(key)
    assert time.monotonic() - started < 5
    request = {**request_echo("echo begun; sleep 30"), "sbatch_list": ["--time=0:1"]}
    check_report(state["info"]["report"], request, "TIMEOUT")
    check_error(muse.result(key), 200, "JobEndedNOK")
    archive = zipfile.ZipFile(io.BytesIO(muse.get(f"software/muse/content/{SOFTWARE}/{key}/").content))
    assert archive.read("__WS__stdout.txt") == b"begun\n"
    stderr = archive.read("__WS__stderr.txt")
    assert b"CANCELLED AT" in stderr and b"DUE TO TIME LIMIT" in stderr
    pid = next(job["pid"] for job in muse.jobs() if job["key"] == key)
    wait_for(lambda: not pid_alive(pid))


def test_sbatch_time_formats() -> None:
    assert parse_walltime([]) is None
    assert parse_walltime(["--time=2"]) == 120
    assert parse_walltime(["-t", "1:30"]) == 90
    assert parse_walltime(["time=01:00:05"]) == 3605
    assert parse_walltime(["--time=1-2"]) == 93600
    assert parse_walltime(["--time=0"]) is None  # sbatch: zero means no limit
    assert parse_walltime(["--time=UNLIMITED"]) is None


def test_bad_requests_answer_the_error_shape(muse: MuseClient) -> None:
    token = muse.token()
    run_path = f"software/muse/run/{SOFTWARE}/"
    unknown = check_error(muse.post("software/muse/run/nosuch/", json={"cmd": "x", "jwt": token}), 404, "NotFound")
    assert SOFTWARE in unknown["more"][0]
    check_error(muse.post(run_path, json={"cmd": "x", "returned_type": "pdf", "jwt": token}), 400, "ValidationError")
    check_error(muse.post(run_path, json={"cmd": "x", "todownload": "maybe", "jwt": token}), 400, "ValidationError")
    bad_time = {"cmd": "x", "sbatch_list": ["--time=soon"], "jwt": token}
    check_error(muse.post(run_path, json=bad_time), 400, "ValidationError")
    check_error(muse.post(run_path, data=b"{not json", headers={"Content-Type": "application/json"}), 400, "ParseError")
    check_error(muse.post(run_path, data=b"x", headers={"Content-Type": "text/plain"}), 400, "UnsupportedMediaType")
    check_error(muse.get(f"software/muse/state/{SOFTWARE}/58ae6cea-df31-4059-9466-b817c337985d/"), 404, "NotFound")
    check_error(muse.get(f"software/muse/run/{SOFTWARE}/no-such-key/"), 404, "NotFound")
    check_error(muse.get(f"software/muse/content/{SOFTWARE}/no-such-key/"), 404, "NotFound")
    key = key_of(muse.submit_json(cmd="python /add.py 1"))
    check_error(muse.get(f"software/muse/state/other_sw/{key}/"), 404, "NotFound")
    # No redirect hides a path without its trailing '/'.
    assert muse.get(f"software/muse/state/{SOFTWARE}/{key}", allow_redirects=False).status_code == 404
    empty = key_of(muse.submit_json(cmd=""))
    assert muse.wait_ended(empty)["info"]["report"]["cr"] == "NOK"


# ------------------------------------------------------------------------------- off-cluster


def test_off_cluster_run_answers_directly(muse: MuseClient) -> None:
    token = muse.token()
    path = f"software/run/{SOFTWARE}/"
    body = muse.post(path, json={"cmd": "python /add.py 4 5", "jwt": token}).json()
    assert body == {
        "info": {
            "stdout": "9.0",
            "report": {
                "name": SOFTWARE,
                "request": {
                    "cmd": "python /add.py 4 5",
                    "cmd_option": "",
                    "ordered_filename_list": [],
                    "returned_type": "stdout",
                    "todownload": False,
                },
                "cr": "OK",
            },
        }
    }
    form = {"cmd": "python /add.py", "returned_type": "stdout.txt", "jwt": token}
    text = muse.post(path, data=form, files=[("file", example_file("stdin.txt"))])
    assert text.status_code == 200 and text.content == b"70.0\n"
    zipped = muse.post(path, json={"cmd": "python /add.py 4 5", "returned_type": "run.zip", "jwt": token})
    assert zipfile.ZipFile(io.BytesIO(zipped.content)).read("__WS__stdout.txt") == b"9.0\n"
    params = {"cmd": "python /add.py 1 1", "returned_type": "run.zip", "todownload": "yes", "jwt": token}
    kept = muse.post(path, json=params).json()
    assert list(kept) == ["msg", "url"]
    archive = zipfile.ZipFile(io.BytesIO(requests.get(kept["url"], timeout=10).content))
    assert archive.read("__WS__stdout.txt") == b"2.0\n"

    failed = check_error(muse.post(path, json={"cmd": "python /add.py 4 x", "jwt": token}), 200, "RunFailed")
    assert any("'x' is not a number" in line for line in failed["more"])
    counts = muse.counters()
    assert counts["requests"]["POST /api/software/run/{name}/"] == 5
    assert "muse_submissions" not in counts  # nothing went to the cluster


def pid_alive(pid: int) -> bool:
    """Return whether a process (not a zombie) with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("encoding", ["json", "form"])
def test_list_parameters_accept_json_lists(muse: MuseClient, encoding: str) -> None:
    params: dict[str, Any] = {
        "cmd": "python /add.py 1",
        "sbatch_list": ["--time=5", "--mail-user=a@b.c"],
        "module_list": ["gcc"],
    }
    token = muse.token()
    if encoding == "json":
        answer = muse.post(f"software/muse/run/{SOFTWARE}/", json={**params, "jwt": token})
    else:
        form = {key: json.dumps(value) if isinstance(value, list) else value for key, value in params.items()}
        answer = muse.post(f"software/muse/run/{SOFTWARE}/", data={**form, "jwt": token})
    request = muse.state(key_of(answer.json()))["info"]["report"]["request"]
    assert request["sbatch_list"] == ["--time=5", "--mail-user=a@b.c"] and request["module_list"] == ["gcc"]


def test_results_asked_together_are_made_once(muse: MuseClient) -> None:
    cmd = "head -c 2000000 /dev/urandom > big.bin; python /add.py 1"
    zipped = key_of(muse.submit_json(cmd=cmd, returned_type="run.zip"))
    kept = key_of(muse.submit_json(cmd=cmd, returned_type="run.zip", todownload="yes"))
    muse.wait_ended(zipped)
    muse.wait_ended(kept)

    def fetch(key: str) -> requests.Response:
        """GET a result with a session of its own."""
        with requests.Session() as session:
            return session.get(f"{muse.base}software/muse/run/{SOFTWARE}/{key}/", timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        archives = list(pool.map(fetch, [zipped] * 8))
        links = list(pool.map(fetch, [kept] * 8))
    assert all(answer.status_code == 200 for answer in archives + links)
    assert len({answer.content for answer in archives}) == 1
    assert zipfile.ZipFile(io.BytesIO(archives[0].content)).testzip() is None
    assert len({answer.json()["url"] for answer in links}) == 1


def test_zips_keep_symbolic_links_as_links(muse: MuseClient) -> None:
    cmd = "ln -s /etc/hostname outside; ln -s nowhere dangling; mkdir d; ln -s d dirlink; python /add.py 1"
    key = key_of(muse.submit_json(cmd=cmd, returned_type="run.zip"))
    assert muse.wait_ended(key)["info"]["report"]["cr"] == "OK"
    for answer in (muse.result(key), muse.get(f"software/muse/content/{SOFTWARE}/{key}/")):
        assert answer.status_code == 200
        archive = zipfile.ZipFile(io.BytesIO(answer.content))
        links = {info.filename: archive.read(info) for info in archive.infolist() if info.external_attr >> 28 == 0xA}
        # The link's target path, never the host file it points at.
        assert links == {"outside": b"/etc/hostname", "dangling": b"nowhere", "dirlink": b"d"}
