"""The issue's targets, judged on the figures of this run only."""

from __future__ import annotations

from typing import Any

from benchmarks.report import Report, Target

CPU_VS_FLOOR = 1.3
CPU_VS_ANCHOR = 6.0
BIG_LOAD = 5000
BIG_LOAD_CPU_PCT = 25.0
BIG_LOAD_RSS_MIB = 1024.0
TRANSFER_VS_CURL = 0.8
TRANSFER_PEAK_MIB = 150.0
TRANSFER_PEAK_SIZE_MIB = 1024
HARVEST_SPEEDUP = 5.0
WORKER_CPU_VS_RESCHEDULE = 20.0


def _largest_case(report: Report, variants: tuple[str, ...]) -> dict[str, Any] | None:
    cases = [c for c in report.sections.get("load", []) if all(v in c["variants"] for v in variants)]
    return max(cases, key=lambda c: c["case"]["muse_jobs"] + c["case"]["rescale_jobs"], default=None)


def _fmt(value: float | None, unit: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def evaluate(report: Report, profile: Any) -> list[Target]:
    """Return every target, met, missed or not measured in this run."""
    return [
        _cpu_vs_floor(report),
        _cpu_vs_anchor(report),
        _big_load(report),
        _worker_cost(report),
        _transfer_speed(report),
        _transfer_memory(report),
        _harvest(report),
    ]


def _cpu_vs_floor(report: Report) -> Target:
    name = f"CPU per poll within {CPU_VS_FLOOR}x of the bare aiohttp floor"
    case = _largest_case(report, ("ours", "floor"))
    if case is None:
        return Target(name, "-", None, "load section not run")
    ratios = case["ratios"]["ours/floor"]
    steady, whole = ratios["cpu_per_poll_steady_ms"], ratios["cpu_per_poll_ms"]
    return Target(
        name,
        f"{_fmt(steady)} steady, {_fmt(whole)} whole run ({case['case']['name']})",
        None if steady is None else steady <= CPU_VS_FLOOR,
        "judged on the steady window; the whole run adds each trigger's start (connection read, hook) "
        "spread over few polls per job",
    )


def _cpu_vs_anchor(report: Report) -> Target:
    name = f"CPU per poll at least {CPU_VS_ANCHOR:g}x lower than HttpSensorTrigger over TLS"
    case = _largest_case(report, ("ours", "anchor"))
    if case is None:
        return Target(name, "-", None, "load section not run")
    ratios = case["ratios"]["anchor/ours"]
    steady, whole = ratios["cpu_per_poll_steady_ms"], ratios["cpu_per_poll_ms"]
    return Target(
        name,
        f"anchor/ours {_fmt(steady)} steady, {_fmt(whole)} whole run ({case['case']['name']})",
        None if steady is None else steady >= CPU_VS_ANCHOR,
        "judged on the steady window",
    )


def _big_load(report: Report) -> Target:
    name = f"{BIG_LOAD} triggers at 30 s: under {BIG_LOAD_CPU_PCT:g}% of one core and under 1 GiB"
    cases = [c for c in report.sections.get("load", []) if c["case"]["muse_jobs"] >= BIG_LOAD and "ours" in c["variants"]]
    if not cases:
        return Target(name, "-", None, "measured in --full only")
    ours = cases[0]["variants"]["ours"]
    pct, rss = ours["cpu_pct_steady"], ours["rss_peak_mib"]
    return Target(
        name,
        f"{_fmt(pct, '%')} of one core (steady), {rss:.0f} MiB peak RSS",
        None if pct is None else pct < BIG_LOAD_CPU_PCT and rss < BIG_LOAD_RSS_MIB,
    )


def _worker_cost(report: Report) -> Target:
    name = f"worker CPU per watched job at least {WORKER_CPU_VS_RESCHEDULE:g}x lower deferred than in reschedule mode"
    worker = report.sections.get("worker")
    if not worker:
        return Target(name, "-", None, "worker section not run")
    ratios, modes = worker["ratios"], worker["per_mode"]
    resumed = ratios["reschedule/deferrable"]["worker_cpu_s_per_job"]
    ended = ratios["reschedule/end_from_trigger"]["worker_cpu_s_per_job"]
    best = max((r for r in (resumed, ended) if r is not None), default=None)
    starts = [modes[mode]["task_starts_per_job"] for mode in ("reschedule", "deferrable", "end_from_trigger")]
    return Target(
        name,
        f"reschedule/deferred {_fmt(resumed)} (resumed on a worker), {_fmt(ended)} (end_from_trigger); "
        f"{worker['length_s']:g}s jobs, checked every {worker['poke_interval_s']:g}s; the triggerer's share: "
        f"{modes['deferrable']['triggerer_cpu_s_per_job']:.2f} CPU s/job",
        None if best is None else best >= WORKER_CPU_VS_RESCHEDULE,
        f"task-process starts per job: {starts[0]:.1f} in reschedule mode, {starts[1]:.1f} deferred and resumed, "
        f"{starts[2]:.1f} ended from the triggerer; the ratio follows the job length over the check interval "
        "(a start per check in reschedule mode)",
    )


def _transfer_speed(report: Report) -> Target:
    name = f"single-file transfer at least {TRANSFER_VS_CURL}x of curl"
    transfers = report.sections.get("transfer")
    if not transfers:
        return Target(name, "-", None, "transfer section not run")
    ratios = {size: r["hook_vs_curl"] for size, r in transfers.items()}
    return Target(
        name,
        ", ".join(f"{size}: {value:.2f}x" for size, value in ratios.items()),
        all(value >= TRANSFER_VS_CURL for value in ratios.values()),
    )


def _transfer_memory(report: Report) -> Target:
    name = f"peak memory under {TRANSFER_PEAK_MIB:g} MiB at 1 GiB, flat"
    transfers = report.sections.get("transfer")
    if not transfers:
        return Target(name, "-", None, "transfer section not run")
    peaks = ", ".join(f"{size}: {r['hook_rss_peak_transfer_mib']:.0f} MiB" for size, r in transfers.items())
    big = transfers.get(f"{TRANSFER_PEAK_SIZE_MIB} MiB")
    if big is None:
        return Target(name, peaks, None, "1 GiB in --full only; the peaks above show whether memory grows with size")
    return Target(name, peaks, big["hook_rss_peak_transfer_mib"] < TRANSFER_PEAK_MIB, "hook process RSS during the transfer")


def _harvest(report: Report) -> Target:
    name = f"parallel harvest at least {HARVEST_SPEEDUP:g}x faster than concurrency 1"
    harvest = report.sections.get("harvest")
    if not harvest:
        return Target(name, "-", None, "harvest section not run")
    return Target(name, f"{harvest['speedup']:.2f}x ({harvest['count']} files)", harvest["speedup"] >= HARVEST_SPEEDUP)
