"""One task of a batch, on its compute node: ``python -m hpc_kernels.batch_task BATCH_DIR``.

Slurm runs it as an element of the batch's job array; ``SLURM_ARRAY_TASK_ID`` picks the task.
It reads the notebook, injects the task's parameters, starts a kernel in the profile's sandbox
on this node (the provisioner's node mode: no relay) and executes the notebook with nbclient.
Then it writes, each atomically, the executed notebook (``<name>.ipynb`` only when every cell
ran; ``<name>.failed.ipynb`` as far as it got otherwise) and the result record
(``<name>.result.json``). A cell that raises, a cell or task past its timeout, a kernel that
dies, or SIGTERM (scancel, the time limit) are each recorded as such; the kernel never outlives
the task.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from . import launcher
from .batch import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    TIMEOUT,
    BatchFiles,
    BatchRecord,
    BatchTask,
    read_notebook,
    utc_time,
    write_result,
)
from .errors import HpcKernelsError
from .terminal import strip_ansi
from .kernelspecs import kernelspec
from .notebooks import inject_parameters, skip_iri_format_checker
from .paths import kernels_root, read_json, write_file_atomically
from .profiles import load_profile
from .state import kernel_files, remove_kernel_dir, state_json

# After a timeout or a signal, how long the execution may take to notice its kernel is gone.
EXECUTION_STOP_SECONDS = 30.0
SHUTDOWN_SECONDS = 5.0
# After SIGTERM: well within Slurm's KillWait (30 s by default).
STOP_AFTER_SIGNAL_SECONDS = 5.0
WAIT_STEP_SECONDS = 0.2
KERNELSPEC_NAME = "hpc-kernels-batch"


@dataclass
class Outcome:
    state: str
    message: str = ""
    error: dict[str, Any] | None = None
    signal: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _say(message: str) -> None:
    print(f"[hpc-kernels batch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _error(ename: str, evalue: str, traceback: str = "", **extra: Any) -> dict[str, Any]:
    """A result record's ``error``."""
    return {"ename": ename, "evalue": evalue, "traceback": traceback, **extra}


def _error_of(e: BaseException) -> dict[str, Any]:
    return _error(type(e).__name__, str(e))


def _failed_cell(nb: Any) -> int | None:
    """The index of the first cell with an error in its outputs."""
    for index, cell in enumerate(nb.cells):
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            return index
    return None


class TaskRunner:
    def __init__(self, batch_dir: Path, index: int, environ: dict[str, str]) -> None:
        files = BatchFiles(batch_dir)
        data = read_json(files.batch)
        if data is None:
            raise HpcKernelsError(f"{files.batch} is missing: the batch's state was removed")
        self.batch = BatchRecord.from_json(data)
        tasks = read_json(files.tasks) or []
        if not 0 <= index < len(tasks):
            raise HpcKernelsError(f"task {index}: batch {self.batch.name} has tasks 0-{len(tasks) - 1}")
        self.task = BatchTask(**tasks[index])
        self.job_id = environ.get("SLURM_JOB_ID", "")
        self.node = environ.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's name for it
        self.array_job_id = environ.get("SLURM_ARRAY_JOB_ID", self.job_id)
        current = self.batch.current(index)
        self.attempt = current[1] if current else 1
        # A job requeued (after a node failure) runs again under its id: a name of its own each time.
        restarts = environ.get("SLURM_RESTART_COUNT", "0")
        self.kernel_prefix = f"batch-{self.job_id or os.getpid()}"
        self.kernel_name = self.kernel_prefix + (f".{restarts}" if restarts not in ("", "0") else "")
        self.started = time.time()
        self.done = threading.Event()  # set when the execution thread has ended
        self.log_copied = False
        self.stopped_by: int | None = None
        self.outcome: Outcome | None = None  # set by the execution thread
        self.nb: Any = None
        self.kernel_ready_at: float | None = None

    # -- signals -----------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only noted: the main thread looks at it while it waits (raising here, inside
        # Thread.join, would leave the thread marked as ended while it runs on).
        self.stopped_by = signum

    # -- the record ------------------------------------------------------------------------

    def record(self, state: str, **extra: Any) -> dict[str, Any]:
        end = time.time() if state != RUNNING else None
        return {
            "batch": self.batch.name, "batch_task": self.task.index, "name": self.task.name,
            "notebook": self.task.notebook, "parameters": self.task.parameters, "state": state,
            "attempt": self.attempt, "array_job_id": self.array_job_id, "job_id": self.job_id,
            "node": self.node, "kernel": self.kernel_name,
            "start": utc_time(self.started), "end": utc_time(end) if end else None,
            "duration": round(end - self.started, 3) if end else None, **extra,
        }

    def save(self, record: dict[str, Any]) -> None:
        write_result(self.task.result(self.batch.out_dir), record)

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        out_dir = self.batch.out_dir
        if not os.path.isdir(out_dir):
            _say(f"the output directory {out_dir} does not exist on {socket.gethostname()}: it must be on a "
                 "file system the compute nodes share")
            return 1
        self.forget_earlier_runs()
        self.save(self.record(RUNNING))
        _say(f"task {self.task.index} ({self.task.name}), attempt {self.attempt}: {self.task.notebook} "
             f"with {json.dumps(self.task.parameters)}")
        outcome = self.execute()
        if self.stopped_by is not None and outcome.state not in (CANCELLED, COMPLETED):  # a signal while finishing
            outcome = Outcome(CANCELLED, f"stopped by {signal.Signals(self.stopped_by).name}",
                              signal=signal.Signals(self.stopped_by).name, timings=outcome.timings)
        output = self.write_notebook(outcome)
        outcome.timings["total"] = round(time.time() - self.started, 3)
        self.save(self.record(outcome.state, message=outcome.message, error=outcome.error, signal=outcome.signal,
                              output=str(output) if output else None, timings=outcome.timings))
        _say(f"task {self.task.index}: {outcome.state}" + (f" ({outcome.message})" if outcome.message else ""))
        return 0 if outcome.state == COMPLETED else 1

    def execute(self) -> Outcome:
        try:
            self.nb = inject_parameters(read_notebook(Path(self.task.notebook)), self.task.parameters)
        except HpcKernelsError as e:
            return Outcome(FAILED, str(e), _error_of(e))
        done = self.done
        worker = threading.Thread(target=self._execute_in_thread, args=(done,), name="nbclient", daemon=True)
        timeout = self.batch.task_timeout
        deadline = None if timeout is None else self.started + timeout
        worker.start()
        while not done.wait(WAIT_STEP_SECONDS):
            if self.stopped_by is not None:
                name = signal.Signals(self.stopped_by).name
                # Slurm kills what is left after its KillWait: end the kernel and be brief.
                self.stop_kernel(done, STOP_AFTER_SIGNAL_SECONDS)
                return Outcome(CANCELLED, f"stopped by {name} (scancel, or Slurm's time limit)", signal=name,
                               timings=self.timings())
            if deadline is not None and time.time() > deadline:
                self.stop_kernel(done, EXECUTION_STOP_SECONDS)
                return Outcome(TIMEOUT, f"the task ran longer than its timeout ({timeout:.0f} s)",
                               _error("TaskTimeout", f"the task ran longer than {timeout:.0f} s (--timeout)"),
                               timings=self.timings())
        self.end_kernel_if_left()
        outcome = self.outcome or Outcome(FAILED, "the execution ended without an outcome (see the log)")
        outcome.timings.update(self.timings())
        return outcome

    def timings(self) -> dict[str, float]:
        if self.kernel_ready_at is None:
            return {}
        return {"kernel_start": round(self.kernel_ready_at - self.started, 3),
                "execute": round(time.time() - self.kernel_ready_at, 3)}

    def stop_kernel(self, done: threading.Event, wait: float) -> None:
        """End the task's kernel (its agent on this node) at once, without a shutdown request, and
        give the execution up to ``wait`` seconds to see it gone. A kernel still starting (its
        state not written yet) is ended as soon as it appears."""
        self._copy_kernel_log()
        deadline = time.monotonic() + wait
        while True:
            self.end_kernel_if_left(graceful=False)
            if done.wait(WAIT_STEP_SECONDS) or time.monotonic() > deadline:
                break
        self.end_kernel_if_left(graceful=False)
        if not done.is_set():
            _say(f"the execution did not end within {wait:.0f} s of its kernel")

    def end_kernel_if_left(self, graceful: bool = True) -> None:
        if kernel_files(self.kernel_name).dir.exists():
            try:
                launcher.shutdown(self.kernel_name, graceful_timeout=SHUTDOWN_SECONDS if graceful else 0)
            except HpcKernelsError as e:
                _say(f"ending kernel {self.kernel_name}: {e}")

    def forget_earlier_runs(self) -> None:
        """The kernel state of an earlier run of this very job (requeued, its node lost): gone."""
        for entry in kernels_root().glob(f"{self.kernel_prefix}*"):
            if entry.name != self.kernel_name and entry.name.partition(".")[0] == self.kernel_prefix:
                remove_kernel_dir(entry.name)

    def _execute_in_thread(self, done: threading.Event) -> None:
        try:
            self._execute_notebook()
        except Exception as e:  # before nbclient ran: the profile, the kernelspec
            if self.outcome is None:
                self.outcome = Outcome(FAILED, f"{type(e).__name__}: {e}", _error_of(e))
        finally:
            done.set()

    def _execute_notebook(self) -> None:
        from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager
        from nbclient import NotebookClient
        from nbclient.exceptions import (
            CellExecutionError,
            CellTimeoutError,
            DeadKernelError,
        )

        batch = self.batch
        spec = kernelspec(load_profile(batch.profile), mode="node", encryption="none", image=batch.image,
                          python_env=batch.python_env)
        spec["metadata"]["kernel_provisioner"]["config"].update(
            kernel_name=self.kernel_name, workspace=batch.workspace or "", workspace_rw=batch.workspace_rw)

        class BatchKernelSpecs(KernelSpecManager):  # type: ignore[misc]
            def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
                return KernelSpec(resource_dir="", **spec)

        km = AsyncKernelManager(kernel_name=KERNELSPEC_NAME, kernel_spec_manager=BatchKernelSpecs())
        client = NotebookClient(
            self.nb, km=km, kernel_name=KERNELSPEC_NAME,
            timeout=math.ceil(batch.cell_timeout) if batch.cell_timeout else None,
            resources={"metadata": {"path": batch.workspace}} if batch.workspace else {},
            on_notebook_start=self._kernel_ready,
        )
        try:
            client.execute()
            self.outcome = Outcome(COMPLETED)
        except CellTimeoutError as e:
            self.outcome = Outcome(TIMEOUT, f"a cell ran longer than {batch.cell_timeout:.0f} s (--cell-timeout)",
                                   _error("CellTimeoutError", strip_ansi(str(e)).strip().splitlines()[0],
                                          cell=self._running_cell()))
        except CellExecutionError as e:
            self.outcome = Outcome(FAILED, f"{e.ename}: {e.evalue}",
                                   _error(e.ename, e.evalue, strip_ansi(e.traceback), cell=_failed_cell(self.nb)))
        except DeadKernelError:
            said = self._agent_message()
            self.outcome = Outcome(FAILED, f"the kernel died ({said})" if said else "the kernel died",
                                   _error("DeadKernelError", said or "the kernel died", cell=self._running_cell()))
        except Exception as e:  # the kernel did not start (its reason), or nbclient gave up
            self.outcome = Outcome(FAILED, str(e).splitlines()[0] if str(e) else type(e).__name__, _error_of(e))
        finally:
            from jupyter_core.utils import run_sync

            self._copy_kernel_log()
            try:  # nbclient leaves a kernel manager it was given alone
                if client.kc is not None:
                    client.kc.stop_channels()
                if self.outcome is not None and self.outcome.state == COMPLETED and km.has_kernel:
                    run_sync(km.shutdown_kernel)(now=False)
                else:  # a kernel that may be busy (a cell past its timeout) or dead: end it, no request
                    self.end_kernel_if_left(graceful=False)
            except Exception as e:
                _say(f"shutting the kernel down: {e}")

    def _copy_kernel_log(self) -> None:
        """The kernel's own log (its agent's messages, the kernel's stderr) goes with the kernel's
        state: keep it in the task's log (once)."""
        if self.log_copied:
            return
        self.log_copied = True
        try:
            text = kernel_files(self.kernel_name).log.read_text(errors="replace")
        except OSError:
            return
        if text.strip():
            sys.stderr.write("".join(f"  | {line}\n" for line in text.splitlines()))
            sys.stderr.flush()

    def _kernel_ready(self, **kwargs: Any) -> None:
        self.kernel_ready_at = time.time()

    def _running_cell(self) -> int | None:
        """The last code cell that has an execution count: the one that was running."""
        found = None
        for index, cell in enumerate(self.nb.cells):
            if cell.get("cell_type") == "code" and cell.get("execution_count") is not None:
                found = index
        return found

    def _agent_message(self) -> str:
        return str(state_json(kernel_files(self.kernel_name).agent).get("message", ""))

    def write_notebook(self, outcome: Outcome) -> Path | None:
        """The executed notebook: under its final name only when every cell ran; as far as it ran
        under ``.failed.ipynb`` for a failure or a timeout; nothing for a cancelled task."""
        if self.nb is None or outcome.state == CANCELLED:
            return None
        if not self.done.is_set():  # the execution still changes it
            outcome.message += "; the execution did not stop, so its notebook was not written"
            return None
        import nbformat

        path = (self.task.output if outcome.state == COMPLETED else self.task.failed_output)(self.batch.out_dir)
        self.nb.metadata["hpc_kernels"] = {
            "batch": self.batch.name, "task": self.task.index, "parameters": self.task.parameters,
            "state": outcome.state, "node": self.node,
            "job_id": self.job_id, "profile": self.batch.profile, "start": utc_time(self.started), "end": utc_time(),
        }
        try:
            write_file_atomically(path, nbformat.writes(self.nb))
        except (OSError, ValueError) as e:
            outcome.message = f"{outcome.message}; the notebook could not be written to {path}: {e}".lstrip("; ")
            if outcome.state == COMPLETED:
                outcome.state = FAILED
                outcome.error = _error_of(e)
            return None
        if outcome.state == COMPLETED:
            self.task.failed_output(self.batch.out_dir).unlink(missing_ok=True)  # from an earlier attempt
        return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if len(args) != 1 or not task_id.isdigit():
        print("usage: python -m hpc_kernels.batch_task BATCH_DIR (in a Slurm array task)", file=sys.stderr)
        return 2
    skip_iri_format_checker()
    try:
        runner = TaskRunner(Path(args[0]), int(task_id), dict(os.environ))
        code = runner.run()
    except HpcKernelsError as e:
        _say(f"failed: {e}")
        return 1
    if not runner.done.is_set():
        # An execution thread that would not stop: its result is recorded and its kernel ended;
        # leave without the exit handlers that would wait on it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
