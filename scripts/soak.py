"""
Fault soak: many Muse runs and Rescale runs with harvests while the emulator injects faults.

Each run goes through the provider's real operators and sensors, the way Airflow drives them:
``execute`` in a worker, the deferral's trigger rebuilt from its serialized kwargs and run to its
event (as a triggerer does), then ``execute_complete`` on a fresh operator instance; the event is
delivered twice to one run in five (events are at-least-once). A try that fails is tried again,
up to ``--tries`` times, with the same ``task_state_store`` (Airflow's retries).

Faults, on every request the provider makes (the harness's own set-up requests are spared):
10 % 5xx (500, 502, 503, 504 in equal parts), 5 % 429 with ``Retry-After: 1``, 2 % dropped
connections (the service did the work, the answer is cut), and random latency on 10 %.

Checked at the end, against the emulator's own records:

- every run ends with the outcome the emulator decided (Muse ``COMPLETED`` / ``FAILED``, Rescale
  job ``Completed successfully`` or not), and a good run's result is the right one;
- no duplicate submission: one Muse submission per run, plus one per try whose submit answer
  was lost in a dropped connection (no client can know such a run was made: it is counted and
  reported, never hidden);
- no lost result: every run that ended well delivered its result (a run whose every try had its
  submit refused by a gateway error never existed: it is counted apart as never submitted);
- every harvested file has the md5 of the emulator's own file, and no file is missing;
- no Rescale run was stopped.

Prints the counts; exits 1 when any check fails.

    python scripts/soak.py                       # the full soak (about 10 minutes)
    python scripts/soak.py --muse-runs 6 --rescale-jobs 2 --max-seconds 120   # a short one
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hpc-soak-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# The provider's retry warnings would be thousands of lines: the counts below say what happened.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

import requests  # noqa: E402
from airflow.sdk.exceptions import TaskDeferred  # noqa: E402

from airflow_provider_hpc.emulator import EmulatorConfig, EmulatorServer  # noqa: E402
from airflow_provider_hpc.exceptions import HpcApiError, MuseJobFailed, RescaleRunFailed  # noqa: E402
from airflow_provider_hpc.hooks._http import close_all_sessions  # noqa: E402
from airflow_provider_hpc.operators.muse import MuseRunOperator  # noqa: E402
from airflow_provider_hpc.operators.rescale_download import MANIFEST_NAME, RescaleDownloadOutputsOperator  # noqa: E402
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor  # noqa: E402

PROVIDER_ROUTES = ("GET /api/*", "POST /api/software/muse/run/*", "POST /api/jwt/obtain/")
FAST = {"poll_interval": 0.3, "max_poll_interval": 1.5, "max_poll_failures": 8}


def fault_rules(scale: float = 1.0) -> list[dict[str, Any]]:
    """The soak's fault rules: one set per provider route; the first rule that fires decides."""
    wanted: list[tuple[float, dict[str, Any]]] = [
        (0.025, {"status": 500}),
        (0.025, {"status": 502}),
        (0.025, {"status": 503}),
        (0.025, {"status": 504}),
        (0.05, {"status": 429, "retry_after": 1}),
        (0.02, {"drop": True}),
        (0.04, {"delay": 0.05}),
        (0.04, {"delay": 0.3}),
        (0.02, {"delay": 1.0}),
    ]
    rules = []
    for route in PROVIDER_ROUTES:
        taken = 0.0
        for share, action in wanted:
            share *= scale
            # Rules are tried in order: each one's probability is conditional on the earlier ones passing.
            rules.append({"route": route, "probability": min(1.0, share / (1.0 - taken)), "action": action})
            taken += share
    return rules


class FakeTaskInstance:
    """The little of a task instance the operators use: XCom pushes and the try number."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.dag_id = "soak"
        self.run_id = "soak"
        self.map_index = -1
        self.try_number = 1
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = json.loads(json.dumps(value))


class StateStore:
    """``task_state_store``: what survives from one try to the next."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.values[key] = json.loads(json.dumps(value))

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def clear(self) -> None:
        self.values.clear()


@dataclass
class Outcome:
    """What one run ended with, as the client saw it."""

    kind: str
    name: str
    status: str = "unknown"
    key: str | None = None
    value: Any = None
    error: str | None = None
    tries: int = 0
    lost_submit_answers: int = 0
    events_delivered: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def drive(operator_factory, ti: FakeTaskInstance, store: StateStore, twice: bool) -> tuple[Any, int]:
    """Run one try as Airflow would: execute, defer, trigger (rebuilt from its kwargs), execute_complete."""
    context: dict[str, Any] = {"ti": ti, "task_state_store": store, "outlet_events": {}}
    operator = operator_factory()
    try:
        return operator.execute(context), 0
    except TaskDeferred as deferred:
        classpath, kwargs = deferred.trigger.serialize()
        trigger = type(deferred.trigger)(**json.loads(json.dumps(kwargs)))
        event = asyncio.run(_first_event(trigger))
        resumed = operator_factory()
        result = getattr(resumed, deferred.method_name)(context, event=event)
        if twice:
            # Events are delivered at least once: a second delivery must give the same result.
            again = getattr(operator_factory(), deferred.method_name)(context, event=event)
            if json.dumps(again, sort_keys=True) != json.dumps(result, sort_keys=True):
                raise AssertionError(f"a second delivery of the event gave another result: {again} != {result}")
            return result, 2
        return result, 1


async def _first_event(trigger: Any) -> dict[str, Any]:
    try:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")
    finally:
        await close_all_sessions()


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


def rescale_job_spec(index: int, runs: int, fail: bool) -> dict[str, Any]:
    command = (
        "mkdir -p out/deep && head -c $(( (RANDOM % 64 + 1) * 4096 )) /dev/urandom > out/data.bin"
        " && echo \"$x\" > out/deep/value.txt && for i in 1 2 3; do echo line $i >> log.txt; done"
    )
    if fail:
        command += " && exit 3"
    return {
        "name": f"soak-{index}",
        "jobanalyses": [{"command": command}],
        "runs": [{"variables": {"x": float(index * 10 + r)}} for r in range(runs)],
    }


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


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Harness:
    """The emulator, the set-up requests that faults spare, and the truth read from the emulator."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.headers["Authorization"] = "Token demo"

    def create_rescale_job(self, spec: dict[str, Any]) -> str:
        base = self.server.rescale_url
        job_id = self.session.post(f"{base}/api/v2/jobs/", json=spec, timeout=30).json()["id"]
        self.session.post(f"{base}/api/v2/jobs/{job_id}/submit/", timeout=30).raise_for_status()
        return job_id

    def muse_jobs(self) -> list[dict[str, Any]]:
        return self.session.get(f"{self.server.base_url}/_emulator/muse/jobs", timeout=30).json()

    def rescale_work_files(self, job_id: str, run_id: str) -> dict[str, str]:
        work = self.server.config.data_dir / "rescale" / "jobs" / job_id / "runs" / run_id / "work"
        return {p.relative_to(work).as_posix(): md5_file(p) for p in work.rglob("*") if p.is_file() and not p.is_symlink()}

    def rescale_final_reason(self, job_id: str) -> str | None:
        # The harness's own reads go around the faults by retrying until they get an answer.
        for _ in range(50):
            try:
                answer = self.session.get(f"{self.server.rescale_url}/api/v2/jobs/{job_id}/statuses/", timeout=30)
                if answer.status_code == 200:
                    statuses = sorted(answer.json()["results"], key=lambda s: s["statusDate"])
                    completed = [s for s in statuses if s["status"] == "Completed"]
                    return completed[-1]["statusReason"] if completed else None
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"could not read the statuses of job {job_id}")


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
            if decided != o.status:
                problems.append(f"{o.name}: the emulator decided {job['state']}, the client saw {o.status} ({o.error})")
                if decided == "ok":
                    figures["lost_results"] += 1
            elif o.status == "ok":
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
            if o.status != decided:
                problems.append(f"{o.name}: the emulator decided {reason!r}, the client saw {o.status} ({o.error})")
                if decided == "success":
                    figures["lost_results"] += 1
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
    for name in ("client_crashes", "duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch"):
        figures.setdefault(name, 0)
    return dict(sorted(figures.items())), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--muse-runs", type=int, default=500, help="Muse runs (default 500)")
    parser.add_argument("--rescale-jobs", type=int, default=100, help="Rescale jobs (default 100)")
    parser.add_argument("--runs-per-job", type=int, default=2, help="runs of each Rescale job (default 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="runs driven at once (default 16)")
    parser.add_argument("--tries", type=int, default=3, help="tries of each task, as Airflow retries (default 3)")
    parser.add_argument("--max-seconds", type=float, default=540, help="start no new run after this (default 540)")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiplies every fault probability")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the runs and of the faults")
    parser.add_argument("--json", type=Path, help="also write the counts and problems to this file")
    args = parser.parse_args(argv)

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
                        if done % 20 == 0:
                            print(f"  {done} runs done in {time.monotonic() - started:.0f}s", flush=True)
        figures, problems = check(outcomes, harness, out)
    figures["seconds"] = round(time.monotonic() - started)
    figures["runs_not_started_before_the_time_limit"] = skipped
    crashes = [o for o in outcomes if o.status == "crash"]
    problems += [f"{o.kind} {o.name} crashed the client:\n{o.error}" for o in crashes]
    print("Fault soak:", " ".join(sys.argv[1:]) or "(defaults)")
    for name, value in figures.items():
        print(f"  {name:42} {value}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "problems": problems}, indent=1))
    if problems:
        print(f"FAILED: {len(problems)} problems", file=sys.stderr)
        for problem in problems[:50]:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("OK: every run ended as the emulator decided; no duplicate submission, no lost result, every file verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
