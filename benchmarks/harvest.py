"""
Parallel harvest: a Rescale run with many output files, behind emulated latency.

A one-run Rescale job writes COUNT files of SIZE random bytes; once it has completed, the emulator
delays every ``/api/`` request by the latency asked, and :class:`RescaleDownloadOutputsOperator`
harvests the run twice, into two empty folders: at its default concurrency, then at concurrency 1.
Every file is checked against the md5 the listing announces, by the operator and again here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.emulator import EmulatorProcess
from hpc_emulator import DEMO_API_KEY
from benchmarks.jobs import wait_rescale_completed
from benchmarks.report import table


class _TaskInstance:
    """Just enough of a task instance for ``execute``: the XCom pushes are kept, not stored."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def create_output_job(emulator: EmulatorProcess, count: int, size: int) -> str:
    """Create and submit a one-run Rescale job writing ``count`` files of ``size`` bytes; return its id."""
    command = (
        f"mkdir -p out && i=0 && while [ $i -lt {count} ]; do "
        f"head -c {size} /dev/urandom > out/part_$i.bin; i=$((i+1)); done"
    )
    headers = {"Authorization": f"Token {DEMO_API_KEY}"}
    verify = emulator.ca_path or True
    job = requests.post(
        f"{emulator.base_url}/api/v2/jobs/", json={"name": "harvest", "jobanalyses": [{"command": command}]},
        headers=headers, verify=verify, timeout=60,
    ).json()
    submitted = requests.post(
        f"{emulator.base_url}/api/v2/jobs/{job['id']}/submit/", headers=headers, verify=verify, timeout=60
    )
    submitted.raise_for_status()
    return job["id"]


def listed_files(emulator: EmulatorProcess, job_id: str) -> dict[str, str]:
    """Return ``relativePath -> md5`` of the run's output files, read from the API (every page)."""
    files: dict[str, str] = {}
    page = 1
    while True:
        answer = requests.get(
            f"{emulator.base_url}/api/jobs/{job_id}/runs/1/files/", params={"page": page, "page_size": 1000},
            headers={"Authorization": f"Token {DEMO_API_KEY}"}, verify=emulator.ca_path or True, timeout=60,
        ).json()
        files.update({item["relativePath"]: item["md5"] for item in answer["results"]})
        if not answer.get("next"):
            return files
        page += 1


def verify_folder(folder: Path, expected: dict[str, str]) -> int:
    """Return how many files under ``folder`` match their announced md5 (every one must)."""
    good = 0
    for relative, md5 in expected.items():
        path = folder / relative
        if path.is_file() and hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == md5:
            good += 1
    return good


def run(emulator: EmulatorProcess, count: int, size: int, latency: float) -> dict[str, Any]:
    """Harvest at the default concurrency and at 1; print and return the figures."""
    os.environ.update(emulator.conn_env)
    from airflow_provider_hpc.operators.rescale_download import DEFAULT_CONCURRENCY, RescaleDownloadOutputsOperator

    job_id = create_output_job(emulator, count, size)
    wait_rescale_completed(emulator, job_id, timeout=600)
    expected = {path: md5 for path, md5 in listed_files(emulator, job_id).items() if path.startswith("out/")}
    if len(expected) != count:
        raise RuntimeError(f"The run listed {len(expected)} output files, {count} were written")
    results: dict[str, Any] = {}
    runs = [(DEFAULT_CONCURRENCY, latency), (1, latency), (DEFAULT_CONCURRENCY, 0.0)]
    with tempfile.TemporaryDirectory(prefix="hpc-bench-harvest-", dir=os.environ.get("HPC_BENCH_TMP")) as scratch:
        for index, (concurrency, delay) in enumerate(runs):
            emulator.set_faults([{"route": "/api/*", "action": {"delay": delay}}] if delay else [])
            folder = Path(scratch) / f"run-{index}"
            operator = RescaleDownloadOutputsOperator(
                task_id=f"harvest_{index}", job_id=job_id, run_id="1", output_path=str(folder), concurrency=concurrency,
            )
            before = emulator.requests_by_route()
            server_cpu, client_cpu = emulator.cpu_seconds(), time.process_time()
            started = time.perf_counter()
            value = operator.execute({"ti": _TaskInstance()})  # type: ignore[arg-type]
            seconds = time.perf_counter() - started
            client_cpu, server_cpu = time.process_time() - client_cpu, emulator.cpu_seconds() - server_cpu
            after = emulator.requests_by_route()
            results[f"{concurrency}@{delay * 1000:g}ms"] = {
                "concurrency": concurrency,
                "latency_s": delay,
                "seconds": seconds,
                "files": value["file_count"],
                "bytes": value["bytes_downloaded"],
                "requests": sum(after.get(k, 0) - before.get(k, 0) for k in after),
                "client_cpu_s": client_cpu,
                "server_cpu_s": server_cpu,
                "md5_verified": verify_folder(folder, expected),
            }
        emulator.set_faults([])
    default = results[f"{DEFAULT_CONCURRENCY}@{latency * 1000:g}ms"]
    single = results[f"1@{latency * 1000:g}ms"]
    speedup = single["seconds"] / default["seconds"]
    print(
        f"\n-- Rescale harvest: {count} files of {size // 1024} KiB, RescaleDownloadOutputsOperator; "
        "the CPU columns are the operator's process and the emulator's"
    )
    rows = [
        (f"concurrency {r['concurrency']}" + (" (default)" if r["concurrency"] == DEFAULT_CONCURRENCY else ""),
         f"{r['latency_s'] * 1000:g} ms", r["seconds"], r["files"], r["bytes"] / r["seconds"] / 2**20, r["requests"],
         r["client_cpu_s"], r["server_cpu_s"], f"{r['md5_verified']}/{count}")
        for r in results.values()
    ]
    print(table(("run", "added latency", "seconds", "files", "MiB/s", "requests", "client CPU s", "emulator CPU s",
                 "md5 verified"), rows))
    print(f"   speed-up of the default concurrency over 1 at {latency * 1000:g} ms: {speedup:.2f}x")
    return {"count": count, "size": size, "latency_s": latency, "runs": results, "speedup": speedup}
