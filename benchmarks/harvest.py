"""
Parallel harvest: a Rescale run with many output files, behind emulated latency.

A one-run Rescale job writes COUNT files of SIZE random bytes; once it has completed, the emulator
delays every ``/api/`` request by the latency asked, and :class:`RescaleDownloadOutputsOperator`
harvests the run into empty folders at concurrency 1, 2, 4, 8 and 16, twice over (the second
sweep in the reverse order, so a drift of the machine's load weighs on both ends alike), each
figure the better of the two; then once at its default concurrency with no added latency (the
CPU-bound floor of this machine). Every file is checked against the md5 the listing announces, by
the operator and again here, in every run. The speed-up of a concurrency is concurrency 1's time
over its own; its efficiency, that speed-up over the concurrency (1.0 is ideal).
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

#: The concurrencies measured at the added latency.
CONCURRENCIES = (1, 2, 4, 8, 16)
#: Sweeps over them; each figure is the best of these.
SWEEPS = 2


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


def harvest_once(
    emulator: EmulatorProcess, job_id: str, folder: Path, concurrency: int, delay: float, expected: dict[str, str]
) -> dict[str, Any]:
    """Harvest the run into ``folder`` at ``concurrency`` with ``delay`` added to every request; return the figures."""
    from airflow_provider_hpc.operators.rescale_download import RescaleDownloadOutputsOperator

    emulator.set_faults([{"route": "/api/*", "action": {"delay": delay}}] if delay else [])
    operator = RescaleDownloadOutputsOperator(
        task_id=f"harvest_{folder.name}", job_id=job_id, run_id="1", output_path=str(folder), concurrency=concurrency,
    )
    before = emulator.requests_by_route()
    server_cpu, client_cpu = emulator.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    value = operator.execute({"ti": _TaskInstance()})  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    client_cpu, server_cpu = time.process_time() - client_cpu, emulator.cpu_seconds() - server_cpu
    after = emulator.requests_by_route()
    emulator.set_faults([])
    return {
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


def run(emulator: EmulatorProcess, count: int, size: int, latency: float) -> dict[str, Any]:
    """Harvest at every concurrency of :data:`CONCURRENCIES` and at the default with no latency; print and return."""
    os.environ.update(emulator.conn_env)
    from airflow.sdk.lineage import get_hook_lineage_collector

    from airflow_provider_hpc.operators.rescale_download import DEFAULT_CONCURRENCY

    # Once per process, not per harvest: the hook lineage every stored file reports to loads
    # Airflow's plugins and the providers' asset factories at its first use (a task process has
    # loaded the plugins already, to build its template context). Left to the first run, it
    # would weigh on whichever concurrency came first.
    get_hook_lineage_collector()
    job_id = create_output_job(emulator, count, size)
    wait_rescale_completed(emulator, job_id, timeout=600)
    expected = {path: md5 for path, md5 in listed_files(emulator, job_id).items() if path.startswith("out/")}
    if len(expected) != count:
        raise RuntimeError(f"The run listed {len(expected)} output files, {count} were written")
    tries: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCIES}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-harvest-", dir=os.environ.get("HPC_BENCH_TMP")) as scratch:
        index = 0
        for sweep in range(SWEEPS):
            for concurrency in CONCURRENCIES if sweep % 2 == 0 else tuple(reversed(CONCURRENCIES)):
                folder = Path(scratch) / f"run-{index}"
                tries[concurrency].append(harvest_once(emulator, job_id, folder, concurrency, latency, expected))
                index += 1
        floor = harvest_once(emulator, job_id, Path(scratch) / "floor", DEFAULT_CONCURRENCY, 0.0, expected)
    best = {c: min(runs, key=lambda r: r["seconds"]) for c, runs in tries.items()}
    single = best[1]["seconds"]
    sweep_figures: dict[str, Any] = {}
    for concurrency, figures in best.items():
        speedup = single / figures["seconds"]
        sweep_figures[str(concurrency)] = {
            **figures,
            "runs_s": [r["seconds"] for r in tries[concurrency]],
            "md5_verified_all": min(r["md5_verified"] for r in tries[concurrency]),
            "speedup": speedup,
            "efficiency": speedup / concurrency,
        }
    default = sweep_figures.get(str(DEFAULT_CONCURRENCY))
    print(
        f"\n-- Rescale harvest: {count} files of {size // 1024} KiB, RescaleDownloadOutputsOperator, best of "
        f"{SWEEPS} sweeps; the CPU columns are the operator's process and the emulator's, in the best run"
    )
    rows = [
        (f"concurrency {r['concurrency']}" + (" (default)" if r["concurrency"] == DEFAULT_CONCURRENCY else ""),
         f"{r['latency_s'] * 1000:g} ms", r["seconds"], " / ".join(f"{t:.2f}" for t in r["runs_s"]), r["files"],
         r["bytes"] / r["seconds"] / 2**20, r["requests"], r["client_cpu_s"], r["server_cpu_s"],
         f"{r['md5_verified_all']}/{count}", f"{r['speedup']:.2f}x", f"{r['efficiency']:.1%}")
        for r in sweep_figures.values()
    ]
    rows.append((
        f"concurrency {DEFAULT_CONCURRENCY} (default), no latency", "0 ms", floor["seconds"], "-", floor["files"],
        floor["bytes"] / floor["seconds"] / 2**20, floor["requests"], floor["client_cpu_s"], floor["server_cpu_s"],
        f"{floor['md5_verified']}/{count}", "-", "-",
    ))
    print(table(("run", "added latency", "best s", "runs s", "files", "MiB/s", "requests", "client CPU s",
                 "emulator CPU s", "md5 verified", "speed-up", "efficiency"), rows))
    verified = min([r["md5_verified_all"] for r in sweep_figures.values()] + [floor["md5_verified"]])
    if default is not None:
        print(
            f"   speed-up of the default concurrency ({DEFAULT_CONCURRENCY}) over 1 at {latency * 1000:g} ms: "
            f"{default['speedup']:.2f}x, {default['efficiency']:.1%} of the ideal {DEFAULT_CONCURRENCY}x"
        )
    return {
        "count": count, "size": size, "latency_s": latency, "default_concurrency": DEFAULT_CONCURRENCY,
        "sweep": sweep_figures, "floor": floor, "md5_verified_min": verified,
        "speedup": None if default is None else default["speedup"],
        "efficiency": None if default is None else default["efficiency"],
    }
