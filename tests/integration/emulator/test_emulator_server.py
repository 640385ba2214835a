"""
The emulator as a server: faults served as scripted, counters, concurrent polls, clean stops, the CLI, TLS.

Everything runs on 127.0.0.1 with port 0 and temporary folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
import requests
from emulator_client import SOFTWARE, MuseClient, key_of, wait_for

from hpc_emulator import DEMO_API_KEY, DEMO_PASSWORD, EmulatorConfig, EmulatorServer
from hpc_emulator.__main__ import banner, is_loopback
from hpc_emulator.__main__ import main as cli_main

STATE_ROUTE = "GET /api/software/muse/state/{name}/{key}/"
SUBMIT_ROUTE = "POST /api/software/muse/run/{name}/"
BANNER_END = "Admin:"
CLI_START_SECONDS = 30.0
DEMO = {"username": "demo", "password": DEMO_PASSWORD}


def set_faults(muse: MuseClient, rules: list[dict[str, Any]]) -> None:
    """Replace the emulator's fault rules."""
    answer = muse.session.post(f"{muse.admin}faults", json=rules, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"rules": len(rules)}, answer.text


def children() -> set[int]:
    """Return the pids of this process's living descendants (zombies left out)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def sleeping(pids: set[int]) -> set[int]:
    """Return those of ``pids`` that run ``sleep``."""
    found = set()
    for pid in pids:
        try:
            if psutil.Process(pid).name() == "sleep":
                found.add(pid)
        except psutil.NoSuchProcess:
            continue
    return found


# ------------------------------------------------------------------------------------- faults


def test_scripted_fault_sequence_is_served_exactly_and_counted(muse: MuseClient) -> None:
    key = key_of(muse.submit_json(cmd="python /add.py 1 2"))
    muse.wait_ended(key)
    before = muse.counters()["requests"][STATE_ROUTE]
    set_faults(
        muse,
        [
            {
                "route": "GET /api/software/muse/state/*",
                "sequence": [{"status": 503}, {"status": 429, "retry_after": 2}, "pass", {"status": 502}],
            }
        ],
    )
    path = f"software/muse/state/{SOFTWARE}/{key}/"
    unavailable = muse.get(path)
    assert unavailable.status_code == 503 and unavailable.json() == {"detail": "Service Unavailable"}
    throttled = muse.get(path)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    assert throttled.json() == {"detail": "Request was throttled. Expected available in 2 seconds."}
    passed = muse.get(path)
    assert passed.status_code == 200 and passed.json()["info"]["report"]["cr"] == "OK"
    gateway = muse.get(path)
    assert gateway.status_code == 502 and gateway.headers["content-type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in gateway.text
    assert muse.get(path).status_code == 200  # the script is over: requests go through again
    # Other routes were never touched by the rule.
    assert muse.result(key).status_code == 200

    counts = muse.counters()
    assert counts["requests"][STATE_ROUTE] - before == 5
    assert counts["requests"]["GET /api/software/muse/run/{name}/{key}/"] == 1
    assert counts["faults"] == {"status:503": 1, "status:429": 1, "status:502": 1}
    described = muse.session.get(f"{muse.admin}faults", timeout=10).json()
    assert described[0]["served"] == 4 and described[0]["remaining"] == 0


def test_dropped_answer_still_submits_once(muse: MuseClient) -> None:
    set_faults(muse, [{"route": "POST /api/software/muse/run/*", "sequence": [{"drop": True}]}])
    # Half the body, then the connection closes: the client sees a broken answer.
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        muse.submit_json(cmd="python /add.py 2 2")
    counts = muse.counters()
    # The service handled the request before the connection broke: the run exists.
    assert counts["muse_submissions"][""] == 1 and counts["faults"] == {"drop": 1}
    assert counts["requests"][SUBMIT_ROUTE] == 1
    assert [job["cmd"] for job in muse.jobs()] == ["python /add.py 2 2"]


def test_probability_faults_replay_identically_with_the_seed(muse: MuseClient) -> None:
    rule = {"route": "/api/software/muse/state/*", "probability": 0.5, "action": {"status": 500}}
    path = f"software/muse/state/{SOFTWARE}/00000000-0000-4000-8000-000000000000/"

    def statuses() -> list[int]:
        """Return the statuses of 30 state polls."""
        return [muse.get(path).status_code for _ in range(30)]

    set_faults(muse, [rule])
    first = statuses()
    assert set(first) == {404, 500}
    assert muse.session.post(f"{muse.admin}reset", timeout=10).json() == {"reset": True}
    assert muse.counters() == {}
    set_faults(muse, [rule])
    assert statuses() == first
    assert muse.counters()["faults"]["status:500"] == first.count(500)


def test_fault_rules_are_checked_and_spare_the_admin_side(muse: MuseClient) -> None:
    invalid_rules = (
        {"route": "*"},
        [{"route": "*", "action": {"status": 200}}],
        [{"route": "*", "action": {"nope": 1}}],
    )
    for invalid in invalid_rules:
        answer = muse.session.post(f"{muse.admin}faults", json=invalid, timeout=10)
        assert answer.status_code == 400 and "invalid fault rules" in answer.json()["detail"]
    set_faults(muse, [{"route": "*", "action": {"status": 503}}])
    assert muse.post("jwt/obtain/", data={"username": "demo", "password": DEMO_PASSWORD}).status_code == 503
    assert muse.session.get(f"{muse.admin}health", timeout=10).json()["status"] == "ok"
    assert muse.counters()["requests"] == {"POST /api/jwt/obtain/": 1}


# ---------------------------------------------------------------------------- load and counts


def test_two_hundred_concurrent_state_polls(muse: MuseClient) -> None:
    key = key_of(muse.submit_json(cmd="python /add.py 4 5"))
    expected = muse.wait_ended(key)
    before = muse.counters()["requests"][STATE_ROUTE]
    local = threading.local()
    sessions: list[requests.Session] = []

    def poll(_: int) -> tuple[int, dict[str, Any]]:
        """Poll the state once with this thread's session; return the status and body."""
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        answer = local.session.get(f"{muse.base}software/muse/state/{SOFTWARE}/{key}/", timeout=30)
        return answer.status_code, answer.json()

    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(poll, range(200)))
    finally:
        for session in sessions:
            session.close()
    assert len(answers) == 200
    assert all(status == 200 and body == expected for status, body in answers)
    assert muse.counters()["requests"][STATE_ROUTE] - before == 200


def test_rescale_through_the_whole_server(emulator: EmulatorServer) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {DEMO_API_KEY}"
    api = f"{emulator.rescale_url}/api"
    command = "mkdir -p out; printf 'x=%s\\n' \"$x\" > out/x.txt; head -c 5000 /dev/urandom > out/noise.bin"
    body = {"name": "t", "jobanalyses": [{"command": command}], "runs": [{"variables": {"x": 2.5}}]}
    job = session.post(f"{api}/v2/jobs/", json=body)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert session.post(f"{api}/v2/jobs/{job_id}/submit/").json() == {}
    run = wait_for(lambda: (found := session.get(f"{api}/jobs/{job_id}/runs/1/").json())["dateCompleted"] and found)
    files = session.get(f"{api}/jobs/{job_id}/runs/1/files/").json()
    assert files["count"] == run["outputFileCount"] == 3
    for entry in files["results"]:
        content = session.get(f"{api}/files/{entry['id']}/contents/").content
        assert hashlib.md5(content).hexdigest() == entry["md5"] and len(content) == entry["decryptedSize"]
        if entry["relativePath"] == "out/x.txt":
            assert content == b"x=2.5\n"
    counts = session.get(f"{emulator.base_url}/_emulator/counters").json()
    assert counts["rescale_jobs_submitted"] == {job_id: 1}
    assert counts["requests"]["GET /api/files/{file_id}/contents/"] == 3
    assert counts["requests"]["POST /api/v2/jobs/"] == 1
    session.close()


# ------------------------------------------------------------------------------------ life cycle


def test_stop_leaves_no_process_and_no_folder() -> None:
    before = children()
    server = EmulatorServer().start()
    data_dir = Path(server.config.data_dir)
    assert data_dir.is_dir() and server.deletes_data_dir
    muse = MuseClient(server)
    rescale = requests.Session()
    rescale.headers["Authorization"] = f"Token {DEMO_API_KEY}"
    try:
        key = key_of(muse.submit_json(cmd="sleep 60"))
        body = {"name": "t", "jobanalyses": [{"command": "sleep 60"}], "runs": [{}, {}]}
        job_id = rescale.post(f"{server.rescale_url}/api/v2/jobs/", json=body).json()["id"]
        rescale.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/")
        # An off-cluster run keeps its request open until its command ends.
        offcluster = threading.Thread(
            target=lambda: muse.post(f"software/run/{SOFTWARE}/", json={"cmd": "sleep 60", "jwt": muse.token()}),
            daemon=True,
        )
        offcluster.start()
        wait_for(lambda: next(job for job in muse.jobs() if job["key"] == key)["pid"])
        # One cluster run, one off-cluster run, two Rescale runs: four sleeps under their shells.
        wait_for(lambda: len(sleeping(children() - before)) == 4)
        started = time.monotonic()
    finally:
        server.stop()
    assert time.monotonic() - started < 5
    offcluster.join(timeout=5)
    assert not offcluster.is_alive()
    wait_for(lambda: not (children() - before), timeout=5)
    assert not data_dir.exists()
    rescale.close()
    muse.session.close()


def test_stop_keeps_a_given_data_folder(emulator_config: EmulatorConfig) -> None:
    with EmulatorServer(emulator_config) as server:
        muse = MuseClient(server)
        muse.wait_ended(key_of(muse.submit_json(cmd="python /add.py 1")))
        muse.session.close()
    assert (Path(emulator_config.data_dir) / "muse" / "jobs").is_dir()


def test_tls_is_trusted_through_its_ca_only(emulator_config: EmulatorConfig) -> None:
    with EmulatorServer(replace(emulator_config, tls=True)) as server:
        assert server.muse_url.startswith("https://127.0.0.1:") and server.ca_path is not None
        answer = requests.post(f"{server.muse_url}jwt/obtain/", data=DEMO, verify=str(server.ca_path), timeout=10)
        assert answer.status_code == 200 and answer.json()["token"]
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{server.base_url}/_emulator/health", timeout=10)
        for env in server.airflow_conn_env().values():
            assert json.loads(env)["extra"] == {"verify": str(server.ca_path)}


# ------------------------------------------------------------------------------------------ CLI


def start_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the emulator's command line; return the process and its banner once it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hpc_emulator", "--port", "0", "--time-scale", "0.05", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    return process, read_banner(process, process.stdout)


def read_banner(process: subprocess.Popen[str], stream: IO[str]) -> list[str]:
    """Read lines up to the banner's last one, failing with what was printed if the process ends."""
    lines: list[str] = []
    deadline = time.monotonic() + CLI_START_SECONDS
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            process.wait(timeout=5)
            raise AssertionError(f"the emulator exited ({process.returncode}):\n" + "".join(lines))
        lines.append(line.rstrip("\n"))
        if line.startswith(BANNER_END):
            return lines
    raise AssertionError("no banner:\n" + "\n".join(lines))


def banner_value(lines: list[str], label: str) -> str:
    """Return the first word after ``label`` on the banner line starting with it."""
    line = next(line for line in lines if line.strip().startswith(label))
    return line.strip()[len(label) :].split()[0]


def exported(lines: list[str]) -> dict[str, str]:
    """Return the ``export NAME=VALUE`` lines of the banner, as the shell would read them."""
    found = {}
    for line in lines:
        if line.strip().startswith("export "):
            name, value = shlex.split(line.strip())[1].split("=", 1)
            found[name] = value
    return found


@pytest.fixture
def cli_processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Started command-line processes, killed at the end if a test left one running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def stop_cli(process: subprocess.Popen[str]) -> str:
    """Send SIGTERM, check the process exits cleanly, and return the rest of its output."""
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=15)
    assert process.returncode == 0, rest
    assert "Traceback" not in rest, rest
    return rest


def test_cli_banner_one_request_and_sigterm(tmp_path: Path, cli_processes: list[subprocess.Popen[str]]) -> None:
    data_dir = tmp_path / "data"
    process, lines = start_cli("--data-dir", str(data_dir))
    cli_processes.append(process)
    muse_url = banner_value(lines, "Muse")
    rescale_url = banner_value(lines, "Rescale")
    assert muse_url.startswith("http://127.0.0.1:") and muse_url.endswith("/api/")
    assert rescale_url == muse_url.removesuffix("/api/")
    assert f"demo/{DEMO_PASSWORD}" in next(line for line in lines if "Muse" in line)
    assert f"API keys: {DEMO_API_KEY}" in next(line for line in lines if "Rescale" in line)
    connections = exported(lines)
    assert set(connections) == {"AIRFLOW_CONN_MUSE_DEFAULT", "AIRFLOW_CONN_RESCALE_DEFAULT"}
    muse_conn = json.loads(connections["AIRFLOW_CONN_MUSE_DEFAULT"])
    assert muse_conn == {"conn_type": "muse", "host": muse_url, "login": "demo", "password": DEMO_PASSWORD, "extra": {}}
    rescale_conn = json.loads(connections["AIRFLOW_CONN_RESCALE_DEFAULT"])
    assert rescale_conn == {"conn_type": "rescale", "host": rescale_url, "password": DEMO_API_KEY, "extra": {}}

    token = requests.post(f"{muse_url}jwt/obtain/", data=DEMO, timeout=10).json()["token"]
    run_url = f"{muse_url}software/muse/run/{SOFTWARE}/"
    submitted = requests.post(run_url, json={"cmd": "sleep 60", "jwt": token}, timeout=10)
    key = key_of(submitted.json())
    jobs_url = f"{rescale_url}/_emulator/muse/jobs"
    pid = wait_for(lambda: requests.get(jobs_url, timeout=10).json()[0]["pid"])
    assert requests.get(jobs_url, timeout=10).json()[0]["key"] == key

    stop_cli(process)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=5)
    assert (data_dir / "muse" / "jobs" / key).is_dir()  # a given data folder is kept


def test_cli_tls_and_temporary_data_folder(tmp_path: Path, cli_processes: list[subprocess.Popen[str]]) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    process, lines = start_cli("--tls", env={**os.environ, "TMPDIR": str(temp_root)})
    cli_processes.append(process)
    muse_url = banner_value(lines, "Muse")
    ca_path = banner_value(lines, "TLS CA")
    assert muse_url.startswith("https://127.0.0.1:") and Path(ca_path).is_relative_to(temp_root)
    assert json.loads(exported(lines)["AIRFLOW_CONN_MUSE_DEFAULT"])["extra"] == {"verify": ca_path}
    assert any("removed on exit" in line for line in lines)

    answer = requests.post(f"{muse_url}jwt/obtain/", data=DEMO, verify=ca_path, timeout=10)
    assert answer.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(f"{muse_url}jwt/obtain/", data=DEMO, timeout=10)

    stop_cli(process)
    assert list(temp_root.iterdir()) == []


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--user", "nopassword"], ["--faults", '[{"route": "*"}]'], ["--user", "a:b:king"]):
        with pytest.raises(SystemExit) as exited:
            cli_main(["--port", "0", *args])
        assert exited.value.code == 2 and "error:" in capsys.readouterr().err


def test_cli_port_in_use_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    handler = signal.getsignal(signal.SIGTERM)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the temporary data folder is gone too
    assert signal.getsignal(signal.SIGTERM) == handler


def test_banner_warns_off_loopback_only() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"))
    with EmulatorServer() as server:
        assert "WARNING" not in banner(server)


def test_the_default_credentials_are_long_enough_for_airflow_s_masker() -> None:
    from airflow.sdk._shared.secrets_masker.secrets_masker import SecretsMasker

    masker = SecretsMasker()
    for secret in (DEMO_PASSWORD, DEMO_API_KEY):
        # Well over [logging] min_length_masked_secret (5 by default): masked, and no warning at start.
        assert len(secret) >= 16
        masker.add_mask(secret)
        assert masker.redact(f"connect with {secret} please") == "connect with *** please"
    config = EmulatorConfig(data_dir=Path("unused"))
    assert config.muse_users["demo"].password == DEMO_PASSWORD and config.rescale_api_keys == {DEMO_API_KEY}
