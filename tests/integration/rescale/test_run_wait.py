"""RescaleRunSensor and RescaleRunTrigger against the emulator: success, failure reasons, tail, timeout."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSensorTimeout
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

from airflow_provider_hpc.exceptions import RescaleApiError, RescaleRunFailed
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger
from tests.integration.rescale.support import (
    API_KEY,
    FAST_RETRY,
    RescaleApi,
    execute_until_deferred,
    first_event,
    rebuild,
    run_deferrable,
)

#: Writes ``step 1`` ... ``step 12`` to ``solver.log``, one line every 0.15 s.
STEPS_COMMAND = 'for i in $(seq 1 12); do echo "step $i" >> solver.log; sleep 0.15; done'
#: Writes steps 1-47 slowly, then, right before the run ends, steps 48-50 and "solver converged" at once:
#: a poll interval longer than that last moment leaves them to the run's output file.
LATE_END_COMMAND = (
    'for i in $(seq 1 47); do echo "step $i" >> solver.log; sleep 0.01; done; sleep 0.6; '
    'for i in 48 49 50; do echo "step $i" >> solver.log; done; echo "solver converged" >> solver.log'
)
LATE_END_LINES = [f"step {i}" for i in range(1, 51)] + ["solver converged"]
#: A slow poll: every tail lands well before or after the command's last lines.
SLOW_WAIT = {"poll_interval": 0.5, "max_poll_interval": 0.5}
FAST_WAIT = {"poll_interval": 0.05, "max_poll_interval": 0.2, "outcome_wait": 5.0, "retry": FAST_RETRY}


def sensor(job_id: str, **kwargs: Any) -> RescaleRunSensor:
    """A sensor on run 1 of ``job_id`` polling fast."""
    return RescaleRunSensor(task_id="watch", job_id=job_id, run_id="1", **{**FAST_WAIT, **kwargs})


def trigger(job_id: str, **kwargs: Any) -> RescaleRunTrigger:
    """A trigger on run 1 of ``job_id`` polling fast, rebuilt from its serialized form."""
    settings = {"poll_interval": 0.05, "max_poll_interval": 0.2, "outcome_wait": 5.0, "retry": FAST_RETRY.to_dict()}
    return rebuild(RescaleRunTrigger(job_id=job_id, run_id="1", **{**settings, **kwargs}))


def tail_messages(capsys: pytest.CaptureFixture[str], path: str) -> list[str]:
    """Return the tail lines of ``path`` the task log showed so far, in order."""
    pattern = re.compile(rf"\[{re.escape(path)}\] (.*?)\s+\[airflow[\w.]*\]")
    return [m.group(1) for line in capsys.readouterr().out.splitlines() if (m := pattern.search(line))]


# ----- success -----------------------------------------------------------------------------------


def test_deferred_wait_succeeds_and_shows_each_tail_line_once(
    api: RescaleApi, context: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = api.start_job(STEPS_COMMAND)
    # The task starts midway: the lines written before it are shown once too.
    api.wait_lines(job_id, "1", "solver.log", 3)
    task = sensor(job_id, tail_path="solver.log", tail_lines=20, deferrable=True)

    result, event = run_deferrable(task, context, api_key=API_KEY)

    assert event["status"] == "success"
    assert result["status"] == "success"
    assert result["job_id"] == job_id and result["run_id"] == "1"
    assert result["run"]["date_completed"]
    assert result["outcome"]["history"][-1] == "Completed"
    assert result["reason"] == "Completed successfully"
    # Every line once, in order, although each poll's tail returned the whole file again.
    assert tail_messages(capsys, "solver.log") == [f"step {i}" for i in range(1, 13)]
    assert json.loads(json.dumps(result)) == result


def test_trigger_tail_with_short_reads_shows_each_line_once(api: RescaleApi, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = api.start_job(STEPS_COMMAND)

    # Five of twelve lines per read: each tail is shorter than the file, yet a poll may come up
    # to 0.75 s late (a loaded machine) before a line falls out of reach.
    event = asyncio.run(first_event(trigger(job_id, tail_path="solver.log", tail_lines=5)))

    assert event["status"] == "success"
    assert tail_messages(capsys, "solver.log") == [f"step {i}" for i in range(1, 13)]


def test_trigger_success_event_carries_run_and_outcome(api: RescaleApi) -> None:
    job_id = api.start_job("echo done > out.txt", runs=[{"variables": {"x": 1.5}}])

    event = asyncio.run(first_event(trigger(job_id)))

    assert event["status"] == "success"
    assert event["run"]["variables"] == {"x": 1.5}
    assert event["outcome"] == {
        "completed": True,
        "succeeded": True,
        "reason": "Completed successfully",
        "history": ["Pending", "Queued", "Started", "Validated", "Executing", "Completed"],
    }
    assert "completed successfully" in event["message"]


async def _raw_event(trigger: RescaleRunTrigger) -> TriggerEvent:
    try:
        async for event in trigger.run():
            return event
    finally:
        await close_all_sessions()
    raise AssertionError("the trigger ended without an event")


def test_end_from_trigger_ends_a_successful_wait_with_the_sensors_own_value(
    api: RescaleApi, context: dict[str, Any]
) -> None:
    job_id = api.start_job("sleep 0.5; echo done > out.txt")
    deferral = execute_until_deferred(sensor(job_id, deferrable=True, end_from_trigger=True), context)
    assert deferral.serialized["end_from_trigger"] is True

    event = asyncio.run(_raw_event(deferral.trigger))

    assert isinstance(event, TaskSuccessEvent)
    # Exactly what a sensor that does not end in the triggerer returns for the same run.
    on_a_worker = sensor(job_id, deferrable=False).execute(context)
    assert event.xcoms == {"return_value": on_a_worker}
    assert on_a_worker["status"] == "success" and on_a_worker["reason"] == "Completed successfully"


def test_end_from_trigger_still_resumes_a_failed_run_on_the_worker(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 0.5; echo boom; exit 3")
    task = sensor(job_id, deferrable=True, end_from_trigger=True)
    deferral = execute_until_deferred(task, context)

    event = asyncio.run(_raw_event(deferral.trigger))

    assert not isinstance(event, TaskSuccessEvent) and event.payload["status"] == "failed"
    with pytest.raises(RescaleRunFailed):
        task.execute_complete(context, json.loads(json.dumps(event.payload)))


def test_a_resume_without_payload_reads_the_run_again(api: RescaleApi, context: dict[str, Any]) -> None:
    # `airflow dags test` resumes even a task its trigger ended, with the state's name as event.
    job_id = api.start_job("echo done > out.txt")
    asyncio.run(first_event(trigger(job_id)))

    value = sensor(job_id, end_from_trigger=True).execute_complete(context, "success")

    assert value["status"] == "success" and value["job_id"] == job_id


def test_poke_mode_succeeds_and_tails(api: RescaleApi, context: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    job_id = api.start_job(STEPS_COMMAND)
    task = sensor(job_id, tail_path="solver.log", deferrable=False, poke_interval=0.05, timeout=30)

    result = task.execute(context)

    assert result["status"] == "success"
    shown = tail_messages(capsys, "solver.log")
    assert len(shown) == len(set(shown)), "a tail line was logged twice"
    assert shown == [f"step {i}" for i in range(1, len(shown) + 1)] and len(shown) >= 6


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferred", "poke"])
def test_the_lines_written_right_before_completion_are_shown_once_in_order(
    api: RescaleApi, context: dict[str, Any], capsys: pytest.CaptureFixture[str], deferrable: bool
) -> None:
    job_id = api.start_job(LATE_END_COMMAND)
    api.wait_lines(job_id, "1", "solver.log", 2)
    task = sensor(job_id, tail_path="solver.log", deferrable=deferrable, timeout=30, **SLOW_WAIT)

    result = run_deferrable(task, context)[0] if deferrable else task.execute(context)

    assert result["status"] == "success"
    # The tail stops at completion; the run's output file gives the rest: every line once, in order.
    assert tail_messages(capsys, "solver.log") == LATE_END_LINES


def test_a_run_completed_before_the_sensor_shows_its_file_once(
    api: RescaleApi, context: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = api.start_job('for i in 1 2 3; do echo "step $i" >> solver.log; done')
    api.wait_job_completed(job_id)

    result = sensor(job_id, tail_path="solver.log", deferrable=True).execute(context)

    assert result["status"] == "success"
    assert tail_messages(capsys, "solver.log") == ["step 1", "step 2", "step 3"]


def test_a_followed_file_the_run_never_wrote_is_said_once(
    api: RescaleApi, context: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = api.start_job("sleep 0.3")

    result, _ = run_deferrable(sensor(job_id, tail_path="missing.log", deferrable=True), context)

    assert result["status"] == "success"
    said = [line for line in capsys.readouterr().out.splitlines() if "is not among the output files" in line]
    assert len(said) == 1 and "[missing.log]" in said[0]


def test_run_already_completed_returns_without_deferring(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("true")
    api.wait_job_completed(job_id)

    result = sensor(job_id, deferrable=True).execute(context)

    assert result["status"] == "success"
    assert context["ti"].xcom["_link_RescaleJobLink"].endswith(f"/jobs/{job_id}/")


# ----- failure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason", ["Exceeded max number of restarts", "Could not allocate compute resources from the compute provider"]
)
def test_completed_with_a_failure_reason_fails_the_deferred_wait(
    api: RescaleApi, context: dict[str, Any], reason: str
) -> None:
    job_id = api.start_job("true", emulator={"completedReason": reason})

    with pytest.raises(RescaleRunFailed, match=re.escape(reason)) as failed:
        run_deferrable(sensor(job_id, deferrable=True), context, api_key=API_KEY)

    assert "did not succeed" in str(failed.value)
    assert API_KEY not in str(failed.value)


def test_failure_event_names_the_reason_and_history(api: RescaleApi) -> None:
    job_id = api.start_job("true", emulator={"completedReason": "Exceeded max number of restarts"})

    event = asyncio.run(first_event(trigger(job_id)))

    assert event["status"] == "failed"
    assert event["reason"] == "Exceeded max number of restarts"
    assert event["outcome"]["succeeded"] is False
    assert event["run"]["date_started"] is None and event["run"]["date_completed"]


def test_nonzero_exit_fails_in_poke_mode_too(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("echo boom; exit 3")

    with pytest.raises(RescaleRunFailed, match="exit code 3"):
        sensor(job_id, deferrable=False, poke_interval=0.05, timeout=30).execute(context)


def test_stopped_run_fails_unless_any_completion_is_accepted(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")
    api.wait_started(job_id)
    api.session.post(api.url(f"jobs/{job_id}/runs/1/stop/"), timeout=10)
    api.wait_job_completed(job_id)

    with pytest.raises(RescaleRunFailed, match="User requested stop"):
        run_deferrable(sensor(job_id, deferrable=True), context)

    result = sensor(job_id, deferrable=True, accept_any_completion=True).execute(context)
    assert result["status"] == "success"
    assert "Stopping" in result["outcome"]["history"]


def test_timeout_fails_the_wait_and_leaves_the_run_going(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")

    with pytest.raises(AirflowSensorTimeout, match="was not stopped"):
        run_deferrable(sensor(job_id, deferrable=True, timeout=0.5), context)

    assert api.stops(job_id) == 0
    assert api.run(job_id)["dateCompleted"] is None


def test_unknown_run_is_an_error_event(api: RescaleApi) -> None:
    job_id = api.start_job("true")

    event = asyncio.run(first_event(rebuild(RescaleRunTrigger(job_id=job_id, run_id="9", poll_interval=0.05))))

    assert event["status"] == "error"
    assert "404" in event["message"]


def test_the_trigger_first_polls_one_interval_after_the_sensors_own_look(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 5")
    before = time.time()
    deferral = execute_until_deferred(sensor(job_id, deferrable=True, poll_interval=2.0), context)
    # An immediate poll would only repeat the sensor's look, and could end the wait before the
    # scheduler has seen the deferral.
    assert before + 2.0 <= deferral.serialized["first_poll_at"] <= time.time() + 2.0


# ----- deferrable by default ---------------------------------------------------------------------


def test_waits_defer_by_default_despite_the_shipped_operators_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.configuration import conf

    monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", raising=False)
    monkeypatch.delenv("AIRFLOW__HPC__DEFAULT_DEFERRABLE", raising=False)
    # Airflow ships (and writes into every airflow.cfg it generates) "default_deferrable = false".
    assert conf.getboolean("operators", "default_deferrable") is False
    assert RescaleRunSensor(task_id="w", job_id="QTVia", run_id="1").deferrable is True

    monkeypatch.setenv("AIRFLOW__HPC__DEFAULT_DEFERRABLE", "false")
    assert RescaleRunSensor(task_id="w", job_id="QTVia", run_id="1").deferrable is False
    assert RescaleRunSensor(task_id="w", job_id="QTVia", run_id="1", deferrable=True).deferrable is True

    monkeypatch.delenv("AIRFLOW__HPC__DEFAULT_DEFERRABLE")
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "False")
    assert RescaleRunSensor(task_id="w", job_id="QTVia", run_id="1").deferrable is False


# ----- errors on the way -------------------------------------------------------------------------


def test_transient_errors_while_polling_are_absorbed(api: RescaleApi, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = api.start_job("sleep 0.5")
    api.set_faults(
        [
            {"route": "GET /api/jobs/*/runs/1/", "sequence": ["pass", {"status": 503}, {"status": 429, "retry_after": 0.05}]},
            {"route": "GET /api/v2/jobs/*/statuses/", "sequence": [{"status": 504}, {"drop": True}]},
        ]
    )

    event = asyncio.run(first_event(trigger(job_id)))

    assert event["status"] == "success"
    assert API_KEY not in capsys.readouterr().out


def test_polls_failing_again_and_again_end_in_an_error(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")
    # The sensor's first look passes; from then on, every poll of the run meets a 502.
    api.set_faults(
        [
            {"route": "GET /api/jobs/*/runs/1/", "sequence": ["pass"]},
            {"route": "GET /api/jobs/*/runs/1/", "probability": 1.0, "action": {"status": 502}},
        ]
    )
    task = sensor(job_id, deferrable=True, max_poll_failures=3, retry=RetryPolicy(max_attempts=2, initial_wait=0.01))

    with pytest.raises(RescaleApiError, match="3 times in a row") as failed:
        run_deferrable(task, context)

    assert "502" in str(failed.value)
    assert api.requests_to("GET /api/jobs/{job_id}/runs/{run_id}/") == 1 + 3 * 2


def test_a_wrong_api_key_fails_at_once_without_showing_it(
    api: RescaleApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = api.start_job("sleep 30")
    wrong_key = "rk-wrong-0123456789abcdef"
    conn = {"conn_type": "rescale", "host": api.server.rescale_url, "password": wrong_key}
    monkeypatch.setenv("AIRFLOW_CONN_RESCALE_WRONG", json.dumps(conn))

    event = asyncio.run(first_event(trigger(job_id, rescale_conn_id="rescale_wrong")))

    assert event["status"] == "error"
    assert "401" in event["message"] and "Invalid token" in event["message"]
    assert wrong_key not in json.dumps(event) and wrong_key not in capsys.readouterr().out
    assert api.requests_to("GET /api/jobs/{job_id}/runs/{run_id}/") == 1, "a 401 is not retried"
