"""MuseRunOperator against the emulator: every result form, uploads, failures, timeouts, faults, retries."""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow.sdk import Asset, ObjectStoragePath
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_hpc import muse_results
from hpc_emulator import EmulatorServer
from airflow_provider_hpc.exceptions import JobTimeout, MuseApiError, MuseJobFailed, UnsafePathError
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.links.muse import STATE_URL_XCOM_KEY, MuseJobStateLink
from airflow_provider_hpc.operators.muse import KEY_XCOM_KEY, STATE_STORE_KEY, MuseRunOperator
from airflow_provider_hpc.triggers._polling import DEFERRAL_TIMEOUT_MARGIN
from airflow_provider_hpc.storage import TEMP_PREFIX, StoredFile

from muse_support import (
    FAST_POLL,
    PASSWORD,
    SUBMIT_ROUTE,
    FakeTaskInstance,
    MemoryStateStore,
    drive,
    make_context,
    set_faults,
    submissions,
)

VALUE_KEYS = {
    "name", "key", "job_id", "state", "state_url", "returned_type", "stdout", "file", "download", "extracted",
    "output_path",
}


def operator(**overrides: Any) -> MuseRunOperator:
    """A ``sw_example`` run of ``python /add.py 4 5`` with fast polls."""
    kwargs: dict[str, Any] = {"task_id": "add", "name": "sw_example", "cmd": "python /add.py 4 5", **FAST_POLL}
    kwargs.update(overrides)
    return MuseRunOperator(**kwargs)


def local(path_text: str) -> Path:
    """Return the local path of a ``file://`` storage path."""
    return Path(ObjectStoragePath(path_text).path)


def no_partial_files(folder: Path) -> bool:
    """Whether no temporary (half-written) file stayed under ``folder``."""
    return not [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def token_of_emulator_user() -> str:
    """Return a token of the emulator's account (to prove it never leaks)."""
    hook = MuseHook()
    try:
        return hook.get_token()
    finally:
        hook.close()


# ----- result forms ------------------------------------------------------------------------------


def test_stdout_goes_to_xcom(muse: EmulatorServer, state_store: MemoryStateStore, results_dir: Path) -> None:
    context = make_context(state_store)
    driven = drive(operator(), context)

    value = driven.value
    assert set(value) == VALUE_KEYS
    assert value["stdout"] == "9.0"
    assert value["file"] is None and value["download"] is None and value["extracted"] is None
    assert value["returned_type"] == "stdout"
    assert value["state"] == "COMPLETED" and isinstance(value["job_id"], int)
    assert value["state_url"] == f"{muse.muse_url}software/muse/state/sw_example/{value['key']}/"
    assert local(value["output_path"]) == results_dir / "muse_dag" / "manual__2026-01-01T00_00_00_00_00" / "muse_task"
    assert json.loads(json.dumps(value)) == value
    # One deferral, its trigger bounded by Airflow too; the key and the link were pushed before it.
    assert len(driven.deferrals) == 1 and driven.deferrals[0].timeout is None
    ti = context["ti"]
    assert ti.xcom[KEY_XCOM_KEY] == value["key"]
    assert ti.xcom[STATE_URL_XCOM_KEY] == value["state_url"] == ti.xcom[MuseJobStateLink().xcom_key]
    assert submissions(muse) == 1


@pytest.mark.parametrize(
    ("returned_type", "todownload", "extract"),
    [
        ("stdout.txt", "no", False),
        ("stdout.txt", "yes", False),
        ("run.zip", False, False),
        ("run.zip", False, True),
        ("run.zip", "yes", True),
        ("run.zip", True, False),
    ],
)
def test_file_results_are_streamed_to_output_path(
    muse: EmulatorServer, tmp_path: Path, returned_type: str, todownload: Any, extract: bool
) -> None:
    out = tmp_path / "out"
    task = operator(returned_type=returned_type, todownload=todownload, extract_zip=extract, output_path=str(out))

    value = drive(task, make_context(MemoryStateStore())).value

    file_name = "stdout.txt" if returned_type == "stdout.txt" else "run.zip"
    stored = out / file_name
    assert value["stdout"] is None
    assert local(value["file"]["path"]) == stored
    body = stored.read_bytes()
    assert value["file"]["size"] == len(body)
    assert value["file"]["md5"] == hashlib.md5(body).hexdigest()
    if returned_type == "stdout.txt":
        assert body.decode().strip() == "9.0"
    else:
        with zipfile.ZipFile(io.BytesIO(body)) as zipped:
            assert zipped.read("__WS__stdout.txt").decode().strip() == "9.0"
            assert "__WS__stderr.txt" in zipped.namelist()
    downloads = muse.counters.get("requests", "GET /api/download/")
    if todownload in ("yes", True):
        assert value["download"]["key"] and value["download"]["url"].endswith(f"download/?key={value['download']['key']}")
        assert downloads == 1
    else:
        assert value["download"] is None and downloads == 0
    if extract:
        assert value["extracted"] == {"path": str(ObjectStoragePath(f"file://{out}/run")), "files": 2, "size": value["extracted"]["size"]}
        assert (out / "run" / "__WS__stdout.txt").read_text().strip() == "9.0"
    else:
        assert value["extracted"] is None and not (out / "run").exists()
    assert no_partial_files(out)


def test_a_stdout_too_large_for_xcom_goes_to_a_file(muse: EmulatorServer, tmp_path: Path) -> None:
    task = operator(cmd="python -c \"print('x' * 5000)\"", max_stdout_chars=1000, output_path=str(tmp_path))

    value = drive(task, make_context(MemoryStateStore())).value

    assert value["stdout"] is None
    assert (tmp_path / "stdout.txt").read_text() == "x" * 5000
    assert value["file"]["size"] == 5000


def test_a_result_larger_than_max_file_bytes_is_refused(muse: EmulatorServer, tmp_path: Path) -> None:
    task = operator(returned_type="run.zip", max_file_bytes=10, output_path=str(tmp_path))

    with pytest.raises(Exception, match="larger than the limit of 10 bytes"):
        drive(task, make_context(MemoryStateStore()))
    assert not (tmp_path / "run.zip").exists() and no_partial_files(tmp_path)


def test_result_announced_on_asset_outlets(muse: EmulatorServer, tmp_path: Path) -> None:
    asset = Asset("muse://sw_example/add")
    context = make_context(MemoryStateStore())

    value = drive(operator(returned_type="run.zip", outlets=[asset], output_path=str(tmp_path)), context).value

    extra = context["outlet_events"][asset].extra
    assert extra["key"] == value["key"] and extra["state"] == "COMPLETED"
    assert extra["file"] == value["file"]["path"] and extra["size"] == value["file"]["size"]
    assert "stdout" not in extra and "download" not in extra


# ----- uploads -------------------------------------------------------------------------------------


def test_files_are_uploaded_in_files_order(muse: EmulatorServer, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "stdin.txt").write_text("30 40\n")
    (inputs / "usrcmd.sh").write_text("#!/bin/sh\npython /add.py < stdin.txt\n")
    task = operator(
        cmd="usrcmd.sh",
        files=[str(inputs / "usrcmd.sh"), ObjectStoragePath(f"file://{inputs}/stdin.txt")],
        files_order=["stdin.txt", "usrcmd.sh"],
    )

    driven = drive(task, make_context(MemoryStateStore()))

    assert driven.value["stdout"] == "70.0"
    request = driven.events[0]["report"]["request"]
    assert request["ordered_filename_list"] == ["stdin.txt", "usrcmd.sh"]
    assert request["cmd"] == "usrcmd.sh"


def test_the_input_files_sent_are_named_in_the_log_before_the_submit(
    muse: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = tmp_path / "inputs" / "case_3"
    case.mkdir(parents=True)
    (case / "stdin.txt").write_text("30 40\n")

    drive(operator(cmd="python /add.py", files=[ObjectStoragePath(f"file://{case}/stdin.txt")]), make_context(MemoryStateStore()))

    out = capsys.readouterr().out
    sending = out.index("Sending 1 input file (6 bytes) to Muse software sw_example:")
    assert sending < out.index("Submitted sw_example to Muse")
    # The name sent, its size and where it came from (which case of a sweep); never its contents.
    assert f"  stdin.txt: 6 bytes, from file://{case}/stdin.txt" in out
    assert "30 40" not in out


def test_an_uploaded_zip_is_unzipped_and_stdin_txt_is_read(muse: EmulatorServer, tmp_path: Path) -> None:
    bundle = tmp_path / "inputs.zip"
    with zipfile.ZipFile(bundle, "w") as zipped:
        zipped.writestr("stdin.txt", "1 2 3.5\n")

    value = drive(operator(cmd="python /add.py", files=[str(bundle)]), make_context(MemoryStateStore())).value

    assert value["stdout"] == "6.5"


def test_a_missing_input_file_fails_before_any_submission(muse: EmulatorServer, tmp_path: Path) -> None:
    with pytest.raises(MuseApiError, match="does not exist"):
        operator(files=[str(tmp_path / "nowhere.txt")]).execute(make_context(MemoryStateStore()))
    assert submissions(muse) == 0


# ----- failures ------------------------------------------------------------------------------------


def test_a_nok_run_raises_with_key_job_state_and_content_zip(
    muse: EmulatorServer, tmp_path: Path, task_logs: list[str]
) -> None:
    context = make_context(MemoryStateStore())

    with pytest.raises(MuseJobFailed) as caught:
        drive(operator(cmd="python /add.py 4 x", output_path=str(tmp_path)), context)

    key = context["ti"].xcom[KEY_XCOM_KEY]
    message = str(caught.value)
    content = tmp_path / "content.zip"
    assert key in message
    assert "latest_state FAILED" in message
    job_id = json.loads(requests.get(f"{muse.base_url}/_emulator/muse/jobs", timeout=10).text)[0]["job_id"]
    assert f"SLURM job {job_id}" in message
    assert str(ObjectStoragePath(f"file://{content}")) in message
    assert f"software/muse/state/sw_example/{key}/" in message
    with zipfile.ZipFile(content) as zipped:
        assert "'x' is not a number" in zipped.read("__WS__stderr.txt").decode()
    tails = [line for line in task_logs if line.startswith("error: Tail of __WS__stderr.txt")]
    assert len(tails) == 1 and "add.py: error: 'x' is not a number" in tails[0]
    assert muse.counters.get("requests", "GET /api/software/muse/content/{name}/{key}/") == 1


def test_a_run_outliving_its_timeout_fails_as_a_timeout(muse: EmulatorServer) -> None:
    task = operator(cmd="sleep 5; python /add.py 1 2", timeout=0.3)
    context = make_context(MemoryStateStore())

    started = time.monotonic()
    with pytest.raises(JobTimeout) as caught:
        drive(task, context)
    assert time.monotonic() - started < 4

    key = context["ti"].xcom[KEY_XCOM_KEY]
    assert key in str(caught.value) and "timeout 0.3s" in str(caught.value)
    assert "no cancel endpoint" in str(caught.value)


def test_the_deferral_is_bounded_by_airflow_beyond_the_trigger_deadline(muse: EmulatorServer) -> None:
    before = time.time()
    with pytest.raises(TaskDeferred) as caught:
        operator(timeout=60, poll_interval=2.0).execute(make_context(MemoryStateStore()))

    assert caught.value.timeout == timedelta(seconds=60) + DEFERRAL_TIMEOUT_MARGIN
    _, kwargs = caught.value.trigger.serialize()
    assert kwargs["deadline"] == pytest.approx(time.time() + 60, abs=5)
    # The task has just submitted: the trigger's first poll comes one interval later, not at once.
    assert before + 2.0 <= kwargs["first_poll_at"] <= time.time() + 2.0


def test_polling_faults_are_absorbed(muse: EmulatorServer) -> None:
    set_faults(
        muse,
        [
            {
                "route": "GET /api/software/muse/state/*",
                "sequence": [{"status": 429, "retry_after": 0.05}, {"status": 429, "retry_after": 0.05}, "pass",
                             {"status": 429, "retry_after": 0.01}],
            }
        ],
    )

    value = drive(operator(cmd="sleep 0.2; python /add.py 4 5"), make_context(MemoryStateStore())).value

    assert value["stdout"] == "9.0"
    assert muse.counters.snapshot()["faults"] == {"status:429": 3}
    assert submissions(muse) == 1


def test_server_errors_on_polls_are_absorbed_by_the_trigger_even_without_transport_retries(
    muse: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One attempt per request: each 5xx costs one poll, which the trigger tolerates (max_poll_failures).
    connection = json.loads(muse.airflow_conn_env()["AIRFLOW_CONN_MUSE_DEFAULT"])
    connection["extra"] = {**connection["extra"], "max_attempts": 1}
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_DEFAULT", json.dumps(connection))
    set_faults(
        muse,
        [{"route": "GET /api/software/muse/state/*", "sequence": [{"status": 503}, {"status": 502}, "pass", {"status": 500}]}],
    )

    value = drive(operator(max_poll_failures=3), make_context(MemoryStateStore())).value

    assert value["stdout"] == "9.0"
    assert muse.counters.snapshot()["faults"]["status:503"] == 1
    assert muse.counters.snapshot()["faults"]["status:502"] == 1


def test_a_submission_refused_with_a_gateway_error_is_not_repeated(muse: EmulatorServer) -> None:
    set_faults(muse, [{"route": SUBMIT_ROUTE.replace("{name}/", "*"), "action": {"status": 502}}])

    with pytest.raises(MuseApiError, match="502"):
        operator().execute(make_context(MemoryStateStore()))
    assert muse.counters.get("requests", SUBMIT_ROUTE) == 1


def test_waiting_in_the_worker_gives_the_same_result(muse: EmulatorServer) -> None:
    driven = drive(operator(deferrable=False), make_context(MemoryStateStore()))

    assert driven.deferrals == [] and driven.value["stdout"] == "9.0"


def test_waiting_in_the_worker_fails_the_same_way(muse: EmulatorServer, tmp_path: Path) -> None:
    with pytest.raises(MuseJobFailed, match="latest_state FAILED"):
        drive(operator(cmd="python /add.py x", deferrable=False, output_path=str(tmp_path)), make_context(MemoryStateStore()))
    assert (tmp_path / "content.zip").is_file()


def test_off_cluster_run_answers_directly(muse: EmulatorServer, tmp_path: Path) -> None:
    driven = drive(operator(cluster=False, returned_type="run.zip", extract_zip=True, output_path=str(tmp_path)), make_context())

    assert driven.deferrals == []
    assert driven.value["key"] is None
    assert (tmp_path / "run" / "__WS__stdout.txt").read_text().strip() == "9.0"
    assert muse.counters.get("muse_offcluster_runs", "python /add.py 4 5") == 1 and submissions(muse) == 0


def test_no_secret_in_xcom_logs_or_errors(muse: EmulatorServer, tmp_path: Path, task_logs: list[str]) -> None:
    token = token_of_emulator_user()
    context = make_context(MemoryStateStore())
    value = drive(operator(returned_type="stdout.txt", todownload="yes", output_path=str(tmp_path)), context).value
    with pytest.raises(MuseJobFailed) as caught:
        drive(operator(cmd="python /add.py x", output_path=str(tmp_path / "bad")), make_context(MemoryStateStore()))

    seen = json.dumps([value, context["ti"].xcom]) + str(caught.value) + "\n".join(task_logs)
    for secret in (PASSWORD, token):
        assert secret not in seen


def test_on_kill_says_the_run_keeps_going(muse: EmulatorServer, task_logs: list[str]) -> None:
    task = operator(cmd="sleep 5; python /add.py 1 2")
    with pytest.raises(TaskDeferred):
        task.execute(make_context(MemoryStateStore()))

    task.on_kill()

    assert any("no way to cancel" in line and task._key in line for line in task_logs)


# ----- retries: the key in task_state_store --------------------------------------------------------


class WorkerDiesAfterStoring(MemoryStateStore):
    """A store whose first write lands, then the worker "dies" (raises), as after a lost node."""

    def __init__(self, inner: MemoryStateStore) -> None:
        super().__init__()
        self.values = inner.values
        self.died = False

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        """Store, then die once."""
        super().set(key, value, retention=retention)
        if not self.died:
            self.died = True
            raise SystemExit("worker lost right after the key was stored")


def first_try_dies(task: MuseRunOperator, store: MemoryStateStore) -> str:
    """Run a first try that dies right after submitting; return the stored key."""
    with pytest.raises(SystemExit):
        task.execute(make_context(WorkerDiesAfterStoring(store)))
    return store.values[STATE_STORE_KEY]["key"]


def test_a_retry_after_a_dead_worker_re_attaches(
    muse: EmulatorServer, state_store: MemoryStateStore, task_logs: list[str]
) -> None:
    task = operator(cmd="sleep 0.5; python /add.py 4 5")
    key = first_try_dies(task, state_store)

    retry = make_context(state_store, ti=FakeTaskInstance(try_number=2))
    driven = drive(operator(cmd="sleep 0.5; python /add.py 4 5"), retry)

    assert driven.value["key"] == key and driven.value["stdout"] == "9.0"
    assert submissions(muse) == 1 and muse.counters.get("requests", SUBMIT_ROUTE) == 1
    assert any("Re-attaching to the previous try's Muse run" in line for line in task_logs)
    assert retry["ti"].xcom[KEY_XCOM_KEY] == key
    # The result is in hand: the entry is marked collected (a retry collects again, a cleared task runs anew).
    assert state_store.values[STATE_STORE_KEY]["collected"] is True


def test_a_retry_after_the_run_ended_well_only_collects(
    muse: EmulatorServer, state_store: MemoryStateStore, task_logs: list[str]
) -> None:
    key = first_try_dies(operator(), state_store)
    hook = MuseHook()
    while not hook.get_state("sw_example", key).is_terminal:
        time.sleep(0.02)

    driven = drive(operator(), make_context(state_store, ti=FakeTaskInstance(try_number=2)))

    assert driven.deferrals == [] and driven.value["key"] == key and driven.value["stdout"] == "9.0"
    assert submissions(muse) == 1
    assert any("already ended well" in line for line in task_logs)


def test_a_retry_after_a_failed_run_submits_anew(muse: EmulatorServer, state_store: MemoryStateStore) -> None:
    key = first_try_dies(operator(cmd="python /add.py x"), state_store)
    hook = MuseHook()
    while not hook.get_state("sw_example", key).is_terminal:
        time.sleep(0.02)

    with pytest.raises(MuseJobFailed):
        drive(operator(cmd="python /add.py x"), make_context(state_store, ti=FakeTaskInstance(try_number=2)))

    assert submissions(muse) == 2
    assert state_store.values[STATE_STORE_KEY]["key"] != key


def test_a_stored_key_the_service_forgot_is_submitted_anew(muse: EmulatorServer, state_store: MemoryStateStore) -> None:
    state_store.set(STATE_STORE_KEY, {"name": "sw_example", "key": "0c119ac7-5eda-4927-afae-f91f031c9b02"})

    value = drive(operator(), make_context(state_store)).value

    assert value["stdout"] == "9.0" and submissions(muse) == 1


def test_after_success_a_rerun_submits_anew(muse: EmulatorServer, state_store: MemoryStateStore) -> None:
    first = drive(operator(), make_context(state_store)).value
    second = drive(operator(), make_context(state_store, ti=FakeTaskInstance(try_number=2))).value

    assert first["key"] != second["key"] and submissions(muse) == 2


def test_without_a_state_store_it_still_runs(muse: EmulatorServer, task_logs: list[str]) -> None:
    value = drive(operator(), make_context()).value

    assert value["stdout"] == "9.0"
    assert any("cannot re-attach" in line for line in task_logs)


def test_a_repeated_event_gives_the_same_result(muse: EmulatorServer, tmp_path: Path) -> None:
    task = operator(returned_type="run.zip", output_path=str(tmp_path))
    context = make_context(MemoryStateStore())
    driven = drive(task, context)

    again = task.resume_execution("execute_complete", {"event": driven.events[0]}, context)

    assert again == driven.value
    assert submissions(muse) == 1 and no_partial_files(tmp_path)


def test_off_cluster_failure_says_why(muse: EmulatorServer) -> None:
    with pytest.raises(MuseApiError) as caught:
        drive(operator(cluster=False, cmd="python /add.py x"), make_context())

    assert "exit status 1" in str(caught.value) and "'x' is not a number" in str(caught.value)


@pytest.mark.parametrize("member", ["../escaped.txt", "/abs/escaped.txt", "run/../../escaped.txt", "a\\..\\..\\escaped.txt"])
def test_extraction_refuses_members_leaving_the_folder(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "out" / "run.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("__WS__stdout.txt", "9.0\n")
        zipped.writestr(member, "should never be written")
    stored = StoredFile(path=str(ObjectStoragePath(f"file://{archive}")), size=archive.stat().st_size, md5="")

    with pytest.raises(UnsafePathError):
        muse_results.extract_result(stored, ObjectStoragePath(f"file://{tmp_path}/out/run"))

    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "out" / "run").exists()
