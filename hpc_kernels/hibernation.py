"""Idle hibernation (``limits.idle_timeout``, ``submit --idle-timeout``): a kernel nobody uses
gives its node back, and ``submit --resume`` brings its variables back on a new job.

Idle means: no cell has run, and no client has had a shell channel open, for the timeout.
The kernel says when a cell last ran (:mod:`hpc_kernels.kernel_hibernate` writes
``activity.json``); the relay's node sides say how many clients they carry (each srun or ssh
node side writes ``clients/<pid>.json``, and the agent counts its own tcp listener's). A client
that only watches IOPub (Jupyter server's activity tracking) is not a user.

Then the agent asks the kernel for its variables, moves the snapshot to the workspace
(``.hpc-kernels-hibernated/<name>/``, else ``<state root>/hibernated/<name>/`` when there is no
workspace or it cannot be written), ends the kernel and the job, and reports ``hibernated``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .kernel_hibernate import ACTIVITY, REPORT, REQUEST, RESTORE, RESTORED, SNAPSHOT
from .paths import read_json, write_json

CLIENTS_DIR = "clients"
SHELL = 0  # the index of the shell socket in protocol.SOCKET_NAMES
SNAPSHOT_NAME = "namespace.pickle"
REPORT_NAME = "report.json"
SAVE_TIMEOUT = 300.0


def clients_file(node_dir: Path, pid: int) -> Path:
    return node_dir / CLIENTS_DIR / f"{pid}.json"


def write_clients(node_dir: Path, pid: int, shell: int) -> None:
    """What a relay's node side says: how many shell channels (clients) it carries now."""
    path = clients_file(node_dir, pid)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_json(path, {"pid": pid, "shell": shell})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def shell_clients(node_dir: Path) -> int:
    """Clients of the kernel, over the node sides that still run."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for path in (node_dir / CLIENTS_DIR).iterdir():
            report = read_json(path) if path.suffix == ".json" else None
            if isinstance(report, dict) and _alive(int(report.get("pid", 0))):
                total += int(report.get("shell", 0))
    return total


def idle_since(activity: dict[str, Any], last_client: float) -> float | None:
    """Since when the kernel has been idle (no cell and no client), or None while a cell runs."""
    if activity.get("busy"):
        return None
    return max(float(activity.get("last", 0)), last_client)


def snapshot_dir(workspace: str | None, state_root: Path, name: str) -> Path:
    """Where a hibernated kernel's variables go: its workspace, else the state root. Made 0700."""
    if workspace and os.access(workspace, os.W_OK):
        try:
            directory = Path(workspace) / ".hpc-kernels-hibernated" / name
            directory.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
            return directory
        except OSError:
            pass
    directory = state_root / "hibernated" / name
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    return directory


def _copy_atomically(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class IdleWatch:
    """A thread of the agent: when the kernel has been idle for ``timeout`` seconds, asks it for
    its variables and hands them to ``hibernated(snapshot, report)``."""

    def __init__(self, node_dir: Path, timeout: float, destination: Callable[[], Path],
                 extra_clients: Callable[[], int], hibernated: Callable[[Path, dict[str, Any]], None],
                 say: Callable[[str], None], restore_source: Path | None = None) -> None:
        self.node_dir = node_dir
        self.restore_source = restore_source  # the snapshot a resumed kernel loads: removed once it has
        self.timeout = timeout
        self.destination = destination
        self.extra_clients = extra_clients
        self.hibernated = hibernated
        self.say = say
        self.every = max(0.5, min(5.0, timeout / 5))
        self.last_client = time.time()
        self.stop_event = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="idle-watch", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.forget_restore_once_done()
            if self.timeout <= 0:
                continue
            now = time.time()
            if shell_clients(self.node_dir) + self.extra_clients():
                self.last_client = now
                continue
            since = idle_since(read_json(self.node_dir / ACTIVITY) or {}, self.last_client)
            if since is None or now - since < self.timeout:
                continue
            if self.save():
                return

    def forget_restore_once_done(self) -> None:
        """A resumed kernel has loaded its variables: the copy in the node-side directory goes
        (a restart in the job must not load them again)."""
        if not (self.node_dir / RESTORE).exists() or not (self.node_dir / RESTORED).exists():
            return
        (self.node_dir / RESTORE).unlink()
        restored = read_json(self.node_dir / RESTORED) or {}
        self.say(f"resumed: {len(restored.get('restored', []))} variables restored, "
                 f"{len(restored.get('failed', {}))} not")
        if self.restore_source is not None:
            for path in (self.restore_source, self.restore_source.with_name(REPORT_NAME)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.restore_source.parent.rmdir()

    def save(self) -> bool:
        """Ask the kernel for its variables and move them into place; False if it did not answer."""
        self.say(f"idle for {self.timeout:.0f} s (no cell, no client): hibernating")
        for stale in (SNAPSHOT, REPORT):
            with contextlib.suppress(FileNotFoundError):
                (self.node_dir / stale).unlink()
        (self.node_dir / REQUEST).touch(mode=0o600)
        deadline = time.monotonic() + SAVE_TIMEOUT
        while not (self.node_dir / REPORT).exists():
            if self.stop_event.wait(0.2) or time.monotonic() > deadline:
                self.say("hibernation: the kernel saved nothing; going on")
                with contextlib.suppress(FileNotFoundError):
                    (self.node_dir / REQUEST).unlink()
                self.last_client = time.time()
                return False
        report = json.loads((self.node_dir / REPORT).read_text())
        directory = self.destination()
        _copy_atomically(self.node_dir / SNAPSHOT, directory / SNAPSHOT_NAME)
        write_json(directory / REPORT_NAME, report)
        self.hibernated(directory / SNAPSHOT_NAME, report)
        return True
