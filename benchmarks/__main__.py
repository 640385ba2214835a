"""
``python -m benchmarks [--quick | --full] [--only SECTION ...] [--json FILE] [--profile DIR]``

The quick mode (the default, what ``make bench`` runs) prints every target, judged at its own
smaller sizes (the 5,000-trigger target in ``--full`` only), in about eight minutes on two cores
(docs/benchmarks.md gives the times measured); ``--full`` adds the
large sizes (5,000 and 10,000 triggers, a 1 GiB transfer, 1,000 output files, 150 s jobs for the
worker cost), the mix of Muse and Rescale triggers in one loop, the worker cost's poke mode and the
request economy, and takes much longer. Everything
binds 127.0.0.1 and stops by itself; the emulator is started and stopped here, and so is the private
Airflow deployment of the ``worker`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("load", "mix", "triggerer", "worker", "transfer", "harvest", "economy")


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode."""

    name: str
    load_cases: tuple[Any, ...]
    mix_case: Any  # None: the mode has no mix section
    triggerer_case: Any
    transfer_sizes_mib: tuple[int, ...]
    transfer_repetitions: int
    harvest_files: int
    harvest_file_size: int = 256 * 1024
    harvest_latency: float = 0.020
    economy_scale: float | None = None  # None: the mode has no economy section
    economy_jobs_per_length: int = 8
    # Worker cost: M sensors watching M Muse runs of T seconds, every mode checking every P seconds.
    # P stays above the supervisor's 5 s end lag ([workers] min_heartbeat_interval): at 5 s, Airflow
    # 3.3's scheduler fails reschedule-mode sensors on the late executor event (apache/airflow#71172).
    worker_jobs: int = 3
    worker_length: float = 20.0
    worker_poke_interval: float = 10.0
    worker_modes: tuple[str, ...] = ()  # set by profiles(), from worker_cost.MODES
    extra: dict[str, Any] = field(default_factory=dict)


def profiles() -> dict[str, Profile]:
    """The quick and the full mode."""
    from benchmarks.airflow_triggerer import TriggererCase
    from benchmarks.triggerer_load import LoadCase
    from benchmarks.worker_cost import MODES

    # The quick mode keeps every target's smallest size, with runs as short as a steady window
    # of a few polls allows, under ten minutes on 2 cores (docs/benchmarks.md gives the time measured).
    quick_load = (
        LoadCase("1000 triggers", 1000, 0, 5.0, (15.0, 25.0)),
        # Polls 17 s apart, longer than aiohttp's default 15 s keep-alive: whether the pooled
        # connections last from one round to the next (the connections target), in three polls.
        LoadCase("100 triggers at 17s", 100, 0, 17.0, (18.0, 26.0), ("ours", "floor")),
    )
    # The real triggerer, polls 10 s apart (the full mode runs 10,000 at Airflow's 30 s).
    quick_triggerer = TriggererCase("500 waits in airflow triggerer", 500, 500, 10.0, (20.0, 28.0))
    return {
        "quick": Profile(
            # What carries no target is in --full only: the mix of Muse and Rescale triggers, the
            # worker cost's poke mode (target 5 compares the deferred modes with reschedule) and
            # the request economy.
            name="quick", load_cases=quick_load, mix_case=None, triggerer_case=quick_triggerer,
            transfer_sizes_mib=(64, 256),
            transfer_repetitions=3, harvest_files=200, economy_scale=None,
            worker_modes=tuple(mode for mode in MODES if mode != "poke"),
        ),
        "full": Profile(
            name="full",
            load_cases=(
                LoadCase("100 triggers", 100, 0, 5.0, (12.0, 24.0)),
                LoadCase("1000 triggers", 1000, 0, 5.0, (20.0, 40.0)),
                LoadCase("5000 triggers", 5000, 0, 30.0, (120.0, 240.0)),
                # The anchor is left out at this size: a new TLS connection per poll, 333 a second,
                # would measure the emulator's handshakes more than the trigger.
                LoadCase("10000 triggers", 10000, 0, 30.0, (120.0, 240.0), ("ours", "floor")),
            ),
            mix_case=LoadCase("mix", 400, 100, 5.0, (20.0, 40.0), ("ours", "floor")),
            triggerer_case=TriggererCase("10000 waits in airflow triggerer", 10000, 1000, 30.0, (120.0, 240.0)),
            transfer_sizes_mib=(64, 256, 1024), transfer_repetitions=3, harvest_files=1000,
            economy_scale=1 / 20,
            worker_jobs=6, worker_length=150.0, worker_modes=MODES,
        ),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of airflow-provider-hpc against its local emulator (see docs/benchmarks.md).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: every target at smaller sizes, about eight minutes on two cores")
    mode.add_argument("--full", action="store_true",
                      help="also 5,000 and 10,000 triggers (10,000 in a real triggerer), the Muse and Rescale mix, 1 GiB, 1,000 files, 150 s jobs and poke mode for the worker cost, the request economy (much longer)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--profile", type=Path, help="write profiles here: pyinstrument of each load variant (section 1), "
                        "py-spy of the real triggerer's process tree per variant (section 1c), pyinstrument of one "
                        "more hook download per size, not counted (section 3a)")
    parser.add_argument("--seed", type=int, default=20261126, help="seed of the job lengths")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sections, print the figures and the targets."""
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="hpc-bench-"))
    # A private Airflow home: nothing is read from, or written to, the user's own.
    os.environ["AIRFLOW_HOME"] = str(scratch / "airflow-home")
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    # This process only orchestrates: its own log lines would drown the figures. The triggerer
    # load variants log at INFO, as a triggerer does (see triggerer_load.py).
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "ERROR"
    os.environ["HPC_BENCH_TMP"] = str(scratch)
    try:
        return _run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, scratch: Path) -> int:
    from benchmarks import airflow_triggerer, economy, harvest, transfer, triggerer_load, worker_cost
    from benchmarks.emulator import EmulatorProcess
    from benchmarks.report import Report, machine, print_machine
    from benchmarks.targets import evaluate

    profile = profiles()["full" if args.full else "quick"]
    sections = args.only or SECTIONS
    report = Report(machine=machine(), mode=profile.name)
    print(f"airflow-provider-hpc benchmarks, {profile.name} mode: python -m benchmarks{' --full' if args.full else ''}")
    print_machine(report.machine)
    print("The emulator runs in its own process on 127.0.0.1 over TLS; its CPU is not counted.")
    if (report.machine["nproc"] or 0) <= 2:
        print("Note: 2 cores, shared with the emulator (and with any other work on the machine): "
              "compare the ratios measured in the same run, not the absolute figures.")
    started = time.monotonic()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    def section(name: str, title: str, in_mode: bool = True) -> bool:
        """Whether to run section ``name``, its title printed; a section asked for but not in this mode says so."""
        if name not in sections:
            return False
        if not in_mode:
            print(f"\n== {title}: in --full only")
            return False
        print(f"\n== {title} [{time.monotonic() - started:.0f}s]", flush=True)
        return True

    if section("load", "1. Triggerer load: MuseJobTrigger vs bare aiohttp floor vs HttpSensorTrigger"):
        with EmulatorProcess(muse_max_running=100_000) as emulator:
            report.sections["load"] = [
                triggerer_load.run_case(emulator, case, args.seed, args.profile) for case in profile.load_cases
            ]
    if section("mix", "1b. Triggerer load, Muse and Rescale triggers in one loop", profile.mix_case is not None):
        with EmulatorProcess(muse_max_running=100_000) as emulator:
            report.sections["mix"] = triggerer_load.run_case(emulator, profile.mix_case, args.seed, args.profile)
    if section("triggerer", "1c. Waits in one real `airflow triggerer` process: MuseJobTrigger vs HttpSensorTrigger, beside the floor"):
        with EmulatorProcess(muse_max_running=100_000) as emulator:
            report.sections["triggerer"] = airflow_triggerer.run(emulator, profile.triggerer_case, args.seed, args.profile)
    if section("worker", f"2. Worker cost per watched job: MuseJobSensor {' vs '.join(profile.worker_modes)}, real Airflow"):
        with EmulatorProcess() as emulator:
            report.sections["worker"] = worker_cost.run(
                emulator, profile.worker_jobs, profile.worker_length, profile.worker_poke_interval,
                profile.worker_modes,
            )
    if section("transfer", "3a. Result transfer: MuseHook.download vs curl -o, same URL"):
        with EmulatorProcess() as emulator:
            report.sections["transfer"] = transfer.run(
                emulator, list(profile.transfer_sizes_mib), profile.transfer_repetitions, args.profile
            )
    if section("harvest", "3b. Parallel harvest of Rescale output files"):
        with EmulatorProcess() as emulator:
            report.sections["harvest"] = harvest.run(
                emulator, profile.harvest_files, profile.harvest_file_size, profile.harvest_latency
            )
    if section("economy", "4. Request economy: default backoff vs fixed 5 s", profile.economy_scale is not None):
        with EmulatorProcess(time_scale=profile.economy_scale) as emulator:
            report.sections["economy"] = economy.run(
                emulator, profile.economy_scale, profile.economy_jobs_per_length, args.seed
            )
    report.targets = evaluate(report, profile)
    report.print_targets()
    elapsed = time.monotonic() - started
    print(f"\nDone in {elapsed / 60:.1f} min ({profile.name} mode).")
    if args.json:
        payload = {
            "machine": report.machine, "mode": report.mode, "elapsed_s": elapsed, "sections": report.sections,
            "targets": [dataclasses.asdict(t) for t in report.targets],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"Figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
