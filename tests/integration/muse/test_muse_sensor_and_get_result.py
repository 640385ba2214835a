"""MuseJobSensor (deferrable, poke, reschedule) and MuseGetResultOperator against the emulator."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowRescheduleException, AirflowSensorTimeout, AirflowSkipException, TaskDeferred
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.exceptions import MuseApiError, MuseJobFailed
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.links.muse import STATE_URL_XCOM_KEY
from airflow_provider_hpc.operators.muse import MuseGetResultOperator
from airflow_provider_hpc.sensors.muse import MuseJobSensor

from muse_support import STATE_ROUTE, drive, make_context, rebuild

LONG_CMD = "sleep 0.6; python /add.py 4 5"


def submit(cmd: str = "python /add.py 4 5", **fields: Any) -> str:
    """Submit ``cmd`` to ``sw_example`` and return the key."""
    hook = MuseHook()
    try:
        return hook.submit("sw_example", cmd=cmd, **fields).key
    finally:
        hook.close()


def wait_until_ended(key: str) -> None:
    """Block until the run's ``cr`` is no longer ``WAIT``."""
    hook = MuseHook()
    deadline = time.monotonic() + 20
    while not hook.get_state("sw_example", key).is_terminal:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.02)
    hook.close()


def sensor(key: str, **overrides: Any) -> MuseJobSensor:
    """A sensor on ``key`` with fast polls."""
    kwargs: dict[str, Any] = {
        "task_id": "wait",
        "name": "sw_example",
        "key": key,
        "poke_interval": 0.05,
        "max_poll_interval": 0.2,
    }
    kwargs.update(overrides)
    return MuseJobSensor(**kwargs)


# ----- MuseJobSensor -------------------------------------------------------------------------------


def test_sensor_defers_by_default_and_returns_the_report(muse: EmulatorServer) -> None:
    key = submit(LONG_CMD)
    task = sensor(key)
    context = make_context()

    driven = drive(task, context)

    assert task.deferrable is True
    assert len(driven.deferrals) == 1
    assert driven.value["cr"] == "OK" and driven.value["latest_state"] == "COMPLETED"
    assert context["ti"].xcom[STATE_URL_XCOM_KEY].endswith(f"/software/muse/state/sw_example/{key}/")


def test_sensor_on_a_run_already_ended_does_not_defer(muse: EmulatorServer) -> None:
    key = submit()
    wait_until_ended(key)

    driven = drive(sensor(key), make_context())

    assert driven.deferrals == [] and driven.value["cr"] == "OK"


def test_sensor_in_poke_mode(muse: EmulatorServer) -> None:
    key = submit(LONG_CMD)

    value = sensor(key, deferrable=False, mode="poke").execute(make_context())

    assert value["cr"] == "OK"
    assert muse.counters.get("requests", STATE_ROUTE) >= 3


def test_sensor_in_reschedule_mode(muse: EmulatorServer) -> None:
    key = submit(LONG_CMD)
    task = sensor(key, deferrable=False, mode="reschedule")

    with pytest.raises(AirflowRescheduleException):
        task.execute(make_context())
    wait_until_ended(key)
    value = task.execute(make_context())

    assert value["cr"] == "OK"


async def _raw_event(trigger: Any) -> TriggerEvent:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger ended without an event")


def _deferral(task: MuseJobSensor, context: dict[str, Any]) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    return deferred.value


def test_end_from_trigger_ends_a_run_that_ended_well_with_the_sensors_own_value(
    muse: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key = submit(LONG_CMD)
    context = make_context()
    deferral = _deferral(sensor(key, end_from_trigger=True), context)

    event = asyncio.run(_raw_event(rebuild(deferral.trigger)))

    assert isinstance(event, TaskSuccessEvent)
    # The triggerer logs a success event without its payload: the trigger's own line says how the run ended.
    logged = capsys.readouterr().out
    assert f"Muse run sw_example/{key} ended well" in logged and "the task ends from the triggerer" in logged
    assert deferral.trigger.serialize()[1]["end_from_trigger"] is True
    # Exactly what a sensor that does not end in the triggerer returns for the same run.
    on_a_worker = drive(sensor(key), make_context()).value
    assert event.xcoms == {"return_value": on_a_worker}
    assert on_a_worker["cr"] == "OK" and on_a_worker["latest_state"] == "COMPLETED"
    assert json.loads(json.dumps(event.xcoms)) == event.xcoms


def test_end_from_trigger_still_resumes_a_failed_run_on_the_worker(muse: EmulatorServer, tmp_path: Path) -> None:
    key = submit("sleep 0.6; python /add.py 4 x")
    task = sensor(key, end_from_trigger=True, output_path=str(tmp_path))
    deferral = _deferral(task, make_context())

    event = asyncio.run(_raw_event(rebuild(deferral.trigger)))

    assert not isinstance(event, TaskSuccessEvent) and event.payload["status"] == "nok"
    with pytest.raises(MuseJobFailed, match=key):
        task.execute_complete(make_context(), json.loads(json.dumps(event.payload)))


def test_a_resume_without_payload_reads_the_state_again(muse: EmulatorServer) -> None:
    # `airflow dags test` resumes even a task its trigger ended, with the state's name as event.
    key = submit()
    wait_until_ended(key)

    value = sensor(key, end_from_trigger=True).execute_complete(make_context(), "success")

    assert value["cr"] == "OK" and value["latest_state"] == "COMPLETED"


@pytest.mark.parametrize("deferrable", [True, False])
def test_sensor_on_a_failed_run_raises_and_keeps_the_content_zip(
    muse: EmulatorServer, tmp_path: Path, deferrable: bool, task_logs: list[str]
) -> None:
    key = submit("sleep 0.2; python /add.py 4 x")

    with pytest.raises(MuseJobFailed, match=f"{key}.*latest_state FAILED"):
        drive(sensor(key, deferrable=deferrable, output_path=str(tmp_path)), make_context())

    with zipfile.ZipFile(tmp_path / "content.zip") as zipped:
        assert "'x' is not a number" in zipped.read("__WS__stderr.txt").decode()
    assert any("'x' is not a number" in line for line in task_logs if line.startswith("error: Tail"))


@pytest.mark.parametrize("deferrable", [True, False])
def test_sensor_soft_fail_skips_a_failed_run(muse: EmulatorServer, tmp_path: Path, deferrable: bool) -> None:
    key = submit("sleep 0.2; python /add.py 4 x")

    with pytest.raises(AirflowSkipException) as caught:
        drive(sensor(key, deferrable=deferrable, soft_fail=True, output_path=str(tmp_path)), make_context())

    # Deferred, Airflow's resume_execution wraps the sensor's own skip; the reason stays in the chain.
    reasons = f"{caught.value} {caught.value.__cause__}"
    assert "ended badly" in reasons and key in reasons


@pytest.mark.parametrize("deferrable", [True, False])
def test_sensor_timeout(muse: EmulatorServer, deferrable: bool) -> None:
    key = submit("sleep 5; python /add.py 1 2")

    started = time.monotonic()
    with pytest.raises(AirflowSensorTimeout):
        drive(sensor(key, deferrable=deferrable, mode="poke", timeout=0.4), make_context())
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("deferrable", [True, False])
def test_sensor_timeout_with_soft_fail_skips(muse: EmulatorServer, deferrable: bool) -> None:
    key = submit("sleep 5; python /add.py 1 2")

    with pytest.raises(AirflowSkipException):
        drive(sensor(key, deferrable=deferrable, timeout=0.3, soft_fail=True), make_context())


def test_sensor_deferral_carries_its_timeout_to_the_trigger(muse: EmulatorServer) -> None:
    key = submit("sleep 5; python /add.py 1 2")

    before = time.time()
    with pytest.raises(TaskDeferred) as caught:
        sensor(key, timeout=120, poke_interval=2.0, max_poll_interval=5.0).execute(make_context())

    _, kwargs = caught.value.trigger.serialize()
    assert kwargs["deadline"] == pytest.approx(time.time() + 120, abs=5)
    assert kwargs["poll_interval"] == 2.0 and kwargs["max_poll_interval"] == 5.0
    # The sensor has just read the state: the trigger's first poll comes one interval later.
    assert before + 2.0 <= kwargs["first_poll_at"] <= time.time() + 2.0


def test_sensor_on_an_unknown_key_fails_clearly(muse: EmulatorServer) -> None:
    with pytest.raises(MuseApiError, match="Unknown key"):
        drive(sensor(str(uuid.uuid4())), make_context())


# ----- MuseGetResultOperator -----------------------------------------------------------------------


def get_result(key: str, **overrides: Any) -> MuseGetResultOperator:
    """A result fetch of ``key``."""
    return MuseGetResultOperator(task_id="fetch", name="sw_example", key=key, **overrides)


def test_get_result_reads_returned_type_from_the_report(muse: EmulatorServer, tmp_path: Path) -> None:
    key = submit(returned_type="run.zip")
    wait_until_ended(key)

    value = get_result(key, output_path=str(tmp_path), extract_zip=True).execute(make_context())

    assert value["returned_type"] == "run.zip" and value["key"] == key
    assert (tmp_path / "run.zip").is_file()
    assert (tmp_path / "run" / "__WS__stdout.txt").read_text().strip() == "9.0"


def test_get_result_of_stdout(muse: EmulatorServer) -> None:
    key = submit()
    wait_until_ended(key)

    value = get_result(key).execute(make_context())

    assert value["stdout"] == "9.0" and value["state"] == "COMPLETED"


def test_get_result_follows_a_download_key(muse: EmulatorServer, tmp_path: Path) -> None:
    key = submit(returned_type="stdout.txt", todownload=True)
    wait_until_ended(key)

    value = get_result(key, output_path=str(tmp_path)).execute(make_context())

    assert value["download"]["key"]
    assert (tmp_path / "stdout.txt").read_text().strip() == "9.0"


def test_get_result_of_a_run_still_going_says_to_wait(muse: EmulatorServer) -> None:
    key = submit("sleep 5; python /add.py 1 2")

    with pytest.raises(MuseApiError, match="still going.*MuseJobSensor"):
        get_result(key).execute(make_context())


def test_get_result_of_a_failed_run_raises(muse: EmulatorServer, tmp_path: Path) -> None:
    key = submit("python /add.py x")
    wait_until_ended(key)

    with pytest.raises(MuseJobFailed, match=key):
        get_result(key, output_path=str(tmp_path)).execute(make_context())
    assert (tmp_path / "content.zip").is_file()


def test_get_result_after_a_sensor_through_xcom_templates(muse: EmulatorServer) -> None:
    key = submit()
    wait_until_ended(key)
    task = get_result("{{ ti.xcom_pull(task_ids='submit', key='muse_key') }}")

    assert "key" in task.template_fields
    task.key = key  # what rendering the template gives
    assert task.execute(make_context())["stdout"] == "9.0"
