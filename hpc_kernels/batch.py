"""Batches: notebooks run over parameter sets as one Slurm job array, seen from the login node.

``submit`` writes the batch's state and sends one ``sbatch --array=0-N%M`` whatever N is; each
array task runs :mod:`hpc_kernels.batch_task` on its node, which executes one (notebook,
parameter set) in the profile's sandbox and writes, next to the executed notebook in the output
directory, the task's *result record* (``<name>.result.json``). ``view`` joins those records
with one squeue query; ``retry`` resubmits only what did not complete; ``cancel`` ends it all.

State, private to the user, in ``<state root>/batches/<name>/``::

    batch.json    the profile, options, output directory and every submission (job id, task ids)
    tasks.json    the tasks: index, notebook, parameters, output name
    job-N.sh      the script of submission N, as submitted
    logs/         Slurm's output of each task, <array job id>_<task id>.log
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BatchError, HpcKernelsError
from .launcher import log_tail, node_python, profile_to_start
from .notebooks import Parameters, output_names
from .paths import (
    ensure_private_dir,
    read_json,
    state_root,
    write_file_atomically,
    write_json,
    write_private_file,
)
from .profiles import KernelRequest, Profile, check_kernel_name, duration_seconds
from .render import render_batch_script
from .slurm import ArrayTaskInfo, array_spec, array_tasks, cancel, submit_batch
from .state import file_lock

PENDING, RUNNING, COMPLETED = "PENDING", "RUNNING", "COMPLETED"
FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, LOST = (
    "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "LOST")
STATES = (PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, LOST)
FINAL = frozenset(STATES) - {PENDING, RUNNING}
RETRYABLE = FINAL - {COMPLETED}
# A finished array task that wrote no final result: what Slurm's state makes of it.
_FROM_SLURM = {"TIMEOUT": TIMEOUT, "NODE_FAIL": NODE_FAIL, "BOOT_FAIL": NODE_FAIL, "OUT_OF_MEMORY": OUT_OF_MEMORY,
               "CANCELLED": CANCELLED, "PREEMPTED": CANCELLED, "DEADLINE": CANCELLED, "REVOKED": CANCELLED}
# Time for a task's kernel to start and its outputs to be written, on top of --timeout, when the
# array's Slurm time limit is derived from it.
START_MARGIN_SECONDS = 300
CANCEL_WAIT_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------
# Pure parts: tasks, names, durations, the state of one task


@dataclass(frozen=True)
class BatchTask:
    index: int
    notebook: str  # absolute path
    parameters: Parameters
    name: str  # of its outputs in the output directory

    def output(self, out_dir: str) -> Path:
        return Path(out_dir) / f"{self.name}.ipynb"

    def failed_output(self, out_dir: str) -> Path:
        """The notebook of a task that failed or timed out, as far as it ran: never under the final name."""
        return Path(out_dir) / f"{self.name}.failed.ipynb"

    def result(self, out_dir: str) -> Path:
        return Path(out_dir) / f"{self.name}.result.json"


def plan_tasks(notebooks: Sequence[Path], parameter_sets: Sequence[Parameters]) -> list[BatchTask]:
    """Every notebook with every parameter set, in that order, with distinct output names. A
    notebook named twice runs once; a parameter set given twice is refused."""
    unique = list(dict.fromkeys(Path(os.path.abspath(nb)) for nb in notebooks))
    seen: dict[str, int] = {}
    for i, parameters in enumerate(parameter_sets):
        key = json.dumps(parameters, sort_keys=True)  # 1, 1.0 and true are different parameters
        if key in seen:
            raise BatchError(f"parameter set {i + 1} ({key}) is the same as set {seen[key] + 1}: "
                             "each would write the same outputs")
        seen[key] = i
    pairs = [(nb, dict(p)) for nb in unique for p in parameter_sets]
    return [BatchTask(i, str(nb), p, name) for i, ((nb, p), name) in enumerate(zip(pairs, output_names(pairs)))]


def parse_duration(text: str, what: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h30m``, ``2d`` or ``1:30:00`` (h:m:s) / ``10:00`` (m:s), in seconds."""
    seconds = duration_seconds(text)
    if not seconds or seconds <= 0:
        raise BatchError(f"{what} {text!r}: expected a duration such as 90s, 10m, 1h30m or 1:30:00")
    return seconds


def slurm_time(seconds: float) -> str:
    """A Slurm --time value (D-HH:MM:SS) of at least ``seconds``."""
    total = int(-(-seconds // 60)) * 60
    days, rest = divmod(total, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:00"


def utc_time(timestamp: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if timestamp is None else timestamp, timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def slurm_utc(text: str | None) -> str | None:
    """A time as Slurm prints it with TZ=UTC (hpc_kernels.slurm fixes the zone) in our form."""
    return f"{text}Z" if text and not text.endswith("Z") else text


@dataclass(frozen=True)
class TaskStatus:
    """What is known of one task now: its result record (if it belongs to the current attempt)
    and Slurm's view of the array element that runs it."""

    task: BatchTask
    state: str
    attempt: int
    array_job_id: str
    record: dict[str, Any] = field(default_factory=dict)
    slurm: ArrayTaskInfo | None = None
    message: str = ""
    settled: dict[str, Any] | None = None  # a final record made from Slurm's word, to be kept

    @property
    def node(self) -> str | None:
        return self.record.get("node") or (self.slurm.node if self.slurm else None)

    @property
    def duration(self) -> float | None:
        value = self.record.get("duration")
        return float(value) if value is not None else None

    @property
    def error(self) -> dict[str, Any]:
        return self.record.get("error") or {}


def task_state(task: BatchTask, array_job_id: str, attempt: int, record: dict[str, Any] | None,
               slurm: ArrayTaskInfo | None, cancelled: bool) -> TaskStatus:
    """The state of one task from its result record and Slurm's element (both for the current
    attempt: a record of an earlier attempt is ignored). When the task ended without a final
    result of its own (killed at the time limit, its node lost), Slurm's state decides, and
    ``settled`` is the record to keep for it (Slurm forgets finished jobs after a while)."""
    if record is not None and str(record.get("array_job_id")) != array_job_id:
        record = None
    status = TaskStatus(task, PENDING, attempt, array_job_id, record or {}, slurm)
    if record is not None and record.get("state") in FINAL:
        # A task stopped by a signal said CANCELLED; Slurm knows whether it was its time limit.
        if record.get("signal") and slurm is not None and _FROM_SLURM.get(slurm.state, CANCELLED) != record["state"]:
            settled = {**record, "state": _FROM_SLURM.get(slurm.state, record["state"]),
                       "message": f"{record.get('message', '')} (Slurm: {slurm.state})".strip()}
            return replace(status, state=settled["state"], record=settled, settled=settled,
                           message=settled["message"])
        return replace(status, state=record["state"], message=str(record.get("message", "")))
    if slurm is None:
        if record is not None:
            return replace(status, state=LOST, message="the task ended without a result and Slurm no longer "
                                                       "knows its job (its node or its process was lost)")
        if cancelled:
            return replace(status, state=CANCELLED, message="cancelled before it started")
        return replace(status, state=LOST, message="Slurm no longer knows this task and it left no result")
    if not slurm.finished:
        state = PENDING if slurm.state == "PENDING" else RUNNING
        return replace(status, state=state, message=slurm.reason if state == PENDING else "")
    if slurm.state == "COMPLETED":  # the runner exits 0 only after it wrote a completed result
        return replace(status, state=COMPLETED, message="Slurm: COMPLETED; its result record is missing (removed, "
                                                        "or replaced by another batch's with the same name)")
    state = _FROM_SLURM.get(slurm.state, FAILED)
    message = f"Slurm: {slurm.state}" + ("" if state != FAILED else ", and the task wrote no result (see its log)")
    settled = {**(record or {}), "batch_task": task.index, "name": task.name, "notebook": task.notebook,
               "parameters": task.parameters, "state": state, "array_job_id": array_job_id,
               "job_id": slurm.job_id, "node": slurm.node, "start": (record or {}).get("start") or slurm_utc(slurm.start),
               "end": slurm_utc(slurm.end), "attempt": attempt, "message": message, "from_slurm": True}
    return replace(status, state=state, record=settled, settled=settled, message=message)


def counts(statuses: Sequence[TaskStatus]) -> dict[str, int]:
    found = Counter(s.state for s in statuses)
    return {state: found[state] for state in STATES if found[state]}


# ---------------------------------------------------------------------------------------------
# The batch's state on disk


@dataclass
class Submission:
    job_id: str
    indices: list[int]
    script: str  # file name in the batch directory
    submitted: str  # UTC
    max_parallel: int | None = None
    cancelled: bool = False


@dataclass
class BatchRecord:
    name: str
    profile: str
    out_dir: str
    created: str
    workspace: str | None = None
    workspace_rw: bool = False
    image: str | None = None
    python_env: str | None = None  # --python-env: the user's own Python environment for every task
    # the command line's resources (time already derived from --timeout), for retries to match
    resources: dict[str, Any] = field(default_factory=dict)
    task_timeout: float | None = None
    cell_timeout: float | None = None
    submissions: list[Submission] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        data = dict(data)
        data["submissions"] = [Submission(**s) for s in data.get("submissions", [])]
        return cls(**data)

    def current(self, index: int) -> tuple[Submission, int] | None:
        """The latest submission that ran task ``index``, and which attempt of it that is."""
        found = [s for s in self.submissions if index in s.indices]
        return (found[-1], len(found)) if found else None


@dataclass(frozen=True)
class BatchFiles:
    dir: Path

    batch = property(lambda self: self.dir / "batch.json")
    tasks = property(lambda self: self.dir / "tasks.json")
    logs = property(lambda self: self.dir / "logs")
    lock = property(lambda self: self.dir / ".lock")

    def script(self, number: int) -> Path:
        return self.dir / f"job-{number}.sh"

    def log(self, array_job_id: str, index: int) -> Path:
        return self.logs / f"{array_job_id}_{index}.log"


def batches_root() -> Path:
    return state_root() / "batches"


def batch_files(name: str) -> BatchFiles:
    return BatchFiles(batches_root() / name)


def load_batch(name: str) -> tuple[BatchRecord, list[BatchTask]]:
    files = batch_files(name)
    data = read_json(files.batch) if _valid_name(name) else None
    if data is None:
        known = ", ".join(b.name for b in list_batches()) or "none"
        raise BatchError(f"no batch named {name!r} (your batches: {known})")
    try:
        tasks = [BatchTask(**t) for t in read_json(files.tasks) or []]
        return BatchRecord.from_json(data), tasks
    except (TypeError, ValueError) as e:
        raise BatchError(f"batch {name}: its state in {files.dir} is damaged ({e})") from None


def _valid_name(name: str) -> bool:
    try:
        check_kernel_name(name)
    except HpcKernelsError:
        return False
    return True


def list_batches() -> list[BatchRecord]:
    root = batches_root()
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        data = read_json(entry / "batch.json") if entry.is_dir() else None
        if data is not None:
            found.append(BatchRecord.from_json(data))
    return sorted(found, key=lambda b: (b.created, int(b.submissions[0].job_id) if b.submissions else 0))


def latest_batch() -> str:
    batches = list_batches()
    if not batches:
        raise BatchError("you have no batches (hpc-kernel batch submit ...)")
    return batches[-1].name


def _save(files: BatchFiles, batch: BatchRecord) -> None:
    write_json(files.batch, asdict(batch))


def _create_batch_dir(name: str | None, stem: str) -> BatchFiles:
    ensure_private_dir(state_root())
    root = ensure_private_dir(batches_root())
    if name is not None:
        if not _valid_name(name):
            raise BatchError(f"--name {name!r}: expected 1-40 letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit")
        try:
            (root / name).mkdir(mode=0o700)
        except FileExistsError:
            raise BatchError(f"a batch named {name!r} exists; choose another --name") from None
        return BatchFiles(root / name)
    stem = (re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-._") or "batch")[:32]
    for number in range(1, 100000):
        try:
            (root / f"{stem}-{number}").mkdir(mode=0o700)
            return BatchFiles(root / f"{stem}-{number}")
        except FileExistsError:
            continue
    raise BatchError(f"no free batch name {stem}-N in {root}")


# ---------------------------------------------------------------------------------------------
# Submit, look, retry, cancel


@dataclass(frozen=True)
class BatchRequest:
    notebooks: list[Path]
    parameter_sets: list[Parameters]
    out_dir: Path
    profile: str
    kernel: KernelRequest  # resources, image, workspace (its name is unused)
    max_parallel: int | None = None
    task_timeout: float | None = None
    cell_timeout: float | None = None
    skip_done: bool = False
    name: str | None = None


def read_notebook(path: Path) -> Any:
    """The notebook at ``path`` (nbformat 4), or BatchError naming the file and what is wrong."""
    import warnings

    import nbformat

    try:
        with warnings.catch_warnings():  # cell ids missing from an nbformat 4.5 file are added below
            warnings.simplefilter("ignore", nbformat.validator.MissingIDFieldWarning)
            nb = nbformat.read(str(path), as_version=4)
        if nb.get("nbformat_minor", 0) >= 5:
            for cell in nb.cells:
                cell.setdefault("id", uuid.uuid4().hex[:8])
        return nb
    except OSError as e:
        raise BatchError(f"{path}: cannot read the notebook: {e.strerror}") from None
    except Exception as e:  # nbformat raises several kinds for a file that is not a notebook
        raise BatchError(f"{path}: not a Jupyter notebook ({type(e).__name__}: {e})") from None


def read_result(path: Path) -> dict[str, Any] | None:
    """A task's result record, or None when there is none (or it is not JSON: a crashed writer
    never leaves one, but a person's editor might)."""
    try:
        record = read_json(path)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _already_done(task: BatchTask, out_dir: str) -> bool:
    record = read_result(task.result(out_dir)) or {}
    return (record.get("state") == COMPLETED and record.get("notebook") == task.notebook
            and record.get("parameters") == task.parameters and task.output(out_dir).exists())


_RESOURCES = ("time", "cpus", "mem", "partition", "gpus")


def _kernel_request(request: BatchRequest) -> KernelRequest:
    """The request every task's job is made from: with --timeout and no --time, the array's time
    limit is the timeout and a margin for the kernel's start and the outputs."""
    kernel = replace(request.kernel, name="batch", allocation=None)
    if request.task_timeout and kernel.time is None:
        kernel = replace(kernel, time=slurm_time(request.task_timeout + START_MARGIN_SECONDS))
    return kernel


def submit(request: BatchRequest) -> tuple[BatchRecord | None, int]:
    """Check everything, write the batch's state, submit one job array. Returns the batch (None
    when ``skip_done`` left nothing to run) and how many tasks were skipped as done."""
    if not request.notebooks:
        raise BatchError("no notebooks given")
    for notebook in request.notebooks:
        read_notebook(notebook)
    _check_max_parallel(request.max_parallel)
    out_dir = os.path.abspath(request.out_dir)
    state = os.path.realpath(state_root())
    if os.path.realpath(out_dir) == state or os.path.realpath(out_dir).startswith(state + "/"):
        raise BatchError(f"--out {request.out_dir}: inside hpc-kernels' own state ({state}); choose a directory of yours")
    kernel = _kernel_request(request)
    profile = profile_to_start(request.profile, kernel)
    language = profile.get("kernel", "language")
    if language != "python" and any(request.parameter_sets):
        raise BatchError(f"profile {profile.name}: kernel.language is {language!r}; parameters are injected as "
                         "Python assignments (as papermill does for Python kernels)")
    tasks = plan_tasks(request.notebooks, request.parameter_sets)
    planned = len(tasks)
    if request.skip_done:
        tasks = [t for t in tasks if not _already_done(t, out_dir)]
        tasks = [replace(t, index=i) for i, t in enumerate(tasks)]
    if not tasks:
        return None, planned
    os.makedirs(out_dir, exist_ok=True)
    files = _create_batch_dir(request.name, Path(request.notebooks[0]).stem)
    batch = BatchRecord(
        name=files.dir.name, profile=profile.name, out_dir=out_dir, created=utc_time(),
        workspace=kernel.workspace, workspace_rw=kernel.workspace_rw, image=kernel.image, python_env=kernel.python_env,
        resources={key: getattr(kernel, key) for key in _RESOURCES if getattr(kernel, key) is not None},
        task_timeout=request.task_timeout, cell_timeout=request.cell_timeout)
    try:
        ensure_private_dir(files.logs)
        write_json(files.tasks, [asdict(t) for t in tasks])
        _save(files, batch)
        _submit_tasks(files, batch, profile, [t.index for t in tasks], request.max_parallel)
    except BaseException:
        for submission in batch.submissions:  # submitted, then interrupted: no orphan array
            cancel(submission.job_id)
        shutil.rmtree(files.dir, ignore_errors=True)  # sbatch refused: nothing is left behind
        raise
    return batch, planned - len(tasks)


def _check_max_parallel(max_parallel: int | None) -> None:
    if max_parallel is not None and max_parallel < 1:
        raise BatchError(f"--max-parallel {max_parallel}: expected 1 or more")


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold batch ``name``'s lock (it must exist: its lock file lives in its directory)."""
    load_batch(name)
    with file_lock(batch_files(name).lock):
        yield


def _submit_tasks(files: BatchFiles, batch: BatchRecord, profile: Profile, indices: list[int],
                  max_parallel: int | None) -> Submission:
    number = len(batch.submissions) + 1
    templates = profile.get("paths", "templates")
    script = render_batch_script(profile, batch_name=batch.name, batch_dir=files.dir, log_dir=files.logs,
                                 array=array_spec(indices, max_parallel), python=node_python(profile),
                                 template_dir=Path(templates) if templates else None)
    write_private_file(files.script(number), script)
    job_id = submit_batch(script)
    submission = Submission(job_id=job_id, indices=sorted(indices), script=files.script(number).name,
                            submitted=utc_time(), max_parallel=max_parallel)
    batch.submissions.append(submission)
    try:
        _save(files, batch)
    except BaseException:
        cancel(job_id)  # a job array the batch does not know of would run for nobody
        batch.submissions.pop()
        raise
    return submission


def kernel_request_of(batch: BatchRecord, name: str) -> KernelRequest:
    """What the batch's tasks were submitted with (for a retry to submit the same)."""
    return KernelRequest(name=name, image=batch.image, workspace=batch.workspace, workspace_rw=batch.workspace_rw,
                         python_env=batch.python_env, **batch.resources)


def view(name: str) -> tuple[BatchRecord, list[TaskStatus]]:
    """Every task's state now: the result records and one squeue query. Final states learnt from
    Slurm (a task killed at its time limit, a lost node) are written down as the task's record."""
    batch, tasks = load_batch(name)
    job_ids = [s.job_id for s in batch.submissions]
    slurm = array_tasks(job_ids)
    statuses = []
    for task in tasks:
        current = batch.current(task.index)
        if current is None:
            continue
        submission, attempt = current
        status = task_state(task, submission.job_id, attempt, read_result(task.result(batch.out_dir)),
                            slurm.get((submission.job_id, task.index)), submission.cancelled)
        if status.settled is not None:
            _settle(task.result(batch.out_dir), {**status.settled, "batch": batch.name}, job_ids)
        statuses.append(status)
    return batch, statuses


def may_settle(existing: dict[str, Any] | None, batch_name: str, job_ids: Sequence[str]) -> bool:
    """Whether a record made from Slurm's word may replace the one at its path: only one of this
    batch's own (an earlier attempt's, or this one's unfinished), never another batch's that
    shares the output directory, nor one of an attempt this caller does not know of yet (a
    retry submitted meanwhile)."""
    if existing is None:
        return True
    return existing.get("batch") == batch_name and str(existing.get("array_job_id")) in job_ids


def _settle(path: Path, record: dict[str, Any], job_ids: Sequence[str]) -> None:
    if not may_settle(read_result(path), str(record["batch"]), job_ids):
        return
    try:
        write_result(path, record)
    except OSError:
        pass  # the output directory went away: the state stays what it is, said each time


def write_result(path: Path, record: dict[str, Any]) -> None:
    """A task's result record, atomically, with the user's umask (it is theirs, like the notebook)."""
    write_file_atomically(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def task_log(batch: BatchRecord, status: TaskStatus, lines: int = 15) -> str:
    return log_tail(batch_files(batch.name).log(status.array_job_id, status.task.index), lines)


def retry(name: str, max_parallel: int | None = None) -> tuple[Submission | None, list[TaskStatus]]:
    """Resubmit (one job array) the tasks that failed, timed out, were cancelled or lost, with the
    command line's resources of the first submission and the profile as it is now."""
    _check_max_parallel(max_parallel)
    files = batch_files(name)
    with _locked(name):
        batch, statuses = view(name)
        again = [s for s in statuses if s.state in RETRYABLE]
        if not again:
            return None, []
        profile = profile_to_start(batch.profile, kernel_request_of(batch, "batch"))
        previous = batch.submissions[-1].max_parallel if batch.submissions else None
        submission = _submit_tasks(files, batch, profile, [s.task.index for s in again], max_parallel or previous)
        return submission, again


def cancel_batch(name: str, wait: float = CANCEL_WAIT_SECONDS) -> tuple[list[TaskStatus], bool]:
    """scancel every job array of the batch; wait (up to ``wait`` seconds) until Slurm has ended
    every task (COMPLETING is not ended). Returns the tasks' states, and whether all ended."""
    files = batch_files(name)
    with _locked(name):
        batch, _ = load_batch(name)
        for submission in batch.submissions:
            cancel(submission.job_id)
            submission.cancelled = True
        _save(files, batch)
    deadline = time.monotonic() + wait
    while True:
        _, statuses = view(name)
        ended = all(s.state in FINAL and (s.slurm is None or s.slurm.finished) for s in statuses)
        if ended or time.monotonic() > deadline:
            return statuses, ended
        time.sleep(0.5)


def result_row(status: TaskStatus) -> dict[str, Any]:
    """One task as a flat row (``batch results --csv``)."""
    record, error = status.record, status.error
    return {
        "task": status.task.index, "name": status.task.name, "notebook": status.task.notebook,
        "parameters": json.dumps(status.task.parameters, sort_keys=True), "state": status.state,
        "attempt": status.attempt, "start": record.get("start", ""), "end": record.get("end", ""),
        "duration": "" if status.duration is None else f"{status.duration:.1f}", "node": status.node or "",
        "job_id": record.get("job_id") or (status.slurm.job_id if status.slurm else ""),
        "error_name": error.get("ename", ""), "error_value": error.get("evalue", ""),
        "message": status.message, "output": record.get("output") or "",
    }
