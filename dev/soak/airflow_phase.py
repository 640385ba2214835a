"""
Phase 2, airflow: the soak DAG once on a private Airflow deployment (``dev/airflow_stack.py``)
under faults, checked against the emulator's records, Airflow's metadata database and its logs,
then a scan for every secret in all of them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from hpc_emulator import EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser

from airflow_provider_hpc.storage_sink import TEMP_PREFIX
from dev.airflow_stack import AirflowStack
from dev.soak.faults import fault_rules, set_faults
from dev.soak.harness import Harness, count_outcome, md5_file
from dev.soak.secret_scan import SecretNeedles, record_issued_tokens
from dev.soak.workload import AirflowPlan, airflow_plan, airflow_rescale_spec

SOAK_DAG_FILE = Path(__file__).with_name("dags") / "hpc_soak_dag.py"
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



def local_stack(work: Path, server: EmulatorServer, plan: AirflowPlan, parallelism: int, fernet_key: str) -> AirflowStack:
    """Return the private SQLite deployment of ``make soak``, its DAG folder holding the soak DAG and its plan."""
    home = work / "airflow-home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    shutil.copy(SOAK_DAG_FILE, dags / SOAK_DAG_FILE.name)
    (dags / "soak_plan.json").write_text(json.dumps(plan.dag_plan(), indent=1))
    return AirflowStack(home, dags, {
        **server.airflow_conn_env(),
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__FERNET_KEY": fernet_key,
    })


class AirflowPhase:
    """
    The soak DAG run once on a deployment under faults, and the checks against the emulator and Airflow.

    This class runs ``make soak``'s private SQLite deployment, whose results and logs are on its
    local disk. A deployment that keeps them elsewhere (PostgreSQL, S3) overrides the methods under
    "where the deployment keeps things" and drives a deployment already running with :meth:`drive`.

    :param stack: the deployment (started by :meth:`run`, or already running for :meth:`drive`).
    :param fernet_key: the deployment's ``[core] fernet_key``, to read the trigger kwargs it encrypts.
    """

    #: Copies every value the secret scan must see into ``soak_audit`` as it is written (SQLite).
    audit_sql = AUDIT_SQL

    def __init__(self, args: argparse.Namespace, server: EmulatorServer, plan: AirflowPlan,
                 secrets: dict[str, str], issued_tokens: list[str], stack: AirflowStack, fernet_key: str) -> None:
        self.args = args
        self.server = server
        self.plan = plan
        self.secrets = secrets
        self.issued_tokens = issued_tokens
        self.harness = Harness(server)
        self.harness.session.headers["Authorization"] = f"Token {secrets['Rescale API key']}"
        self.fernet_key = fernet_key
        self.figures: Counter[str] = Counter()
        self.problems: list[str] = []
        self.rescale_runs: list[dict[str, Any]] = []
        self.run_id = ""
        self.stack = stack
        self.counters_before: dict[str, dict[str, int]] = {}

    # ----- running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Start the deployment, run the DAG under faults, check; the deployment is always stopped."""
        started = time.monotonic()
        try:
            self.stack.prepare()
            self.stack.execute_script(self.audit_sql)
            self.stack.start_services()
            self.figures["deployment_start_seconds"] = round(time.monotonic() - started)
            print(f"  deployment up in {self.figures['deployment_start_seconds']}s", flush=True)
            self.drive()
        finally:
            self.stack.stop()
            left = self.stack.kill_leftovers()
            self.figures["processes_left_behind"] = len(left)
            if left:
                self.problems.append(f"{len(left)} processes of the deployment were still alive after it stopped: {left}")
        # The services are stopped: every log and the database are final.
        self.scan_for_secrets()

    def drive(self) -> None:
        """Run the DAG once under faults on the running deployment, then check every run against the emulator."""
        self.counters_before = self.server.counters.snapshot()
        set_faults(self.server, fault_rules(self.args.fault_scale))
        try:
            conf = {"rescale": self._start_rescale_jobs()}
            self.run_id = self.stack.trigger(SOAK_DAG_ID, conf)
            dag_started = time.monotonic()
            state = self._wait_for_the_run()
            self.figures["dag_run_seconds"] = round(time.monotonic() - dag_started)
            self.figures[f"dag_run_{state}"] = 1
        finally:
            set_faults(self.server, [])
        self.settle()
        self.check_muse()
        self.check_rescale()
        self.check_counters()

    def counts(self) -> dict[str, Any]:
        """Return the counts, sorted, with every count the verdict names present (0 when nothing happened)."""
        for name in ("duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch",
                     "muse_lost_submit_answers", "muse_never_submitted", "secrets_found", "files_md5_verified",
                     "outcomes_not_as_decided"):
            self.figures.setdefault(name, 0)
        return dict(sorted(self.figures.items()))

    # ----- where the deployment keeps things ---------------------------------------------------------

    def settle(self) -> None:
        """Wait, once the DAG run ended, until what its tasks write after their end is in place (here: nothing)."""

    def log_files(self, folder: str) -> Iterator[tuple[str, str]]:
        """Yield (file name, text) for every log file in one task instance's log folder (``dag_id=.../...``)."""
        for path in sorted((self.stack.home / "logs" / folder).glob("*.log")):
            yield path.name, path.read_text(errors="replace")

    def read_result(self, location: str) -> bytes | None:
        """Return the bytes of a result file or manifest the tasks wrote, or None when there is none."""
        path = Path(location.removeprefix("file://"))
        return path.read_bytes() if path.is_file() else None

    def harvested_md5s(self, root: str) -> dict[str, str]:
        """Return the md5 of every file under a harvest's output folder, by path relative to it."""
        folder = Path(root.removeprefix("file://"))
        return {p.relative_to(folder).as_posix(): md5_file(p) for p in folder.rglob("*") if p.is_file()}

    def partial_leftovers(self, root: str) -> list[str]:
        """Return what a harvest left half-written under its output folder (should be nothing)."""
        return [p.name for p in Path(root.removeprefix("file://")).rglob(f"{TEMP_PREFIX}*")]

    def stored_blobs(self) -> Iterator[tuple[str, str, bytes]]:
        """Yield (category, name, bytes) for every file the deployment wrote, for the secret scan."""
        home = self.stack.home
        for path in sorted(p for p in home.rglob("*") if p.is_file()):
            relative = path.relative_to(home).as_posix()
            if relative.startswith("airflow.db"):
                continue
            yield _category(relative), relative, path.read_bytes()
        # The database, raw (every table, every page), then the values decoded.
        for path in sorted(home.glob("airflow.db*")):
            yield "database", path.name, path.read_bytes()

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
        folder = f"dag_id={SOAK_DAG_ID}/run_id={self.run_id}/task_id={task_id}"
        if map_index >= 0:
            folder += f"/map_index={map_index}"
        logs: dict[int, str] = {}
        for name, text in self.log_files(folder):
            worker_log = re.fullmatch(r"attempt=(\d+)\.log", name)
            if worker_log:
                logs[int(worker_log.group(1))] = text
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
                stored = self.read_result(str(value["file"]["path"]))
                text = None if stored is None else stored.decode(errors="replace")
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
            manifest_path = str((value or {}).get("manifest_path", ""))
            stored = self.read_result(manifest_path) if manifest_path else None
            if stored is None:
                f["lost_results"] += 1
                self.problems.append(f"{name}: no manifest ({value!r})")
                continue
            manifest = json.loads(stored)
            root = str(manifest.get("output_path", ""))
            truth = self.harness.rescale_work_files(job_id, run_id)
            got = {entry["relative_path"] for entry in manifest.get("files", [])}
            if got != set(truth):
                f["lost_files"] += len(set(truth) - got)
                self.problems.append(f"{name}: harvested {sorted(got)}, the run produced {sorted(truth)}")
            harvested = self.harvested_md5s(root)
            for relative, expected_md5 in truth.items():
                if harvested.get(relative) == expected_md5:
                    f["files_md5_verified"] += 1
                else:
                    f["files_md5_mismatch"] += 1
                    self.problems.append(f"{name}: {relative} missing or with the wrong md5")
            leftovers = self.partial_leftovers(root)
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
        # Counted from the DAG run's start: an emulator shared with other runs has counts of its own.
        counters, before = self.server.counters.snapshot(), self.counters_before

        def since_start(kind: str) -> dict[str, int]:
            return {name: count - before.get(kind, {}).get(name, 0) for name, count in counters.get(kind, {}).items()}

        stops = sum(since_start("rescale_stops").values())
        self.figures["rescale_stops"] = stops
        if stops:
            self.problems.append(f"{stops} Rescale runs were stopped")
        self.figures["requests"] = sum(since_start("requests").values())
        for kind, count in since_start("faults").items():
            self.figures[f"fault_{kind}"] = count

    # ----- secrets ---------------------------------------------------------------------------------

    def scan_for_secrets(self) -> None:
        """Look for the password, the API key and every issued JWT in every log, XCom and trigger kwargs."""
        needles = SecretNeedles(self.secrets, self.issued_tokens)
        found: list[str] = []
        f = self.figures
        f["jwts_issued"] = len(self.issued_tokens)
        if not self.issued_tokens:
            self.problems.append("the emulator issued no JWT: the scan for tokens would prove nothing")

        def scan(where: str, data: bytes) -> None:
            found.extend(f"{what} in {where}" for what in needles.find(data))

        for category, where, data in self.stored_blobs():
            scan(where, data)
            f["secret_scan_files"] += 1
            f["secret_scan_bytes"] += len(data)
            f[f"secret_scan_{category}"] += 1
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


def _category(relative: str) -> str:
    """Name what a file of a deployment's folder is, for the secret scan's counts."""
    name = relative.rsplit("/", 1)[-1]
    if "dag_id=" in relative:
        return "trigger_logs" if ".log.trigger." in name else "task_logs"
    if "hpc-results/" in relative or relative.startswith("results/"):
        return "result_files"
    if name.endswith(".log"):
        return "service_logs"
    return "other_files"



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
    fernet_key = Fernet.generate_key().decode()
    with EmulatorServer(config) as server:
        stack = local_stack(work, server, plan, args.airflow_parallelism, fernet_key)
        phase = AirflowPhase(args, server, plan, secrets, record_issued_tokens(server), stack, fernet_key)
        try:
            phase.run()
        except Exception as exc:  # the deployment or the harness broke: reported, never hidden
            phase.problems.append("".join(traceback.format_exception(exc))[-4000:])
    phase.figures["seconds"] = round(time.monotonic() - started)
    figures = phase.counts()
    if phase.problems:
        print(f"  the deployment's home is kept for inspection: {phase.stack.home}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return figures, phase.problems

