"""
One streaming download, alone in its process: ``python -m benchmarks.download_worker``.

``--mode hook`` streams a Muse download key to a local ``ObjectStoragePath`` with
:meth:`MuseHook.download`; ``--mode bare`` fetches the same URL with a bare ``requests`` stream,
an md5 and a plain file write, nothing else (what any Python client that checks md5 pays);
``--mode bare-nomd5`` does the same without the md5. Each writes the seconds taken, the bytes,
the md5 (when computed), and the resident memory before and during the transfer (sampled every
20 ms) as JSON.
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
    parser.add_argument("--mode", choices=("hook", "bare", "bare-nomd5"), default="hook", help="hook, or bare requests")
    parser.add_argument("--key", required=True, help="the download key")
    parser.add_argument("--url", help="the download URL (bare mode)")
    parser.add_argument("--ca", help="the CA to trust (bare mode)")
    parser.add_argument("--dest", required=True, help="the local file to write")
    parser.add_argument("--out", required=True, help="where to write the figures (JSON)")
    args = parser.parse_args(argv)

    if args.mode == "hook":
        from airflow.sdk import ObjectStoragePath

        from airflow_provider_hpc.hooks.muse import MuseHook

        hook = MuseHook("muse_default")
        hook.transport  # noqa: B018 - the connection is read and the session made before the clock starts
        dest = ObjectStoragePath(f"file://{args.dest}")

        def download() -> tuple[int, str]:
            stored = hook.download(args.key, dest)
            hook.close()
            return stored.size, stored.md5

    else:
        import hashlib

        import requests

        session = requests.Session()

        hashing = args.mode == "bare"

        def download() -> tuple[int, str]:
            digest, size = hashlib.md5(usedforsecurity=False), 0
            with session.get(args.url, stream=True, verify=args.ca, timeout=60) as response, open(args.dest, "wb") as out:
                response.raise_for_status()
                for chunk in response.iter_content(1024 * 1024):
                    if hashing:
                        digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            return size, digest.hexdigest() if hashing else ""

    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    size, md5 = download()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    figures = {
        "seconds": seconds,
        "bytes": size,
        "md5": md5,
        "rss_base": base,
        "rss_peak": peak[0],
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(args.out, "w") as handle:
        json.dump(figures, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
