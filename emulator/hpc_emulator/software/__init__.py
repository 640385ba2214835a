"""
The Muse emulator's software catalogue, and how a run's ``cmd`` is executed "inside" a software.

The real service runs ``singularity exec {cmd_option} {image} {cmd}`` on a cluster node, in the run's
folder. Here a software is a folder ``NAME/image/`` standing for its image, and the command runs
for real as a shell command in the run's folder, with what makes it behave as in the container:

- an absolute path in ``cmd`` that exists in the image folder (``/add.py``) is read from there;
- ``python`` (and ``python3``) is the emulator's own interpreter, through a small shim that maps
  absolute paths the same way, so a user's script calling ``python /add.py`` works too;
- a ``cmd`` whose first word names an uploaded file (``usrcmd.sh``) runs that file;
- an empty ``cmd`` fails as ``singularity exec`` does without a command.

``cmd_option`` holds Singularity options; there is no container here, so it is echoed and
otherwise ignored.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BUILTIN_CATALOGUE = Path(__file__).resolve().parent
IMAGE_FOLDER = "image"
IMAGE_ENV = "HPC_EMULATOR_IMAGE"
SHIM_NAMES = ("python", "python3")
_SOFTWARE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# An absolute path inside a shell command: starts a word (or follows a redirection or '='), up to
# the next blank, quote or shell operator.
_ABSOLUTE_PATH = re.compile(r"""(?:(?<=[\s'"=<>|;&(])|^)(/[^\s'"<>|;&()`$]+)""")
_FIRST_WORD = re.compile(r"""^(\s*)([^\s'"<>|;&()`$=]+)""")
_NO_COMMAND = "FATAL:   exec requires a command to run: cmd is empty"


@dataclass(frozen=True)
class Software:
    """One software of the catalogue: its name and the folder standing for its image."""

    name: str
    folder: Path

    @property
    def image_dir(self) -> Path:
        """Return the folder whose content the software's command sees at ``/``."""
        return self.folder / IMAGE_FOLDER


class SoftwareCatalogue:
    """
    The software the emulator serves: the built-in ``sw_example`` plus any extra catalogues.

    A catalogue is a folder of ``NAME/image/`` folders. Lookups read the disk each time, so a
    software added while the emulator runs is served at once.

    :param extra_dirs: extra catalogue folders, searched after the built-in one.
    """

    def __init__(self, extra_dirs: Iterable[Path] = ()) -> None:
        self._dirs = [BUILTIN_CATALOGUE, *(Path(d) for d in extra_dirs)]

    def get(self, name: str) -> Software | None:
        """Return the software called ``name``, or ``None`` when no catalogue holds it."""
        if not _SOFTWARE_NAME.match(name):
            return None
        for catalogue in self._dirs:
            folder = catalogue / name
            if (folder / IMAGE_FOLDER).is_dir():
                return Software(name=name, folder=folder)
        return None

    def names(self) -> list[str]:
        """Return the names of every software, sorted."""
        found = {
            entry.name
            for catalogue in self._dirs
            if catalogue.is_dir()
            for entry in catalogue.iterdir()
            if _SOFTWARE_NAME.match(entry.name) and (entry / IMAGE_FOLDER).is_dir()
        }
        return sorted(found)


def write_python_shim(bin_dir: Path) -> Path:
    """
    Write the ``python``/``python3`` shims into ``bin_dir`` and return it (to put first on ``PATH``).

    The shim runs this interpreter, replacing each argument that is an absolute path existing in
    the image folder (named by the ``HPC_EMULATOR_IMAGE`` variable) by its path in that folder.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/bin/sh\n"
        "# `python` inside the emulated Singularity image: an absolute path that exists in the\n"
        f"# image folder (${IMAGE_ENV}) is read from there, as the container would see it.\n"
        "for arg do\n"
        "  shift\n"
        "  case $arg in\n"
        f'    /*) if [ -n "${IMAGE_ENV}" ] && [ -e "${IMAGE_ENV}$arg" ]; then arg=${IMAGE_ENV}$arg; fi ;;\n'
        "  esac\n"
        '  set -- "$@" "$arg"\n'
        "done\n"
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    for name in SHIM_NAMES:
        target = bin_dir / name
        temporary = bin_dir / f".{name}.tmp"
        temporary.write_text(script)
        temporary.chmod(0o755)
        # Atomic, so a run starting meanwhile never sees half a shim.
        os.replace(temporary, target)
    return bin_dir


def container_command(software: Software, cmd: str, run_dir: Path) -> str:
    """
    Return the shell command that emulates ``singularity exec {cmd_option} {image} {cmd}``.

    :param software: the software whose image the command runs in.
    :param cmd: the run's ``cmd`` parameter.
    :param run_dir: the run's folder (the command's working folder, where uploads landed).
    """
    if not cmd.strip():
        return f"echo {shlex.quote(_NO_COMMAND)} >&2; exit 255"
    command = _map_image_paths(cmd, software.image_dir)
    return _run_uploaded_script(command, run_dir)


def _map_image_paths(cmd: str, image_dir: Path) -> str:
    """Replace each absolute path of ``cmd`` that exists in the image folder by its real path."""

    def replace(match: re.Match[str]) -> str:
        """Return the path in the image folder if it exists there, else the path as written."""
        inside = image_dir / match.group(1).lstrip("/")
        return shlex.quote(str(inside)) if inside.exists() else match.group(1)

    return _ABSOLUTE_PATH.sub(replace, cmd)


def _run_uploaded_script(command: str, run_dir: Path) -> str:
    """Make a command whose first word names an uploaded file run that file (``usrcmd.sh``)."""
    match = _FIRST_WORD.match(command)
    if not match or "/" in match.group(2):
        return command
    script = run_dir / match.group(2)
    if not script.is_file():
        return command
    # An uploaded file arrives without its execute bit; the user asked to run it.
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return f"{match.group(1)}./{match.group(2)}{command[match.end():]}"
