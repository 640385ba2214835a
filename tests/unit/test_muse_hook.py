"""MuseHook against the answers of the Muse reference pages (``shared/api/muse/*.rst``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import requests_mock as rm
from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, InvalidIdentifierError, MuseApiError
from airflow_provider_hpc.hooks.muse import MuseCr, MuseHook, MuseReport

API = "http://muse.test/api/"
KEY_A = "58ae6cea-df31-4059-9466-b817c337985d"
KEY_D = "d0a61955-bd83-4656-9444-6568af141b7a"
DOWNLOAD_KEY = "20210119_130603_a20ce46e-849e-4674-ab2d-b3927a758024"
SUBMIT_URL = API + "software/muse/run/sw_example/"
STATE_URL = API + f"software/muse/state/sw_example/{KEY_A}/"
RESULT_URL = API + f"software/muse/run/sw_example/{KEY_A}/"
OBTAIN_URL = API + "jwt/obtain/"

# Example A, step 1 (the page's answer, with its "urls" object).
SUBMIT_ANSWER_A = {
    "msg": (
        f"GET http://147.100.179.250/api/software/muse/state/sw_example/{KEY_A}/ request to get cluster job "
        f"state, while waiting for results (the GET http://147.100.179.250/api/software/muse/run/sw_example/{KEY_A}/ "
        "request to get results will be possible once job finished). Keep the software name value=sw_example "
        f"and the key value={KEY_A} in order to be able to follow your POST request."
    ),
    "url": f"http://147.100.179.250/api/software/muse/state/sw_example/{KEY_A}/",
    "urls": {},
}


def report(cr: str = "OK", latest_cr: str = "ENDED_OK", latest_state: str = "COMPLETED", **request: Any) -> dict:
    """Return the ``report`` of example A (``python /add.py 4 5``), with the given state words."""
    return {
        "request": {
            "cmd": "python /add.py 4 5",
            "cmd_option": "",
            "ordered_filename_list": [],
            "returned_type": "stdout",
            "todownload": False,
            "sbatch_list": [],
            "module_list": [],
            **request,
        },
        "rsrc": {"identity": "muse"},
        "process": {"jobname": "114-ws-sw_example", "job_id": 2459394, "latest_cr": latest_cr, "latest_state": latest_state},
        "name": "sw_example",
        "cr": cr,
    }


# Example A, step 2.
STATE_ANSWER_A = {
    "info": {"report": report()},
    "msg": f"End of job. You can now get results by GET http://147.100.179.250/api/software/muse/run/sw_example/{KEY_A}/ request",
    "url": f"http://147.100.179.250/api/software/muse/run/sw_example/{KEY_A}/",
}
# Example A, step 3.
RESULT_ANSWER_A = {"info": {"stdout": "9.0", "report": report()}}
# Example D, step 3 (todownload=yes).
RESULT_ANSWER_D = {
    "msg": (
        f"The response content can be downloaded at : http://147.100.179.250/api/download/?key={DOWNLOAD_KEY} "
        f"*** Keep this key value in order to be able to download the response content later on : key={DOWNLOAD_KEY}"
    ),
    "url": f"http://147.100.179.250/api/download/?key={DOWNLOAD_KEY}",
}
MUSE_ERROR = {"error": "results not ready", "more": ["cr is WAIT"], "type": "NotReady"}
# requests_mock sends no Content-Type for json=; the result endpoints tell JSON from a file by it.
JSON = {"Content-Type": "application/json"}


def form(request: Any) -> dict[str, list[str]]:
    """Return the urlencoded form fields of a recorded request."""
    return parse_qs(request.text or "", keep_blank_values=True)


def token_login(m: rm.Mocker, *tokens: str) -> Any:
    """Answer ``jwt/obtain/`` with each token in turn."""
    return m.post(OBTAIN_URL, [{"json": {"token": t}} for t in tokens])


# ----- submit ------------------------------------------------------------------------------------


def test_submit_parses_key_from_url_and_sends_jwt_as_form_field(
    muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any
) -> None:
    """Example A: the key is the last path segment of ``url``; the JWT travels as the ``jwt`` form field."""
    obtain = token_login(requests_mock, creds.jwt)
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    submission = muse_hook.submit("sw_example", cmd="python /add.py 4 5", returned_type="stdout")

    assert submission.key == KEY_A
    assert submission.name == "sw_example"
    # Built from the connection, not taken from the answer: the server never chooses the UI link.
    assert submission.state_url == muse_hook.state_url("sw_example", KEY_A) == f"{API}software/muse/state/sw_example/{KEY_A}/"
    assert form(obtain.last_request) == {"username": [creds.login], "password": [creds.password]}
    sent = form(submit.last_request)
    assert sent["jwt"] == [creds.jwt]
    assert sent["cmd"] == ["python /add.py 4 5"]
    assert sent["returned_type"] == ["stdout"]
    assert sent["todownload"] == ["no"]
    for request in requests_mock.request_history:
        assert creds.jwt not in request.url and creds.password not in request.url
        assert not urlsplit(request.url).query
        assert all(creds.jwt not in v for v in request.headers.values())


def test_token_is_obtained_once_and_reused(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """Several submits share one token: ``jwt/obtain/`` is asked once."""
    obtain = token_login(requests_mock, creds.jwt, creds.new_jwt)
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    for _ in range(3):
        muse_hook.submit("sw_example", cmd="python /add.py 4 5")

    assert obtain.call_count == 1
    assert [form(r)["jwt"] for r in submit.request_history] == [[creds.jwt]] * 3


def test_ready_token_in_extra_skips_obtain(
    set_conn: Callable[..., str], fast_retry: Any, requests_mock: rm.Mocker, creds: Any
) -> None:
    """A connection with a ready ``token`` extra sends it as is and never calls ``jwt/obtain/``."""
    conn_id = set_conn("muse_tok", conn_type="muse", host=API, extra={"token": creds.jwt})
    obtain = requests_mock.post(OBTAIN_URL, json={"token": "other"})
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    MuseHook(conn_id, retry=fast_retry).submit("sw_example")

    assert obtain.call_count == 0
    assert form(submit.last_request)["jwt"] == [creds.jwt]


@pytest.mark.parametrize(
    "answer",
    [{"json": {"jwt": "tok-from-jwt-field"}}, {"json": "tok-from-jwt-field"}, {"text": "tok-from-jwt-field\n"}],
    ids=["json-object", "json-string", "bare-text"],
)
def test_obtain_accepts_token_shapes(muse_hook: MuseHook, requests_mock: rm.Mocker, answer: dict) -> None:
    """``jwt/obtain/`` answers "the JWT value": an object holding it, a JSON string or bare text are all read."""
    requests_mock.post(OBTAIN_URL, **answer)
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    muse_hook.submit("sw_example")

    assert form(submit.last_request)["jwt"] == ["tok-from-jwt-field"]


def test_obtain_answering_a_page_is_a_clear_error(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """An HTML page where the token was expected is an error naming its size and type, never its text."""
    requests_mock.post(
        OBTAIN_URL, text="<html><body><h1>502 Bad Gateway</h1> nginx</body></html>", headers={"Content-Type": "text/html"}
    )
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)
    with pytest.raises(MuseApiError, match="56 bytes of text/html that are neither JSON nor a token") as info:
        muse_hook.submit("sw_example")
    assert info.value.excerpt is None and "Bad Gateway" not in str(info.value)
    assert submit.call_count == 0


def test_submit_with_files_is_multipart_with_files_order(
    muse_hook: MuseHook, requests_mock: rm.Mocker, tmp_path: Any, creds: Any
) -> None:
    """Example F: input files go as ``file`` parts; ``files_order`` is a JSON list sent as a string."""
    (tmp_path / "usrcmd.sh").write_text("#!/bin/sh\npython /add.py < stdin.txt\n")
    (tmp_path / "stdin.txt").write_text("4 66\n")
    token_login(requests_mock, creds.jwt)
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    muse_hook.submit(
        "sw_example",
        cmd="usrcmd.sh",
        files=[str(tmp_path / "usrcmd.sh"), ObjectStoragePath(f"file://{tmp_path}/stdin.txt")],
        files_order=["stdin.txt", "usrcmd.sh"],
    )

    request = submit.last_request
    assert request.headers["Content-Type"].startswith("multipart/form-data")
    # The body streams from the files as it is sent: read it as the socket would.
    body = b"".join(iter(lambda: request.body.read(65536), b""))
    assert b'name="file"; filename="usrcmd.sh"' in body
    assert b'name="file"; filename="stdin.txt"' in body
    assert b"4 66\n" in body
    assert b'name="jwt"\r\n\r\n' + creds.jwt.encode() in body
    assert b'name="files_order"\r\n\r\n["stdin.txt", "usrcmd.sh"]' in body
    assert urlsplit(request.url).query == ""


def test_submit_rejects_todownload_with_stdout(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """``todownload`` only applies to file results: asking it with ``stdout`` fails before any request."""
    with pytest.raises(MuseApiError, match="todownload"):
        muse_hook.submit("sw_example", returned_type="stdout", todownload=True)
    with pytest.raises(MuseApiError, match="returned_type"):
        muse_hook.submit("sw_example", returned_type="stdout.zip")
    assert requests_mock.call_count == 0


def test_submit_without_key_in_url_is_a_clear_error(
    muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any
) -> None:
    """A submit answer whose ``url`` carries no key is an error naming the endpoint."""
    token_login(requests_mock, creds.jwt)
    requests_mock.post(SUBMIT_URL, json={"msg": "ok", "url": "http://147.100.179.250/api/"})
    with pytest.raises(MuseApiError, match="no url ending with the run key") as info:
        muse_hook.submit("sw_example")
    assert info.value.endpoint == "POST /api/software/muse/run/sw_example/"


def test_connection_without_credentials_fails_clearly(
    set_conn: Callable[..., str], fast_retry: Any, requests_mock: rm.Mocker
) -> None:
    """Running software needs a token: a connection with neither login/password nor token says so."""
    conn_id = set_conn("muse_anon", conn_type="muse", host=API)
    with pytest.raises(MuseApiError, match="neither login/password nor a token"):
        MuseHook(conn_id, retry=fast_retry).submit("sw_example")
    assert requests_mock.call_count == 0


# ----- expired token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        {"status_code": 401, "json": {"detail": "Signature has expired."}},
        {"status_code": 200, "json": {"error": "Invalid token (expired)", "more": [], "type": "AuthenticationFailed"}},
    ],
    ids=["401", "200-error-body"],
)
def test_expired_token_is_renewed_once_and_the_call_repeated(
    muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any, refusal: dict
) -> None:
    """A refused token is replaced by a new one from ``jwt/obtain/`` and the call is repeated once."""
    obtain = token_login(requests_mock, creds.jwt, creds.new_jwt)
    submit = requests_mock.post(SUBMIT_URL, [refusal, {"json": SUBMIT_ANSWER_A}])

    submission = muse_hook.submit("sw_example")

    assert submission.key == KEY_A
    assert obtain.call_count == 2
    assert [form(r)["jwt"] for r in submit.request_history] == [[creds.jwt], [creds.new_jwt]]


def test_second_token_refusal_fails_clearly(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """When the new token is refused too, the call fails (no loop): two obtains, two submits."""
    obtain = token_login(requests_mock, creds.jwt, creds.new_jwt)
    submit = requests_mock.post(SUBMIT_URL, status_code=401, json={"detail": "Invalid token."})

    with pytest.raises(MuseApiError) as info:
        muse_hook.submit("sw_example")

    assert info.value.status == 401
    assert info.value.error == "Invalid token."
    assert obtain.call_count == 2
    assert submit.call_count == 2


def test_wrong_password_is_not_tried_twice(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """A refused login fails at once: the password is not sent again and nothing is submitted."""
    obtain = requests_mock.post(OBTAIN_URL, status_code=401, json={"detail": "No active account found"})
    submit = requests_mock.post(SUBMIT_URL, json=SUBMIT_ANSWER_A)

    with pytest.raises(MuseApiError, match="No active account found"):
        muse_hook.submit("sw_example")

    assert obtain.call_count == 1
    assert submit.call_count == 0


def test_refused_ready_token_asks_for_a_new_one(
    set_conn: Callable[..., str], fast_retry: Any, requests_mock: rm.Mocker, creds: Any
) -> None:
    """A ready token that the service refuses cannot be renewed: the error tells what to do."""
    conn_id = set_conn("muse_tok", conn_type="muse", host=API, extra={"token": creds.jwt})
    submit = requests_mock.post(SUBMIT_URL, status_code=401, json={"detail": "Token expired"})
    with pytest.raises(MuseApiError, match="put a new one in the connection"):
        MuseHook(conn_id, retry=fast_retry).submit("sw_example")
    assert submit.call_count == 1


# ----- state -------------------------------------------------------------------------------------


def test_get_state_reads_the_report(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Example A, step 2: the report's cr, process and request become :class:`MuseReport` fields."""
    requests_mock.get(STATE_URL, json=STATE_ANSWER_A)

    state = muse_hook.get_state("sw_example", KEY_A)

    assert state.cr is MuseCr.OK
    assert state.latest_cr == "ENDED_OK"
    assert state.latest_state == "COMPLETED"
    assert state.job_id == 2459394
    assert state.jobname == "114-ws-sw_example"
    assert state.name == "sw_example"
    assert state.request["cmd"] == "python /add.py 4 5"
    assert state.request["todownload"] is False
    assert state.is_terminal and state.is_successful
    # The state needs no token.
    assert requests_mock.call_count == 1
    assert MuseReport.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize(
    ("cr", "latest_cr", "latest_state", "terminal", "successful"),
    [
        ("WAIT", "IN_PROGRESS", "PENDING", False, False),
        ("WAIT", "IN_PROGRESS", "RUNNING", False, False),
        ("NOK", "ENDED_NOK", "FAILED", True, False),
        ("NOK", "ENDED_NOK", "OUT_OF_MEMORY", True, False),
    ],
)
def test_report_states(
    muse_hook: MuseHook,
    requests_mock: rm.Mocker,
    cr: str,
    latest_cr: str,
    latest_state: str,
    terminal: bool,
    successful: bool,
) -> None:
    """WAIT is not terminal; NOK is terminal and not successful, with the SLURM state kept."""
    requests_mock.get(STATE_URL, json={"info": {"report": report(cr, latest_cr, latest_state)}, "msg": "", "url": ""})
    state = muse_hook.get_state("sw_example", KEY_A)
    assert (state.is_terminal, state.is_successful) == (terminal, successful)
    assert state.state == latest_state


def test_state_error_body_with_200_is_a_muse_error(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Muse's ``{"error","more","type"}`` answered with 200 is a :class:`MuseApiError` carrying all three."""
    requests_mock.get(STATE_URL, status_code=200, json=MUSE_ERROR)
    with pytest.raises(MuseApiError) as info:
        muse_hook.get_state("sw_example", KEY_A)
    error = info.value
    assert error.error == "results not ready"
    assert error.error_type == "NotReady"
    assert "cr is WAIT" in str(error.more)
    assert "results not ready" in str(error)


def test_unknown_cr_is_a_clear_error(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """A report whose cr is not WAIT/OK/NOK is refused with the value named."""
    requests_mock.get(STATE_URL, json={"info": {"report": report(cr="MAYBE")}})
    with pytest.raises(MuseApiError, match="MAYBE"):
        muse_hook.get_state("sw_example", KEY_A)


# ----- result ------------------------------------------------------------------------------------


def test_result_stdout(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Example A, step 3: ``returned_type=stdout`` gives ``info.stdout`` (``9.0``) and the report."""
    requests_mock.get(RESULT_URL, json=RESULT_ANSWER_A, headers=JSON)

    result = muse_hook.get_result("sw_example", KEY_A)

    assert result.kind == "stdout"
    assert result.stdout == "9.0"
    assert result.report is not None and result.report.job_id == 2459394


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/zip", b"PK\x03\x04" + bytes(range(256)) * 50),
        ("text/plain", b"70.0\n"),
    ],
    ids=["run.zip", "stdout.txt"],
)
def test_result_file_is_streamed_to_destination(
    muse_hook: MuseHook,
    requests_mock: rm.Mocker,
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
    content_type: str,
    body: bytes,
) -> None:
    """Examples B and C: a file result is written whole to the destination, with its size and md5."""
    requests_mock.get(RESULT_URL, content=body, headers={"Content-Type": content_type})
    dest = dest_dir / "results" / "out.bin"

    result = muse_hook.get_result("sw_example", KEY_A, dest)

    assert result.kind == "file"
    assert result.file is not None
    assert result.file.size == len(body)
    assert result.file.md5 == hashlib.md5(body).hexdigest()
    assert dest.read_bytes() == body
    assert list_files(dest_dir) == ["results/out.bin"]


def test_file_result_without_destination_is_refused(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """A file result needs a destination: the error says so rather than loading the file in memory."""
    requests_mock.get(RESULT_URL, content=b"PK\x03\x04", headers={"Content-Type": "application/zip"})
    with pytest.raises(MuseApiError, match="give a destination"):
        muse_hook.get_result("sw_example", KEY_A)


def test_result_todownload_gives_download_key(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Example D: ``todownload=yes`` answers a URL whose ``key`` is kept to download later."""
    requests_mock.get(API + f"software/muse/run/sw_example/{KEY_D}/", json=RESULT_ANSWER_D, headers=JSON)

    result = muse_hook.get_result("sw_example", KEY_D)

    assert result.kind == "download"
    assert result.download_key == DOWNLOAD_KEY
    assert result.download_url == RESULT_ANSWER_D["url"]


def test_result_before_ok_is_the_servers_error(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Asking results before cr is OK answers Muse's error shape: it surfaces as a :class:`MuseApiError`."""
    requests_mock.get(RESULT_URL, json=MUSE_ERROR, headers=JSON)
    with pytest.raises(MuseApiError) as info:
        muse_hook.get_result("sw_example", KEY_A)
    assert (info.value.error, info.value.error_type) == ("results not ready", "NotReady")


def test_download_streams_the_file_behind_a_key(
    muse_hook: MuseHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath
) -> None:
    """``GET download/?key=...`` is streamed to the destination."""
    body = b"PK\x05\x06" + b"\0" * 18
    route = requests_mock.get(API + "download/", content=body, headers={"Content-Type": "application/zip"})

    stored = muse_hook.download(DOWNLOAD_KEY, dest_dir / "MYRETURNEDFILE1_MUSE.zip")

    assert route.last_request.qs == {"key": [DOWNLOAD_KEY.lower()]}
    assert DOWNLOAD_KEY in route.last_request.url
    assert stored.size == len(body)
    assert (dest_dir / "MYRETURNEDFILE1_MUSE.zip").read_bytes() == body


def test_content_streams_the_run_folder_zip(
    muse_hook: MuseHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath
) -> None:
    """``GET software/muse/content/{name}/{key}/`` is streamed to the destination, to investigate."""
    body = b"PK\x03\x04" + b"stderr" * 100
    requests_mock.get(
        API + f"software/muse/content/sw_example/{KEY_A}/", content=body, headers={"Content-Type": "application/zip"}
    )

    stored = muse_hook.get_content("sw_example", KEY_A, dest_dir / "content.zip")

    assert stored.md5 == hashlib.md5(body).hexdigest()
    assert (dest_dir / "content.zip").read_bytes() == body


def test_content_answering_an_error_writes_nothing(
    muse_hook: MuseHook,
    requests_mock: rm.Mocker,
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
) -> None:
    """Where a file is expected, Muse's JSON error is raised and no file is written."""
    requests_mock.get(API + f"software/muse/content/sw_example/{KEY_A}/", json=MUSE_ERROR, headers=JSON)
    with pytest.raises(MuseApiError, match="results not ready"):
        muse_hook.get_content("sw_example", KEY_A, dest_dir / "content.zip")
    assert list_files(dest_dir) == []


def test_file_result_over_the_limit_is_refused(
    muse_hook: MuseHook,
    requests_mock: rm.Mocker,
    dest_dir: ObjectStoragePath,
    list_files: Callable[[ObjectStoragePath], list[str]],
) -> None:
    """``max_bytes`` bounds a file result; a bigger one keeps nothing."""
    requests_mock.get(RESULT_URL, content=b"x" * 2048, headers={"Content-Type": "text/plain"})
    with pytest.raises(HpcApiError, match="larger than the limit"):
        muse_hook.get_result("sw_example", KEY_A, dest_dir / "out.txt", max_bytes=1024)
    assert list_files(dest_dir) == []


# ----- identifiers -------------------------------------------------------------------------------

BAD_IDS = ["../x", "a/b", "x?y", "#", "", "a b", "..", "x\n", " x", "x#y", "%2e%2e"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_name_or_key_rejected_before_any_request(
    muse_hook: MuseHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath, bad: str
) -> None:
    """A name or key that could change the URL is refused before a request is made."""
    calls: list[Callable[[], Any]] = [
        lambda: muse_hook.submit(bad),
        lambda: muse_hook.get_state(bad, KEY_A),
        lambda: muse_hook.get_state("sw_example", bad),
        lambda: muse_hook.get_result("sw_example", bad),
        lambda: muse_hook.get_content(bad, KEY_A, dest_dir / "c.zip"),
        lambda: muse_hook.download(bad, dest_dir / "d.zip"),
        lambda: muse_hook.state_url("sw_example", bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifierError):
            call()
    assert requests_mock.call_count == 0


# ----- URLs ------------------------------------------------------------------------------------------


def test_state_url(muse_hook: MuseHook) -> None:
    """The state URL shown in the UI is the base URL plus the state path."""
    assert muse_hook.state_url("sw_example", KEY_A) == STATE_URL


# ----- test_connection ---------------------------------------------------------------------------


def test_test_connection_ok(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """The UI's Test button: a token obtained and verified gives ``(True, ...)``."""
    token_login(requests_mock, creds.jwt)
    verify = requests_mock.post(API + "jwt/verify/", json={"token": creds.jwt})

    ok, message = muse_hook.test_connection()

    assert ok is True
    assert API in message
    assert form(verify.last_request) == {"jwt": [creds.jwt]}


@pytest.mark.parametrize(
    "obtain",
    [
        {"status_code": 401, "json": {"detail": "No active account found with the given credentials"}},
        {"status_code": 200, "text": "<html><body><h1>Login</h1></body></html>"},
        {"exc": requests.exceptions.ConnectTimeout("timed out")},
    ],
    ids=["refused", "html", "unreachable"],
)
def test_test_connection_failure(muse_hook: MuseHook, requests_mock: rm.Mocker, obtain: dict) -> None:
    """The UI's Test button gives ``(False, message)`` whatever went wrong, never a traceback."""
    requests_mock.post(OBTAIN_URL, **obtain)
    ok, message = muse_hook.test_connection()
    assert ok is False
    assert message


def test_test_connection_token_rejected_by_verify(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """A token that ``jwt/verify/`` refuses fails the test."""
    token_login(requests_mock, creds.jwt)
    requests_mock.post(API + "jwt/verify/", status_code=401, json={"detail": "Token is invalid or expired"})
    assert muse_hook.test_connection() == (False, "The service does not accept the token")


# ----- examples B to F ----------------------------------------------------------------------------

# Step 1 of examples B to F: the request sent, and the key of the page's answer.
EXAMPLES = {
    "B": ({"cmd": "python /add.py 4 55", "returned_type": "run.zip"}, "fc3b822f-c62f-40fe-93be-417b1bcc38e9"),
    "C": ({"cmd": "python /add.py 4 55", "returned_type": "stdout.txt"}, "f3d078e0-7496-4f02-b9c4-2da924a24955"),
    "D": ({"cmd": "python /add.py 4 55", "returned_type": "run.zip", "todownload": True}, KEY_D),
    "E": ({"cmd": "python /add.py", "returned_type": "stdout", "files": ["stdin.txt"]}, "0cfb698a-3a86-414f-8d5c-959dc4164f2e"),
    "F": ({"cmd": "usrcmd.sh", "returned_type": "stdout", "files": ["usrcmd.sh", "stdin.txt"],
           "files_order": ["stdin.txt", "usrcmd.sh"]}, "de8a34be-dd3f-4f4e-9ea7-5ab820a26b00"),
}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_submit_examples_b_to_f(
    muse_hook: MuseHook, requests_mock: rm.Mocker, tmp_path: Any, creds: Any, example: str
) -> None:
    """Each example's request is sent with the page's fields, and the key is read from the page's answer."""
    arguments, key = EXAMPLES[example]
    arguments = dict(arguments)
    (tmp_path / "stdin.txt").write_text("4 66\n")
    (tmp_path / "usrcmd.sh").write_text("#!/bin/sh\npython /add.py < stdin.txt\n")
    if "files" in arguments:
        arguments["files"] = [str(tmp_path / name) for name in arguments["files"]]
    answer = {
        "msg": f"GET http://147.100.179.250/api/software/muse/state/sw_example/{key}/ request to get cluster job state, "
        f"while waiting for results ... Keep the software name value=sw_example and the key value={key} in order to "
        "be able to follow your POST request. (__todo__: add information about temps imparti...)",
        "url": f"http://147.100.179.250/api/software/muse/state/sw_example/{key}/",
    }
    token_login(requests_mock, creds.jwt)
    submit = requests_mock.post(SUBMIT_URL, json=answer)

    assert muse_hook.submit("sw_example", **arguments).key == key

    body = submit.last_request.body
    if hasattr(body, "read"):  # a multipart body streams from its files as it is sent
        body = b"".join(iter(lambda: body.read(65536), b""))
    body = body if isinstance(body, bytes) else body.encode()
    todownload = b"yes" if arguments.get("todownload") else b"no"
    assert arguments["returned_type"].encode() in body and todownload in body
    if "files" in arguments:
        assert body.count(b'name="file"; filename=') == len(arguments["files"])
    assert (b"files_order" in body) == ("files_order" in arguments)


def test_state_example_e_echoes_the_request(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Example E, step 2: the report echoes ``ordered_filename_list`` and ``todownload`` as a boolean."""
    key = EXAMPLES["E"][1]
    requests_mock.get(
        API + f"software/muse/state/sw_example/{key}/",
        json={
            "info": {"report": {
                "request": {"cmd": "python /add.py", "cmd_option": "", "ordered_filename_list": ["stdin.txt"],
                            "returned_type": "stdout", "todownload": False, "sbatch_list": [], "module_list": []},
                "rsrc": {"identity": "muse"},
                "process": {"jobname": "118-ws-sw_example", "job_id": 2461256, "latest_cr": "ENDED_OK", "latest_state": "COMPLETED"},
                "name": "sw_example", "cr": "OK",
            }},
            "msg": "End of job.",
            "url": f"http://147.100.179.250/api/software/muse/run/sw_example/{key}/",
        },
    )
    state = muse_hook.get_state("sw_example", key)
    assert state.request["ordered_filename_list"] == ["stdin.txt"]
    assert (state.job_id, state.jobname, state.is_successful) == (2461256, "118-ws-sw_example", True)


def test_result_example_e_stdout(muse_hook: MuseHook, requests_mock: rm.Mocker) -> None:
    """Example E, step 3: ``70.0`` from ``info.stdout``."""
    key = EXAMPLES["E"][1]
    answer = {"info": {"stdout": "70.0", "report": report(ordered_filename_list=["stdin.txt"])}}
    requests_mock.get(API + f"software/muse/run/sw_example/{key}/", json=answer, headers=JSON)
    assert muse_hook.get_result("sw_example", key).stdout == "70.0"


# ----- off-cluster run, verify --------------------------------------------------------------------


def test_run_off_cluster_answers_the_result(
    muse_hook: MuseHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath, creds: Any
) -> None:
    """``POST software/run/{name}/`` answers the result directly: stdout as JSON, or a file written to ``dest``."""
    token_login(requests_mock, creds.jwt)
    route = requests_mock.post(API + "software/run/sw_example/", [
        {"json": RESULT_ANSWER_A, "headers": JSON},
        {"content": b"9.0\n", "headers": {"Content-Type": "text/plain"}},
    ])
    assert muse_hook.run("sw_example", cmd="python /add.py 4 5").stdout == "9.0"
    result = muse_hook.run("sw_example", cmd="python /add.py 4 5", returned_type="stdout.txt", dest=dest_dir / "stdout.txt")
    assert result.kind == "file" and (dest_dir / "stdout.txt").read_bytes() == b"9.0\n"
    assert [form(r)["jwt"] for r in route.request_history[:1]] == [[creds.jwt]]


def test_run_off_cluster_error_is_not_repeated(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any) -> None:
    """An off-cluster run that fails answers Muse's error shape: raised once, never run twice."""
    token_login(requests_mock, creds.jwt)
    route = requests_mock.post(
        API + "software/run/sw_example/",
        json={"error": "The run ended with exit status 1.", "more": ["Traceback ..."], "type": "RunFailed"},
        headers=JSON,
    )
    with pytest.raises(MuseApiError, match="exit status 1") as info:
        muse_hook.run("sw_example", cmd="python /add.py x")
    assert info.value.error_type == "RunFailed" and route.call_count == 1


@pytest.mark.parametrize(
    ("answer", "valid"),
    [
        ({"json": {"valid": True, "username": "alice"}}, True),
        ({"json": {"valid": False, "error": "Signature has expired."}}, False),
        ({"status_code": 401, "json": {"detail": "Token is invalid or expired"}}, False),
    ],
)
def test_verify_token(muse_hook: MuseHook, requests_mock: rm.Mocker, creds: Any, answer: dict, valid: bool) -> None:
    """``jwt/verify/`` says whether the token is still good; a refusal is ``False``, not an error."""
    token_login(requests_mock, creds.jwt)
    verify = requests_mock.post(API + "jwt/verify/", **answer)
    assert muse_hook.verify_token() is valid
    assert form(verify.last_request) == {"jwt": [creds.jwt]}
