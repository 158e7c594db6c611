"""A kernel's directory in node-local tmp: its layout by trust zone, and the sweep of what a
killed job left there.

Each kernel's agent makes ``<node tmp>/hk-<job id>-<random>/`` (0700) and removes it when it
ends. Inside, what the sandbox may write is kept apart from what processes outside it read:

- ``rw/``: bound read-write into the sandbox. The kernel's connection file (ipykernel 6 writes
  it again) and its five sockets, the egress proxy's socket, IPython's directory with the
  startup code (IPython insists on writing there), and what the kernel reports to the agent
  (``limits.json``, hibernation's files). The agent and the relay read nothing here without
  checking it (a regular file or socket of ours, not a link, size capped); nothing outside
  reads the connection file back or runs what is here.
- ``ro/``: bound read-only. What the agent tells the kernel as it runs: the deadline.
- everything else stays outside the sandbox: ``client/`` (the connection file a frontend on this
  node uses), ``clients/`` (the relay node sides' client counts), ``empty/``.

An agent that cannot remove its directory (SIGKILL after Slurm's KillWait, a node that
rebooted with a persistent /tmp) leaves it behind; so the next
kernel of the same user on that node, before it starts, removes every such directory of that
user whose job Slurm no longer runs. Nothing is removed unless all of this holds: the name is
ours, the entry is a real directory (not a link) owned by this user, it is not this job's, and
Slurm answered for the job and said it is over (or forgot it). Another user's directories and
a running job's are never touched; when Slurm cannot be asked, nothing is.

Pure parts (the name, the choice) are separate from the one function that reads and removes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

NODE_DIR_PREFIX = "hk-"
SANDBOX_RW = "rw"
SANDBOX_RO = "ro"
CONNECTION_FILE = "kernel.json"
# tempfile.mkdtemp(prefix="hk-<job>-") adds 8 characters of [a-z0-9_].
_NODE_DIR = re.compile(r"^hk-(\d+)-[a-z0-9_]{8}$")


def node_dir_prefix(job_id: str) -> str:
    return f"{NODE_DIR_PREFIX}{job_id}-"


def sandbox_rw(node_dir: Path) -> Path:
    """Bound read-write into the sandbox: the kernel's sockets and reports."""
    return node_dir / SANDBOX_RW


def sandbox_ro(node_dir: Path) -> Path:
    """Bound read-only into the sandbox: what the agent gives the kernel."""
    return node_dir / SANDBOX_RO


def kernel_socket_base(node_dir: Path) -> Path:
    """The kernel binds ``<this>-1`` .. ``<this>-5`` (ZeroMQ ipc)."""
    return sandbox_rw(node_dir) / "kernel"


def kernel_connection_file(node_dir: Path) -> Path:
    """The kernel's own connection file: in ``rw/``, since ipykernel 6 writes it again once its
    sockets are bound. Nothing outside the sandbox reads it back (the key is in the state)."""
    return sandbox_rw(node_dir) / CONNECTION_FILE


def make_node_dir(root: Path, job_id: str) -> Path:
    """A fresh node directory (0700) with its ``rw/`` and ``ro/`` parts."""
    node_dir = Path(tempfile.mkdtemp(prefix=node_dir_prefix(job_id), dir=root))
    sandbox_rw(node_dir).mkdir(mode=0o700)
    sandbox_ro(node_dir).mkdir(mode=0o700)
    return node_dir


def node_dir_job(name: str) -> str | None:
    """The job id in a node directory's name, or None if the name is not one of ours."""
    match = _NODE_DIR.match(name)
    return match.group(1) if match else None


def stale_candidates(root: Path, uid: int, own_job: str) -> dict[Path, str]:
    """Directories in ``root`` that look like node directories of user ``uid`` of other jobs:
    path -> job id. Links and other users' entries are left out (lstat, never followed)."""
    found: dict[Path, str] = {}
    try:
        names = os.listdir(root)
    except OSError:
        return found
    for name in names:
        job = node_dir_job(name)
        if job is None or job == own_job:
            continue
        try:
            st = os.lstat(root / name)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            found[root / name] = job
    return found


def sweep_stale_node_dirs(root: Path, own_job: str, jobs_alive: Callable[[Iterable[str]], set[str]],
                          *, uid: int | None = None) -> list[Path]:
    """Remove this user's node directories in ``root`` whose jobs have ended; return them.

    ``jobs_alive(ids)`` is the subset of ``ids`` that Slurm still runs (or may run again: pending,
    requeued, suspended); it raises if Slurm cannot say, and then nothing is removed."""
    candidates = stale_candidates(root, os.getuid() if uid is None else uid, own_job)
    if not candidates:
        return []
    alive = jobs_alive(sorted(set(candidates.values())))
    removed = []
    for path, job in sorted(candidates.items()):
        if job in alive:
            continue
        # rmtree works through directory file descriptors and does not follow links in the tree.
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed
