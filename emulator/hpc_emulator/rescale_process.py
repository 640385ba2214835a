"""
The command of a Rescale emulator run: its working folder made ready, its script, its environment,
its process started and killed.

The engine (``rescale_runs.py``) decides when; this module does it, holding no state and no lock.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence

from hpc_emulator.rescale_files import place_inputs
from hpc_emulator.rescale_models import Job, Run, display_value
from hpc_emulator.rescale_spec import AnalysisSpec

LOG_NAME = "process_output.log"


def prepare_work_dir(job: Job, run: Run) -> bool:
    """Put the job's input files into the run's working folder; on failure, say why in its log."""
    try:
        place_inputs(run.work_dir, job.spec.input_files)
    except OSError as exc:
        with contextlib.suppress(OSError), (run.work_dir / LOG_NAME).open("ab") as output:
            output.write(f"emulator: cannot place the input files: {exc}\n".encode())
        return False
    return True


def start_command(job: Job, run: Run) -> subprocess.Popen[bytes] | None:
    """Start the run's script in its working folder, output to its log; ``None`` if it cannot start."""
    with (run.work_dir / LOG_NAME).open("ab") as output:
        try:
            return subprocess.Popen(
                ["/bin/sh", "-c", script(job.spec.analyses)],
                cwd=run.work_dir,
                env=environment(job, run),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            output.write(f"emulator: cannot start the command: {exc}\n".encode())
            return None


def kill_command(process: subprocess.Popen[bytes] | None) -> None:
    """Kill a run's shell and everything it started (it runs in its own session)."""
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def script(analyses: Sequence[AnalysisSpec]) -> str:
    """
    Return the shell script of a run: each analysis in its own subshell, in order.

    The first failure ends the run with its exit code. The newline before ``)`` keeps a trailing
    ``# comment`` from eating the parenthesis. An analysis's ``envVars`` are exported in its own
    subshell only, so they win over the run's variables of the same name and never reach the
    other analyses.
    """
    return " && ".join(f"( {_exports(analysis)}{analysis.command}\n)" for analysis in analyses)


def _exports(analysis: AnalysisSpec) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in analysis.env_vars)


def environment(job: Job, run: Run) -> dict[str, str]:
    """Return the run's environment: the server's, the run's variables, its job and run ids."""
    env = dict(os.environ)
    env.update({name: display_value(value) for name, value in run.spec.variables})
    env.update({"RESCALE_RUN_ID": run.id, "RESCALE_JOB_ID": job.id})
    return env
