"""
One client's streaming downloads, in its own process: ``python -m benchmarks.download_worker``.

The process reads one download per line of its standard input (JSON: ``key``, ``url``, ``dest``,
``out``, and for the hook an optional ``profile``: where to write a pyinstrument call tree of that
download), runs it, writes its figures to ``out`` and answers ``done``; it ends at end of input.
One process serves every repetition of a client, so its start (Airflow's imports, for the hook) is
paid once, not per transfer, and no transfer runs while another process starts.

``--mode hook`` streams a Muse download key to a local ``ObjectStoragePath`` with
:meth:`MuseHook.download` (a new hook per download, its connection read and session made before
the clock); ``--mode bare`` fetches the same URL with a bare ``requests`` stream, an md5 and a
plain file write, nothing else (what any Python client that checks md5 pays); ``--mode
bare-nomd5`` does the same without the md5. Each download's figures are the seconds taken, the
CPU seconds, the bytes, the md5 (when computed), and the resident memory before and during the
transfer (sampled every 20 ms).

The hook's time is also split by phase, with time counters around the provider's own steps
(:class:`PhaseClock`): waiting for and reading the next chunk of the body (``read``: the socket
and the TLS decryption), the md5 (``hash``), the file write (``write``), the final ``os.replace``
(``commit``), and the rest (``other``: the request, opening the temporary file, the checks). The
counters wrap a few hundred calls per GiB (one per chunk of about 1 MiB), so they cost well under
a millisecond.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.load_worker import profiled, rss_bytes

SAMPLE_SECONDS = 0.02


class PhaseClock:
    """Seconds spent in each step of the hook's download, counted by wrapping the provider's functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Start counting again from zero (before each download)."""
        self.seconds = {"read": 0.0, "hash": 0.0, "write": 0.0, "commit": 0.0}

    def timed(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``function`` counting its time under ``phase``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return wrapper

    def timed_chunks(self, body_chunks: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """Return ``body_chunks`` counting the time each next chunk takes to arrive under ``read``."""

        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            chunks = body_chunks(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                finally:
                    self.seconds["read"] += time.perf_counter() - started
                yield chunk

        return wrapper

    def install(self) -> None:
        """Wrap the download path of ``MuseHook.download`` to a local file."""
        from airflow_provider_hpc import storage_sink
        from airflow_provider_hpc.hooks import muse

        muse.body_chunks = self.timed_chunks(muse.body_chunks)  # type: ignore[assignment]
        storage_sink.StreamMd5.update = self.timed("hash", storage_sink.StreamMd5.update)  # type: ignore[method-assign]
        storage_sink._LocalFile.write = self.timed("write", storage_sink._LocalFile.write)  # type: ignore[method-assign]
        storage_sink._LocalFile.commit = self.timed("commit", storage_sink._LocalFile.commit)  # type: ignore[method-assign]


def hook_download(key: str, dest_path: str, clock: PhaseClock, profile_path: str | None = None) -> dict[str, Any]:
    """
    Stream ``key`` to ``dest_path`` with :meth:`MuseHook.download`, the hook and its session made before the clock.

    With ``profile_path``, pyinstrument profiles the download and writes its call tree there
    (:func:`~benchmarks.load_worker.profiled`); the profiler's cost is in the figures returned then.
    """
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_hpc.hooks.muse import MuseHook

    hook = MuseHook("muse_default")
    hook.transport  # noqa: B018 - the connection is read and the session made before the clock starts
    dest = ObjectStoragePath(f"file://{dest_path}")
    clock.reset()

    def download() -> tuple[int, str]:
        stored = hook.download(key, dest)
        hook.close()
        return stored.size, stored.md5

    with profiled(profile_path):
        return measure(download)


def bare_download(url: str, ca: str | None, dest_path: str, hashing: bool) -> dict[str, Any]:
    """
    Fetch ``url`` with a bare ``requests`` stream and a plain file write, with or without md5.

    ``ca`` is the CA file to trust; ``None`` trusts requests' own bundle (certifi).
    """
    import hashlib

    import requests

    # A new session per download, as the hook has: every client opens its connection in the clock.
    session = requests.Session()

    def download() -> tuple[int, str]:
        digest, size = hashlib.md5(usedforsecurity=False), 0
        with session.get(url, stream=True, verify=ca, timeout=60) as response, open(dest_path, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_content(1024 * 1024):
                if hashing:
                    digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return size, digest.hexdigest() if hashing else ""

    try:
        return measure(download)
    finally:
        session.close()


def measure(download: Callable[[], tuple[int, str]]) -> dict[str, Any]:
    """Run one download; return its figures: seconds, CPU seconds, bytes, md5, resident memory before and at peak."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    size, md5 = download()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    return {"seconds": seconds, "cpu_s": cpu, "bytes": size, "md5": md5, "rss_base": base, "rss_peak": peak[0]}


def main(argv: list[str] | None = None) -> int:
    """Download once per line of standard input (JSON: key, url, dest, out, and profile for the hook); answer ``done`` after each."""
    parser = argparse.ArgumentParser(description="Stream Muse downloads to local files with MuseHook, or bare requests.")
    parser.add_argument("--mode", choices=("hook", "bare", "bare-nomd5"), default="hook", help="hook, or bare requests")
    parser.add_argument("--ca", help="the CA to trust (bare modes)")
    args = parser.parse_args(argv)
    # The answers go to the parent on the original standard output, and anything else printed
    # (Airflow's console log handler writes to sys.stdout) to standard error, the client's log.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    clock = PhaseClock()
    if args.mode == "hook":
        from airflow.sdk.lineage import get_hook_lineage_collector

        # Once per process, not per transfer: the hook lineage the first stored file reports to
        # loads Airflow's plugins (a task process has loaded them already: the task runner does so
        # to build the template context; 1.3 s and 40 MiB here) and the providers' asset factories
        # (0.09 s). Made before the clock, as the connection is.
        get_hook_lineage_collector()
        clock.install()

    for line in sys.stdin:
        order = json.loads(line)
        if args.mode == "hook":
            figures = hook_download(order["key"], order["dest"], clock, order.get("profile"))
            phases = {f"{phase}_s": value for phase, value in clock.seconds.items()}
            phases["other_s"] = max(0.0, figures["seconds"] - sum(clock.seconds.values()))
            figures["phases"] = phases
        else:
            figures = bare_download(order["url"], args.ca, order["dest"], hashing=args.mode == "bare")
        with open(order["out"], "w") as handle:
            json.dump(figures, handle)
        answers.write("done\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
