"""
The files of the Rescale emulator's runs, on disk: hashes, working folders, snapshots, tails, inputs.

No state and no lock: ``rescale_runs.py`` calls these from its worker threads, ``rescale.py`` from
its request handlers (in the thread pool).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from hpc_emulator.rescale_models import InputFile

CHUNK = 1024 * 1024
# A tail never reads more than this from the end of a file, whatever ``lines`` asks.
MAX_TAIL_BYTES = 16 * 1024 * 1024


def md5_of(path: Path) -> str:
    """Return the hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_work_files(work_dir: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` for every regular file under ``work_dir``, sorted."""
    for folder, subfolders, names in os.walk(work_dir):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            # Symlinks are skipped: one could point anywhere on the emulator's host.
            if not path.is_symlink() and path.is_file():
                yield path.relative_to(work_dir).as_posix(), path


def zip_folder(folder: Path, target: Path) -> None:
    """Write every file of ``folder`` into the zip ``target``; files that vanish meanwhile are skipped."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for relative, path in iter_work_files(folder):
            try:
                archive.write(path, relative)
            except FileNotFoundError:
                continue


def describe_file_type(path: Path) -> str:
    """Guess a file's type as the ``file`` command would word it, from its first bytes."""
    with path.open("rb") as handle:
        head = handle.read(64 * 1024)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "Zip archive data"
    if b"\x00" in head:
        return "data"
    try:
        head.decode("ascii")
        return "ASCII text"
    except UnicodeDecodeError:
        pass
    try:
        # The head may cut a multi-byte character in two: ignore a broken last few bytes.
        head[: len(head) - 3 if len(head) == 64 * 1024 else len(head)].decode("utf-8")
        return "UTF-8 Unicode text"
    except UnicodeDecodeError:
        return "data"


def tail_lines(path: Path, count: int) -> list[str]:
    """Return the last ``count`` lines of a text file, reading backwards from its end."""
    if count <= 0:
        return []
    with path.open("rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        data = b""
        # More than ``count`` newlines guarantee the first kept line is whole.
        while position > 0 and data.count(b"\n") <= count and len(data) < MAX_TAIL_BYTES:
            step = min(64 * 1024, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    if not data:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    lines = data.split(b"\n")
    return [line.decode("utf-8", "replace").rstrip("\r") for line in lines[-count:]]


def place_inputs(work_dir: Path, inputs: Iterable[InputFile]) -> None:
    """
    Copy each input file into ``work_dir`` under its name, as Rescale puts them on the node.

    Copied, not hard-linked: a command that appends to its input in place must not change the
    stored upload, which other jobs (and other runs of this job) may use. A ``.zip`` stays a zip.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    for item in inputs:
        shutil.copyfile(item.disk_path, work_dir / item.name)


def is_unchanged_input(relative: str, size: int, md5: str, inputs: dict[str, InputFile]) -> bool:
    """
    Tell whether a working file is an input file the command left as it was placed.

    Compared by size and md5, not by modification time: the content is what matters to whoever
    downloads the outputs, a command may rewrite a file with the same bytes (or ``touch`` it), and
    the md5 is computed for every output anyway.
    """
    original = inputs.get(relative)
    return original is not None and original.size == size and original.md5 == md5
