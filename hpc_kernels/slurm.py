"""The one way into Slurm: its command-line tools (sbatch, scontrol, scancel, srun).

pyslurm would save a process per query, but no PyPI build matches the Slurm of the machines we
test on (see docs/architecture.md), so the CLI tools are the default and only backend for now.
Parsing is kept in pure functions so it can be tested without a cluster.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SlurmError

# Job states after which a job will never run (again).
FINISHED_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
     "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED"}
)


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    reason: str
    node: str | None
    exit_code: str
    fields: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def expected_start(self) -> str | None:
        """When Slurm expects a pending job to start, if it says (StartTime is then an estimate)."""
        start = self.fields.get("StartTime", "")
        if self.state != "PENDING" or start in ("", "Unknown", "None", "(null)"):
            return None
        return start.replace("T", " ") + " UTC"

    @property
    def name(self) -> str:
        return self.fields.get("JobName", "")

    @property
    def submit_time(self) -> str:
        """With the id, what names a job: Slurm reuses ids (after a controller loses its state)."""
        return self.fields.get("SubmitTime", "")


# Times as Slurm prints them depend on the caller's time zone and SLURM_TIME_FORMAT; fix both so
# that a recorded SubmitTime compares equal from any shell, on any login node.
_TIME_ENVIRONMENT = {"TZ": "UTC", "SLURM_TIME_FORMAT": "standard"}


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **_TIME_ENVIRONMENT})
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} was not found on PATH: is Slurm's client installed on this node?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:.0f} s: is slurmctld up?") from None


def _slurm_message(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")


def submit_batch(script: str, extra_args: Sequence[str] = ()) -> str:
    """Submit ``script`` (given on stdin, so no file is needed) and return the job id."""
    proc = _run(["sbatch", "--parsable", *extra_args], input=script)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_slurm_message(proc)}")
    return parse_sbatch_parsable(proc.stdout)


def sbatch_test_only(script: str) -> str:
    """``sbatch --test-only``: Slurm's verdict on the script (when and where it would start),
    without submitting anything. A refusal raises SlurmError with Slurm's message."""
    proc = _run(["sbatch", "--test-only"], input=script)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch --test-only refused the job: {_slurm_message(proc)}")
    return _slurm_message(proc)


def parse_sbatch_parsable(stdout: str) -> str:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    job_id = stdout.strip().splitlines()[-1].split(";")[0].strip() if stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()!r}")
    return job_id


def parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """Parse one line of ``scontrol show job -o`` into a dict.

    Fields are ``Key=Value`` separated by spaces; a value may itself hold spaces (a command
    line, a reason), so a token without ``=`` belongs to the value before it.
    """
    fields: dict[str, str] = {}
    last: str | None = None
    for token in line.strip().split(" "):
        key, sep, value = token.partition("=")
        if sep and key and (key[0].isalpha()) and key.replace(":", "").replace("/", "").isalnum():
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += " " + token
    return fields


def job_info_from_fields(fields: dict[str, str]) -> JobInfo:
    node = fields.get("BatchHost") or fields.get("NodeList")
    if node in ("", "(null)"):
        node = None
    reason = fields.get("Reason", "None")
    return JobInfo(
        job_id=fields.get("JobId", ""),
        state=fields.get("JobState", "UNKNOWN"),
        reason="" if reason in ("None", "(null)") else reason,
        node=node,
        exit_code=fields.get("ExitCode", ""),
        fields=fields,
    )


def job_info(job_id: str) -> JobInfo | None:
    """The job as slurmctld knows it, or None once it has forgotten it (after MinJobAge)."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {_slurm_message(proc)}")
    line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    return job_info_from_fields(parse_scontrol_oneliner(line)) if line else None


# squeue fields for job_infos, in the names scontrol uses (so one parser serves both).
_SQUEUE_FIELDS = (("JobId", "%i"), ("JobState", "%T"), ("Reason", "%r"), ("NodeList", "%N"),
                  ("BatchHost", "%B"), ("SubmitTime", "%V"), ("StartTime", "%S"), ("JobName", "%j"))


def job_infos(job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """Many jobs in one query, rather than one query per job: a controller must not be polled
    once per kernel. Only the jobs asked for are fetched (not the whole cluster's queue)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    proc = _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(wanted)}",
                 "--format=" + "|".join(code for _, code in _SQUEUE_FIELDS)])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SlurmError(f"squeue --jobs failed: {_slurm_message(proc)}")
    return parse_squeue_jobs(proc.stdout if proc.returncode == 0 else "")


def jobs_alive(job_ids: Sequence[str]) -> set[str]:
    """Those of ``job_ids`` (each job's own id, also for an array's task) that Slurm has not
    finished: pending, running, suspended, completing, requeued. Raises SlurmError when Slurm
    cannot say (the caller must then assume every job still runs)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return set()
    proc = _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(wanted)}", "--format=%A|%T"])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return set()
        raise SlurmError(f"squeue --jobs failed: {_slurm_message(proc)}")
    return parse_jobs_alive(proc.stdout, wanted)


def parse_jobs_alive(stdout: str, wanted: Sequence[str]) -> set[str]:
    alive = set()
    for line in stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job in wanted and state.strip() not in FINISHED_STATES:
            alive.add(job)
    return alive


def parse_squeue_jobs(stdout: str) -> dict[str, JobInfo]:
    infos = {}
    for line in stdout.splitlines():
        values = line.split("|")
        if len(values) != len(_SQUEUE_FIELDS):
            continue
        fields = {name: value.strip() for (name, _), value in zip(_SQUEUE_FIELDS, values)}
        if fields["BatchHost"] in ("n/a", ""):
            fields["BatchHost"] = ""
        info = job_info_from_fields(fields)
        infos[info.job_id] = info
    return infos


def job_steps(job_id: str) -> dict[str, str]:
    """The running steps of a job: step id (``JOB.STEP``) -> step name. Empty once the job is gone."""
    proc = _run(["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i %j"])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}
        raise SlurmError(f"squeue --steps --jobs={job_id} failed: {_slurm_message(proc)}")
    steps = {}
    for line in proc.stdout.splitlines():
        step, _, name = line.strip().partition(" ")
        if step:
            steps[step] = name.strip()
    return steps


def ours_named(job_name: str) -> list[str]:
    """Our jobs and steps (``JOB.STEP``) still in the queue under the name ``job_name``: how a
    kernel whose record was lost is still found (its job, or its step in an allocation)."""
    found = []
    for options in (["--format=%i %j"], ["--steps", "--format=%i %j"]):
        proc = _run(["squeue", "--noheader", "--me", *options])
        if proc.returncode != 0:
            raise SlurmError(f"squeue failed: {_slurm_message(proc)}")
        found += [i for i, _, name in (line.strip().partition(" ") for line in proc.stdout.splitlines())
                  if name.strip() == job_name]
    return found


def cancel(job_id: str) -> None:
    """Cancel the job, or the step ``JOB.STEP``. A job that already ended is not an error."""
    argv = ["scancel", str(job_id)]
    proc = _run(argv)
    if proc.returncode != 0 and "already completed" not in proc.stderr and "Invalid job id" not in proc.stderr:
        raise SlurmError(f"scancel {job_id} failed: {_slurm_message(proc)}")


# What our own steps in a kernel's job (the relay's node side, an interrupt) get of the login
# side's environment; LD_PRELOAD, for one, stays here.
NODE_STEP_ENVIRONMENT = ("PATH", "HOME", "LANG")


def srun_into_job(job_id: str, argv: Sequence[str], export: Sequence[str] | None = None,
                  node: str | None = None) -> list[str]:
    """The command line that runs ``argv`` as an extra step inside a running job, on ``node``
    (the kernel's: an allocation of the user's may span several nodes).

    ``--overlap`` lets the step share the resources the batch step holds; ``-u`` makes stdout
    unbuffered (a pty on the task side, which the task must put in raw mode). ``export`` names
    the only variables of ours the step gets (Slurm adds its own SLURM_* ones). The step runs in
    ``/``, not in the caller's directory (Slurm's default), which may be a workspace the kernel
    can write.
    """
    options = [f"--export={','.join(export)}"] if export is not None else []
    if node:
        options.append(f"--nodelist={node}")
    return ["srun", f"--jobid={job_id}", "--overlap", "-u", "--nodes=1", "--ntasks=1", "--quiet", "--chdir=/",
            *options, *argv]


# ---------------------------------------------------------------------------------------------
# Job arrays (batches)


@dataclass(frozen=True)
class ArrayTaskInfo:
    """One element of a job array as squeue lists it."""

    array_job_id: str
    task_id: int
    job_id: str  # the element's own job id (what SLURM_JOB_ID is inside it)
    state: str
    reason: str
    node: str | None
    start: str | None  # Slurm's times, UTC, e.g. 2026-11-23T10:00:00
    end: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


_ARRAY_FIELDS = ("%F", "%K", "%A", "%T", "%r", "%N", "%S", "%e")


def array_tasks(array_job_ids: Sequence[str]) -> dict[tuple[str, int], ArrayTaskInfo]:
    """Every element Slurm still knows of the given job arrays, one query for all of them:
    (array job id, task id) -> element. Elements that finished longer ago than the controller's
    MinJobAge are no longer listed."""
    wanted = sorted(set(array_job_ids))
    if not wanted:
        return {}
    proc = _run(["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(wanted)}",
                 "--format=" + "|".join(_ARRAY_FIELDS)])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SlurmError(f"squeue --array --jobs failed: {_slurm_message(proc)}")
    return parse_array_tasks(proc.stdout if proc.returncode == 0 else "")


def parse_array_tasks(stdout: str) -> dict[tuple[str, int], ArrayTaskInfo]:
    def when(text: str) -> str | None:
        return None if text in ("", "N/A", "NONE", "Unknown", "(null)") else text

    tasks = {}
    for line in stdout.splitlines():
        values = [v.strip() for v in line.split("|")]
        if len(values) != len(_ARRAY_FIELDS) or not values[1].isdigit():
            continue  # a non-array job, or pending elements still folded as 3-8%4
        array_job_id, task_id, job_id, state, reason, node, start, end = values
        info = ArrayTaskInfo(array_job_id, int(task_id), job_id, state,
                             "" if reason in ("None", "(null)") else reason,
                             node if node not in ("", "(null)") else None, when(start), when(end))
        tasks[(array_job_id, info.task_id)] = info
    return tasks


def array_spec(indices: Sequence[int], max_parallel: int | None = None) -> str:
    """sbatch's ``--array`` value for these task ids: ranges folded (``0-8,11,13-14``), with
    ``%M`` to run at most M at once."""
    ordered = sorted(set(indices))
    if not ordered:
        raise ValueError("a job array needs at least one task")
    parts = []
    start = previous = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def queue_position(job_id: str, partition: str) -> int | None:
    """Where pending job ``job_id`` stands among the pending jobs of ``partition`` (1: next to
    start), in Slurm's scheduling order (priority, then id); None if it is not pending there.
    One squeue of the partition's pending jobs: ids only."""
    proc = _run(["squeue", "--noheader", "--states=PENDING", f"--partition={partition}", "--sort=-p,i",
                 "--format=%i"])
    if proc.returncode != 0:
        raise SlurmError(f"squeue --partition={partition} failed: {_slurm_message(proc)}")
    return parse_queue_position(proc.stdout, job_id)


def parse_queue_position(stdout: str, job_id: str) -> int | None:
    ids = [line.strip() for line in stdout.splitlines() if line.strip()]
    return ids.index(job_id) + 1 if job_id in ids else None
