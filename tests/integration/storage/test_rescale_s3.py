"""
Rescale harvests and snapshots on S3, against the emulator: every file verified under its key, a
re-run skips what is there, a transfer cut midway or corrupted leaves nothing, and a 96 MiB file
goes through with memory bounded by a few parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from airflow_provider_hpc.exceptions import RescaleApiError, TransferIntegrityError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.operators.rescale import RescaleSnapshotRunOperator
from airflow_provider_hpc.operators.rescale_download import MANIFEST_NAME, RescaleDownloadOutputsOperator
from airflow_provider_hpc.storage_sink import PART_BYTES
from hpc_emulator import EmulatorServer
from tests.integration.rescale.support import FAST_RETRY, FakeTaskInstance, RescaleApi
from tests.integration.storage.s3_support import S3Bucket

MIB = 1024 * 1024
CONTENTS_ROUTE = "GET /api/files/{file_id}/contents/"
#: Small files in folders and one of 20 MiB (three parts of 8 MiB), plus the run's process_output.log.
OUTPUTS = (
    "mkdir -p fields/a post; for i in $(seq 1 6); do head -c $((i * 997)) /dev/urandom > fields/a/f$i.bin; done; "
    "head -c 20971520 /dev/urandom > post/big.bin; echo 'x,y' > post/table.csv; echo finished"
)


@pytest.fixture
def api(emulator_conns: EmulatorServer) -> Iterator[RescaleApi]:
    """A client of the emulator behind ``rescale_default``."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {sorted(emulator_conns.config.rescale_api_keys)[0]}"
    try:
        yield RescaleApi(emulator_conns, session)
    finally:
        session.close()


def listed_files(api: RescaleApi, job_id: str) -> dict[str, dict[str, Any]]:
    """The run's output files by relativePath, as the API lists them."""
    body = api.session.get(api.url(f"jobs/{job_id}/runs/1/files/"), params={"page_size": 100}, timeout=10).json()
    return {f["relativePath"]: f for f in body["results"]}


@pytest.fixture
def finished_job(api: RescaleApi) -> tuple[str, dict[str, dict[str, Any]]]:
    """A completed run with 9 output files; its job id and listed files."""
    job_id = api.start_job(OUTPUTS)
    api.wait_job_completed(job_id)
    return job_id, listed_files(api, job_id)


def harvest(job_id: str, output_path: str, **kwargs: Any) -> dict[str, Any]:
    """Harvest run 1 of ``job_id`` to ``output_path``; return the XCom value."""
    settings: dict[str, Any] = {"concurrency": 4, "retry": FAST_RETRY, **kwargs}
    task = RescaleDownloadOutputsOperator(task_id="harvest", job_id=job_id, run_id="1", output_path=output_path, **settings)
    return task.execute({"ti": FakeTaskInstance()})


def test_a_harvest_lands_on_s3_verified_and_a_rerun_skips_it(
    api: RescaleApi, finished_job: tuple[str, dict[str, dict[str, Any]]], s3: S3Bucket
) -> None:
    job_id, listed = finished_job

    result = harvest(job_id, s3.url("harvest"))

    assert result["downloaded"] == len(listed) == 9
    assert s3.keys() == sorted([f"harvest/{p}" for p in listed] + [f"harvest/{MANIFEST_NAME}"])
    for relative, file in listed.items():
        data = s3.read(f"harvest/{relative}")
        assert len(data) == file["decryptedSize"] and hashlib.md5(data).hexdigest() == file["md5"]
    manifest = json.loads(s3.read(f"harvest/{MANIFEST_NAME}"))
    assert result["manifest_path"] == s3.url(f"harvest/{MANIFEST_NAME}")
    assert {e["path"] for e in manifest["files"]} == {s3.url(f"harvest/{p}") for p in listed}
    assert s3.uploads() == []

    downloads = api.requests_to(CONTENTS_ROUTE)
    again = harvest(job_id, s3.url("harvest"))
    assert again["skipped"] == 9 and again["downloaded"] == 0
    assert api.requests_to(CONTENTS_ROUTE) == downloads, "files already on S3 with the same md5 are not fetched again"


@pytest.mark.parametrize(
    ("action", "error"),
    [({"drop": True}, RescaleApiError), ({"corrupt": True}, TransferIntegrityError)],
    ids=["dropped-midway", "md5-mismatch"],
)
def test_a_transfer_that_keeps_failing_leaves_no_object_and_no_upload(
    api: RescaleApi, finished_job: tuple[str, dict[str, dict[str, Any]]], s3: S3Bucket, action: dict, error: type
) -> None:
    """The 20 MiB file is cut after half its bytes (a part already uploaded) or corrupted, on every attempt."""
    job_id, listed = finished_job
    big = listed["post/big.bin"]
    api.set_faults([{"route": f"GET /api/files/{big['id']}/contents/", "probability": 1.0, "action": action}])

    with pytest.raises(error):
        harvest(job_id, s3.url("harvest"), concurrency=1, include="post/*")

    assert "harvest/post/big.bin" not in s3.keys()
    assert all(key in {"harvest/post/table.csv"} for key in s3.keys()), "only verified files, no temporary key"
    assert s3.uploads() == [], "the multipart upload was aborted"


def test_a_transfer_cut_once_is_made_again_and_leaves_one_object(
    api: RescaleApi, finished_job: tuple[str, dict[str, dict[str, Any]]], s3: S3Bucket
) -> None:
    job_id, listed = finished_job
    big = listed["post/big.bin"]
    api.set_faults([{"route": f"GET /api/files/{big['id']}/contents/", "sequence": [{"drop": True}, {"corrupt": True}, "pass"]}])

    result = harvest(job_id, s3.url("harvest"), include="post/big.bin")

    assert result["downloaded"] == 1
    assert hashlib.md5(s3.read("harvest/post/big.bin")).hexdigest() == big["md5"]
    assert s3.keys() == ["harvest/_rescale_manifest.json", "harvest/post/big.bin"] and s3.uploads() == []


def test_a_snapshot_is_downloaded_to_s3(api: RescaleApi, s3: S3Bucket) -> None:
    job_id = api.start_job('mkdir -p out; for i in $(seq 1 300); do echo "line $i" >> out/progress.log; sleep 0.1; done')
    api.wait_lines(job_id, "1", "out/progress.log", 3)
    task = RescaleSnapshotRunOperator(
        task_id="snapshot", job_id=job_id, run_id="1", wait_for_file=True, deferrable=False,
        output_path=s3.url("snap"), poll_interval=0.05, max_poll_interval=0.2, wait_timeout=30, retry=FAST_RETRY,
    )

    result = task.execute({"ti": FakeTaskInstance()})

    key = result["path"].removeprefix(s3.url())
    data = s3.read(key)
    assert hashlib.md5(data).hexdigest() == result["file"]["md5"] and len(data) == result["file"]["decrypted_size"]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.read("out/progress.log").startswith(b"line 1\n")
    assert s3.keys() == [key] and s3.uploads() == []


def test_a_96_mib_file_keeps_memory_within_a_few_parts(api: RescaleApi, s3_apart: S3Bucket) -> None:
    """
    From the HTTP response to S3 parts, memory peaks at a few parts, whatever the file's size.

    s3fs holds the part being filled and a copy of it while aiohttp sends it (about three and a half
    parts with the 1 MiB chunks); a first, small harvest loads botocore's service model and the
    filesystem beforehand, so the measure holds only what the transfer itself costs.
    """
    size = 96 * MIB
    job_id = api.start_job(f"head -c {size} /dev/urandom > big.bin; echo warm > small.txt")
    api.wait_job_completed(job_id)
    big = listed_files(api, job_id)["big.bin"]
    harvest(job_id, s3_apart.url("warm-up"), include="small.txt")

    tracemalloc.start()
    try:
        result = harvest(job_id, s3_apart.url("harvest"), include="big.bin", concurrency=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result["bytes_downloaded"] == size
    assert s3_apart.client.head_object(Bucket=s3_apart.name, Key="harvest/big.bin")["ContentLength"] == size
    assert hashlib.md5(s3_apart.read("harvest/big.bin")).hexdigest() == big["md5"]
    assert peak < 5 * PART_BYTES, f"peak {peak / MIB:.1f} MiB for a {size // MIB} MiB file"


def test_an_input_file_is_uploaded_from_s3(emulator_conns: EmulatorServer, s3: S3Bucket) -> None:
    """A case on S3 (a result of an earlier task) goes to Rescale streamed from the bucket, md5 checked."""
    case = b'{"mesh": "airFoil2D", "angle": 4}\n' * 1000
    s3.put("cases/case.json", case)
    hook = RescaleHook()
    try:
        uploaded = hook.upload_file(s3.url("cases/case.json"))
    finally:
        hook.close()

    assert uploaded.decrypted_size == len(case) and uploaded.md5 == hashlib.md5(case).hexdigest()
    assert uploaded.name == "case.json"
