"""Runs inside the kernel: warns the kernel's users before its job reaches its time limit.

The node agent installs this file in the kernel (:mod:`hpc_kernels.kernel_startup`) and keeps a
small JSON file in the node-side directory up to date from Slurm: the job's end time and how
long before it to warn. This file must stand
alone: it runs under the kernel's Python (an Apptainer image has only ipykernel), not ours.

A cell that is running when the time comes gets the warning in its stderr stream, sent on
IOPub with that cell's request as parent, so every client shows it where the user looks.
A warning that comes while no cell runs is shown at the start of the next cell, and so is the
agent's ``notice`` (that this kernel replaces one lost when Slurm requeued the job).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

POLL_SECONDS = 5.0
LAST_CALL_SECONDS = 60.0  # a second warning this long before the end (if the first came earlier)


def warning_times(warn_before: float) -> list[float]:
    """Seconds before the end at which to warn, earliest first."""
    if warn_before <= 0:
        return []
    if warn_before > 2 * LAST_CALL_SECONDS:
        return [warn_before, LAST_CALL_SECONDS]
    return [warn_before]


def due_warning(deadline: dict[str, Any], now: float, given: set[tuple[float, float]]) -> tuple[float, float] | None:
    """The warning to give now, as (end, threshold), or None. ``given`` holds those already given:
    a new end time (the limit was changed) arms them again. ``deadline`` is what the agent wrote:
    ``end`` and ``start`` (Unix times; ``end`` None without a limit) and ``warn_before``."""
    try:
        end = float(deadline["end"])
        warn_before = float(deadline.get("warn_before", 0))
        length = end - float(deadline["start"]) if deadline.get("start") is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    left = end - now
    if left <= 0:
        return None
    # A job shorter than a warning's lead time is not warned at its start: its user chose the time.
    due = [t for t in warning_times(warn_before)
           if left <= t and (end, t) not in given and (length is None or t < length)]
    return (end, min(due)) if due else None


def warning_text(deadline: dict[str, Any], now: float) -> str:
    end = float(deadline["end"])
    left = max(0, int(end - now))
    minutes, seconds = divmod(left, 60)
    span = f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
    job = deadline.get("job_id") or "?"
    return (f"\n[hpc-kernels] WARNING: job {job} reaches its time limit in {span} "
            f"(at {time.strftime('%H:%M:%S', time.localtime(end))} on the node). "
            "The kernel and everything in its memory end then: save your work.\n")


def read_deadline(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class TimeWarning:
    """The warning thread and the cell hooks, in one running kernel."""

    def __init__(self, shell: Any, path: str) -> None:
        self.shell = shell
        self.kernel = shell.kernel
        self.path = path
        self.lock = threading.Lock()
        self.running_parent: dict[str, Any] | None = None  # the request of the cell running now
        self.pending: str | None = None  # said while no cell ran: said again at the next cell
        self.given: set[tuple[float, float]] = set()

    def start(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)
        threading.Thread(target=self.watch, name="hpc-kernels-time-warning", daemon=True).start()

    def pre_run_cell(self, *_: Any) -> None:
        # Called on the shell's own thread, where the kernel knows the request being run
        # (ipykernel 7 keeps it in a context variable that other threads do not see).
        with self.lock:
            self.running_parent = self.kernel.get_parent("shell")
            pending, self.pending = self.pending, None
        if pending:
            sys.stderr.write(pending)
            sys.stderr.flush()

    def post_run_cell(self, *_: Any) -> None:
        with self.lock:
            self.running_parent = None

    def watch(self) -> None:
        notice_given = False
        while True:
            deadline = read_deadline(self.path)
            if deadline and deadline.get("notice") and not notice_given:
                notice_given = True
                self.say(f"\n[hpc-kernels] {deadline['notice']}\n")
            now = time.time()
            due = due_warning(deadline, now, self.given) if deadline else None
            if due is not None:
                self.given.add(due)
                self.say(warning_text(deadline, now))  # type: ignore[arg-type]
            time.sleep(POLL_SECONDS)

    def say(self, text: str) -> None:
        with self.lock:
            parent = self.running_parent
            if parent is None:
                self.pending = text
                return
        kernel = self.kernel
        kernel.session.send(kernel.iopub_socket, "stream", {"name": "stderr", "text": text},
                            parent=parent, ident=kernel._topic("stream"))


def install(shell: Any, path: str) -> TimeWarning | None:
    """Start warning in the kernel whose IPython shell is ``shell``; None outside a kernel."""
    if not path or getattr(shell, "kernel", None) is None:
        return None
    warning = TimeWarning(shell, path)
    warning.start()
    return warning
