"""
Muse results on S3, against the emulator: ``stdout.txt``, ``run.zip`` and its extraction, a file
behind a download key, a failed run's content zip; inputs read from S3; a download cut midway
leaves nothing; another process (a worker elsewhere) reads what the task wrote.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from typing import Any

import pytest

from airflow_provider_hpc.exceptions import MuseApiError, MuseJobFailed
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.transport.retry import RetryPolicy
from hpc_emulator import EmulatorServer
from tests.integration.muse.muse_support import FAST_POLL, MemoryStateStore, drive, make_context, set_faults, submissions
from tests.integration.storage.s3_support import S3Bucket

RESULT_ROUTE = "GET /api/software/muse/run/*"
#: Writes 20 MiB of random bytes in the run folder: run.zip needs a multipart upload (parts of 8 MiB).
BIG_RUN = "python -c \"import os; open('field.bin', 'wb').write(os.urandom(20 * 1024 * 1024)); print(9.0)\""
QUICK = RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.02, max_retry_after=0.1)


def operator(**overrides: Any) -> MuseRunOperator:
    """A ``sw_example`` run of ``python /add.py 4 5`` with fast polls."""
    return MuseRunOperator(**{"task_id": "add", "name": "sw_example", "cmd": "python /add.py 4 5", **FAST_POLL, **overrides})


def run(**overrides: Any) -> dict[str, Any]:
    """Run the task as a worker and a triggerer would; return its XCom value."""
    return drive(operator(**overrides), make_context(MemoryStateStore())).value


@pytest.mark.parametrize(
    ("returned_type", "todownload", "extract"),
    [("stdout.txt", "no", False), ("stdout.txt", "yes", False), ("run.zip", "no", True), ("run.zip", "yes", True)],
    ids=["stdout.txt", "stdout.txt-download-key", "run.zip-extracted", "run.zip-download-key-extracted"],
)
def test_file_results_land_on_s3(
    emulator_conns: EmulatorServer, s3: S3Bucket, returned_type: str, todownload: str, extract: bool
) -> None:
    value = run(returned_type=returned_type, todownload=todownload, extract_zip=extract, output_path=s3.url("add"))

    name = "stdout.txt" if returned_type == "stdout.txt" else "run.zip"
    body = s3.read(f"add/{name}")
    assert value["file"] == {"path": s3.url(f"add/{name}"), "size": len(body), "md5": hashlib.md5(body).hexdigest()}
    assert value["output_path"] == s3.url("add")
    if returned_type == "stdout.txt":
        assert body.decode().strip() == "9.0"
        assert s3.keys() == ["add/stdout.txt"]
    else:
        assert value["extracted"] == {"path": s3.url("add/run"), "files": 2, "size": value["extracted"]["size"]}
        assert s3.read("add/run/__WS__stdout.txt").decode().strip() == "9.0"
        assert s3.keys() == ["add/run.zip", "add/run/__WS__stderr.txt", "add/run/__WS__stdout.txt"]
    assert (value["download"] is not None) == (todownload == "yes")
    assert s3.uploads() == []


def test_results_base_on_s3_gives_each_task_its_folder(
    emulator_conns: EmulatorServer, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__HPC__RESULTS_BASE", s3.url("hpc-results"))

    value = run(returned_type="stdout.txt")

    folder = "hpc-results/muse_dag/manual__2026-01-01T00_00_00_00_00/muse_task"
    assert value["output_path"] == s3.url(folder)
    assert s3.keys() == [f"{folder}/stdout.txt"]


def test_a_large_run_zip_streams_in_parts_and_another_worker_reads_it(emulator_conns: EmulatorServer, s3: S3Bucket) -> None:
    """A 20 MiB run.zip is a multipart upload; a separate process, as a task on another machine, reads it."""
    value = run(cmd=BIG_RUN, returned_type="run.zip", extract_zip=True, output_path=s3.url("big"))

    assert value["file"]["size"] > 20 * 1024 * 1024
    reader = (
        "import hashlib, sys\n"
        "from airflow.sdk import ObjectStoragePath\n"
        "archive, member = (ObjectStoragePath(a) for a in sys.argv[1:3])\n"
        "print(hashlib.md5(archive.read_bytes()).hexdigest(), member.stat().st_size)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", reader, value["file"]["path"], value["extracted"]["path"] + "/field.bin"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Airflow's own log lines (the connection it read) come first; the answer is the last line.
    assert done.stdout.strip().splitlines()[-1].split() == [value["file"]["md5"], str(20 * 1024 * 1024)]
    assert s3.uploads() == []


@pytest.mark.parametrize("route", [RESULT_ROUTE, "GET /api/download/"], ids=["result", "download-key"])
def test_a_download_cut_midway_leaves_nothing_under_the_key(
    emulator_conns: EmulatorServer, s3: S3Bucket, route: str
) -> None:
    """Every attempt cut after half the body: no object, no temporary key, no upload left open; then one that passes."""
    todownload = route.endswith("download/")
    first = run(cmd=BIG_RUN, returned_type="run.zip", todownload=todownload, output_path=s3.url("first"))
    hook = MuseHook(retry=QUICK)
    fetch = (
        (lambda dest: hook.download(first["download"]["key"], dest)) if todownload
        else (lambda dest: hook.get_result("sw_example", first["key"], dest).file)
    )
    try:
        set_faults(emulator_conns, [{"route": route, "probability": 1.0, "action": {"drop": True}}])
        with pytest.raises(MuseApiError):
            fetch(s3.path("again/run.zip"))
        assert s3.keys("again/") == [] and s3.uploads() == []

        set_faults(emulator_conns, [{"route": route, "sequence": [{"drop": True}, "pass"]}])
        stored = fetch(s3.path("again/run.zip"))
    finally:
        hook.close()

    assert stored.md5 == first["file"]["md5"] and stored.size == first["file"]["size"]
    assert s3.keys("again/") == ["again/run.zip"] and s3.uploads() == []


def test_a_failed_runs_content_zip_lands_on_s3(emulator_conns: EmulatorServer, s3: S3Bucket) -> None:
    with pytest.raises(MuseJobFailed) as caught:
        run(cmd="python /add.py 4 x", output_path=s3.url("bad"))

    assert f"content zip at {s3.url('bad/content.zip')}" in str(caught.value)
    with zipfile.ZipFile(io.BytesIO(s3.read("bad/content.zip"))) as zipped:
        assert "'x' is not a number" in zipped.read("__WS__stderr.txt").decode()
    assert s3.keys() == ["bad/content.zip"] and s3.uploads() == []


def test_input_files_are_read_from_s3(emulator_conns: EmulatorServer, s3: S3Bucket) -> None:
    """Inputs given as ``s3://`` URLs or paths are streamed from the bucket into the submission."""
    s3.put("inputs/stdin.txt", b"30 40\n")
    s3.put("inputs/usrcmd.sh", b"#!/bin/sh\npython /add.py < stdin.txt\n")

    driven = drive(
        operator(cmd="usrcmd.sh", files=[s3.url("inputs/usrcmd.sh"), s3.path("inputs/stdin.txt")],
                 files_order=["stdin.txt", "usrcmd.sh"]),
        make_context(MemoryStateStore()),
    )

    assert driven.value["stdout"] == "70.0"
    assert driven.events[0]["report"]["request"]["ordered_filename_list"] == ["stdin.txt", "usrcmd.sh"]


def test_a_missing_input_on_s3_fails_before_any_submission(emulator_conns: EmulatorServer, s3: S3Bucket) -> None:
    with pytest.raises(MuseApiError, match="does not exist"):
        operator(files=[s3.url("inputs/nowhere.txt")]).execute(make_context(MemoryStateStore()))
    assert submissions(emulator_conns) == 0
