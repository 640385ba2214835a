"""The accounting of the worker-cost benchmark (``benchmarks/worker_cost.py``), on synthetic process lists."""

from __future__ import annotations

import pytest

from benchmarks.worker_cost import ProcSample, busy_seconds, run, split_scheduler_tree, subtree, summarise

SCHEDULER = 100


def _tree(task_alive: bool) -> dict[int, ProcSample]:
    """A scheduler with a log server and two workers; worker 201 runs task 301 (alive or reaped)."""
    samples = {
        SCHEDULER: ProcSample(SCHEDULER, 1, "airflow scheduler", 10.0, 0.0),
        150: ProcSample(150, SCHEDULER, "airflow serve-logs", 1.0, 0.0),
        201: ProcSample(201, SCHEDULER, "airflow worker -- LocalExecutor: ti-1", 2.0, 0.0 if task_alive else 3.0),
        202: ProcSample(202, SCHEDULER, "airflow worker -- LocalExecutor: <idle>", 0.5, 4.0),
    }
    if task_alive:
        samples[301] = ProcSample(301, 201, "airflow worker -- ti-1", 3.0, 0.0)
    return samples


def test_subtree_follows_descendants_only() -> None:
    assert subtree(_tree(task_alive=True), [201]) == {201, 301}
    assert subtree(_tree(task_alive=True), [999]) == set()


def test_a_task_process_counts_once_alive_or_reaped() -> None:
    # Alive, its own CPU counts; reaped, the same CPU is in its worker's children_cpu.
    alive = split_scheduler_tree(_tree(task_alive=True), SCHEDULER)
    reaped = split_scheduler_tree(_tree(task_alive=False), SCHEDULER)
    assert alive == reaped == {"workers": 2.0 + 3.0 + 0.5 + 4.0, "scheduler": 11.0}


def test_busy_seconds_holds_each_count_until_the_next_sample() -> None:
    assert busy_seconds([(0.0, 2), (1.0, 1), (3.0, 0), (4.0, 5)]) == pytest.approx(2.0 + 2.0)
    assert busy_seconds([(0.0, 3)]) == 0


def test_summarise_subtracts_idle_and_gives_ratios() -> None:
    def mode(workers: float, slot: float, starts: int) -> dict:
        cpu = {"workers": workers, "triggerer": 2.0, "scheduler": 1.0, "api": 1.0}
        return {"cpu_s": cpu, "window_s": 10.0, "slot_s": slot, "task_starts": starts, "task_reschedule_rows": 0,
                "dag_run_s": 9.0}

    raw = {"deferrable": mode(2.0, 10.0, 4), "reschedule": mode(20.0, 40.0, 20), "poke": mode(4.0, 100.0, 2)}
    idle = {"workers": 0.0, "triggerer": 0.1, "scheduler": 0.0, "api": 0.0}
    figures = summarise(raw, idle, jobs=2)
    deferred = figures["per_mode"]["deferrable"]
    assert deferred["worker_cpu_s_per_job"] == 1.0
    assert deferred["triggerer_cpu_s_per_job"] == pytest.approx((2.0 - 0.1 * 10.0) / 2)
    assert deferred["task_starts_per_job"] == 2
    assert figures["ratios"]["reschedule/deferrable"]["worker_cpu_s_per_job"] == 10.0
    assert figures["ratios"]["poke/deferrable"]["slot_s_per_job"] == 10.0


def test_summarise_without_poke_compares_reschedule_only() -> None:
    # The quick mode leaves poke out: its ratios are absent, not zero.
    cpu = {"workers": 2.0, "triggerer": 1.0, "scheduler": 1.0, "api": 1.0}
    one = {"cpu_s": cpu, "window_s": 10.0, "slot_s": 10.0, "task_starts": 2, "task_reschedule_rows": 0, "dag_run_s": 9.0}
    raw = {"deferrable": one, "end_from_trigger": one, "reschedule": {**one, "task_starts": 6}}
    figures = summarise(raw, {"workers": 0.0, "triggerer": 0.0, "scheduler": 0.0, "api": 0.0}, jobs=2)
    assert sorted(figures["ratios"]) == ["reschedule/deferrable", "reschedule/end_from_trigger"]


@pytest.mark.parametrize("modes", [
    ("reschedule", "poke"), ("deferrable", "end_from_trigger"), ("deferrable", "end_from_trigger", "reschedule", "sleep"),
    ("deferrable", "end_from_trigger", "reschedule", "reschedule"),
])
def test_run_refuses_modes_before_starting_anything(modes: tuple[str, ...]) -> None:
    # No emulator and no deployment are needed to refuse: the check comes first.
    with pytest.raises(ValueError, match="modes must hold"):
        run(None, jobs=1, length=1.0, poke_interval=1.0, modes=modes)  # type: ignore[arg-type]


def test_both_modes_run_what_target_5_compares() -> None:
    from benchmarks.__main__ import profiles

    for profile in profiles().values():
        assert {"deferrable", "end_from_trigger", "reschedule"} <= set(profile.worker_modes)
    assert "poke" in profiles()["full"].worker_modes and "poke" not in profiles()["quick"].worker_modes
