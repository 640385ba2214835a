"""
Untrusted paths: a zip member or a Rescale ``relativePath`` never writes outside the destination,
and a zip bomb is stopped by a size limit before it fills the disk.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_hpc.exceptions import HpcApiError, UnsafePathError
from airflow_provider_hpc.hooks.rescale import OutputFile
from airflow_provider_hpc.operators.rescale_download import plan_destinations
from airflow_provider_hpc.storage import extract_zip, safe_join

HOSTILE_PATHS = [
    "../evil.txt",
    "../../etc/passwd",
    "a/../../evil.txt",
    "a/b/../../../evil.txt",
    "/etc/passwd",
    "//server/share/x",
    "C:/Windows/evil.txt",
    "C:evil.txt",
    "..\\evil.txt",
    "a\\..\\..\\evil.txt",
    "a/./b",
    "a//b",
    ".",
    "..",
    "",
    "a/",
    "evil\x00.txt",
]


def _storage(path: Path) -> ObjectStoragePath:
    return ObjectStoragePath(f"file://{path}")


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _zip(members: list[tuple[str, bytes]], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode bits below mean what they say
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """A destination folder, and a sibling folder nothing may ever be written to."""
    (tmp_path / "dest").mkdir()
    (tmp_path / "outside").mkdir()
    return {"root": tmp_path, "dest": tmp_path / "dest", "outside": tmp_path / "outside"}


def _nothing_escaped(sandbox: dict[str, Path]) -> None:
    root = sandbox["root"]
    escaped = [p for p in root.rglob("*") if p.is_file() and sandbox["dest"] not in p.parents and p.name != "archive.zip"]
    assert escaped == [], f"written outside the destination: {escaped}"
    assert not Path("/etc/evil.txt").exists()


# ----- Rescale relativePath ----------------------------------------------------------------------


@pytest.mark.parametrize("relative", HOSTILE_PATHS)
def test_a_hostile_relative_path_is_refused_before_anything_is_written(relative: str, sandbox: dict[str, Path]) -> None:
    files = [
        OutputFile(id="good1", name="a.txt", relative_path="results/a.txt", decrypted_size=1, md5="0" * 32),
        OutputFile(id="bad01", name="x", relative_path=relative, decrypted_size=1, md5="0" * 32),
    ]
    with pytest.raises(UnsafePathError) as caught:
        plan_destinations(_storage(sandbox["dest"]), files)
    assert "bad01" in str(caught.value) or repr(relative) in str(caught.value) or "Refusing" in str(caught.value)
    assert _files_under(sandbox["dest"]) == []
    _nothing_escaped(sandbox)


def test_two_files_with_the_same_relative_path_are_refused(sandbox: dict[str, Path]) -> None:
    files = [
        OutputFile(id="one01", name="a", relative_path="out/a.txt"),
        OutputFile(id="two02", name="a", relative_path="out/a.txt"),
    ]
    with pytest.raises(UnsafePathError, match="share the relativePath"):
        plan_destinations(_storage(sandbox["dest"]), files)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relative=st.text(alphabet=st.sampled_from(list("ab./\\:\x00~ ")), max_size=14) | st.text(max_size=14))
def test_any_relative_path_is_refused_or_lands_inside_the_destination(relative: str, tmp_path: Path) -> None:
    root = tmp_path / "dest"
    try:
        target = safe_join(_storage(root), relative)
    except UnsafePathError:
        return
    resolved = os.path.realpath(target.path)
    assert resolved.startswith(os.path.realpath(root) + os.sep), f"{relative!r} -> {resolved}"


def test_a_symlink_already_in_the_destination_cannot_carry_a_file_outside(sandbox: dict[str, Path]) -> None:
    # A link left in the destination folder (by anyone) must not become a way out.
    (sandbox["dest"] / "link").symlink_to(sandbox["outside"], target_is_directory=True)
    files = [OutputFile(id="via01", name="x", relative_path="link/evil.txt")]
    with pytest.raises(UnsafePathError):
        plan_destinations(_storage(sandbox["dest"]), files)


# ----- zip members --------------------------------------------------------------------------------


def _archive(sandbox: dict[str, Path], data: bytes) -> ObjectStoragePath:
    path = sandbox["root"] / "archive.zip"
    path.write_bytes(data)
    return _storage(path)


@pytest.mark.parametrize("member", [p for p in HOSTILE_PATHS if p not in ("", "a/", ".", "..", "evil\x00.txt")])
def test_a_hostile_zip_member_is_refused_and_nothing_is_extracted(member: str, sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([("ok.txt", b"fine"), (member, b"evil")]))
    with pytest.raises(UnsafePathError):
        extract_zip(archive, _storage(sandbox["dest"]))
    # Every member is checked before the first byte is written.
    assert _files_under(sandbox["dest"]) == []
    _nothing_escaped(sandbox)


def test_a_symlink_member_is_refused(sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([("ok.txt", b"fine")], symlinks={"link": str(sandbox["outside"])}))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        extract_zip(archive, _storage(sandbox["dest"]))
    assert _files_under(sandbox["dest"]) == []


def test_a_symlink_member_then_a_file_through_it_writes_nothing_outside(sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([("link/evil.txt", b"evil")], symlinks={"link": str(sandbox["outside"])}))
    with pytest.raises(UnsafePathError):
        extract_zip(archive, _storage(sandbox["dest"]))
    assert list(sandbox["outside"].iterdir()) == []


def test_a_symlink_already_in_the_destination_cannot_carry_a_member_outside(sandbox: dict[str, Path]) -> None:
    (sandbox["dest"] / "link").symlink_to(sandbox["outside"], target_is_directory=True)
    archive = _archive(sandbox, _zip([("link/evil.txt", b"evil")]))
    with pytest.raises(UnsafePathError):
        extract_zip(archive, _storage(sandbox["dest"]))
    assert list(sandbox["outside"].iterdir()) == []


def test_a_zip_bomb_is_refused_from_its_declared_sizes(sandbox: dict[str, Path]) -> None:
    # 64 MiB of zeros compress to about 64 KiB: a ratio of a thousand, as bombs have.
    archive = _archive(sandbox, _zip([(f"part{i}.bin", b"\0" * (16 * 1024 * 1024)) for i in range(4)]))
    assert (sandbox["root"] / "archive.zip").stat().st_size < 1024 * 1024
    with pytest.raises(UnsafePathError, match="limit"):
        extract_zip(archive, _storage(sandbox["dest"]), max_total_bytes=8 * 1024 * 1024)
    assert _files_under(sandbox["dest"]) == []


def test_a_zip_with_more_members_than_the_limit_is_refused(sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([(f"f{i}.txt", b"x") for i in range(50)]))
    with pytest.raises(UnsafePathError, match="limit"):
        extract_zip(archive, _storage(sandbox["dest"]), max_members=10)


def test_a_zip_lying_about_its_sizes_cannot_write_more_than_it_declared(sandbox: dict[str, Path]) -> None:
    # The headers claim 10 bytes; the member really inflates to 1 MiB.
    data = bytearray(_zip([("big.bin", b"\0" * (1024 * 1024))]))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)  # central directory: uncompressed size
    struct.pack_into("<I", data, 22, 10)  # local header: uncompressed size
    archive = _archive(sandbox, bytes(data))
    with pytest.raises(HpcApiError):
        extract_zip(archive, _storage(sandbox["dest"]), max_total_bytes=1000)
    assert _files_under(sandbox["dest"]) == []


@pytest.mark.parametrize(
    "data",
    [b"not a zip at all", b"PK\x03\x04" + b"\0" * 40, _zip([("a.txt", b"hello" * 1000)])[:-30]],
    ids=["text", "header-only", "truncated"],
)
def test_a_broken_archive_is_a_clear_error_of_the_family(data: bytes, sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, data)
    with pytest.raises(HpcApiError, match="zip"):
        extract_zip(archive, _storage(sandbox["dest"]))


def test_a_member_that_is_both_file_and_folder_is_a_clear_error(sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([("a", b"file"), ("a/b.txt", b"inside")]))
    with pytest.raises(HpcApiError):
        extract_zip(archive, _storage(sandbox["dest"]))
    _nothing_escaped(sandbox)


def test_a_safe_archive_is_extracted_whole(sandbox: dict[str, Path]) -> None:
    archive = _archive(sandbox, _zip([("a.txt", b"one"), ("sub/b.txt", b"two"), ("sub/deeper/c.txt", b"three")]))
    written = extract_zip(archive, _storage(sandbox["dest"]))
    assert sorted(_files_under(sandbox["dest"])) == ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert sum(f.size for f in written) == 11
