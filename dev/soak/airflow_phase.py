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
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from hpc_emulator import EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser

from dev.airflow_stack import AirflowStack
from dev.soak.faults import fault_rules, set_faults
from dev.soak.harness import Harness, count_outcome, md5_file
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

