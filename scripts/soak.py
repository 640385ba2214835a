"""
Fault soak: many Muse runs and Rescale runs with harvests while the emulator injects faults.

Two phases, each against an emulator of its own:

1. **in-process** (every delivery path; 100 Muse runs and 50 Rescale runs by default): each run
   goes through the provider's real operators and sensors, the way Airflow drives them:
   ``execute`` in a worker, the deferral's trigger rebuilt from its serialized kwargs and run to
   its event (as a triggerer does), then ``execute_complete`` on a fresh operator instance; the
   event is delivered twice to one run in five (events are at-least-once). A try that fails is
   tried again, up to ``--tries`` times, with the same ``task_state_store`` (Airflow's retries).
2. **airflow** (the real thing, and the volume: 300 Muse runs and 50 Rescale runs by default): a
   private Airflow deployment (API server, scheduler with LocalExecutor, triggerer, SQLite, a
   temporary AIRFLOW_HOME, all on loopback; see ``tests/reliability/airflow_stack.py``) runs the
   DAG ``tests/reliability/dags/hpc_soak_dag.py``
   once: mapped ``MuseRunOperator`` tasks (about one in seven with a command that exits non-zero;
   task retries set) and Rescale runs, each watched by a deferrable ``RescaleRunSensor`` and then
   harvested by ``RescaleDownloadOutputsOperator``. The emulator's Muse password and Rescale API
   key are random, and every JWT it issues is recorded, so that a secret scan can look for them
   in every task, trigger and service log, every XCom value, every serialized trigger kwargs
   (kept as they are written, since Airflow deletes a trigger row once its task resumes), the
   rendered fields and the raw database. The deployment is stopped whatever happens, and no
   process of it may outlive it.

Faults, on every request the provider makes (the harness's own set-up requests are spared):
10 % 5xx (500, 502, 503, 504 in equal parts), 5 % 429 with ``Retry-After: 1``, 2 % dropped
connections (the service did the work, the answer is cut), and random latency on 10 %.

Checked at the end, against the emulator's own records (and, for phase 2, Airflow's metadata
database and logs):

- every run ends with the outcome the emulator decided (Muse ``COMPLETED`` / ``FAILED``, Rescale
  job ``Completed successfully`` or not), and a good run's result is the right one (phase 2: the
  task is ``success`` or ``failed`` accordingly, and its XCom holds the right stdout);
- no duplicate submission: one Muse submission per try that learned its run's key (a new try
  submits again only after ``NOK``), plus one per try whose submit answer was lost in a dropped
  connection (no client can know such a run was made: it is counted and reported, never hidden);
- no lost result: every run that ended well delivered its result (a run whose every try had its
  submit refused by a gateway error never existed: it is counted apart as never submitted);
- every harvested file has the md5 of the emulator's own file, and no file is missing;
- no Rescale run was stopped;
- phase 2: no secret anywhere (``secrets_found`` is 0) and no process left behind.

Prints the counts; exits 1 when any check fails.

    python scripts/soak.py                                   # both phases (about 8 minutes on 2 cores)
    python scripts/soak.py --phase in-process --muse-runs 8 --rescale-jobs 3 --max-seconds 90   # a short one
    python scripts/soak.py --phase airflow --airflow-muse-runs 12 --airflow-rescale-jobs 2     # phase 2, short
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The private Airflow deployment of the reliability tests drives phase 2.
sys.path.insert(0, str(REPO / "tests" / "reliability"))
# Phase 1 runs the operators in this process: they get a throwaway AIRFLOW_HOME, removed at exit.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = _OWN_AIRFLOW_HOME = tempfile.mkdtemp(prefix="hpc-soak-airflow-home-")
    atexit.register(shutil.rmtree, _OWN_AIRFLOW_HOME, ignore_errors=True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# The provider's retry warnings would be thousands of lines, and every run designed to fail logs its
# stderr tail as an error: the counts below say what happened.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "CRITICAL")

import requests  # noqa: E402
from airflow_stack import AirflowStack  # noqa: E402
from cryptography.fernet import Fernet, InvalidToken  # noqa: E402
from airflow.sdk.exceptions import TaskDeferred  # noqa: E402

from airflow_provider_hpc.emulator import EmulatorConfig, EmulatorServer  # noqa: E402
from airflow_provider_hpc.emulator.config import MuseUser  # noqa: E402
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


def count_outcome(figures: Counter[str], problems: list[str], agrees: bool, succeeded: bool, problem: str) -> bool:
    """
    Count one run's outcome against the emulator's decision; return whether they agree.

    :param agrees: whether what the client (or Airflow) saw is what the emulator decided.
    :param succeeded: whether the emulator decided success: a disagreement then lost a result.
    :param problem: what to report when they disagree.
    """
    if agrees:
        figures["outcomes_as_decided"] += 1
        return True
    figures["outcomes_not_as_decided"] += 1
    problems.append(problem)
    if succeeded:
        figures["lost_results"] += 1
    return False


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


# ----- phase 2: DAG runs on a real Airflow deployment ------------------------------------------

SOAK_DAG_FILE = REPO / "tests" / "reliability" / "dags" / "hpc_soak_dag.py"
SOAK_DAG_ID = "hpc_soak"
SOAK_MUSE_USER = "soak"
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# What a try's log says once it knows the key of the run it submitted (or re-attached to).
LEARNED_KEY = re.compile(rf"Muse run sw_example/({_UUID}): follow it at")
# A try whose submit got no answer at all (no HTTP status): the run may exist, its key is unknown.
LOST_SUBMIT_ANSWER = re.compile(r"endpoint: POST /api/software/muse/run/sw_example/(?! \| status: )")
# Copies every value Airflow writes into the tables the secret scan reads, as it is written: trigger
# rows are deleted once their task resumes, and a retry clears the XComs of the try before.
AUDIT_SQL = """
CREATE TABLE soak_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, classpath TEXT, value BLOB);
CREATE TRIGGER soak_audit_trigger_insert AFTER INSERT ON "trigger"
BEGIN INSERT INTO soak_audit (source, classpath, value) VALUES ('trigger kwargs', NEW.classpath, NEW.kwargs); END;
CREATE TRIGGER soak_audit_trigger_update AFTER UPDATE OF kwargs ON "trigger"
BEGIN INSERT INTO soak_audit (source, classpath, value) VALUES ('trigger kwargs', NEW.classpath, NEW.kwargs); END;
CREATE TRIGGER soak_audit_xcom_insert AFTER INSERT ON xcom
BEGIN INSERT INTO soak_audit (source, value) VALUES ('xcom', NEW.value); END;
CREATE TRIGGER soak_audit_xcom_update AFTER UPDATE OF value ON xcom
BEGIN INSERT INTO soak_audit (source, value) VALUES ('xcom', NEW.value); END;
CREATE TRIGGER soak_audit_next_kwargs AFTER UPDATE OF next_kwargs ON task_instance WHEN NEW.next_kwargs IS NOT NULL
BEGIN INSERT INTO soak_audit (source, value) VALUES ('task_instance next_kwargs', NEW.next_kwargs); END;
CREATE TRIGGER soak_audit_rendered_insert AFTER INSERT ON rendered_task_instance_fields
BEGIN INSERT INTO soak_audit (source, value) VALUES ('rendered fields', NEW.rendered_fields); END;
CREATE TRIGGER soak_audit_rendered_update AFTER UPDATE OF rendered_fields ON rendered_task_instance_fields
BEGIN INSERT INTO soak_audit (source, value) VALUES ('rendered fields', NEW.rendered_fields); END;
"""


@dataclass
class AirflowPlan:
    """What the soak DAG runs: the mapped Muse tasks and the Rescale runs, with what each should give."""

    muse: list[dict[str, Any]]
    rescale_jobs: list[dict[str, Any]]
    settings: dict[str, Any]

    def dag_plan(self) -> dict[str, Any]:
        """Return the plan the DAG file reads (``soak_plan.json``)."""
        return {
            "muse": [{"cmd": m["cmd"], "returned_type": m["returned_type"]} for m in self.muse],
            "rescale_runs": sum(job["runs"] for job in self.rescale_jobs),
            "settings": self.settings,
        }


def airflow_plan(args: argparse.Namespace) -> AirflowPlan:
    """Draw the Muse commands (about one in seven fails) and the Rescale jobs (the last one fails)."""
    rng = random.Random(args.seed + 1)
    count = args.airflow_muse_runs
    bad = set(rng.sample(range(count), max(1, round(count * 0.15)))) if count else set()
    muse = []
    for index in range(count):
        b = 1000 + rng.randint(0, 999)
        sleep = rng.choice([1, 2, 4, 6, 8])
        muse.append({
            "cmd": f"sleep {sleep}; python /add.py {index} {'oops' if index in bad else b}",
            "returned_type": rng.choice(["stdout", "stdout", "stdout", "stdout.txt"]),
            "expected": None if index in bad else f"{float(index + b)}",
        })
    # The last job fails (when there are two or more): every other one is watched and harvested.
    last = args.airflow_rescale_jobs - 1
    jobs = [{"fail": index == last and last > 0, "runs": 2} for index in range(args.airflow_rescale_jobs)]
    settings = {
        "poll_interval": 1.0, "max_poll_interval": 3.0, "max_poll_failures": 8, "retry_delay": 2,
        "muse_retries": 3, "rescale_wait_retries": 1, "harvest_retries": 3, "rescale_timeout": 600,
        "max_active_tasks": 256,
    }
    return AirflowPlan(muse, jobs, settings)


def airflow_rescale_spec(index: int, runs: int, fail: bool) -> dict[str, Any]:
    """A Rescale job whose runs last long enough for their waits to be deferred."""
    spec = rescale_job_spec(1000 + index, runs, fail)
    spec["jobanalyses"][0]["command"] = f"sleep {10 + 5 * index} && " + spec["jobanalyses"][0]["command"]
    return spec


def record_issued_tokens(server: EmulatorServer) -> list[str]:
    """Return a list the emulator fills with every Muse JWT it issues from now on (for the secret scan)."""
    tokens = server._app.state.muse.tokens  # noqa: SLF001 - the emulator runs in this process
    issued: list[str] = []
    obtain = tokens.obtain

    def recording_obtain(username: str, password: str) -> str:
        token = obtain(username, password)
        issued.append(token)
        return token

    tokens.obtain = recording_obtain
    return issued


def set_faults(server: EmulatorServer, rules: list[dict[str, Any]]) -> None:
    """Replace the emulator's fault rules (``POST /_emulator/faults``)."""
    requests.post(f"{server.base_url}/_emulator/faults", json=rules, timeout=30).raise_for_status()


def decode_json(value: Any) -> Any:
    """Decode a value Airflow stored as JSON text (possibly JSON inside JSON)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    while isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value


class AirflowPhase:
    """The deployment, the emulator it talks to, the DAG run, and the checks against both."""

    def __init__(self, args: argparse.Namespace, server: EmulatorServer, work: Path, plan: AirflowPlan,
                 secrets: dict[str, str], issued_tokens: list[str]) -> None:
        self.args = args
        self.server = server
        self.work = work
        self.plan = plan
        self.secrets = secrets
        self.issued_tokens = issued_tokens
        self.harness = Harness(server)
        self.harness.session.headers["Authorization"] = f"Token {secrets['Rescale API key']}"
        self.fernet_key = Fernet.generate_key().decode()
        self.figures: Counter[str] = Counter()
        self.problems: list[str] = []
        self.rescale_runs: list[dict[str, Any]] = []
        self.run_id = ""
        home = work / "airflow-home"
        dags = home / "dags"
        dags.mkdir(parents=True)
        shutil.copy(SOAK_DAG_FILE, dags / SOAK_DAG_FILE.name)
        (dags / "soak_plan.json").write_text(json.dumps(plan.dag_plan(), indent=1))
        self.stack = AirflowStack(home, dags, {
            **server.airflow_conn_env(),
            "AIRFLOW__CORE__PARALLELISM": str(args.airflow_parallelism),
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
        })

    # ----- running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Start the deployment, run the DAG under faults, check; the deployment is always stopped."""
        started = time.monotonic()
        try:
            self.stack.prepare()
            self.stack.execute_script(AUDIT_SQL)
            self.stack.start_services()
            self.figures["deployment_start_seconds"] = round(time.monotonic() - started)
            print(f"  deployment up in {self.figures['deployment_start_seconds']}s", flush=True)
            set_faults(self.server, fault_rules(self.args.fault_scale))
            conf = {"rescale": self._start_rescale_jobs()}
            self.run_id = self.stack.trigger(SOAK_DAG_ID, conf)
            dag_started = time.monotonic()
            state = self._wait_for_the_run()
            self.figures["dag_run_seconds"] = round(time.monotonic() - dag_started)
            self.figures[f"dag_run_{state}"] = 1
            set_faults(self.server, [])
            self.check_muse()
            self.check_rescale()
            self.check_counters()
        finally:
            self.stack.stop()
            left = self.stack.kill_leftovers()
            self.figures["processes_left_behind"] = len(left)
            if left:
                self.problems.append(f"{len(left)} processes of the deployment were still alive after it stopped: {left}")
        # The services are stopped: every log and the database are final.
        self.scan_for_secrets()

    def _start_rescale_jobs(self) -> list[dict[str, str]]:
        runs = []
        for index, job in enumerate(self.plan.rescale_jobs):
            job_id = self.harness.create_rescale_job(airflow_rescale_spec(index, job["runs"], job["fail"]))
            for run in range(1, job["runs"] + 1):
                runs.append({"job_id": job_id, "run_id": str(run)})
                self.rescale_runs.append({"job_id": job_id, "run_id": str(run), "fail": job["fail"]})
        return runs

    def _wait_for_the_run(self) -> str:
        deadline = time.monotonic() + self.args.airflow_max_seconds
        last_print = 0.0
        while True:
            state = self.stack.run_state(SOAK_DAG_ID, self.run_id)
            if state in ("success", "failed"):
                return state
            now = time.monotonic()
            if now - last_print >= 30:
                last_print = now
                states = Counter(s for (s,) in self.stack.query(
                    "SELECT state FROM task_instance WHERE dag_id = ? AND run_id = ?", SOAK_DAG_ID, self.run_id))
                print("  tasks: " + ", ".join(f"{n} {s or 'not yet scheduled'}"
                                             for s, n in sorted(states.items(), key=lambda x: str(x[0]))), flush=True)
            if now > deadline:
                self.problems.append(f"the DAG run did not end within {self.args.airflow_max_seconds:.0f}s")
                return "unfinished"
            time.sleep(2)

    # ----- reading the deployment ------------------------------------------------------------------

    def _task_instances(self, task_id: str) -> dict[int, tuple[str | None, int]]:
        rows = self.stack.query(
            "SELECT map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            SOAK_DAG_ID, self.run_id, task_id,
        )
        return {map_index: (state, try_number) for map_index, state, try_number in rows}

    def _xcom(self, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        rows = self.stack.query(
            'SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND map_index = ? AND "key" = ?',
            SOAK_DAG_ID, self.run_id, task_id, map_index, key,
        )
        return decode_json(rows[0][0]) if rows else None

    def _task_logs(self, task_id: str, map_index: int) -> dict[int, str]:
        """Return the worker log of each try of a task instance, by try number (trigger logs left out)."""
        folder = self.stack.home / "logs" / f"dag_id={SOAK_DAG_ID}" / f"run_id={self.run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder /= f"map_index={map_index}"
        logs = {}
        for path in folder.glob("attempt=*.log"):
            worker_log = re.fullmatch(r"attempt=(\d+)\.log", path.name)
            if worker_log:
                logs[int(worker_log.group(1))] = path.read_text(errors="replace")
        return dict(sorted(logs.items()))

    # ----- checks ----------------------------------------------------------------------------------

    def check_muse(self) -> None:
        """Every mapped Muse task ended as the emulator decided, with the right result and no duplicate run."""
        emulator_jobs = self.harness.muse_jobs()
        by_cmd: dict[str, list[dict[str, Any]]] = {}
        for job in sorted(emulator_jobs, key=lambda j: j["submitted_at"]):
            by_cmd.setdefault(job["cmd"], []).append(job)
        instances = self._task_instances("muse")
        f = self.figures
        for index, planned in enumerate(self.plan.muse):
            name = f"muse[{index}]"
            f["muse_tasks_designed_to_fail"] += planned["expected"] is None
            state, tries = instances.get(index, (None, 0))
            f["muse_tasks"] += 1
            f[f"muse_tasks_{state}"] += 1
            f["muse_tries"] += tries
            f["muse_tasks_retried"] += tries > 1
            logs = self._task_logs("muse", index)
            learned: list[str] = []
            lost = 0
            for text in logs.values():
                for key in LEARNED_KEY.findall(text):
                    if key not in learned:
                        learned.append(key)
                lost += bool(LOST_SUBMIT_ANSWER.search(text))
            jobs = by_cmd.get(planned["cmd"], [])
            keys = {job["key"]: job for job in jobs}
            unknown_to_client = [job for job in jobs if job["key"] not in learned]
            f["muse_lost_submit_answers"] += lost
            extra = len(unknown_to_client) - lost
            if extra > 0:
                f["duplicate_submissions"] += extra
                self.problems.append(f"{name}: {len(jobs)} runs submitted, {len(learned)} known to the task, "
                                     f"{lost} submit answers lost")
            elif extra < 0:
                self.problems.append(f"{name}: the logs show {lost} lost submit answers, the emulator "
                                     f"{len(unknown_to_client)} runs unknown to the task")
            for key in learned:
                if key not in keys:
                    self.problems.append(f"{name}: the task followed run {key}, which the emulator never made")
            ordered = [keys[key] for key in learned if key in keys]
            ordered.sort(key=lambda j: j["submitted_at"])
            for earlier in ordered[:-1]:
                # A new submission is right only after a run that ended badly.
                if earlier["state"] != "FAILED":
                    f["duplicate_submissions"] += 1
                    self.problems.append(f"{name}: submitted again after run {earlier['key']} ({earlier['state']})")
            f["muse_resubmissions_after_nok"] += sum(1 for job in ordered[:-1] if job["state"] == "FAILED")
            if not ordered:
                f["muse_never_submitted"] += 1
                if state != "failed":
                    self.problems.append(f"{name}: no run was ever submitted, yet the task is {state}")
                continue
            final = ordered[-1]
            decided = {"COMPLETED": "success", "FAILED": "failed"}.get(final["state"], final["state"])
            wanted = "failed" if planned["expected"] is None else "success"
            if decided != wanted:
                self.problems.append(f"{name}: the emulator decided {final['state']} for {planned['cmd']!r}")
            f[f"muse_emulator_{final['state'].lower()}"] += 1
            if not count_outcome(f, self.problems, state == decided, decided == "success",
                                 f"{name}: the emulator decided {final['state']}, the task is {state}"):
                continue
            if decided != "success":
                continue
            value = self._xcom("muse", index)
            if not isinstance(value, dict):
                f["lost_results"] += 1
                self.problems.append(f"{name}: succeeded without an XCom value ({value!r})")
                continue
            text = value.get("stdout")
            if text is None and value.get("file"):
                path = Path(str(value["file"]["path"]).removeprefix("file://"))
                text = path.read_text() if path.is_file() else None
            if (text or "").strip() != planned["expected"]:
                f["wrong_results"] += 1
                self.problems.append(f"{name}: result {text!r}, expected {planned['expected']!r}")
            else:
                f["muse_results_verified"] += 1
        f["muse_submissions"] = sum(len(by_cmd.get(m["cmd"], [])) for m in self.plan.muse)

    def check_rescale(self) -> None:
        """Every Rescale wait ended as the emulator decided; every good run's files were harvested intact."""
        waits = self._task_instances_by_prefix("rescale_wait_")
        harvests = self._task_instances_by_prefix("rescale_harvest_")
        f = self.figures
        for index, run in enumerate(self.rescale_runs):
            job_id, run_id = run["job_id"], run["run_id"]
            name = f"rescale[{index}] {job_id}/{run_id}"
            reason = self.harness.rescale_final_reason(job_id)
            decided = "success" if reason == "Completed successfully" else "failed"
            f["rescale_runs"] += 1
            f[f"rescale_emulator_{decided}"] += 1
            if decided != ("failed" if run["fail"] else "success"):
                self.problems.append(f"{name}: the emulator decided {reason!r}, the soak planned fail={run['fail']}")
            wait_state, wait_tries = waits.get(index, (None, 0))
            harvest_state, harvest_tries = harvests.get(index, (None, 0))
            f["rescale_wait_tries"] += wait_tries
            f["rescale_harvest_tries"] += harvest_tries
            f[f"rescale_waits_{wait_state}"] += 1
            f[f"rescale_harvests_{harvest_state}"] += 1
            wanted_harvest = "success" if decided == "success" else "upstream_failed"
            agrees = (wait_state, harvest_state) == (decided, wanted_harvest)
            if not count_outcome(f, self.problems, agrees, decided == "success",
                                 f"{name}: the emulator decided {reason!r}; wait {wait_state}, harvest {harvest_state}"):
                continue
            if decided != "success":
                continue
            value = self._xcom(f"rescale_harvest_{index}")
            manifest_path = Path(str((value or {}).get("manifest_path", "")).removeprefix("file://"))
            if not manifest_path.is_file():
                f["lost_results"] += 1
                self.problems.append(f"{name}: no manifest ({value!r})")
                continue
            manifest = json.loads(manifest_path.read_text())
            root = Path(str(manifest.get("output_path", "")).removeprefix("file://"))
            truth = self.harness.rescale_work_files(job_id, run_id)
            got = {entry["relative_path"] for entry in manifest.get("files", [])}
            if got != set(truth):
                f["lost_files"] += len(set(truth) - got)
                self.problems.append(f"{name}: harvested {sorted(got)}, the run produced {sorted(truth)}")
            for relative, expected_md5 in truth.items():
                local = root / relative
                if local.is_file() and md5_file(local) == expected_md5:
                    f["files_md5_verified"] += 1
                else:
                    f["files_md5_mismatch"] += 1
                    self.problems.append(f"{name}: {relative} missing or with the wrong md5")
            leftovers = [p.name for p in root.rglob(".hpc-partial-*")]
            if leftovers:
                self.problems.append(f"{name}: partial files left behind: {leftovers}")

    def _task_instances_by_prefix(self, prefix: str) -> dict[int, tuple[str | None, int]]:
        rows = self.stack.query(
            "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id LIKE ?",
            SOAK_DAG_ID, self.run_id, f"{prefix}%",
        )
        return {int(task_id.removeprefix(prefix)): (state, tries) for task_id, state, tries in rows}

    def check_counters(self) -> None:
        """Take the emulator's request and fault counts; no Rescale run may have been stopped."""
        counters = self.server.counters.snapshot()
        stops = sum(counters.get("rescale_stops", {}).values())
        self.figures["rescale_stops"] = stops
        if stops:
            self.problems.append(f"{stops} Rescale runs were stopped")
        self.figures["requests"] = sum(counters.get("requests", {}).values())
        for kind, count in counters.get("faults", {}).items():
            self.figures[f"fault_{kind}"] = count

    # ----- secrets ---------------------------------------------------------------------------------

    def scan_for_secrets(self) -> None:
        """Look for the password, the API key and every issued JWT in every log, XCom and trigger kwargs."""
        secrets = dict(self.secrets)
        for number, token in enumerate(self.issued_tokens, 1):
            secrets[f"Muse JWT #{number}"] = token
            # A token cut by a log line still gives itself away by its signature.
            secrets[f"Muse JWT #{number} signature"] = token.rsplit(".", 1)[-1]
        needles = {what: value.encode() for what, value in secrets.items()}
        found: list[str] = []
        f = self.figures
        f["jwts_issued"] = len(self.issued_tokens)
        if not self.issued_tokens:
            self.problems.append("the emulator issued no JWT: the scan for tokens would prove nothing")

        def scan(where: str, data: bytes) -> None:
            for what, needle in needles.items():
                if needle in data:
                    found.append(f"{what} in {where}")

        home = self.stack.home
        for path in sorted(p for p in home.rglob("*") if p.is_file()):
            relative = path.relative_to(home).as_posix()
            if relative.startswith("airflow.db"):
                continue
            data = path.read_bytes()
            scan(relative, data)
            f["secret_scan_files"] += 1
            f["secret_scan_bytes"] += len(data)
            if relative.startswith("logs/dag_id="):
                f["secret_scan_trigger_logs" if ".log.trigger." in relative else "secret_scan_task_logs"] += 1
            elif "/" not in relative and relative.endswith(".log"):
                f["secret_scan_service_logs"] += 1
            elif relative.startswith("hpc-results/"):
                f["secret_scan_result_files"] += 1
        # The database, raw (every table, every page), then the values decoded.
        for path in sorted(home.glob("airflow.db*")):
            data = path.read_bytes()
            scan(path.name, data)
            f["secret_scan_bytes"] += len(data)
        fernet = Fernet(self.fernet_key.encode())
        for source, classpath, value in self.stack.query("SELECT source, classpath, value FROM soak_audit ORDER BY id"):
            data = value if isinstance(value, bytes) else str(value or "").encode()
            if source == "trigger kwargs":
                # Airflow stores them encrypted with the Fernet key, or as plain JSON on some paths.
                if not data.startswith(b"{"):
                    try:
                        data = fernet.decrypt(data)
                    except InvalidToken:
                        self.problems.append(f"trigger kwargs of {classpath} could not be decrypted")
                f[f"secret_scan_trigger_kwargs_{str(classpath).rsplit('.', 1)[-1]}"] += 1
            else:
                f[f"secret_scan_{source.replace(' ', '_')}"] += 1
            scan(source, data)
        for table, column in (("xcom", "value"), ("task_instance", "next_kwargs"), ("dag_run", "conf"),
                              ("rendered_task_instance_fields", "rendered_fields")):
            for (value,) in self.stack.query(f"SELECT {column} FROM {table}"):  # noqa: S608 - fixed names
                scan(f"{table}.{column}", value if isinstance(value, bytes) else str(value or "").encode())
        f["secrets_looked_for"] = len(needles)
        f["secrets_found"] = len(found)
        self.problems += [f"secret found: {where}" for where in found]


def airflow_phase(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Phase 2: the soak DAG on a real deployment under faults; return the counts and the problems."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="hpc-soak-airflow-"))
    secrets = {"Muse password": f"soak-pw-{uuid.uuid4().hex}", "Rescale API key": f"soak-rk-{uuid.uuid4().hex}"}
    config = EmulatorConfig(
        data_dir=work / "emulator", time_scale=1.0, pending_seconds=0.3, seed=args.seed + 1, muse_max_running=64,
        muse_users={SOAK_MUSE_USER: MuseUser(secrets["Muse password"], "user")},
        rescale_api_keys=frozenset({secrets["Rescale API key"]}),
    )
    plan = airflow_plan(args)
    with EmulatorServer(config) as server:
        phase = AirflowPhase(args, server, work, plan, secrets, record_issued_tokens(server))
        try:
            phase.run()
        except Exception as exc:  # the deployment or the harness broke: reported, never hidden
            phase.problems.append("".join(traceback.format_exception(exc))[-4000:])
    for name in ("duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch",
                 "muse_lost_submit_answers", "muse_never_submitted", "secrets_found", "files_md5_verified",
                 "outcomes_not_as_decided"):
        phase.figures.setdefault(name, 0)
    phase.figures["seconds"] = round(time.monotonic() - started)
    figures = dict(sorted(phase.figures.items()))
    if phase.problems:
        print(f"  the deployment's home is kept for inspection: {phase.stack.home}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return figures, phase.problems


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
