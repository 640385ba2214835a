"""
Following a growing file of a Rescale run into a log: each line once, in order, the last ones included.

While the run is in progress, ``tail`` gives the file's last lines at each poll; once it completed,
``tail`` answers 400 and the file is one of the run's output files: the lines the last tail did not
reach are read from there (:meth:`TailFollower.show_rest`). The trigger (async) and the sensor's
poke (sync) fetch; this module decides what to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.models.rescale import MAX_FOLLOWED_FILE_BYTES, OutputFile, text_lines_from_bytes


def fresh_lines(previous: Sequence[str], current: Sequence[str]) -> tuple[list[str], bool]:
    """
    Return the lines of ``current`` not already shown in ``previous``, and whether some were missed.

    Both are the last lines of the same growing file, read at two moments. The longest suffix of
    ``previous`` that is also a prefix of ``current`` is what both tails share; what follows it is
    new. No overlap at all means more lines were appended than one tail returns (or the file was
    rewritten): every line of ``current`` is new, and some lines between the two tails were missed.

    :param previous: the tail shown last time (empty at first).
    :param current: the tail just read.
    """
    previous, current = list(previous), list(current)
    if not previous:
        return current, False
    overlap = _longest_overlap(previous, current)
    if overlap:
        return current[overlap:], False
    return current, bool(current)


def missed_lines(previous: Sequence[str], whole: Sequence[str]) -> tuple[list[str], bool]:
    """
    Return the lines of a file read whole that follow the tail shown last, and whether some were missed.

    ``whole`` is the file's end as the completed run uploaded it (up to ``MAX_TAIL_LINES``
    lines), longer than a tail: ``previous`` is found where it last occurs in it, and what follows
    is new. When ``whole`` begins inside ``previous`` (the file is longer than what was kept), the
    overlap of :func:`fresh_lines` decides; with neither, every line is new and some were missed.
    As with :func:`fresh_lines`, repeated lines make it show fewer lines, never a line twice.

    :param previous: the tail shown last (empty when nothing was shown).
    :param whole: the file's last lines, read from the run's output file.
    """
    previous, whole = list(previous), list(whole)
    if not previous:
        return whole, False
    end = _last_occurrence_end(previous, whole)
    if end is not None:
        return whole[end:], False
    return fresh_lines(previous, whole)


def _last_occurrence_end(pattern: list[str], text: list[str]) -> int | None:
    """Return where the last occurrence of ``pattern`` in ``text`` ends, or ``None``, in linear time (KMP)."""
    prefix = _prefix_function(pattern)
    end, length = None, 0
    for index, line in enumerate(text):
        while length and line != pattern[length]:
            length = prefix[length - 1]
        if line == pattern[length]:
            length += 1
        if length == len(pattern):
            end, length = index + 1, prefix[length - 1]
    return end


def _longest_overlap(previous: list[str], current: list[str]) -> int:
    """
    Return the longest ``k`` with ``previous[-k:] == current[:k]``, in linear time.

    The prefix function of ``current + [sentinel] + previous`` (Knuth-Morris-Pratt): its last
    value is that ``k``. A trigger follows many files at once: comparing every overlap length
    would cost the event loop the square of the tail's length at every poll.
    """
    sentinel = object()  # equal to no line, so no match runs across it
    return _prefix_function([*current, sentinel, *previous])[-1]


def _prefix_function(sequence: list[Any]) -> list[int]:
    """Return, for each position, the length of the longest proper prefix of ``sequence`` ending there."""
    prefix = [0] * len(sequence)
    for index in range(1, len(sequence)):
        length = prefix[index - 1]
        while length and sequence[index] != sequence[length]:
            length = prefix[length - 1]
        if sequence[index] == sequence[length]:
            length += 1
        prefix[index] = length
    return prefix


def tail_is_over(exc: HpcApiError) -> bool:
    """
    Tell whether a failed tail or listing only means the file or the run's working folder is gone.

    ``directory-contents`` and ``tail`` answer 400 once the run is no longer in progress and 404 for
    a file that does not exist (yet): neither is worth a warning (the run's output file then
    gives the last lines, see :meth:`TailFollower.show_rest`).

    :param exc: the error of the tail or listing request.
    """
    return exc.status in (400, 404)


def same_path(listed: str, followed: str) -> bool:
    """Tell whether an output file's ``relativePath`` is the followed file's path (``./`` and ``/`` aside)."""

    def plain(path: str) -> str:
        path = path.strip().lstrip("/")
        while path.startswith("./"):
            path = path[2:]
        return path

    return plain(listed) == plain(followed)


@dataclass
class TailFollower:
    """
    Follow a growing file of a run into a log: each new line once, in order.

    The trigger (async) and the sensor's poke (sync) fetch; this decides what to show. A failed
    tail never fails the wait: following the file is a courtesy.

    :param path: the file's path in the run's working folder (as ``directory-contents`` lists it).
    :param lines: how many lines each tail asks for.
    """

    path: str
    lines: int = 100
    found: bool = False
    shown: list[str] = field(default_factory=list)
    #: Whether the completed run's output file was looked at (once per run).
    finished: bool = False

    def spot(self, listed_paths: Sequence[str]) -> bool:
        """
        Note whether the file is among the working folder's files; return whether it was found.

        :param listed_paths: the paths ``directory-contents`` answered.
        """
        self.found = self.path in listed_paths
        return self.found

    def take(self, current: Sequence[str]) -> tuple[list[str], bool]:
        """
        Return the new lines of a fresh tail (and whether some were missed), remembering it.

        :param current: the tail just read.
        """
        current = list(current)[-self.lines:]  # a server may answer more than it was asked for
        new, gap = fresh_lines(self.shown, current)
        self.shown = current
        return new, gap

    def show(self, current: Sequence[str], log: Any) -> int:
        """
        Log the new lines of a fresh tail; return how many were shown.

        :param current: the tail just read.
        :param log: the task's (or trigger's) logger.
        """
        new, gap = self.take(current)
        if gap:
            log.info("[%s] ... (more than %d lines since the last poll; some were skipped)", self.path, self.lines)
        return self._log_lines(new, log)

    def _log_lines(self, new: Sequence[str], log: Any) -> int:
        for line in new:
            log.info("[%s] %s", self.path, line)
        return len(new)

    def pick_output(self, file: OutputFile | None, run_id: str, log: Any) -> bool:
        """
        Note that the completed run's outputs were looked at; return whether to read ``file``.

        A file that is not among the outputs, or larger than :data:`MAX_FOLLOWED_FILE_BYTES`, is
        said in one log line and not read.

        :param file: the followed file's output record, ``None`` when the run has none.
        :param run_id: the run followed, for the log line.
        :param log: the logger.
        """
        self.finished = True
        if file is None:
            log.info("[%s] is not among the output files of run %s: its last lines cannot be shown", self.path, run_id)
            return False
        if file.decrypted_size is not None and file.decrypted_size > MAX_FOLLOWED_FILE_BYTES:
            self.say_too_large(run_id, log)
            return False
        return True

    def say_too_large(self, run_id: str, log: Any) -> None:
        """Log, in one line, that the output file is too large to read for its last lines."""
        log.info(
            "[%s] is larger than the %d bytes read at completion: its last lines are not shown "
            "(it is among the output files of run %s)", self.path, MAX_FOLLOWED_FILE_BYTES, run_id,
        )

    def show_rest(self, body: bytes | None, run_id: str, log: Any) -> int:
        """
        Log the lines of the completed run's output file the tail did not show; return how many.

        :param body: the output file's bytes, ``None`` when it held more than :data:`MAX_FOLLOWED_FILE_BYTES`.
        :param run_id: the run followed, for the log line.
        :param log: the logger.
        """
        self.finished = True
        if body is None:
            self.say_too_large(run_id, log)
            return 0
        whole, earlier = text_lines_from_bytes(body)
        new, gap = missed_lines(self.shown, whole)
        if gap or (earlier and not self.shown):
            log.info("[%s] ... (lines before the last %d of the file are not shown)", self.path, len(whole))
        self.shown = whole[-self.lines:]
        return self._log_lines(new, log)

    def note_failure(self, exc: HpcApiError, run_id: str, log: Any) -> None:
        """
        Log a failed tail or listing, unless it only means the file or the folder is gone.

        :param exc: the error of the request.
        :param run_id: the run followed, for the log line.
        :param log: the logger.
        """
        if not tail_is_over(exc):
            log.warning("Could not tail %s of run %s: %s", self.path, run_id, exc)
