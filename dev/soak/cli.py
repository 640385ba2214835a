"""
The soak's command line (``scripts/soak.py``, ``make soak``): the phases asked for, their counts, the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import dev.soak
from dev.soak.airflow_phase import airflow_phase
from dev.soak.in_process import in_process_phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=dev.soak.__doc__.strip().splitlines()[0])
    parser.add_argument("--phase", choices=("all", "in-process", "airflow"), default="all",
                        help="which phases to run (default all: in-process, then airflow)")
    parser.add_argument("--muse-runs", type=int, default=100, help="in-process phase: Muse runs (default 100)")
    parser.add_argument("--rescale-jobs", type=int, default=25, help="in-process phase: Rescale jobs (default 25)")
    parser.add_argument("--runs-per-job", type=int, default=2, help="in-process phase: runs of each Rescale job (default 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="in-process phase: runs driven at once (default 16)")
    parser.add_argument("--tries", type=int, default=3, help="in-process phase: tries of each task (default 3)")
    parser.add_argument("--max-seconds", type=float, default=120,
                        help="in-process phase: start no new run after this (default 120)")
    parser.add_argument("--airflow-muse-runs", type=int, default=300,
                        help="airflow phase: mapped Muse tasks (default 300)")
    parser.add_argument("--airflow-rescale-jobs", type=int, default=25,
                        help="airflow phase: Rescale jobs of 2 runs, each run watched and harvested (default 25)")
    parser.add_argument("--airflow-parallelism", type=int, default=8,
                        help="airflow phase: LocalExecutor parallelism (default 8: on 2 cores, tasks spend much of "
                             "their time waiting on the network)")
    parser.add_argument("--airflow-max-seconds", type=float, default=900,
                        help="airflow phase: the longest wait for the DAG run to end (default 900)")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiplies every fault probability")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the runs and of the faults")
    parser.add_argument("--json", type=Path, help="also write the counts and problems to this file")
    args = parser.parse_args(argv)

    started = time.monotonic()
    report: dict[str, Any] = {"problems": []}
    print("Fault soak:", " ".join(sys.argv[1:] if argv is None else argv) or "(defaults)", flush=True)
    if args.phase in ("all", "in-process"):
        print("Phase 1, in-process: the operators, triggers and execute_complete driven in this process", flush=True)
        figures, problems = in_process_phase(args)
        print_figures("Phase 1, in-process", figures)
        report["figures"] = figures
        report["problems"] += [f"in-process: {p}" for p in problems]
    if args.phase in ("all", "airflow"):
        print("Phase 2, airflow: DAG runs on a real API server, scheduler (LocalExecutor) and triggerer", flush=True)
        figures, problems = airflow_phase(args)
        print_figures("Phase 2, airflow", figures)
        report["airflow_figures"] = figures
        report["problems"] += [f"airflow: {p}" for p in problems]
    report["seconds"] = round(time.monotonic() - started)
    print(f"Total: {report['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    problems = report["problems"]
    if problems:
        print(f"FAILED: {len(problems)} problems", file=sys.stderr)
        for problem in problems[:50]:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("OK: every run ended as the emulator decided; no duplicate submission, no lost result, every file verified"
          + ("; no secret found, no process left behind" if "airflow_figures" in report else ""))
    return 0



def print_figures(title: str, figures: dict[str, Any]) -> None:
    """Print one phase's counts, one a line, then the line that says whether it held."""
    print(f"{title}:")
    for name, value in figures.items():
        print(f"  {name:42} {value}")
    muse = figures.get("muse_runs", figures.get("muse_tasks", 0))
    rescale = figures.get("rescale_runs", 0)
    summary = [
        f"runs {muse + rescale} ({muse} Muse, {rescale} Rescale)",
        f"outcomes as decided {figures.get('outcomes_as_decided', 0)} of {muse + rescale}"
        f" ({figures.get('muse_never_submitted', 0)} Muse tasks never got a run: every submit refused)",
        f"duplicates {figures.get('duplicate_submissions', 0)}",
        f"lost {figures.get('lost_results', 0) + figures.get('lost_files', 0)}",
        f"md5 failures {figures.get('files_md5_mismatch', 0)}",
    ]
    if "secrets_found" in figures:
        summary.append(f"secrets found {figures['secrets_found']}")
    print(f"{title} in short: " + "; ".join(summary), flush=True)

