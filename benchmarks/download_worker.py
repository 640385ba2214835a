"""
One streaming download through the provider's hook, alone in its process: ``python -m benchmarks.download_worker``.

It streams a Muse download key to a local ``ObjectStoragePath`` with :meth:`MuseHook.download`
and writes the seconds taken, the bytes, the md5, and the resident memory before and during the
transfer (sampled every 20 ms) as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

from benchmarks.load_worker import rss_bytes

SAMPLE_SECONDS = 0.02


def main(argv: list[str] | None = None) -> int:
    """Download once and write the figures."""
    parser = argparse.ArgumentParser(description="Stream one Muse download key to a local file with MuseHook.")
    parser.add_argument("--key", required=True, help="the download key")
    parser.add_argument("--dest", required=True, help="the local file to write")
    parser.add_argument("--out", required=True, help="where to write the figures (JSON)")
    args = parser.parse_args(argv)

    from airflow.sdk import ObjectStoragePath

    from airflow_provider_hpc.hooks.muse import MuseHook

    hook = MuseHook("muse_default")
    hook.transport  # noqa: B018 - the connection is read and the session made before the clock starts
    dest = ObjectStoragePath(f"file://{args.dest}")
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    stored = hook.download(args.key, dest)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    hook.close()
    figures = {
        "seconds": seconds,
        "bytes": stored.size,
        "md5": stored.md5,
        "rss_base": base,
        "rss_peak": peak[0],
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(args.out, "w") as handle:
        json.dump(figures, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
