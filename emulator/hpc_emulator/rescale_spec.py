"""
The job bodies of the Rescale emulator: what ``POST jobs/`` accepts, how it is checked, how it is echoed.

Two shapes of analysis are accepted, side by side in one job if need be:

- the emulator's short one, ``{"command"}`` alone, echoed as such;
- Rescale's own, as its API reference gives it: ``{"analysis": {"code", "version"}, "command",
  "hardware": {"coreType", "coresPerSlot", "slots", "walltime"}, "inputFiles": [{"id"}],
  "envVars", "useMpi"}``, echoed in full with the server's defaults filled in, its input files
  expanded to file records.

A refused body raises :class:`JobSpecError` (a :class:`FieldError`), which knows where in the body the fault is, so the
answer can be DRF's (``{"field": ["message"]}``, nested as the body is) as well as the one-line
``detail`` every other error of the API carries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from hpc_emulator.rescale_models import EngineError, InputFile

FieldPath = tuple[Union[str, int], ...]
FileLookup = Callable[[str], Union[InputFile, None]]

RUN_TYPES = frozenset({1, 2, 3})
MAX_RUNS = 10_000
MAX_CONCURRENT_RUNS = 64
DEFAULT_CONCURRENT_RUNS = 8
MAX_INPUT_FILES = 1000
MAX_JOB_VARIABLES = 1000
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# The analysis that runs the user's own command, named as Rescale's catalogue names it.
USER_INCLUDED = "user_included"
USER_SOFTWARE = "Custom User-Defined Software"
# An analysis entry holding any of these keys is in Rescale's shape, and is echoed in full.
RESCALE_ANALYSIS_KEYS = frozenset({"analysis", "hardware", "inputFiles", "envVars", "useMpi"})
# DRF's own messages, so a client sees the words the real service would use.
REQUIRED = "This field is required."
NOT_NULL = "This field may not be null."
NOT_STRING = "Not a valid string."
BLANK = "This field may not be blank."
NULL_CHARACTER = "Null characters are not allowed."
NOT_INTEGER = "A valid integer is required."
TOO_SMALL = "Ensure this value is greater than or equal to {}."
NOT_BOOLEAN = "Must be a valid boolean."
NOT_OBJECT = "Invalid data. Expected a dictionary, but got {}."
NOT_DICT = 'Expected a dictionary of items but got type "{}".'
NOT_LIST = 'Expected a list of items but got type "{}".'
TOO_LONG_LIST = "Ensure this field has no more than {} elements."
UNKNOWN_FILE = 'Invalid pk "{}" - object does not exist.'
# Where DRF puts the errors about a whole object rather than one of its fields.
NON_FIELD = "non_field_errors"
_MISSING: Any = object()


class FieldError(EngineError):
    """A field of a request body is refused; ``path`` says which, e.g. ``("jobanalyses", 0, "hardware")``."""

    def __init__(self, path: FieldPath, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{dotted(path)}: {message}" if path else message)

    def to_json(self) -> dict[str, Any]:
        """Return the answer's body: ``detail`` in one line, and DRF's field errors."""
        return {"detail": str(self), **field_errors(self.path, self.message)}


class JobSpecError(FieldError):
    """The job body cannot be accepted."""


def dotted(path: FieldPath) -> str:
    """Write a field path as ``jobanalyses[0].hardware.slots``."""
    text = ""
    for part in path:
        if part != NON_FIELD:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def field_errors(path: FieldPath, message: str) -> dict[str, Any]:
    """
    Return DRF's error body for one message at ``path``, nested as the body is.

    DRF answers a list of objects with one entry per item, ``{}`` for the items without errors:
    ``{"jobanalyses": [{}, {"hardware": {"slots": ["..."]}}]}``; errors about a whole object are
    under ``non_field_errors`` (a path may end with it; :func:`dotted` leaves it out).
    """
    if not path:
        return {NON_FIELD: [message]}
    return {str(path[0]): _errors_below(path[1:], message)}


def _errors_below(path: FieldPath, message: str) -> Any:
    if not path:
        return [message]
    head = path[0]
    if isinstance(head, int):
        return [{} for _ in range(head)] + [field_errors(path[1:], message)]
    return {head: _errors_below(path[1:], message)}


@dataclass(frozen=True)
class RunSpec:
    """One run as the job body asks for it: its variables (name, value), ``isOptimal``, ``type``."""

    variables: tuple[tuple[str, float], ...] = ()
    is_optimal: bool = False
    run_type: int = 3


@dataclass(frozen=True)
class Hardware:
    """An analysis's ``hardware``; ``walltime`` is in hours, ``None`` when not given (not enforced)."""

    core_type: str
    cores_per_slot: int
    slots: int = 1
    walltime: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the hardware as the job echo shows it."""
        fields = (self.core_type, self.cores_per_slot, self.slots, self.walltime)
        return dict(zip(("coreType", "coresPerSlot", "slots", "walltime"), fields))


@dataclass(frozen=True)
class AnalysisSpec:
    """
    One entry of ``jobanalyses``.

    :param short: given as ``{"command"}`` alone, the emulator's short shape: echoed the same way.
    :param code: ``analysis.code``, ``None`` without an ``analysis``. Whatever the code, the
        emulator runs ``command`` as a user command.
    """

    command: str
    short: bool = True
    code: str | None = None
    version: str | None = None
    hardware: Hardware | None = None
    input_files: tuple[InputFile, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()
    use_mpi: bool = False

    @property
    def display_name(self) -> str:
        """Return the software's name as the job list's ``analysisNames`` gives it."""
        return USER_SOFTWARE if self.code in (None, USER_INCLUDED) else str(self.code)

    def to_json(self) -> dict[str, Any]:
        """Return the analysis as the job echo shows it."""
        if self.short:
            return {"command": self.command}
        return {
            "analysis": self._software_json(),
            "command": self.command,
            "envVars": dict(self.env_vars),
            "flags": {},
            "hardware": None if self.hardware is None else self.hardware.to_json(),
            "inputFiles": [item.to_json() for item in self.input_files],
            "postProcessScript": None,
            "postProcessScriptCommand": "",
            "preProcessScript": None,
            "preProcessScriptCommand": "",
            "templateTasks": [],
            "useMpi": self.use_mpi,
            "useRescaleLicense": False,
        }

    def _software_json(self) -> dict[str, Any] | None:
        if self.code is None:
            return None
        version_name = "" if self.code == USER_INCLUDED else (self.version or "")
        return {"code": self.code, "name": self.display_name, "version": self.version, "versionName": version_name}


@dataclass(frozen=True)
class JobSpec:
    """A validated job body (see :func:`parse_job_spec` for the accepted shape)."""

    name: str
    analyses: tuple[AnalysisSpec, ...]
    runs: tuple[RunSpec, ...]
    completed_reason: str | None = None
    max_concurrent_runs: int = DEFAULT_CONCURRENT_RUNS
    job_variables: tuple[Any, ...] = ()
    is_low_priority: bool = False

    @property
    def commands(self) -> tuple[str, ...]:
        """Return the analyses' commands, in order."""
        return tuple(analysis.command for analysis in self.analyses)

    @property
    def input_files(self) -> tuple[InputFile, ...]:
        """Return the input files of every analysis, each once (names are unique in a job)."""
        found = {item.id: item for analysis in self.analyses for item in analysis.input_files}
        return tuple(found.values())

    def job_fields(self) -> dict[str, Any]:
        """Return the job-level fields of the echo, with the real service's defaults."""
        return {
            "archiveFilters": [],
            "caseFile": None,
            "expectedRuns": None,
            "includeNominalRun": False,
            "isLowPriority": self.is_low_priority,
            "isTemplateDryRun": False,
            "jobvariables": list(self.job_variables),
            "monteCarloIterations": None,
            "optimizer": None,
            "paramFile": None,
            "remoteVizConfig": None,
            "resourceFilters": [],
        }


def parse_job_spec(body: Any, input_file: FileLookup = lambda _file_id: None) -> JobSpec:
    """
    Validate a job-creation body and return its spec, or raise :class:`JobSpecError`.

    Accepted (unknown keys are ignored, as the real service does)::

        {"name": "sweep",
         "jobanalyses": [{"command": "echo $x > out.txt"}],
         "runs": [{"variables": {"x": 1.5}, "isOptimal": false, "type": 3}],
         "emulator": {"completedReason": "Exceeded max number of restarts", "maxConcurrentRuns": 8}}

    and Rescale's analyses (see the module's docstring), ``jobvariables`` and ``isLowPriority``.

    :param input_file: returns the uploaded file of an id, or ``None`` for an unknown id.
    """
    if not isinstance(body, Mapping):
        raise JobSpecError((), "Expected a JSON object.")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise JobSpecError(("name",), "this field is required and must be a non-empty string.")
    analyses = _parse_analyses(body.get("jobanalyses"), input_file)
    runs_body = body.get("runs")
    runs = (RunSpec(),) if runs_body is None else _parse_runs(runs_body)
    reason, concurrency = _parse_emulator_options(body.get("emulator"))
    variables = _parse_job_variables(body.get("jobvariables"))
    low_priority = _boolean(body.get("isLowPriority", False), ("isLowPriority",))
    return JobSpec(name, analyses, runs, reason, concurrency, variables, low_priority)


def _parse_analyses(analyses: Any, input_file: FileLookup) -> tuple[AnalysisSpec, ...]:
    if not isinstance(analyses, list) or not analyses:
        raise JobSpecError(("jobanalyses",), 'a non-empty list of {"command": str} is required.')
    # Every input lands in the one working folder of a run: two files of one name would collide.
    names: dict[str, str] = {}
    return tuple(_parse_analysis(index, entry, input_file, names) for index, entry in enumerate(analyses))


def _parse_analysis(index: int, entry: Any, input_file: FileLookup, names: dict[str, str]) -> AnalysisSpec:
    path: FieldPath = ("jobanalyses", index)
    command = entry.get("command") if isinstance(entry, Mapping) else None
    if not isinstance(command, str) or not command.strip():
        raise JobSpecError((*path, "command"), "a non-empty string is required.")
    if RESCALE_ANALYSIS_KEYS.isdisjoint(entry):
        return AnalysisSpec(command)
    code, version = _parse_software(entry.get("analysis"), (*path, "analysis"))
    return AnalysisSpec(
        command,
        short=False,
        code=code,
        version=version,
        hardware=_parse_hardware(entry.get("hardware"), (*path, "hardware")),
        input_files=_parse_input_files(entry.get("inputFiles"), (*path, "inputFiles"), input_file, names),
        env_vars=_parse_env_vars(entry.get("envVars"), (*path, "envVars")),
        use_mpi=_boolean(entry.get("useMpi", False), (*path, "useMpi")),
    )


def _parse_software(value: Any, path: FieldPath) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    fields = _object(value, path)
    code = _string(fields.get("code", _MISSING), (*path, "code"))
    version = fields.get("version")
    if version is not None and not isinstance(version, str):
        raise JobSpecError((*path, "version"), NOT_STRING)
    # The catalogue's only version of the user's own software is "0".
    return code, "0" if version is None and code == USER_INCLUDED else version


def _parse_hardware(value: Any, path: FieldPath) -> Hardware | None:
    if value is None:
        return None
    fields = _object(value, path)
    walltime = fields.get("walltime")
    return Hardware(
        core_type=_string(fields.get("coreType", _MISSING), (*path, "coreType")),
        cores_per_slot=_integer(fields.get("coresPerSlot", _MISSING), (*path, "coresPerSlot")),
        slots=_integer(fields.get("slots", 1), (*path, "slots")),
        walltime=None if walltime is None else _integer(walltime, (*path, "walltime")),
    )


def _parse_input_files(
    value: Any, path: FieldPath, input_file: FileLookup, names: dict[str, str]
) -> tuple[InputFile, ...]:
    if value is None:
        return ()
    found: dict[str, InputFile] = {}
    for position, item in enumerate(_list(value, path, MAX_INPUT_FILES)):
        id_path = (*path, position, "id")
        file_id = _string(_object(item, (*path, position)).get("id", _MISSING), id_path)
        record = input_file(file_id)
        if record is None:
            raise JobSpecError(id_path, UNKNOWN_FILE.format(file_id[:64]))
        if names.setdefault(record.name, record.id) != record.id:
            raise JobSpecError(id_path, f'Another input file of this job is already named "{record.name}".')
        found[record.id] = record
    return tuple(found.values())


def _parse_env_vars(value: Any, path: FieldPath) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise JobSpecError(path, NOT_DICT.format(type(value).__name__))
    pairs = []
    for name, item in value.items():
        # They become environment variables of the command's shell: shell names only.
        if not isinstance(name, str) or not _VARIABLE_NAME.match(name):
            raise JobSpecError(path, f"{str(name)[:64]!r} is not a valid environment variable name.")
        if not isinstance(item, str):
            raise JobSpecError((*path, name), NOT_STRING)
        if "\x00" in item:
            raise JobSpecError((*path, name), NULL_CHARACTER)
        pairs.append((name, item))
    return tuple(pairs)


def _parse_job_variables(value: Any) -> tuple[Any, ...]:
    # Rescale's DOE variables: kept and echoed as given; the emulator's runs come from "runs".
    if value is None:
        return ()
    items = _list(value, ("jobvariables",), MAX_JOB_VARIABLES)
    return tuple(_object(item, ("jobvariables", position)) for position, item in enumerate(items))


def _object(value: Any, path: FieldPath) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise JobSpecError((*path, NON_FIELD), NOT_OBJECT.format(type(value).__name__))
    return value


def _list(value: Any, path: FieldPath, most: int) -> list[Any]:
    if not isinstance(value, list):
        raise JobSpecError(path, NOT_LIST.format(type(value).__name__))
    if len(value) > most:
        raise JobSpecError(path, TOO_LONG_LIST.format(most))
    return value


def _string(value: Any, path: FieldPath) -> str:
    if value is _MISSING:
        raise JobSpecError(path, REQUIRED)
    if value is None:
        raise JobSpecError(path, NOT_NULL)
    if not isinstance(value, str):
        raise JobSpecError(path, NOT_STRING)
    if not value.strip():
        raise JobSpecError(path, BLANK)
    if "\x00" in value:
        raise JobSpecError(path, NULL_CHARACTER)
    return value


def _integer(value: Any, path: FieldPath, minimum: int = 1) -> int:
    if value is _MISSING:
        raise JobSpecError(path, REQUIRED)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(path, NOT_INTEGER)
    if value < minimum:
        raise JobSpecError(path, TOO_SMALL.format(minimum))
    return value


def _boolean(value: Any, path: FieldPath) -> bool:
    if not isinstance(value, bool):
        raise JobSpecError(path, NOT_BOOLEAN)
    return value


def _parse_runs(runs: Any) -> tuple[RunSpec, ...]:
    if not isinstance(runs, list) or not 1 <= len(runs) <= MAX_RUNS:
        raise JobSpecError(("runs",), f"a list of 1 to {MAX_RUNS} run objects is expected.")
    return tuple(_parse_run(index, run) for index, run in enumerate(runs))


def _parse_run(index: int, run: Any) -> RunSpec:
    if not isinstance(run, Mapping):
        raise JobSpecError(("runs", index), "expected an object.")
    variables = run.get("variables", {})
    if not isinstance(variables, Mapping):
        raise JobSpecError(("runs", index, "variables"), "expected an object of name: number.")
    parsed = tuple((name, _parse_value(index, name, value)) for name, value in variables.items())
    is_optimal = run.get("isOptimal", False)
    run_type = run.get("type", 3)
    if not isinstance(is_optimal, bool):
        raise JobSpecError(("runs", index, "isOptimal"), "expected a boolean.")
    if run_type not in RUN_TYPES or isinstance(run_type, bool):
        raise JobSpecError(("runs", index, "type"), "expected 1 (optimization), 2 (iteration) or 3 (case).")
    return RunSpec(parsed, is_optimal, run_type)


def _parse_value(index: int, name: Any, value: Any) -> float:
    # Variables become environment variables, so their names must be valid shell names.
    if not isinstance(name, str) or not _VARIABLE_NAME.match(name):
        raise JobSpecError(("runs", index, "variables"), f"{name!r} is not a valid variable name.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobSpecError(("runs", index, "variables", name), "expected a finite number.")
    return float(value)


def _parse_emulator_options(options: Any) -> tuple[str | None, int]:
    if options is None:
        return None, DEFAULT_CONCURRENT_RUNS
    if not isinstance(options, Mapping):
        raise JobSpecError(("emulator",), "expected an object.")
    reason = options.get("completedReason")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise JobSpecError(("emulator", "completedReason"), "expected a non-empty string.")
    concurrency = options.get("maxConcurrentRuns", DEFAULT_CONCURRENT_RUNS)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise JobSpecError(("emulator", "maxConcurrentRuns"), "expected an integer.")
    if not 1 <= concurrency <= MAX_CONCURRENT_RUNS:
        raise JobSpecError(("emulator", "maxConcurrentRuns"), f"expected 1 to {MAX_CONCURRENT_RUNS}.")
    return reason, concurrency
