"""The real-triggerer target (``benchmarks/targets.py``): judged by the same thresholds at the quick size, named so."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.report import Report, Target
from benchmarks.targets import TRIGGERER_WAITS, _real_triggerer


def _report(waits: int, cpu_pct: float, blocked: int = 0) -> Report:
    ours: dict[str, Any] = {
        "jobs": waits, "events": waits, "fired": waits, "cpu_pct_steady": cpu_pct, "supervisor_cpu_pct_steady": 0.5,
        "rss_peak_mib": 500.0, "delay_p50_s": 3.0, "delay_p99_s": 9.0, "delay_max_s": 10.0,
        "blocked_warnings": blocked, "error_count": 0, "cpu_per_poll_steady_ms": 0.5,
        "resume_delay_p50_s": 4.0, "resume_delay_p99_s": 10.0, "resume_delay_max_s": 10.5,
    }
    case = {"name": f"{waits} waits in airflow triggerer", "interval": 10.0}
    report = Report(machine={}, mode="test")
    report.sections["triggerer"] = {"case": case, "variants": {"ours": ours}}
    return report


def _triggerer_target(report: Report) -> Target:
    return _real_triggerer(report)


@pytest.mark.parametrize(("cpu_pct", "blocked", "result"), [(3.7, 0, "met at 500 waits"), (3.7, 1, "MISSED at 500 waits"), (30.0, 0, "MISSED at 500 waits")])
def test_the_quick_size_is_judged_and_says_its_size(cpu_pct: float, blocked: int, result: str) -> None:
    target = _triggerer_target(_report(500, cpu_pct, blocked))
    assert target.result == result
    assert f"{TRIGGERER_WAITS} waits in --full" in target.note


def test_the_full_size_is_judged_without_a_size_of_its_own() -> None:
    assert _triggerer_target(_report(TRIGGERER_WAITS, 20.0)).result == "met"
    missed = _triggerer_target(_report(TRIGGERER_WAITS, 46.3))
    assert missed.result == "MISSED" and "CPU 46.30% steady" in missed.note


def test_a_target_not_measured_says_so_whatever_its_size() -> None:
    target = _triggerer_target(Report(machine={}, mode="test"))
    assert target.result == "not measured" and target.note == "triggerer section not run"
