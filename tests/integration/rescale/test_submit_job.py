"""
RescaleSubmitJobOperator against the emulator: start a job, wait for every run, judge it; durably.

Each try is an ``execute`` with a context holding a ``task_state_store``; a worker that dies is a
``BaseException`` raised from the store right after a given write, as in the Muse retry tests.
The emulator counts every create and submit, so "exactly one job" is what it saw.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from airflow_provider_hpc.exceptions import RescaleRunFailed
from airflow_provider_hpc.operators.rescale_submit import JOB_STATE_KEY, RescaleSubmitJobOperator
from airflow_provider_hpc.transport.aio import close_all_sessions
from tests.integration.rescale.support import API_KEY, FAST_RETRY, FakeTaskInstance, RescaleApi, run_deferrable

CREATE_ROUTE = "POST /api/v2/jobs/"
SUBMIT_ROUTE = "POST /api/v2/jobs/{job_id}/submit/"
STOP_ROUTE = "POST /api/v2/jobs/{job_id}/stop/"
FAST = {"poll_interval": 0.1, "max_poll_interval": 0.2, "outcome_wait": 2.0, "retry": FAST_RETRY}


def body(command: str = "echo solved > out.txt", **extra: Any) -> dict[str, Any]:
    """A job body as Rescale's API reference gives it."""
    analysis = {
        "analysis": {"code": "user_included", "version": "0"},
        "command": command,
        "hardware": {"coreType": "emerald", "coresPerSlot": 1, "slots": 1},
    }
    return {"name": "solver", "jobanalyses": [analysis], **extra}


def submit(**kwargs: Any) -> RescaleSubmitJobOperator:
    return RescaleSubmitJobOperator(task_id="solve", job=kwargs.pop("job", body()), **{**FAST, **kwargs})


class Store:
    """A ``task_state_store``: JSON values by key, kept across tries; can kill the try after a write."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.die_after: Any = None

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(json.dumps(self.values[key])) if key in self.values else default

    def set(self, key: str, value: Any, **_: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))
        if self.die_after is not None and self.die_after(value):
            self.die_after = None
            raise WorkerLost(f"worker lost after storing {value}")

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


class WorkerLost(BaseException):
    """The death of the worker running a try."""


@pytest.fixture
def store() -> Store:
    return Store()


def context_of(store: Store, try_number: int = 1) -> dict[str, Any]:
    ti = FakeTaskInstance()
    ti.try_number, ti.max_tries = try_number, 3  # type: ignore[attr-defined]
    return {"ti": ti, "task_state_store": store}


def counts(api: RescaleApi) -> tuple[int, int]:
    return api.requests_to(CREATE_ROUTE), api.requests_to(SUBMIT_ROUTE)


def test_a_job_is_started_waited_on_and_judged(api: RescaleApi, store: Store) -> None:
    result, event = run_deferrable(submit(), context_of(store), api_key=API_KEY)

    assert result["status"] == "success" and result["run_ids"] == ["1"]
    assert result["outcome"]["history"][-1] == "Completed"
    assert counts(api) == (1, 1)
    # The job's name says which task instance started it: a lost create answer can be found again.
    job = api.session.get(api.url(f"jobs/{result['job_id']}/"), timeout=10).json()
    assert job["name"] == "solver [dag.task@manual__test]"
    assert store.values[JOB_STATE_KEY]["collected"] is True


def test_a_failed_job_fails_the_task(api: RescaleApi, store: Store) -> None:
    with pytest.raises(RescaleRunFailed, match="did not succeed"):
        run_deferrable(submit(job=body(emulator={"completedReason": "Exceeded max number of restarts"})), context_of(store))


@pytest.mark.parametrize(
    ("dies_after", "case"),
    [
        (lambda v: v.get("job_id") and v.get("submitted") is False, "created, never submitted"),
        (lambda v: v.get("submitted") is True, "submitted, never deferred"),
    ],
    ids=["after-create", "after-submit"],
)
def test_a_retry_after_a_dead_worker_starts_no_second_job(api: RescaleApi, store: Store, dies_after: Any, case: str) -> None:
    store.die_after = dies_after
    with pytest.raises(WorkerLost):
        submit().execute(context_of(store))

    result, _ = run_deferrable(submit(), context_of(store, try_number=2))

    assert result["status"] == "success", case
    assert counts(api) == (1, 1), case


def test_a_retry_whose_create_answer_was_lost_finds_the_job_by_name(api: RescaleApi, store: Store) -> None:
    store.die_after = lambda v: v.get("job_id") and v.get("submitted") is False
    with pytest.raises(WorkerLost):
        submit().execute(context_of(store))
    store.values[JOB_STATE_KEY]["job_id"] = None  # as if the create's answer never arrived

    result, _ = run_deferrable(submit(), context_of(store, try_number=2))

    assert result["status"] == "success" and counts(api) == (1, 1)


def test_a_retry_after_a_failed_job_starts_a_new_one(api: RescaleApi, store: Store) -> None:
    failing = body(emulator={"completedReason": "Exceeded max number of restarts"})
    with pytest.raises(RescaleRunFailed):
        run_deferrable(submit(job=failing), context_of(store))

    with pytest.raises(RescaleRunFailed):
        run_deferrable(submit(job=failing), context_of(store, try_number=2))

    assert counts(api) == (2, 2)


def test_killing_the_deferred_task_stops_the_job_once_and_a_timeout_stops_nothing(api: RescaleApi, store: Store) -> None:
    from tests.integration.rescale.support import execute_until_deferred

    deferral = execute_until_deferred(submit(job=body("sleep 30")), context_of(store))
    trigger = deferral.trigger

    async def kill_while_waiting() -> None:
        try:
            waiting = asyncio.ensure_future(trigger.run().__anext__())
            await asyncio.sleep(0.5)
            waiting.cancel()
            await trigger.on_kill()
        finally:
            await close_all_sessions()

    asyncio.run(kill_while_waiting())
    assert api.requests_to(STOP_ROUTE) == 1

    timed = execute_until_deferred(submit(job=body("sleep 30"), timeout=0.5), context_of(Store()))
    event = asyncio.run(_first_event(timed.trigger))
    assert event["status"] == "timeout" and api.requests_to(STOP_ROUTE) == 1


async def _first_event(trigger: Any) -> dict[str, Any]:
    try:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")
    finally:
        await close_all_sessions()


def test_a_bad_body_is_refused_before_any_request(api: RescaleApi, store: Store) -> None:
    from airflow_provider_hpc.exceptions import RescaleApiError

    with pytest.raises(RescaleApiError, match="non-empty name"):
        submit(job={"jobanalyses": [{"command": "x"}]}).execute(context_of(store))
    assert counts(api) == (0, 0)


def test_a_retry_while_the_first_try_was_deferred_re_attaches(api: RescaleApi, store: Store) -> None:
    from tests.integration.rescale.support import execute_until_deferred

    execute_until_deferred(submit(job=body("sleep 1; echo done > out.txt")), context_of(store))  # the try is lost deferred

    result, _ = run_deferrable(submit(job=body("sleep 1; echo done > out.txt")), context_of(store, try_number=2))

    assert result["status"] == "success" and counts(api) == (1, 1)


def test_the_running_run_s_file_is_followed_into_the_log(api: RescaleApi, store: Store, capsys: Any) -> None:
    command = "for i in 1 2 3 4 5 6; do echo line $i >> solver.log; sleep 0.3; done"
    result, _ = run_deferrable(submit(job=body(command), tail_path="solver.log"), context_of(store))

    assert result["status"] == "success"
    shown = re.findall(r"\[solver\.log\] line (\d)", capsys.readouterr().out)
    # Each line once, in order (the last ones may land after the run completed, when the tail ends).
    assert shown and shown == sorted(set(shown)) and shown[0] == "1"


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferred", "in-worker"])
def test_the_last_lines_of_the_followed_file_are_shown_once_the_job_completed(
    api: RescaleApi, store: Store, capsys: Any, deferrable: bool
) -> None:
    # The last lines land right before the run ends, after the last tail (a slow poll): the
    # run's output file gives them, so the log shows the whole file, each line once, in order.
    command = (
        'for i in $(seq 1 47); do echo "step $i" >> solver.log; sleep 0.01; done; sleep 0.6; '
        'for i in 48 49 50; do echo "step $i" >> solver.log; done; echo "solver converged" >> solver.log'
    )
    task = submit(
        job=body(command), tail_path="solver.log", deferrable=deferrable,
        poll_interval=0.5, max_poll_interval=0.5,
    )

    result = run_deferrable(task, context_of(store))[0] if deferrable else task.execute(context_of(store))

    assert result["status"] == "success"
    shown = re.findall(r"\[solver\.log\] (.*?)\s+\[airflow", capsys.readouterr().out)
    assert shown == [f"step {i}" for i in range(1, 51)] + ["solver converged"]


def test_inputs_from_a_local_path_and_from_object_storage_reach_the_run(api: RescaleApi, store: Store, tmp_path: Any) -> None:
    import fsspec
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach

    attach("memory", fs=fsspec.filesystem("memory"))
    local = tmp_path / "case.txt"
    local.write_text("4 5\n")
    remote = ObjectStoragePath("memory://cases/extra.txt")
    remote.parent.mkdir(parents=True, exist_ok=True)
    remote.write_bytes(b"from object storage\n")

    command = "cat case.txt extra.txt > seen.txt"
    result, _ = run_deferrable(submit(job=body(command), input_files=[str(local), remote]), context_of(store))

    assert result["status"] == "success"
    files = api.session.get(api.url(f"jobs/{result['job_id']}/runs/1/files/"), timeout=10).json()["results"]
    seen = next(f for f in files if f["relativePath"] == "seen.txt")
    content = api.session.get(api.url(f"files/{seen['id']}/contents/"), timeout=10).content
    assert content == b"4 5\nfrom object storage\n"
    assert api.requests_to("POST /api/v2/files/contents/") == 2
    fsspec.filesystem("memory").rm("/cases", recursive=True)


def test_an_upload_is_checked_and_a_missing_input_refused_before_any_request(api: RescaleApi, tmp_path: Any) -> None:
    from airflow_provider_hpc.hooks.rescale import RescaleHook

    source = tmp_path / "case.txt"
    source.write_text("4 5\n")
    hook = RescaleHook(retry=FAST_RETRY)
    uploaded = hook.upload_file(source)
    assert uploaded.decrypted_size == 4 and uploaded.md5 == __import__("hashlib").md5(b"4 5\n").hexdigest()

    from airflow_provider_hpc.exceptions import RescaleApiError

    with pytest.raises(RescaleApiError, match="does not exist"):
        hook.upload_file(tmp_path / "missing.txt")
    assert api.requests_to("POST /api/v2/files/contents/") == 1


def test_without_waiting_the_task_returns_the_submitted_job_and_a_retry_starts_no_other(api: RescaleApi, store: Store) -> None:
    operator = submit(job=body("sleep 5; echo solved > out.txt"), wait_for_completion=False)
    context = context_of(store)

    first = operator.execute(context)
    again = submit(job=body("sleep 5; echo solved > out.txt"), wait_for_completion=False).execute(context_of(store, try_number=2))

    assert first["status"] == "submitted" and first["run_ids"] == ["1"]
    assert context["ti"].xcom["job_id"] == first["job_id"]  # for the next task's templated fields
    assert first["outcome"]["completed"] is False
    assert again["job_id"] == first["job_id"]
    assert counts(api) == (1, 1)
