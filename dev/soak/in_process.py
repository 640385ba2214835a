"""
Phase 1, in-process: every delivery path, each run through the provider's real operators and
sensors driven in this process, tried again with the same ``task_state_store`` when a try fails.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hpc_emulator import EmulatorConfig, EmulatorServer

from airflow_provider_hpc.exceptions import HpcApiError, MuseJobFailed, RescaleRunFailed
from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.operators.rescale_download import MANIFEST_NAME, RescaleDownloadOutputsOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor
from dev.soak.driving import FAST, FakeTaskInstance, Outcome, StateStore, drive
from dev.soak.faults import fault_rules
from dev.soak.harness import Harness, count_outcome, md5_file
from dev.soak.workload import rescale_job_spec


def muse_run(index: int, out: Path, tries: int, rng: random.Random) -> Outcome:
    a, b = index, 1000 + rng.randint(0, 999)
    bad = rng.random() < 0.15
    sleep = rng.choice([0, 0, 1, 2, 3])
    returned_type = rng.choice(["stdout", "stdout", "stdout.txt"])
    cmd = f"sleep {sleep}; python /add.py {a} {'oops' if bad else b}"
    outcome = Outcome("muse", f"muse-{index}", extra={"cmd": cmd, "expected": None if bad else f"{float(a + b)}",
                                                        "returned_type": returned_type})
    ti, store = FakeTaskInstance(f"muse_{index}"), StateStore()

    def factory() -> MuseRunOperator:
        return MuseRunOperator(task_id=ti.task_id, name="sw_example", cmd=cmd, returned_type=returned_type,
                               output_path=str(out / f"muse-{index}"), deferrable=True, **FAST)

    for attempt in range(1, tries + 1):
        ti.try_number = attempt
        outcome.tries = attempt
        try:
            value, delivered = drive(factory, ti, store, twice=index % 5 == 0)
            outcome.events_delivered += delivered
            outcome.status, outcome.value = "ok", value
            break
        except MuseJobFailed as exc:
            outcome.status, outcome.error = "nok", str(exc)[:300]
            break
        except HpcApiError as exc:
            outcome.status, outcome.error = "error", str(exc)[:300]
            if "muse_key" not in ti.xcom and exc.status is None and "/software/muse/run/" in str(exc.endpoint or ""):
                outcome.lost_submit_answers += 1
    outcome.key = ti.xcom.get("muse_key") or (store.get("muse_run") or {}).get("key")
    if outcome.lost_submit_answers and outcome.status != "error":
        # A lost answer is recognised by its error only while no key was known yet.
        pass
    outcome.extra["state_store"] = store.values
    return outcome



def rescale_run(job_id: str, run_id: str, fail: bool, out: Path, tries: int, twice: bool) -> Outcome:
    outcome = Outcome("rescale", f"{job_id}/{run_id}", extra={"expected": "failed" if fail else "success"})
    ti, store = FakeTaskInstance(f"wait_{job_id}_{run_id}"), StateStore()
    dest = out / f"rescale-{job_id}-{run_id}"

    def sensor() -> RescaleRunSensor:
        return RescaleRunSensor(task_id=ti.task_id, job_id=job_id, run_id=run_id, deferrable=True, timeout=300,
                                outcome_wait=10, **FAST)

    for attempt in range(1, tries + 1):
        ti.try_number = attempt
        outcome.tries = attempt
        try:
            value, delivered = drive(sensor, ti, store, twice=twice)
            outcome.events_delivered += delivered
            outcome.status = value["status"] if isinstance(value, dict) else "success"
            break
        except RescaleRunFailed as exc:
            outcome.status, outcome.error = "failed", str(exc)[:300]
            break
        except HpcApiError as exc:
            outcome.status, outcome.error = "error", str(exc)[:300]
    if outcome.status != "success":
        return outcome
    harvest_ti = FakeTaskInstance(f"harvest_{job_id}_{run_id}")
    for attempt in range(1, tries + 1):
        harvest_ti.try_number = attempt
        try:
            manifest, _ = drive(lambda: RescaleDownloadOutputsOperator(
                task_id=harvest_ti.task_id, job_id=job_id, run_id=run_id, output_path=str(dest), concurrency=4,
            ), harvest_ti, StateStore(), twice=False)
            outcome.value = manifest
            outcome.extra["harvest_tries"] = attempt
            break
        except HpcApiError as exc:
            outcome.error = f"harvest: {str(exc)[:300]}"
    else:
        outcome.status = "harvest-failed"
    return outcome



def check(outcomes: list[Outcome], harness: Harness, out: Path) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    counters = harness.server.counters.snapshot()
    emulator_jobs = {job["key"]: job for job in harness.muse_jobs()}
    submissions = counters.get("muse_submissions", {})
    figures: Counter[str] = Counter()
    for o in outcomes:
        if o.status == "crash":
            figures["client_crashes"] += 1
            continue
        figures[f"{o.kind}_runs"] += 1
        figures[f"{o.kind}_{o.status}"] += 1
        figures["events_delivered"] += o.events_delivered
        figures["tries"] += o.tries
        figures["retried_runs"] += o.tries > 1
        if o.kind == "muse":
            cmd = o.extra["cmd"]
            made = submissions.get(cmd, 0)
            figures["lost_submit_answers"] += o.lost_submit_answers
            extra = made - (1 if o.key else 0) - o.lost_submit_answers
            if extra:
                problems.append(f"{o.name}: {made} submissions for {o.lost_submit_answers} lost answers and key {o.key}")
                figures["duplicate_submissions"] += max(0, extra)
            if o.key is None and o.status == "error":
                # Every try's submit was answered by an error before any run was made (a gateway 5xx is
                # not retried for a submit): the task fails, nothing runs, nothing is lost.
                figures["muse_never_submitted"] += 1
                continue
            job = emulator_jobs.get(o.key or "")
            if job is None:
                problems.append(f"{o.name}: no run known to the emulator ({o.status}: {o.error})")
                continue
            decided = {"COMPLETED": "ok", "FAILED": "nok"}.get(job["state"], job["state"])
            seen_as_decided = count_outcome(
                figures, problems, decided == o.status, decided == "ok",
                f"{o.name}: the emulator decided {job['state']}, the client saw {o.status} ({o.error})",
            )
            if seen_as_decided and o.status == "ok":
                value = o.value
                text = value.get("stdout")
                if text is None and value.get("file"):
                    text = Path(value["file"]["path"].removeprefix("file://")).read_text()
                if (text or "").strip() != o.extra["expected"]:
                    problems.append(f"{o.name}: result {text!r}, expected {o.extra['expected']!r}")
                    figures["wrong_results"] += 1
        else:
            job_id, run_id = o.name.split("/")
            reason = harness.rescale_final_reason(job_id)
            decided = "success" if reason == "Completed successfully" else "failed"
            if decided != o.extra["expected"]:
                problems.append(f"{o.name}: the emulator decided {reason!r}, the soak expected {o.extra['expected']}")
            if not count_outcome(figures, problems, o.status == decided, decided == "success",
                                 f"{o.name}: the emulator decided {reason!r}, the client saw {o.status} ({o.error})"):
                continue
            if decided != "success":
                continue
            truth = harness.rescale_work_files(job_id, run_id)
            manifest = o.value or {}
            got = {e["relative_path"]: e for e in manifest.get("files", [])}
            if set(got) != set(truth):
                problems.append(f"{o.name}: harvested {sorted(got)}, the run produced {sorted(truth)}")
                figures["lost_files"] += len(set(truth) - set(got))
            for relative, expected_md5 in truth.items():
                local = Path(manifest.get("output_path", "").removeprefix("file://")) / relative
                if local.is_file() and md5_file(local) == expected_md5:
                    figures["files_md5_verified"] += 1
                else:
                    problems.append(f"{o.name}: {relative} missing or with the wrong md5")
                    figures["files_md5_mismatch"] += 1
            leftovers = [p.name for p in (out / f"rescale-{job_id}-{run_id}").rglob(".hpc-partial-*")]
            if leftovers:
                problems.append(f"{o.name}: partial files left behind: {leftovers}")
            if not (out / f"rescale-{job_id}-{run_id}" / MANIFEST_NAME).is_file():
                problems.append(f"{o.name}: no manifest")
    stops = sum(counters.get("rescale_stops", {}).values())
    if stops:
        problems.append(f"{stops} Rescale runs were stopped")
    figures["rescale_stops"] = stops
    figures["muse_submissions"] = submissions.get("", 0)
    figures["requests"] = sum(counters.get("requests", {}).values())
    for kind, count in counters.get("faults", {}).items():
        figures[f"fault_{kind}"] = count
    for name in ("client_crashes", "duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch",
                 "outcomes_not_as_decided"):
        figures.setdefault(name, 0)
    return dict(sorted(figures.items())), problems



def in_process_phase(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Phase 1: many runs driven in this process as Airflow would; return the counts and the problems."""
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="hpc-soak-"))
    config = EmulatorConfig(data_dir=work / "emulator", time_scale=1.0, pending_seconds=0.3, seed=args.seed,
                            faults=fault_rules(args.fault_scale), muse_max_running=64)
    started = time.monotonic()
    with EmulatorServer(config) as server:
        os.environ.update(server.airflow_conn_env())
        harness = Harness(server)
        out = work / "results"
        tasks: list[tuple] = []
        for index in range(args.muse_runs):
            tasks.append(("muse", index, random.Random(rng.random())))
        for index in range(args.rescale_jobs):
            fail = rng.random() < 0.2
            job_id = harness.create_rescale_job(rescale_job_spec(index, args.runs_per_job, fail))
            for run in range(1, args.runs_per_job + 1):
                tasks.append(("rescale", job_id, str(run), fail, index % 4 == 0))
        rng.shuffle(tasks)
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        skipped = 0

        def one(task: tuple) -> Outcome | None:
            if time.monotonic() - started > args.max_seconds:
                return None
            try:
                if task[0] == "muse":
                    return muse_run(task[1], out, args.tries, task[2])
                return rescale_run(task[1], task[2], task[3], out, args.tries, task[4])
            except Exception as exc:  # a bug of the client: counted, with its traceback
                return Outcome(task[0], str(task[1:3]), status="crash", error="".join(traceback.format_exception(exc))[-2000:])

        with ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="soak") as pool:
            for future in as_completed([pool.submit(one, task) for task in tasks]):
                outcome = future.result()
                with lock:
                    if outcome is None:
                        skipped += 1
                    else:
                        outcomes.append(outcome)
                        done = len(outcomes)
                        if done % 50 == 0:
                            print(f"  {done} runs done in {time.monotonic() - started:.0f}s", flush=True)
        figures, problems = check(outcomes, harness, out)
    shutil.rmtree(work, ignore_errors=True)
    figures["seconds"] = round(time.monotonic() - started)
    figures["runs_not_started_before_the_time_limit"] = skipped
    crashes = [o for o in outcomes if o.status == "crash"]
    problems += [f"{o.kind} {o.name} crashed the client:\n{o.error}" for o in crashes]
    return figures, problems

