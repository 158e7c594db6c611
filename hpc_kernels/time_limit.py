"""The job's time limit, as the node agent tells the kernel about it.

The agent asks Slurm for the job's end time (again every minute: a user or an admin may change
the limit with ``scontrol update``) and writes it with the profile's ``kernel.time_warning``
into ``deadline.json`` in the node-side directory. The kernel reads that file
(:mod:`hpc_kernels.kernel_time_warning`, installed as an IPython startup file) and warns its
users in their output a configured time before the end.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import SlurmError
from .paths import write_json
from .slurm import job_info

REFRESH_SECONDS = 60.0
DEADLINE_FILE = "deadline.json"


def job_time(fields: dict[str, str], field: str = "EndTime") -> float | None:
    """The job's end (or another of its times) as a Unix time, from ``scontrol show job`` fields
    printed in UTC (as :mod:`hpc_kernels.slurm` has them printed); None without a limit or
    before the job runs."""
    text = fields.get(field, "")
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None  # Unknown, None, or a limit of UNLIMITED


class DeadlineWriter:
    """A thread that keeps ``deadline.json`` true to Slurm's end time for the job."""

    def __init__(self, node_dir: Path, job_id: str, warn_before: float, say: Callable[[str], None], *,
                 notice: str | None = None) -> None:
        self.path = node_dir / DEADLINE_FILE
        self.job_id = job_id
        self.warn_before = warn_before
        self.say = say
        self.notice = notice  # said once, at the kernel's first cell (a requeued job's new kernel)
        self.written: float | None = None
        self.start_time: float | None = None
        self.has_written = False
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def _write(self, end: float | None, start: float | None = None) -> None:
        with self.lock:
            write_json(self.path, {"job_id": self.job_id, "end": end, "start": start, "warn_before": self.warn_before,
                                   **({"notice": self.notice} if self.notice else {})})
            self.written = end
            self.start_time = start
            self.has_written = True

    def clear_notice(self) -> None:
        """The kernel is restarted in the job: the next one is not news."""
        if self.notice is None:
            return
        self.notice = None
        if self.has_written:
            self._write(self.written, self.start_time)

    def refresh(self) -> None:
        try:
            job = job_info(self.job_id)
        except SlurmError as e:
            self.say(f"time limit: cannot ask Slurm for the end time: {e}")
            return
        end = job_time(job.fields) if job else None
        if self.has_written and (end == self.written or end is None):
            return  # None after a known end: an answer cut short, not a limit removed
        first = not self.has_written
        self._write(end, job_time(job.fields, "StartTime") if job else None)
        if end is None:
            self.say("time limit: Slurm gives this job no end time: no warning")
        elif first:
            self.say(f"time limit: the job ends at {time.strftime('%H:%M:%S', time.localtime(end))}; "
                     f"the kernel warns {self.warn_before:.0f} s before")
        else:
            self.say(f"time limit changed: the job now ends at {time.strftime('%H:%M:%S', time.localtime(end))}")

    def start(self) -> None:
        self.refresh()
        threading.Thread(target=self._run, name="deadline", daemon=True).start()

    def _run(self) -> None:
        while not self.stop_event.wait(REFRESH_SECONDS):
            self.refresh()

    def stop(self) -> None:
        self.stop_event.set()
