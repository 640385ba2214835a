"""RescaleRunTrigger and RescaleSnapshotTrigger without a network: the hook's async calls are scripted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from airflow.sdk import Connection

from airflow_provider_hpc.exceptions import InvalidIdentifierError, RescaleApiError
from airflow_provider_hpc.hooks.rescale import DirectoryEntry, JobStatus, OutputFile, RescaleHook, RescaleRun
from airflow_provider_hpc.models.rescale_state import judge_completed_run, pick_new_snapshot
from airflow_provider_hpc.models.rescale_tail import TailFollower, fresh_lines
from airflow_provider_hpc.transport import aio
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger, RescaleSnapshotTrigger

API_KEY = "rk-unit-SECRET-0123456789"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class RecordingLog:
    """Stands for the trigger's logger: keeps every formatted line by level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, message: str, *args: Any, **_: Any) -> None:
        self.lines.append((level, message % args if args else message))

    def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._add("info", message, *args, **kwargs)

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._add("warning", message, *args, **kwargs)

    def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._add("debug", message, *args, **kwargs)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def statuses(*items: tuple[str, str | None]) -> list[JobStatus]:
    """Return a date-sorted history from ``(status, reason)`` pairs."""
    return [JobStatus(status, T0 + timedelta(seconds=i), reason) for i, (status, reason) in enumerate(items)]


RUNNING = RescaleRun(id="1", date_started="2024-05-01T12:00:01Z")
PENDING = RescaleRun(id="1")
DONE = RescaleRun(id="1", date_started="2024-05-01T12:00:01Z", date_completed="2024-05-01T12:05:00Z", output_file_count=3)
GOOD = statuses(("Pending", None), ("Queued", None), ("Started", None), ("Executing", None), ("Completed", "Completed successfully"))


class Script:
    """Scripted answers for the hook's async methods: each call takes the next item, the last one forever."""

    def __init__(self, **items: Iterable[Any]) -> None:
        self.items = {name: list(values) for name, values in items.items()}
        self.calls: dict[str, int] = {}
        self.sessions_seen: set[int] = set()

    def next(self, name: str) -> Any:
        pool = aio._SESSIONS.get(asyncio.get_running_loop())
        self.sessions_seen.update(id(s) for s in (pool.sessions.values() if pool else ()))
        values = self.items[name]
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        item = values[min(count, len(values) - 1)]
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch) -> Connection:
    conn = Connection(conn_id="rescale_unit", conn_type="rescale", host="http://127.0.0.1:9/", password=API_KEY)

    async def aget_connection(cls: type, conn_id: str) -> Connection:
        assert conn_id == "rescale_unit"
        return conn

    monkeypatch.setattr(RescaleHook, "aget_connection", classmethod(aget_connection))
    return conn


def script(monkeypatch: pytest.MonkeyPatch, **items: Iterable[Any]) -> Script:
    scripted = Script(**items)

    async def a_get_run(hook: RescaleHook, job_id: str, run_id: str) -> RescaleRun:
        assert (job_id, run_id) == ("jobA", "1")
        return scripted.next("run")

    async def a_get_job_statuses(hook: RescaleHook, job_id: str) -> list[JobStatus]:
        return scripted.next("statuses")

    async def a_get_directory_contents(hook: RescaleHook, job_id: str, run_id: str) -> list[DirectoryEntry]:
        return scripted.next("directory")

    async def a_tail(hook: RescaleHook, job_id: str, run_id: str, path: str, lines: int = 100) -> list[str]:
        return scripted.next("tail")

    async def a_list_output_files(hook: RescaleHook, job_id: str, run_id: str, **_: Any) -> list[OutputFile]:
        return scripted.next("files")

    async def a_stop_run(hook: RescaleHook, job_id: str, run_id: str) -> None:
        return scripted.next("stop")

    async def a_find_output_file(hook: RescaleHook, job_id: str, run_id: str, path: str, **_: Any) -> OutputFile | None:
        # Unscripted, the completed run has no such output file.
        return scripted.next("output") if "output" in scripted.items else None

    async def a_read_output_file(hook: RescaleHook, file: OutputFile, *, max_bytes: int) -> bytes | None:
        body = scripted.next("body")
        return body if body is None or len(body) <= max_bytes else None

    for name, fn in list(locals().items()):
        if name.startswith("a_"):
            monkeypatch.setattr(RescaleHook, name, fn)
    return scripted


def make_trigger(**overrides: Any) -> RescaleRunTrigger:
    kwargs: dict[str, Any] = {
        "job_id": "jobA",
        "run_id": "1",
        "rescale_conn_id": "rescale_unit",
        "poll_interval": 0.001,
        "max_poll_interval": 0.002,
        "max_poll_failures": 3,
        "outcome_wait": 0.0,
        "retry": {"max_attempts": 2, "initial_wait": 0.01},
    }
    kwargs.update(overrides)
    trigger = RescaleRunTrigger(**kwargs)
    trigger._log = RecordingLog()
    return trigger


async def only_event(trigger: Any) -> dict[str, Any]:
    events = [event async for event in trigger.run()]
    assert len(events) == 1
    return events[0].payload


# ----- pure pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        ([], ["a", "b"], (["a", "b"], False)),
        (["a", "b", "c"], ["b", "c", "d", "e"], (["d", "e"], False)),
        (["a", "b", "c"], ["a", "b", "c"], ([], False)),
        (["a", "b", "c"], ["c"], ([], False)),
        (["a", "b"], ["x", "y"], (["x", "y"], True)),
        (["a", "b"], [], ([], False)),
        # Repeated lines: the longest overlap wins, so nothing already shown comes back.
        (["x", "x", "y"], ["x", "y", "x"], (["x"], False)),
    ],
)
def test_fresh_lines(previous: list[str], current: list[str], expected: tuple[list[str], bool]) -> None:
    assert fresh_lines(previous, current) == expected


def test_follower_shows_every_line_of_a_growing_file_once() -> None:
    log = [f"step {i}" for i in range(30)]
    follower = TailFollower("log.txt", lines=5)
    shown: list[str] = []
    for end in (2, 4, 4, 8, 10, 14, 30):
        new, gap = follower.take(log[max(0, end - 5):end])
        shown += new
        if end != 30:
            assert not gap
    # The jump from 14 to 30 lines is more than one tail holds: the gap is reported, nothing repeats.
    assert shown == log[:14] + log[25:30]
    assert len(shown) == len(set(shown))


def test_judge_success_failure_and_stops() -> None:
    ok = judge_completed_run(GOOD, accept_any_completion=False, waited_for_job=0, outcome_wait=60)
    assert ok is not None and ok.status == "success" and ok.reason == "Completed successfully"
    restarts = statuses(("Executing", None), ("Completed", "Exceeded max number of restarts"))
    bad = judge_completed_run(restarts, accept_any_completion=False, waited_for_job=0, outcome_wait=60)
    assert bad is not None and (bad.status, bad.reason) == ("failed", "Exceeded max number of restarts")
    stopped = statuses(("Executing", None), ("Stopping", "User requested stop"), ("Completed", "Completed successfully"))
    verdict = judge_completed_run(stopped, accept_any_completion=False, waited_for_job=0, outcome_wait=60)
    assert verdict is not None and (verdict.status, verdict.reason) == ("failed", "User requested stop")
    anyway = judge_completed_run(stopped, accept_any_completion=True, waited_for_job=0, outcome_wait=60)
    assert anyway is not None and anyway.status == "success"


def test_judge_waits_for_the_job_then_decides_from_the_run() -> None:
    going = statuses(("Queued", None), ("Executing", None))
    assert judge_completed_run(going, accept_any_completion=False, waited_for_job=5, outcome_wait=60) is None
    late = judge_completed_run(going, accept_any_completion=False, waited_for_job=61, outcome_wait=60)
    assert late is not None and late.status == "success" and "not completed yet" in (late.reason or "")
    stopping = statuses(("Executing", None), ("Stopping", "User requested stop"))
    early = judge_completed_run(stopping, accept_any_completion=False, waited_for_job=0, outcome_wait=60)
    assert early is not None and early.status == "failed"


def _file(file_id: str, relative: str, uploaded: str = "2024-05-01T12:00:00Z") -> OutputFile:
    return OutputFile(id=file_id, name=relative.rsplit("/", 1)[-1], relative_path=relative, date_uploaded=uploaded)


def test_pick_new_snapshot() -> None:
    old = _file("old", "snapshots/snapshot-old.zip")
    assert pick_new_snapshot([old], ["old"]) is None
    new = _file("new", "snapshots/snapshot-new.zip", "2024-05-01T12:01:00Z")
    assert pick_new_snapshot([old, new], ["old"]) == new
    # The run completed meanwhile: every output appeared; the snapshot is the one named so.
    outputs = [_file("a", "out.csv"), _file("b", "process_output.log"), new]
    assert pick_new_snapshot([old, *outputs], ["old"]) == new


# ----- the run trigger ----------------------------------------------------------------------------


async def test_success_event_after_the_run_completes(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, run=[PENDING, RUNNING, RUNNING, DONE], statuses=[GOOD])
    trigger = make_trigger()
    event = await only_event(trigger)
    assert event["status"] == "success"
    assert (event["job_id"], event["run_id"]) == ("jobA", "1")
    assert event["run"]["date_completed"] == DONE.date_completed
    assert event["outcome"]["succeeded"] is True and event["outcome"]["history"][-1] == "Completed"
    assert "completed successfully" in event["message"]
    assert scripted.calls["run"] == 4
    # Every poll went through one shared session, closed once the trigger ended.
    assert len(scripted.sessions_seen) == 1
    pool = aio._SESSIONS.get(asyncio.get_running_loop())
    assert pool is None or not pool.sessions
    json.dumps(event)


async def test_failed_event_names_the_reason(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    history = statuses(("Executing", None), ("Completed", "Could not allocate compute resources from the compute provider"))
    script(monkeypatch, run=[DONE], statuses=[history])
    event = await only_event(make_trigger())
    assert event["status"] == "failed"
    assert event["reason"] == "Could not allocate compute resources from the compute provider"
    assert "did not succeed" in event["message"]


async def test_waits_for_the_job_status_that_lags_the_run(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    lagging = statuses(("Queued", None), ("Executing", None))
    scripted = script(monkeypatch, run=[DONE], statuses=[lagging, lagging, GOOD])
    event = await only_event(make_trigger(outcome_wait=60))
    assert event["status"] == "success" and scripted.calls["statuses"] == 3


LOG_FILE = OutputFile(id="f9", name="log.txt", relative_path="log.txt", decrypted_size=15)


async def test_tail_logs_each_new_line_once(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    tails = [["l1", "l2"], ["l1", "l2"], ["l2", "l3", "l4"], ["l4", "l5"]]
    scripted = script(
        monkeypatch,
        run=[RUNNING, RUNNING, RUNNING, RUNNING, RUNNING, RUNNING, DONE],
        statuses=[GOOD],
        directory=[[], [DirectoryEntry("other.txt")], [DirectoryEntry("other.txt"), DirectoryEntry("log.txt")]],
        tail=tails,
        output=[LOG_FILE],
        body=[b"l1\nl2\nl3\nl4\nl5\n"],
    )
    trigger = make_trigger(tail_path="log.txt", tail_lines=3)
    event = await only_event(trigger)
    assert event["status"] == "success"
    tail_lines = [line for _, line in trigger.log.lines if line.startswith("[log.txt] ")]
    assert tail_lines == [f"[log.txt] l{i}" for i in range(1, 6)]
    # Once found, the file is no longer looked for; the output file is read once.
    assert scripted.calls["directory"] == 3 and scripted.calls["body"] == 1


async def test_the_lines_written_after_the_last_tail_come_from_the_output_file(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run wrote steps 48-50 and "solver converged" after the last tail, then completed: tail
    # answers 400 now, the uploaded output file has every line.
    whole = [f"step {i}" for i in range(1, 51)] + ["solver converged"]
    gone = RescaleApiError("HTTP 400", status=400, error="This run is not in progress.")
    scripted = script(
        monkeypatch,
        run=[RUNNING, RUNNING, RUNNING, DONE, DONE, DONE],
        statuses=[statuses(("Executing", None)), GOOD],
        directory=[[DirectoryEntry("solver.log")]],
        tail=[whole[20:30], whole[28:38], whole[37:47], gone],
        output=[OutputFile(id="f9", name="solver.log", relative_path="solver.log", decrypted_size=400)],
        body=["\n".join(whole).encode() + b"\n"],
    )
    trigger = make_trigger(tail_path="solver.log", tail_lines=10, outcome_wait=60)
    assert (await only_event(trigger))["status"] == "success"
    shown = [line.removeprefix("[solver.log] ") for _, line in trigger.log.lines if line.startswith("[solver.log] ")]
    assert shown == whole[20:]  # each line once, in order, the last ones included
    assert scripted.calls["output"] == 1 and scripted.calls["body"] == 1
    assert not [line for level, line in trigger.log.lines if level == "warning"]


@pytest.mark.parametrize(
    ("output", "said"),
    [
        (None, "[log.txt] is not among the output files of run 1"),
        (OutputFile(id="f9", name="log.txt", relative_path="log.txt", decrypted_size=10**9), "is larger than the 1000000 bytes"),
        (OutputFile(id="f9", name="log.txt", relative_path="log.txt"), "is larger than the 1000000 bytes"),
    ],
    ids=["absent", "announced-too-large", "found-too-large"],
)
async def test_an_absent_or_too_large_output_file_is_said_in_one_line(
    connection: Connection, monkeypatch: pytest.MonkeyPatch, output: OutputFile | None, said: str
) -> None:
    scripted = script(
        monkeypatch, run=[RUNNING, DONE], statuses=[GOOD], directory=[[DirectoryEntry("log.txt")]], tail=[["l1"]],
        output=[output], body=[b"x" * 1_000_001],
    )
    trigger = make_trigger(tail_path="log.txt")
    assert (await only_event(trigger))["status"] == "success"
    about = [line for _, line in trigger.log.lines if said in line]
    assert len(about) == 1
    # A file announced larger than the cap is not even asked for.
    assert scripted.calls.get("body", 0) == (1 if output and output.decrypted_size is None else 0)


async def test_a_failed_read_of_the_output_file_never_fails_the_wait(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = RescaleApiError("HTTP 403", status=403, error="Forbidden")
    script(monkeypatch, run=[DONE], statuses=[GOOD], output=[refused])
    trigger = make_trigger(tail_path="log.txt")
    assert (await only_event(trigger))["status"] == "success"
    warnings = [line for level, line in trigger.log.lines if level == "warning"]
    assert len(warnings) == 1 and "Could not read the output file log.txt" in warnings[0]


async def test_tail_errors_never_fail_the_wait(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = RescaleApiError("HTTP 400", status=400, error="This run is not in progress.")
    script(monkeypatch, run=[RUNNING, DONE], statuses=[GOOD], directory=[[DirectoryEntry("log.txt")]], tail=[gone])
    trigger = make_trigger(tail_path="log.txt")
    assert (await only_event(trigger))["status"] == "success"
    assert not [line for level, line in trigger.log.lines if level == "warning"]


async def test_transient_failures_are_absorbed(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = RescaleApiError("HTTP 504", status=504, retryable=True)
    scripted = script(monkeypatch, run=[flaky, RUNNING, flaky, flaky, DONE], statuses=[GOOD])
    event = await only_event(make_trigger(max_poll_failures=3))
    assert event["status"] == "success" and scripted.calls["run"] == 5


async def test_error_event_after_the_failure_budget(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = RescaleApiError("HTTP 503", status=503, retryable=True)
    scripted = script(monkeypatch, run=[flaky])
    event = await only_event(make_trigger(max_poll_failures=3))
    assert event["status"] == "error" and "3 times in a row" in event["message"]
    assert scripted.calls["run"] == 3


@pytest.mark.parametrize(
    "error",
    [RescaleApiError("HTTP 404", status=404, error="Not found."), InvalidIdentifierError("Job id 'a/b' is not valid")],
)
async def test_permanent_error_ends_at_once(
    connection: Connection, monkeypatch: pytest.MonkeyPatch, error: RescaleApiError
) -> None:
    scripted = script(monkeypatch, run=[error])
    event = await only_event(make_trigger())
    assert event["status"] == "error" and scripted.calls["run"] == 1


async def test_timeout_event(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, run=[RUNNING])
    event = await only_event(make_trigger(deadline=0.0))
    assert event["status"] == "timeout" and "not stopped" in event["message"]
    assert event["run"]["date_started"] == RUNNING.date_started


async def test_missing_connection_is_an_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    async def aget_connection(cls: type, conn_id: str) -> Connection:
        raise LookupError(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(RescaleHook, "aget_connection", classmethod(aget_connection))
    event = await only_event(make_trigger())
    assert event["status"] == "error" and "rescale_unit" in event["message"]


def test_serialize_round_trips_with_plain_values_and_no_secret() -> None:
    trigger = make_trigger(deadline=1_900_000_000.5, tail_path="process_output.log", tail_lines=50)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_hpc.triggers.rescale.RescaleRunTrigger"
    text = json.dumps(kwargs)
    assert API_KEY not in text and "password" not in text
    rebuilt = RescaleRunTrigger(**json.loads(text))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["tail_path"] == "process_output.log" and kwargs["cancel_on_kill"] is True


async def test_kwargs_stay_secret_free_after_running(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, run=[DONE], statuses=[GOOD])
    trigger = make_trigger()
    await only_event(trigger)
    assert API_KEY not in json.dumps(trigger.serialize()[1]) and API_KEY not in repr(trigger)


async def test_on_kill_stops_the_run(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, stop=[None])
    await make_trigger().on_kill()
    assert scripted.calls["stop"] == 1


async def test_on_kill_respects_cancel_on_kill_off(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, stop=[None])
    trigger = make_trigger(cancel_on_kill=False)
    await trigger.on_kill()
    assert "stop" not in scripted.calls and "keeps going" in trigger.log.text()


async def test_on_kill_failure_is_logged_not_raised(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, stop=[RescaleApiError("HTTP 503", status=503)])
    trigger = make_trigger()
    await trigger.on_kill()
    assert "Could not stop" in trigger.log.text()


async def test_cancellation_and_cleanup_never_stop_the_run(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, run=[RUNNING], stop=[None])
    trigger = make_trigger(poll_interval=0.01, max_poll_interval=0.01)
    task = asyncio.create_task(only_event(trigger))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await trigger.cleanup()
    assert "stop" not in scripted.calls
    pool = aio._SESSIONS.get(asyncio.get_running_loop())
    assert pool is None or not pool.sessions


# ----- the snapshot trigger -----------------------------------------------------------------------


async def test_snapshot_trigger_waits_for_the_new_file(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _file("old", "snapshots/snapshot-old.zip")
    new = _file("new", "snapshots/snapshot-new.zip")
    scripted = script(monkeypatch, files=[[old], [old], [old, new]])
    trigger = RescaleSnapshotTrigger(
        job_id="jobA", run_id="1", rescale_conn_id="rescale_unit", known_file_ids=["old"],
        poll_interval=0.001, max_poll_interval=0.002,
    )
    event = await only_event(trigger)
    assert event["status"] == "success" and event["file"]["id"] == "new"
    assert scripted.calls["files"] == 3
    classpath, kwargs = trigger.serialize()
    assert RescaleSnapshotTrigger(**json.loads(json.dumps(kwargs))).serialize() == (classpath, kwargs)


async def test_snapshot_trigger_times_out(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, files=[[]])
    trigger = RescaleSnapshotTrigger(job_id="jobA", run_id="1", rescale_conn_id="rescale_unit", deadline=0.0, poll_interval=0.001)
    event = await only_event(trigger)
    assert event["status"] == "timeout" and event["file"] is None
