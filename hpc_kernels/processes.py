"""Knowing whether a process we recorded is still the one we started.

A pid alone is not enough: pids are reused, and the state directory (where pids are recorded)
is on a shared file system that several login nodes see. A recorded process is therefore named
by host, pid, start time and a marker in its command line.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any


def python_module(python: str, module: str, *args: str) -> list[str]:
    """``python -I -m module args``: how every Python process of ours outside the sandbox starts.

    Isolated mode keeps the working directory off ``sys.path`` (``-m`` would put it first) and
    ignores PYTHONPATH, PYTHONSTARTUP, PYTHONUSERBASE and the user's site directory: our processes
    often start in a workspace the kernel may write, and nothing there may be imported outside
    the sandbox (a planted ``hpc_kernels/agent.py`` or ``stringprep.py`` would run on the node with
    the user's network and home). hpc-kernels must therefore be installed in ``python``'s own
    environment, not reached through PYTHONPATH."""
    return [python, "-I", "-m", module, *args]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    if there is no such process or it is a zombie (PID 1 here reaps slowly: a zombie is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``, nearest first (read from /proc: children lists are
    per thread, so all of a process's threads are asked)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                if child not in out and start_time(child) is not None:
                    out.append(child)
                    todo.append(child)
    return out


def identity(pid: int | None = None) -> dict[str, Any]:
    """What to record about ``pid`` (default: this process) to find it again."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "start_time": start_time(pid)}


def is_running(recorded: dict[str, Any], marker: str) -> bool:
    """True if the recorded process runs on this host, started when recorded, with ``marker``
    in its command line."""
    pid = recorded.get("pid")
    if not isinstance(pid, int) or recorded.get("host") != socket.gethostname():
        return False
    if start_time(pid) != recorded.get("start_time"):
        return False
    return marker in cmdline(pid)


def unblock_signals() -> None:
    """Take no blocked signals from whoever started us: the bridge blocks SIGINT, SIGTERM and
    SIGHUP in all its threads (so that a frontend's signal to its process group does not reach
    its children), and a daemon of ours that it starts must still stop on them."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


PARENT_VARIABLE = "HPC_KERNELS_PARENT"  # "PID:START_TIME" of the process that must outlive us
PARENT_CHECK_SECONDS = 2.0


def parent_variable(pid: int | None = None) -> dict[str, str]:
    """The variable that tells a process we start whom to end with (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return {PARENT_VARIABLE: f"{pid}:{start_time(pid)}"}


def watch_parent(environ: dict[str, str] | os._Environ[str], gone: Any) -> threading.Thread | None:
    """If ``HPC_KERNELS_PARENT`` names a process, call ``gone()`` once it no longer runs (checked
    every 2 s): a process of ours started detached (in a session of its own) still ends with
    whoever started it, whatever the site's proctrack plugin makes of a reparented process.
    (PR_SET_PDEATHSIG would fire when the starting *thread* ends, which a thread pool's do.)"""
    value = environ.get(PARENT_VARIABLE, "")
    pid, _, started = value.partition(":")
    if not pid.isdigit():
        return None

    def run() -> None:
        while str(start_time(int(pid))) == started:
            time.sleep(PARENT_CHECK_SECONDS)
        gone()

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def terminate(recorded: dict[str, Any], marker: str, timeout: float) -> None:
    """SIGTERM the recorded process if it is still ours, then SIGKILL it after ``timeout`` s."""
    if not is_running(recorded, marker):
        return
    pid = int(recorded["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_running(recorded, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_running(recorded, marker):
        os.kill(pid, signal.SIGKILL)
