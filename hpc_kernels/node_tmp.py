"""What a kernel leaves in node-local tmp, and the sweep of what a killed job left there.

Each kernel's agent makes ``<node tmp>/hk-<job id>-<random>/`` (0700: the kernel's connection
file with its key, its sockets) and removes it when it ends. An agent that cannot (SIGKILL after
Slurm's KillWait, a node that rebooted with a persistent /tmp) leaves it behind; so the next
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
from collections.abc import Callable, Iterable
from pathlib import Path

NODE_DIR_PREFIX = "hk-"
# tempfile.mkdtemp(prefix="hk-<job>-") adds 8 characters of [a-z0-9_].
_NODE_DIR = re.compile(r"^hk-(\d+)-[a-z0-9_]{8}$")


def node_dir_prefix(job_id: str) -> str:
    return f"{NODE_DIR_PREFIX}{job_id}-"


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
