"""
The files of the Muse emulator's run folders: uploads saved and placed, zips made and unpacked, stdout read.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hpc_emulator.muse_models import STDOUT_NAME, bad_request

COPY_CHUNK = 1024 * 1024


def save_upload(source: IO[bytes], target: Path) -> None:
    """Write an upload's whole content to ``target``."""
    source.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, COPY_CHUNK)


def place_file(source: Path, target: Path) -> None:
    """Copy an upload into the run folder (overwriting), and unzip it there if it is a zip."""
    shutil.copyfile(source, target)
    if target.suffix.lower() == ".zip":
        extract_zip(target, target.parent)


def extract_zip(archive: Path, destination: Path) -> None:
    """Unzip ``archive`` into ``destination``, refusing any member that would land outside it."""
    root = destination.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                target = (root / member.filename).resolve()
                if target != root and root not in target.parents:
                    raise bad_request(f"Unsafe member {member.filename!r} in {archive.name}: it leaves the run folder.")
            bundle.extractall(root)
    except zipfile.BadZipFile:
        raise bad_request(f"Uploaded file {archive.name} is not a valid zip file.") from None


def zip_folder(folder: Path, target: Path) -> None:
    """
    Write a zip of everything under ``folder`` (names relative to it) to ``target``, atomically.

    The folder is zipped as it is: a symbolic link is stored as a link (its target's path, not
    the file it points at, which may be anywhere on the host or nowhere), and a file the running
    command removes meanwhile is left out.
    """
    # A name of its own: two requests may zip the same folder at once.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as bundle:
            for path in _walk_entries(folder):
                _add_entry(bundle, path, path.relative_to(folder).as_posix())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _add_entry(bundle: zipfile.ZipFile, path: Path, name: str) -> None:
    try:
        if path.is_symlink():
            info = zipfile.ZipInfo(name, date_time=time.localtime(path.lstat().st_mtime)[:6])
            info.create_system = 3  # Unix, so the mode bits below are read as such
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, os.readlink(path))
        else:
            bundle.write(path, name)
    except FileNotFoundError:
        pass


def _walk_entries(folder: Path) -> Iterator[Path]:
    """Yield every file and symbolic link under ``folder``, sorted; links to folders are not followed."""
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        links = [name for name in subdirs if os.path.islink(os.path.join(directory, name))]
        for name in sorted(files + links):
            yield Path(directory) / name


def read_stdout(run_dir: Path) -> str:
    """Return the run's stdout as the ``stdout`` result gives it: the text without its final newline."""
    path = run_dir / STDOUT_NAME
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return text.rstrip("\r\n")
