"""A kernel that a Jupyter frontend started ends when that frontend's process is gone.

A local Jupyter kernel dies with the process that started it: jupyter_client passes its pid as
``JPY_PARENT_PID`` and ipykernel exits when that parent is gone (jupyter_server relies on it:
"the kernels will shutdown themselves when this process no longer exists"). A kernel the
provisioner submitted runs in a Slurm job that knows nothing of that process, so a Jupyter
server killed with SIGKILL (or an nbclient script that exits without shutting its kernel down)
would leave the job running, or waiting in the queue, until its time limit.

So the provisioner *claims* each kernel it starts in a job: ``frontend.json`` in the kernel's
state directory names the claiming process (host, pid, start time), a random claim token and a
grace period. A watcher (``python -I -m hpc_kernels.frontend_watch STATE_DIR TOKEN``), started
detached on the same login node, checks that process every 2 s. Once it is gone, the watcher
waits the grace period, then shuts the kernel down as ``hpc-kernel shutdown`` does, unless
another process took the kernel over meanwhile (``load_provisioner_info`` claims it anew, with
a new token: the old watcher then leaves). A shutdown by the frontend itself or by
``hpc-kernel shutdown`` removes the state directory, and the watcher leaves too.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from .errors import HpcKernelsError, KernelNotFound
from .paths import kernels_root, write_json
from .processes import identity, python_module, start_time, unblock_signals
from .state import KernelFiles, kernel_files, load_record, locked, state_json

CHECK_SECONDS = 2.0
WATCH_MODULE = "hpc_kernels.frontend_watch"

Step = Literal["watch", "leave", "end"]

# The watchers this process started, kept to reap them (a long-lived Jupyter server would
# otherwise collect a zombie per kernel it shut down).
_watchers: list[subprocess.Popen[bytes]] = []


def claim_file(files: KernelFiles) -> Path:
    return files.dir / "frontend.json"


def watch_log(files: KernelFiles) -> Path:
    return files.dir / "frontend-watch.log"


def new_claim(owner: dict[str, Any], grace: float) -> dict[str, Any]:
    """What ``frontend.json`` holds: the owner's identity (see :func:`processes.identity`), a
    fresh token and the grace period."""
    if not grace > 0:
        raise HpcKernelsError(f"orphan_timeout: {grace!r} is not valid: expected a number of seconds above 0")
    return {**owner, "token": secrets.token_hex(8), "grace": float(grace)}


def owner_alive(claim: dict[str, Any]) -> bool:
    """The claiming process still runs (checked on its host, by pid and start time)."""
    pid = claim.get("pid")
    return (isinstance(pid, int) and claim.get("host") == socket.gethostname()
            and start_time(pid) == claim.get("start_time"))


def next_step(claim: dict[str, Any], token: str, alive: bool, gone_for: float | None) -> Step:
    """What a watcher with ``token`` does next (pure): ``leave`` when the claim is no longer its
    own (taken over, or being ended by another); ``end`` when its owner has been gone for the
    grace period; else ``watch``."""
    if claim.get("token") != token or claim.get("ending"):
        return "leave"
    if alive or gone_for is None:
        return "watch"
    return "end" if gone_for >= float(claim.get("grace") or 0) else "watch"


def claim(name: str, grace: float, *, owner: dict[str, Any] | None = None, start: bool = True) -> str:
    """Make ``owner`` (this process by default) the frontend of kernel ``name``: the kernel ends
    ``grace`` seconds after it is gone, unless claimed again. Starts the watcher here (unless
    ``start`` is false: the caller runs :func:`watch`). Returns the claim's token."""
    files = kernel_files(name)
    with locked(name):
        load_record(name)  # KernelNotFound once it was shut down
        if state_json(claim_file(files)).get("ending"):
            raise HpcKernelsError(f"kernel {name!r} is being shut down: the frontend that started it has gone")
        record = new_claim(owner or identity(), grace)
        write_json(claim_file(files), record)
    if start:
        _start_watcher(files, record["token"])
    return str(record["token"])


def _start_watcher(files: KernelFiles, token: str) -> None:
    """The watcher, in a session of its own (a Ctrl-C at the frontend's terminal, or a signal to
    its process group, does not reach it), in ``/``, its output appended to its log."""
    _watchers[:] = [w for w in _watchers if w.poll() is None]
    fd = os.open(watch_log(files), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _watchers.append(subprocess.Popen(python_module(sys.executable, WATCH_MODULE, str(files.dir), token),
                                          stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                          close_fds=True, cwd="/"))
    finally:
        os.close(fd)


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} frontend watch: {message}", flush=True)


def watch(files: KernelFiles, token: str, *, check_seconds: float = CHECK_SECONDS) -> str:
    """Follow the claim ``token`` of the kernel in ``files`` until it ends; returns why."""
    gone_since: float | None = None
    while True:
        try:
            if not files.record.exists():
                return "the kernel was shut down"
            current = state_json(claim_file(files))
        except OSError as e:  # a shared file system's hiccup: no news is not an ending
            _say(f"cannot read {files.dir}: {e}")
            time.sleep(check_seconds)
            continue
        alive = owner_alive(current)
        if not alive and gone_since is None and current.get("token") == token:
            gone_since = time.monotonic()
            _say(f"the frontend that holds kernel {files.name} (pid {current.get('pid')} on {current.get('host')}) "
                 f"is gone: the kernel ends in {current.get('grace')} s unless another frontend takes it over")
        step = next_step(current, token, alive, None if gone_since is None else time.monotonic() - gone_since)
        if step == "leave":
            return "another frontend took the kernel over" if current.get("token") else "the kernel was shut down"
        if step == "end":
            return _end(files, token)
        time.sleep(check_seconds)


def _end(files: KernelFiles, token: str) -> str:
    from . import launcher  # only now: a watcher that never ends its kernel stays small

    with locked(files.name):  # a frontend that takes the kernel over now finds it ending (claim)
        current = state_json(claim_file(files))
        if current.get("token") != token or not files.record.exists():
            return "another frontend took the kernel over"
        write_json(claim_file(files), {**current, "ending": True})
    try:
        launcher.shutdown(files.name, progress=_say)
    except KernelNotFound:
        return "the kernel was shut down"
    return f"shut kernel {files.name} down: its frontend had gone"


def main(argv: list[str] | None = None) -> int:
    unblock_signals()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m {WATCH_MODULE} STATE_DIR TOKEN", file=sys.stderr)
        return 2
    state_dir = Path(args[0])
    if state_dir.parent != kernels_root():
        print(f"{WATCH_MODULE}: {state_dir} is not a kernel's state directory (in {kernels_root()})", file=sys.stderr)
        return 2
    try:
        _say(watch(KernelFiles(state_dir), args[1]))
    except HpcKernelsError as e:
        _say(f"could not end kernel {state_dir.name}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
