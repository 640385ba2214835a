"""
A sampling profile of a running process and its children, with ``py-spy`` (``--profile``).

Section 1c's variants run inside ``airflow triggerer``, a tree of processes (the supervisor, the
trigger runner it starts, the log server) that the benchmark does not run itself, so pyinstrument,
which profiles the process it runs in, cannot see them. ``py-spy record`` attaches to the tree from
outside, without pausing it (``--nonblocking``), and writes collapsed stacks: one line per distinct
stack, ``process PID:"COMMAND";frame;frame;... COUNT``, idle threads left out, so the counts are
samples of work. Feed the file to ``flamegraph.pl`` or speedscope, or read the summary printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: Samples per second: enough to rank the functions of a run of minutes, little enough to leave
#: the two cores to what is measured.
RATE = 50
#: Where one collapsed stack ends and the next begins: after its count, before its process. A
#: command line may hold newlines and quotes, so lines alone do not separate the stacks.
NEXT_STACK = re.compile(r'(?<=\d)\n(?=process \d+:")')
#: The processes a stack starts with, from the profiled one down to the one sampled.
PROCESS = re.compile(r'process (\d+):"')
#: A function on at least this share of a process's stacks is an entry point (``main``, the
#: event loop's ``run_forever``), not where the time goes.
ENTRY_POINT = 0.95


def py_spy() -> str | None:
    """The ``py-spy`` executable beside this interpreter (the ``bench`` extra installs it), else on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class TreeProfile:
    """``py-spy record`` of one process and its descendants, from :meth:`start` until the process exits."""

    def __init__(self, pid: int, path: Path) -> None:
        self.pid = pid
        self.path = path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> TreeProfile:
        """Attach to the process, or say why not (and profile nothing)."""
        executable = py_spy()
        if executable is None:
            print("   --profile needs py-spy (the bench extra installs it); not profiling the triggerer", flush=True)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [executable, "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking",
             "--rate", str(RATE), "--format", "raw", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return self

    def stop(self, timeout: float = 60.0) -> list[str]:
        """Wait for py-spy to write its file once the process has exited; return the summary's lines."""
        if self._process is None:
            return []
        try:
            _, stderr = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Interrupted, py-spy still writes what it sampled; killed, it writes nothing.
            self._process.send_signal(signal.SIGINT)
            try:
                _, stderr = self._process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                _, stderr = self._process.communicate()
        if not self.path.exists():
            said = stderr.decode(errors="replace").strip().splitlines()
            return [f"py-spy wrote no profile: {said[0][:300] if said else 'no message'}"]
        return summary(self.path.read_text(errors="replace"), self.pid)


class _ProcessSamples:
    """One process's samples: by the function running, and by every function on the stack."""

    def __init__(self) -> None:
        self.on_top: Counter[str] = Counter()
        self.anywhere: Counter[str] = Counter()
        self.depth: dict[str, int] = {}  # the deepest level each function was seen at

    def add(self, names: list[str], count: int) -> None:
        """Count one collapsed stack, its frames from the outermost."""
        self.on_top[names[-1]] += count
        seen: set[str] = set()
        for level, name in enumerate(names):
            if name not in seen:  # a recursive function counts once per stack
                seen.add(name)
                self.anywhere[name] += count
                self.depth[name] = max(self.depth.get(name, 0), level)

    def report(self, top: int) -> list[str]:
        """The ``self`` and ``total`` lines of :func:`summary`."""
        samples = sum(self.on_top.values())
        out = [f"    self  {n / samples:6.1%}  {name[:110]}" for name, n in self.on_top.most_common(top)]
        # Of the functions on the same number of stacks (a chain of wrappers), the innermost.
        innermost: dict[int, str] = {}
        for name, n in self.anywhere.items():
            if n < ENTRY_POINT * samples and self.depth[name] >= self.depth.get(innermost.get(n, ""), -1):
                innermost[n] = name
        out.extend(f"    total {n / samples:6.1%}  {innermost[n][:110]}" for n in sorted(innermost, reverse=True)[:top])
        return out


def _short_command(command: str, width: int = 80) -> str:
    """A command line on one line, its absolute paths cut to their last part, at most ``width`` characters."""
    words = [os.path.basename(word.rstrip("/")) or word if word.startswith("/") else word for word in command.split()]
    line = " ".join(words)
    return line if len(line) <= width else line[: width - 3] + "..."


def summary(text: str, root_pid: int, top: int = 5) -> list[str]:
    """
    Per process of a profile (collapsed stacks), its samples and where they went.

    ``self``: the functions most often on top of its stacks, running. ``total``: the functions most
    often anywhere on them, leaving out those on nearly every one (the entry points: ``main`` says
    nothing), and of a chain of calls on the same stacks (wrappers), only the innermost. ``root_pid``
    is the process profiled; the others are its descendants.
    """
    processes: dict[str, _ProcessSamples] = {}
    for stack in NEXT_STACK.split(text.strip()):
        stack, _, count = stack.rpartition(" ")
        sampled = list(PROCESS.finditer(stack))
        if not sampled or not count.isdigit():
            continue
        pid = int(sampled[-1].group(1))
        rest = stack[sampled[-1].end():]
        # Frames have no quotes: the sampled process's command line ends at the last '";'.
        command, quote_semicolon, frames = rest.rpartition('";')
        if not quote_semicolon:
            command, frames = rest.removesuffix('"'), ""
        role = "the process profiled" if pid == root_pid else "a child"
        label = f"process {pid}, {role} ({_short_command(command)})"
        names = frames.split(";") if frames else ["(no Python frame)"]
        processes.setdefault(label, _ProcessSamples()).add(names, int(count))
    total = sum(sum(process.on_top.values()) for process in processes.values())
    out = [f"profile: {total} samples at {RATE}/s"]
    for label, process in sorted(processes.items(), key=lambda item: -sum(item[1].on_top.values())):
        out.append(f"  {label}: {sum(process.on_top.values())} samples")
        out.extend(process.report(top))
    return out
