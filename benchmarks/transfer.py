"""
Result transfer: one large ``run.zip`` streamed by the hook to a local ``ObjectStoragePath``, beside ``curl -o``.

A Muse job writes SIZE random bytes (incompressible, so ``run.zip`` is about SIZE too) and is
asked for ``run.zip`` with ``todownload=yes``: the download URL then serves that file. The hook
(:meth:`MuseHook.download`), a bare ``requests`` client with and without md5 (each in a process
of its own, started once for the section: see :class:`DownloadClient`) and ``curl -o`` fetch the
same URL over TLS, taking turns (see :func:`turn_order`); each figure is
the best of the repetitions (three by default, for every client and size). Peak resident memory is
the hook process's, sampled every 20 ms during its transfers of a size, beside its lowest value
before any of them. Where the hook's time goes is
printed for its best repetition: reading the body (socket and TLS), the md5, the file write, the
final rename and the rest, counted inside its process (see ``benchmarks/download_worker.py``),
beside the CPU seconds of every client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from benchmarks.emulator import EmulatorProcess
from benchmarks.jobs import MUSE_SOFTWARE, muse_token, wait_muse_ok
from benchmarks.report import table

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def prepare_download(emulator: EmulatorProcess, size: int) -> tuple[str, str]:
    """Run a job that writes ``size`` random bytes; return its run.zip's download key and URL."""
    verify = emulator.ca_path or True
    form = {
        "jwt": muse_token(emulator),
        "cmd": f"head -c {size} /dev/urandom > data.bin",
        "returned_type": "run.zip",
        "todownload": "yes",
    }
    answer = requests.post(f"{emulator.muse_url}software/muse/run/{MUSE_SOFTWARE}/", data=form, verify=verify, timeout=60).json()
    key = re.search(r"/([0-9a-f-]{36})/$", answer["url"]).group(1)  # type: ignore[union-attr]
    wait_muse_ok(emulator, key, timeout=600)
    # The emulator zips the run folder when the result is first asked: that is not the transfer.
    result = requests.get(f"{emulator.muse_url}software/muse/run/{MUSE_SOFTWARE}/{key}/", verify=verify, timeout=900).json()
    url = result["url"]
    download_key = re.search(r"[?&]key=([A-Za-z0-9_.:-]+)", url).group(1)  # type: ignore[union-attr]
    return download_key, url


def file_md5(path: Path) -> str:
    """Return a file's hex md5."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _wait(process: subprocess.Popen[Any]) -> None:
    """Wait for a child; raise if it failed."""
    if process.wait() != 0:
        raise RuntimeError(f"{process.args[:4]!r} exited with {process.returncode}")


def curl_once(emulator: EmulatorProcess, url: str, dest: Path) -> dict[str, Any]:
    """Fetch ``url`` with ``curl -o``; return seconds (curl's own ``time_total``), CPU seconds and bytes."""
    command = ["curl", "-sS", "--fail", "--cacert", str(emulator.ca_path), "-o", str(dest),
               "-w", "%{time_total} %{size_download}", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read() if process.stdout else ""
    _wait(process)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, size = output.split()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": float(seconds), "cpu_s": cpu, "bytes": int(size), "md5": file_md5(dest)}


class DownloadClient:
    """
    One Python client (``hook``, ``bare`` or ``bare-nomd5``) in its own process for the whole section.

    Each :meth:`download` hands it one transfer and waits for its figures (see
    ``benchmarks/download_worker.py``). Its own output goes to ``log``, whose end is in the error
    when the client stops before answering. Use it as a context manager: the process ends with it.

    :param ca_path: the CA the bare clients trust (``None``: the system's).
    :param env: environment variables added to this process's (the hook's connection).
    :param log: where the client's output (standard error) goes.
    """

    def __init__(self, mode: str, ca_path: str | None, env: dict[str, str], log: Path) -> None:
        self.mode = mode
        self.log = log
        command = [sys.executable, "-m", "benchmarks.download_worker", "--mode", mode]
        if ca_path:
            command += ["--ca", str(ca_path)]
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                command, env={**os.environ, **env}, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=output, text=True,
            )

    def __enter__(self) -> DownloadClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def download(self, key: str, url: str, dest: Path, scratch: Path, profile: Path | None = None) -> dict[str, Any]:
        """Stream one download to ``dest``; return its figures (with ``profile``, the hook's pyinstrument tree goes there)."""
        if profile is not None and self.mode != "hook":
            raise ValueError(f"only the hook client profiles its downloads, not {self.mode}")
        assert self.process.stdin is not None and self.process.stdout is not None
        out = scratch / f"{self.mode}.json"
        order = {"key": key, "url": url, "dest": str(dest), "out": str(out)}
        if profile is not None:
            order["profile"] = str(profile)
        try:
            self.process.stdin.write(json.dumps(order) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline().strip()
        except (BrokenPipeError, ValueError):  # gone: its pipe broken, or closed after an earlier failure
            answer = ""
        if answer != "done":
            self.close()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the {self.mode} download client stopped (exit code {self.process.returncode}):\n{tail}")
        return json.loads(out.read_text())

    def close(self) -> None:
        """End the client's process (end of input), killed if it does not end by itself; never raises."""
        try:
            if self.process.stdin is not None and not self.process.stdin.closed:
                self.process.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already: what was left unsent does not matter
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def turn_order(names: list[str], repetition: int) -> list[str]:
    """
    The clients' order in one repetition: each repetition starts with the next client.

    No client holds the same place in every repetition: on a virtual machine the page cache a
    write fills can cost several times more at some moments than at others (docs/benchmarks.md,
    section 3a), and a fixed order could leave the same client at the same moment every time.
    """
    shift = repetition % len(names)
    return names[shift:] + names[:shift]


def _measure_size(
    emulator: EmulatorProcess, clients: dict[str, DownloadClient], key: str, url: str, size_mib: int, repetitions: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Fetch one file of ``size_mib`` with every client, taking turns; return its figures and each client's best run."""
    runs: dict[str, list[dict[str, Any]]] = {"hook": [], "bare": [], "bare-nomd5": [], "curl": []}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-transfer-", dir=os.environ.get("HPC_BENCH_TMP")) as scratch:
        folder = Path(scratch)
        for repetition in range(repetitions):
            for name in turn_order(list(runs), repetition):
                dest = folder / f"{name}.zip"
                if name == "curl":
                    runs[name].append(curl_once(emulator, url, dest))
                else:
                    runs[name].append(clients[name].download(key, url, dest, folder))
                    runs[name][-1]["md5_check"] = file_md5(dest)
                dest.unlink()
    best = {name: min(measured, key=lambda r: r["seconds"]) for name, measured in runs.items()}
    md5s = {r["md5"] for measured in runs.values() for r in measured if r["md5"]}
    md5s |= {r["md5_check"] for name in runs if name != "curl" for r in runs[name]}
    result = {
        "size_mib": size_mib,
        "bytes": best["hook"]["bytes"],
        **{f"{name.replace('-', '_')}_mib_s": best[name]["bytes"] / MIB / best[name]["seconds"] for name in runs},
        **{f"{name.replace('-', '_')}_runs_s": [r["seconds"] for r in measured] for name, measured in runs.items()},
        # The lowest RSS before any of the hook's downloads of this size: memory a download kept
        # in the client's process shows as growth of the later ones.
        "hook_rss_base_mib": min(r["rss_base"] for r in runs["hook"]) / MIB,
        "hook_rss_peak_transfer_mib": max(r["rss_peak"] for r in runs["hook"]) / MIB,
        "bare_rss_peak_transfer_mib": max(r["rss_peak"] for r in runs["bare"]) / MIB,
        "md5_identical": len(md5s) == 1,
        "hook_phases": best["hook"]["phases"],
        **{f"{name.replace('-', '_')}_cpu_s": best[name]["cpu_s"] for name in runs},
    }
    result["hook_vs_curl"] = result["hook_mib_s"] / result["curl_mib_s"]
    result["bare_vs_curl"] = result["bare_mib_s"] / result["curl_mib_s"]
    result["bare_nomd5_vs_curl"] = result["bare_nomd5_mib_s"] / result["curl_mib_s"]
    return result, best


def _profile_hook(hook: DownloadClient, downloads: dict[int, tuple[str, str]], profile_dir: Path) -> None:
    """
    Download each size once more with the hook, under pyinstrument, not counted.

    After every size is measured: the profiler's imports and data stay in the hook's process, and
    would be in the memory figures of the sizes after.
    """
    with tempfile.TemporaryDirectory(prefix="hpc-bench-transfer-", dir=os.environ.get("HPC_BENCH_TMP")) as scratch:
        folder = Path(scratch)
        for size_mib, (key, url) in downloads.items():
            profile = profile_dir / f"transfer-hook-{size_mib}MiB.txt"
            hook.download(key, url, folder / "hook.zip", folder, profile)
            (folder / "hook.zip").unlink()
            print(f"   {size_mib} MiB: the hook's download profiled (not counted): {profile}", flush=True)


def run(emulator: EmulatorProcess, sizes_mib: list[int], repetitions: int, profile_dir: Path | None = None) -> dict[str, Any]:
    """Measure every size; print and return the figures (with ``profile_dir``, a pyinstrument profile of the hook per size)."""
    rows, phase_rows, results = [], [], {}
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hpc-bench-clients-", dir=os.environ.get("HPC_BENCH_TMP"))))
        clients = {
            mode: stack.enter_context(DownloadClient(mode, emulator.ca_path, emulator.conn_env, logs / f"{mode}.log"))
            for mode in ("hook", "bare", "bare-nomd5")
        }
        downloads: dict[int, tuple[str, str]] = {}
        for size_mib in sizes_mib:
            downloads[size_mib] = prepare_download(emulator, size_mib * MIB)
            result, best = _measure_size(emulator, clients, *downloads[size_mib], size_mib, repetitions)
            results[f"{size_mib} MiB"] = result
            rows.append((
                f"{size_mib} MiB", result["hook_mib_s"], result["bare_mib_s"], result["bare_nomd5_mib_s"],
                result["curl_mib_s"], result["hook_vs_curl"], result["bare_vs_curl"], result["bare_nomd5_vs_curl"],
                result["hook_rss_base_mib"], result["hook_rss_peak_transfer_mib"], "yes" if result["md5_identical"] else "NO",
            ))
            phases = result["hook_phases"]
            phase_rows.append((
                f"{size_mib} MiB", best["hook"]["seconds"], phases["read_s"], phases["hash_s"], phases["write_s"],
                phases["commit_s"], phases["other_s"], result["hook_cpu_s"], result["bare_cpu_s"],
                result["bare_nomd5_cpu_s"], result["curl_cpu_s"],
            ))
            print(f"   {size_mib} MiB done", flush=True)
        if profile_dir is not None:
            _profile_hook(clients["hook"], downloads, profile_dir)
    print(
        f"\n-- one run.zip over TLS, best of {repetitions}, each client in its own process (one for the section), taking turns; "
        "bare = requests stream + md5 + plain file write; nomd5 = the same without md5"
    )
    print(table(
        ("size", "hook MiB/s", "bare MiB/s", "nomd5 MiB/s", "curl MiB/s", "hook/curl", "bare/curl", "nomd5/curl",
         "hook RSS before MiB", "hook RSS peak MiB", "same bytes"),
        rows,
    ))
    print(
        "\n-- where the hook's time goes, its best repetition (seconds, counted in its process: read = waiting "
        "for and decrypting the body, hash = md5, write = file writes, commit = the final rename); "
        "CPU = user + system seconds of each client's best repetition"
    )
    print(table(
        ("size", "hook s", "read s", "hash s", "write s", "commit s", "other s", "hook CPU s", "bare CPU s",
         "nomd5 CPU s", "curl CPU s"),
        phase_rows,
    ))
    return results
