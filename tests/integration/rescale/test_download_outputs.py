"""RescaleDownloadOutputsOperator against the emulator: pages, md5, retries, skips, unsafe paths, manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_hpc.exceptions import RescaleApiError, TransferIntegrityError, UnsafePathError
from airflow_provider_hpc.hooks.rescale import OutputFile, RescaleHook
from airflow_provider_hpc.operators.rescale_download import MANIFEST_NAME, RescaleDownloadOutputsOperator
from airflow_provider_hpc.storage import TEMP_PREFIX
from tests.integration.rescale.support import API_KEY, FAST_RETRY, RescaleApi

CONTENTS_ROUTE = "GET /api/files/{file_id}/contents/"
LISTING_ROUTE = "GET /api/jobs/{job_id}/runs/{run_id}/files/"
PAGE_SIZE = 10
#: 40 binary files in nested folders, one of 3 MiB (several chunks), a text file; plus process_output.log.
MANY_FILES_COMMAND = (
    "mkdir -p fields/a fields/b post; "
    'for i in $(seq 1 20); do head -c $((i * 997)) /dev/urandom > "fields/a/f$i.bin"; '
    'head -c $((i * 13)) /dev/urandom > "fields/b/g$i.bin"; done; '
    "head -c 3145728 /dev/urandom > post/big.bin; echo 'x,y' > post/table.csv; echo finished"
)


@pytest.fixture
def finished_job(api: RescaleApi) -> tuple[str, list[dict[str, Any]]]:
    """A completed run with 43 output files (5 pages of 10); return its job id and listed files."""
    job_id = api.start_job(MANY_FILES_COMMAND)
    api.wait_job_completed(job_id)
    files: list[dict[str, Any]] = []
    page = 1
    while True:
        params = {"page": page, "page_size": 50}
        body = api.session.get(api.url(f"jobs/{job_id}/runs/1/files/"), params=params, timeout=10).json()
        files += body["results"]
        if not body["next"]:
            break
        page += 1
    assert len(files) == 43
    return job_id, files


def harvest(job_id: str, dest: Path, **kwargs: Any) -> RescaleDownloadOutputsOperator:
    """A harvest task of run 1 of ``job_id`` into ``dest``, listing 10 files per page."""
    settings: dict[str, Any] = {"page_size": PAGE_SIZE, "concurrency": 4, "retry": FAST_RETRY}
    return RescaleDownloadOutputsOperator(
        task_id="harvest", job_id=job_id, run_id="1", output_path=str(dest), **{**settings, **kwargs}
    )


def local_files(root: Path) -> set[str]:
    """Return every file under ``root`` as a relative POSIX path."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_harvest_every_page_verified(
    api: RescaleApi, finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, listed = finished_job
    dest = tmp_path / "out"

    result = harvest(job_id, dest).execute(context)

    assert result["file_count"] == 43 and result["downloaded"] == 43 and result["skipped"] == 0
    assert api.requests_to(LISTING_ROUTE) == 5, "5 pages of 10, page_size carried to every page"
    assert api.requests_to(CONTENTS_ROUTE) == 43
    assert local_files(dest) == {f["relativePath"] for f in listed} | {MANIFEST_NAME}
    for file in listed:
        data = (dest / file["relativePath"]).read_bytes()
        assert len(data) == file["decryptedSize"]
        assert hashlib.md5(data).hexdigest() == file["md5"]
    assert result["bytes"] == sum(f["decryptedSize"] for f in listed) == result["bytes_downloaded"]
    assert context["ti"].xcom["_link_RescaleJobLink"].endswith(f"/jobs/{job_id}/")


def test_manifest_in_xcom_and_next_to_the_files(
    finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, listed = finished_job
    dest = tmp_path / "out"

    result = harvest(job_id, dest).execute(context)

    by_path = {f["relativePath"]: f for f in listed}
    assert len(result["files"]) == 43 and result["files_truncated"] is False
    for entry in result["files"]:
        assert set(entry) == {"relative_path", "path", "size", "md5", "skipped"}
        source = by_path[entry["relative_path"]]
        assert entry["size"] == source["decryptedSize"] and entry["md5"] == source["md5"]
        assert entry["path"] == f"file://{dest / entry['relative_path']}"
    assert result["manifest_path"] == f"file://{dest / MANIFEST_NAME}"
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["files"] == result["files"]
    assert {k: manifest[k] for k in ("job_id", "run_id", "downloaded", "skipped")} == {
        "job_id": job_id, "run_id": "1", "downloaded": 43, "skipped": 0
    }
    assert API_KEY not in json.dumps(result) and API_KEY not in (dest / MANIFEST_NAME).read_text()

    # Above max_xcom_files, XCom keeps the counts and the manifest's path only.
    small = harvest(job_id, dest, max_xcom_files=5).execute(context)
    assert small["files"] == [] and small["files_truncated"] is True and small["file_count"] == 43


def test_second_run_downloads_nothing(
    api: RescaleApi, finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, _ = finished_job
    dest = tmp_path / "out"
    harvest(job_id, dest).execute(context)
    downloads = api.requests_to(CONTENTS_ROUTE)

    again = harvest(job_id, dest).execute(context)

    assert again["downloaded"] == 0 and again["skipped"] == 43 and again["bytes_downloaded"] == 0
    assert all(entry["skipped"] for entry in again["files"])
    assert api.requests_to(CONTENTS_ROUTE) == downloads, "identical files are not downloaded again"

    # A file changed locally is fetched again, and only that one.
    (dest / "post/table.csv").write_text("tampered\n")
    third = harvest(job_id, dest).execute(context)
    assert third["downloaded"] == 1 and api.requests_to(CONTENTS_ROUTE) == downloads + 1
    assert (dest / "post/table.csv").read_text() == "x,y\n"


def test_corrupted_byte_is_detected_and_retried(
    api: RescaleApi,
    finished_job: tuple[str, list[dict[str, Any]]],
    context: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id, listed = finished_job
    big = next(f for f in listed if f["relativePath"] == "post/big.bin")
    api.set_faults([{"route": f"GET /api/files/{big['id']}/contents/", "sequence": [{"corrupt": True}, "pass"]}])
    dest = tmp_path / "out"

    result = harvest(job_id, dest).execute(context)

    assert result["downloaded"] == 43
    assert hashlib.md5((dest / "post/big.bin").read_bytes()).hexdigest() == big["md5"]
    assert api.requests_to(CONTENTS_ROUTE) == 44, "the corrupted transfer was made again, once"
    assert "does not match" in capsys.readouterr().out
    assert not [p for p in local_files(dest) if TEMP_PREFIX in p], "no partial file is left behind"


def test_corruption_that_persists_fails_and_keeps_nothing_of_that_file(
    api: RescaleApi, finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, listed = finished_job
    table = next(f for f in listed if f["relativePath"] == "post/table.csv")
    api.set_faults([{"route": f"GET /api/files/{table['id']}/contents/", "probability": 1.0, "action": {"corrupt": True}}])
    dest = tmp_path / "out"

    with pytest.raises(TransferIntegrityError, match="md5"):
        harvest(job_id, dest).execute(context)

    assert not (dest / "post/table.csv").exists()
    assert not [p for p in local_files(dest) if TEMP_PREFIX in p]
    api.set_faults([])
    # The files that did arrive are verified and kept: a re-run fetches only what is missing.
    before = api.requests_to(CONTENTS_ROUTE)
    rerun = harvest(job_id, dest).execute(context)
    assert rerun["downloaded"] == api.requests_to(CONTENTS_ROUTE) - before
    assert rerun["downloaded"] + rerun["skipped"] == 43 and rerun["skipped"] >= 1


def test_429_and_5xx_during_listing_and_download_are_absorbed(
    api: RescaleApi, finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, listed = finished_job
    api.set_faults(
        [
            {
                "route": "GET /api/jobs/*/runs/*/files/",
                "sequence": [{"status": 429, "retry_after": 0.05}, "pass", {"status": 503}, "pass", {"status": 502}],
            },
            {
                "route": "GET /api/files/*/contents/",
                "sequence": [{"status": 500}, {"status": 429, "retry_after": 0.05}, {"drop": True}, {"status": 504}],
            },
        ]
    )
    dest = tmp_path / "out"

    result = harvest(job_id, dest).execute(context)

    assert result["downloaded"] == 43
    assert api.requests_to(LISTING_ROUTE) == 5 + 3
    assert api.requests_to(CONTENTS_ROUTE) == 43 + 4
    for file in listed:
        assert hashlib.md5((dest / file["relativePath"]).read_bytes()).hexdigest() == file["md5"]


@pytest.mark.parametrize("evil", ["../escape.txt", "fields/../../escape.txt", "/tmp/escape.txt", "..\\escape.txt"])
def test_path_traversal_is_refused_before_anything_is_written(
    api: RescaleApi,
    finished_job: tuple[str, list[dict[str, Any]]],
    context: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    evil: str,
) -> None:
    job_id, listed = finished_job
    real_listing = RescaleHook.list_output_files

    def listing_with_an_evil_path(self: RescaleHook, *args: Any, **kwargs: Any) -> list[OutputFile]:
        # A server (or a man in the middle) naming a real file with a path that leaves the folder.
        files = real_listing(self, *args, **kwargs)
        return [*files, OutputFile(id=listed[0]["id"], name="escape.txt", relative_path=evil, md5=listed[0]["md5"])]

    monkeypatch.setattr(RescaleHook, "list_output_files", listing_with_an_evil_path)
    dest = tmp_path / "deep" / "out"

    with pytest.raises(UnsafePathError, match="outside"):
        harvest(job_id, dest).execute(context)

    assert api.requests_to(CONTENTS_ROUTE) == 0
    assert not dest.exists()
    assert not (tmp_path / "deep" / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def test_include_exclude_and_size_filters(
    finished_job: tuple[str, list[dict[str, Any]]], context: dict[str, Any], tmp_path: Path
) -> None:
    job_id, _ = finished_job
    dest = tmp_path / "out"

    result = harvest(job_id, dest, include=["fields/*", "post/*"], exclude="fields/b/*", max_file_size=1024 * 1024).execute(
        context
    )

    assert local_files(dest) == {f"fields/a/f{i}.bin" for i in range(1, 21)} | {"post/table.csv", MANIFEST_NAME}
    assert result["file_count"] == 21


def test_a_run_in_progress_is_refused(api: RescaleApi, context: dict[str, Any], tmp_path: Path) -> None:
    job_id = api.start_job("sleep 30")

    with pytest.raises(RescaleApiError, match="has not completed"):
        harvest(job_id, tmp_path / "out").execute(context)
    assert api.requests_to(LISTING_ROUTE) == 0
