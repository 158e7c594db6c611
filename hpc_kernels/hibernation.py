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
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .kernel_hibernate import ACTIVITY, REPORT, REQUEST, RESTORED, SNAPSHOT
from .paths import atomic_file, open_regular, read_json, read_untrusted_json, write_json
from .processes import identity, is_running
from .protocol import SOCKET_NAMES

CLIENTS_DIR = "clients"
NODE_SIDE_MARKER = "hpc_kernels.relay"  # in the command line of a relay's node side
SHELL = SOCKET_NAMES.index("shell")  # clients are counted by their shell channels
SNAPSHOT_NAME = "namespace.pickle"
REPORT_NAME = "report.json"
SAVE_TIMEOUT = 300.0
REPORT_MAX_BYTES = 16 << 20


def counts_clients(node_dir: Path) -> bool:
    """Whether the kernel's agent wants its clients counted (it may hibernate)."""
    return (node_dir / CLIENTS_DIR).is_dir()


def clients_file(node_dir: Path, pid: int) -> Path:
    return node_dir / CLIENTS_DIR / f"{pid}.json"


def write_clients(node_dir: Path, shell: int) -> None:
    """What a relay's node side (this process) says: how many shell channels (clients) it
    carries now. The agent made the directory; once it is gone (the kernel ended), nothing is written."""
    write_json(clients_file(node_dir, os.getpid()), {**identity(), "shell": shell})


def shell_clients(node_dir: Path) -> int:
    """Clients of the kernel, over the node sides that still run (a reused pid is not one)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for path in (node_dir / CLIENTS_DIR).iterdir():
            report = read_json(path) if path.suffix == ".json" else None
            if isinstance(report, dict) and is_running(report, NODE_SIDE_MARKER):
                total += int(report.get("shell", 0))
    return total


def idle_since(activity: dict[str, Any], last_client: float) -> float | None:
    """Since when the kernel has been idle (no cell and no client), or None while a cell runs."""
    if activity.get("busy"):
        return None
    return max(float(activity.get("last", 0)), last_client)


def _private_dirs(base: Path, *names: str) -> Path:
    """``base/names...``: each level a directory of ours (not a link), made 0700 when new; the
    last one 0700 whatever it was."""
    path = base
    for name in names:
        path = path / name
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{path} is not a directory of ours")
    if stat.S_IMODE(path.lstat().st_mode) != 0o700:
        os.chmod(path, 0o700)  # only the kernel's own: the levels above may be shared on purpose
    return path


def snapshot_dir(workspace: str | None, state_root: Path, name: str) -> Path:
    """Where a hibernated kernel's variables go: its workspace, else the state root; every
    directory made there is private (a workspace may be shared with a group)."""
    if workspace and os.access(workspace, os.W_OK):
        try:
            return _private_dirs(Path(workspace), ".hpc-kernels-hibernated", name)
        except OSError:
            pass
    state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _private_dirs(state_root, "hibernated", name)


def copy_checked(source: Path, target: Path) -> str:
    """Copy ``source`` (see :func:`open_regular`) to ``target`` atomically (0600); its SHA-256."""
    digest = hashlib.sha256()
    with atomic_file(target, 0o600) as out, open_regular(source) as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class IdleWatch:
    """A thread of the agent: when the kernel has been idle for ``timeout`` seconds (0: never),
    asks it for its variables and hands them to ``hibernated(snapshot, report, sha256)``. For a
    resumed kernel, it also says once the kernel has loaded its saved variables (``restore_source``)."""

    def __init__(self, node_dir: Path, shared: Path, timeout: float, destination: Callable[[], Path],
                 extra_clients: Callable[[], int], hibernated: Callable[[Path, dict[str, Any], str], None],
                 say: Callable[[str], None], restore_source: Path | None = None) -> None:
        self.node_dir = node_dir  # the private part: the relay node sides' client counts
        self.shared = shared  # what the kernel writes (and may forge): its activity, report, snapshot
        self.restore_source = restore_source
        self.timeout = timeout
        self.destination = destination
        self.extra_clients = extra_clients
        self.hibernated = hibernated
        self.say = say
        self.every = max(0.5, min(5.0, timeout / 5)) if timeout > 0 else 2.0
        self.last_client = time.time()
        self.stop_event = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="idle-watch", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()

    def clients(self) -> int:
        return shell_clients(self.node_dir) + self.extra_clients()

    def idle_since(self) -> float | None:
        """Since when neither a cell nor a client was seen; None while a cell runs or a client is there."""
        if self.clients():
            self.last_client = time.time()
            return None
        return idle_since(read_untrusted_json(self.shared / ACTIVITY) or {}, self.last_client)

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.forget_restored()
                if self.timeout <= 0:
                    continue
                since = self.idle_since()
                if since is not None and time.time() - since >= self.timeout and self.try_save(since):
                    return
            except Exception as e:  # noqa: BLE001 (the watch must outlive a bad file or a race)
                self.say(f"idle watch: {type(e).__name__}: {e}")

    def forget_restored(self) -> None:
        """A resumed kernel has loaded its variables: say so. The saved copy stays (the resumed
        kernel may crash, or its job fail) until a new hibernation replaces it or a shutdown
        discards it."""
        if self.restore_source is None or not (self.shared / RESTORED).exists():
            return
        restored = read_untrusted_json(self.shared / RESTORED) or {}
        self.say(f"resumed: {len(restored.get('restored', []))} variables restored, "
                 f"{len(restored.get('failed', {}))} not (the saved copy stays until a shutdown)")
        self.restore_source = None

    def try_save(self, since: float) -> bool:
        try:
            return self.save(since)
        except Exception as e:  # noqa: BLE001 (a full disk, a bad report): not again at once
            return self._give_up(f"{type(e).__name__}: {e}")

    def save(self, since: float) -> bool:
        """Ask the kernel for its variables and move them into place, unless someone came back
        meanwhile; False if nothing was saved (the watch goes on)."""
        self.say(f"idle for {self.timeout:.0f} s (no cell, no client): hibernating")
        for stale in (SNAPSHOT, REPORT, REQUEST):
            with contextlib.suppress(FileNotFoundError):
                (self.shared / stale).unlink()
        os.close(os.open(self.shared / REQUEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        deadline = time.monotonic() + SAVE_TIMEOUT
        while not (self.shared / REPORT).exists():
            if self.stop_event.wait(0.2) or time.monotonic() > deadline:
                return self._give_up("the kernel did not answer")
        report = read_untrusted_json(self.shared / REPORT, REPORT_MAX_BYTES)
        if not isinstance(report, dict):
            return self._give_up("the kernel's report is not a JSON object of at most 16 MiB in a regular file")
        if report.get("error"):
            return self._give_up(f"the kernel could not save its variables: {report['error']}")
        now_since = self.idle_since()
        if now_since is None or now_since > since:
            return self._give_up("a cell ran or a client came meanwhile")
        directory = self.destination()
        sha256 = copy_checked(self.shared / SNAPSHOT, directory / SNAPSHOT_NAME)
        write_json(directory / REPORT_NAME, report)
        self.hibernated(directory / SNAPSHOT_NAME, report, sha256)
        return True

    def _give_up(self, why: str) -> bool:
        self.say(f"not hibernating: {why}")
        for stale in (SNAPSHOT, REPORT, REQUEST):
            with contextlib.suppress(FileNotFoundError):
                (self.shared / stale).unlink()
        self.last_client = time.time()  # a full timeout again before the next try
        return False
