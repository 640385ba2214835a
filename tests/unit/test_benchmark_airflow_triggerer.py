"""The accounting of the real-triggerer benchmark (``benchmarks/airflow_triggerer.py``), on synthetic figures."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from benchmarks.airflow_triggerer import TriggererCase, summarize

CASE = TriggererCase("3 waits", 3, 0, 10.0, (30.0, 40.0))
# 2026-12-02T12:13:23Z: the runs end 30, 35 and 40 s after it.
RELEASED = 1796213603.0
BLOCKED_LINE = (
    "2026-12-02T12:14:03.053589Z [info     ] Triggerer's async thread was blocked for 0.65 seconds, exceeding "
    "the configured warning threshold of 0.20 seconds. [airflow.jobs.triggerer_job_runner]"
)


def _summary(instances: list[dict], log_text: str = "") -> dict:
    # From 20 s before the release on: 0.1 CPU second and 5 polls a second, so 10 % of one core, 20 ms per poll;
    # of it, the supervisor's own 0.04 CPU second a second.
    sampler = SimpleNamespace(
        samples=[(RELEASED - 20 + t, 5.0 + max(0.0, t - 20) / 10, 100 * 2**20) for t in range(0, 80)],
        root_samples=[(RELEASED - 20 + t, 2.0 + max(0.0, t - 20) * 0.04) for t in range(0, 80)],
        peak_rss=300 * 2**20, peak_runner_rss=200 * 2**20,
    )
    polls = SimpleNamespace(samples=[(RELEASED - 20 + t, 5 * max(0, t - 20)) for t in range(0, 80)])
    ends = {"a": RELEASED + 30.0, "b": RELEASED + 35.0, "c": RELEASED + 40.0}
    return summarize(CASE, "ours", 3, instances, sampler, polls, RELEASED, RELEASED + 55.0, 12.0, ends, log_text)


def _resumed(key: str, at: float, status: str = "ok") -> dict:
    return {"key": key, "state": "scheduled", "updated_at": RELEASED + at, "event": {"status": status}}


def _fired(key: str, at: float) -> str:
    """A trigger log's event line, as Airflow's run_trigger writes it (JSON, the payload's repr in it)."""
    stamp = datetime.fromtimestamp(RELEASED + at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (
        f'{{"timestamp":"{stamp}","level":"info","event":"Trigger fired event","name":"bench/run/watch/0/1 (ID 1)",'
        f'"result":"TriggerEvent<{{\'status\': \'ok\', \'name\': \'sw_example\', \'key\': \'{key}\'}}>"}}'
    )


def test_each_run_s_delays_count_from_its_end_to_its_trigger_s_event_and_to_its_resume() -> None:
    # The triggerer's own output renders some lines for the console: they count too.
    console_b = (
        "2026-12-02T12:14:01.000000Z [info     ] Trigger fired event   [airflow.jobs.triggerer_job_runner] "
        "result=\"TriggerEvent<{'status': 'ok', 'name': 'sw_example', 'key': 'b'}>\""
    )
    log = "\n".join([_fired("a", 31.0), console_b, _fired("c", 45.0), _fired("a", 90.0)])
    summary = _summary([_resumed("a", 32.0), _resumed("b", 41.0), _resumed("c", 50.0)], log)
    assert (summary["events"], summary["fired"], summary["error_count"], summary["blocked_warnings"]) == (3, 3, 0, 0)
    # The trigger's event: 1, 3 and 5 s after the runs' ends (a key's first event counts).
    assert (summary["delay_p50_s"], summary["delay_max_s"]) == (3.0, 5.0)
    # The task instances resumed by the supervisor: 2, 6 and 10 s after.
    assert (summary["resume_delay_p50_s"], summary["resume_delay_max_s"]) == (6.0, 10.0)
    assert round(summary["cpu_pct_steady"], 3) == 10.0
    # The supervisor's share of it, the rest being the trigger runner's and the log server's.
    assert round(summary["supervisor_cpu_pct_steady"], 3) == 4.0
    assert round(summary["cpu_per_poll_steady_ms"], 3) == 20.0
    assert summary["rss_peak_mib"] == 300


def test_a_wait_still_deferred_or_ended_badly_is_an_error() -> None:
    deferred = {"key": "c", "state": "deferred", "updated_at": RELEASED, "event": None}
    summary = _summary([_resumed("a", 32.0), _resumed("b", 41.0, status="error"), deferred])
    assert summary["events"] == 2
    assert summary["error_count"] == 2
    assert any(error.startswith("c: deferred") for error in summary["errors"])


def test_blocked_warnings_and_error_lines_of_the_triggerer_are_counted() -> None:
    log = "\n".join([
        BLOCKED_LINE,
        "2026-12-02T12:15:00Z [error    ] Trigger failed [airflow.jobs.triggerer_job_runner]",
        '{"level": "info", "event": "trigger completed"}',
        '{"level": "error", "event": "Trigger runner failed"}',
    ])
    summary = _summary([_resumed(k, 40.0) for k in "abc"], log)
    assert (summary["blocked_warnings"], summary["blocked_max_s"]) == (1, 0.65)
    assert summary["blocked_at_s"] == [round(1796213643.053589 - RELEASED, 1)]  # 12:14:03.05 UTC
    assert summary["error_count"] == 2
