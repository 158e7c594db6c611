"""Per-kernel state on the shared file system.

One private directory per kernel, ``<state root>/kernels/<name>/``::

    record.json   the login side's record (job id, profile, node, status, paths)
    key           the HMAC key, 0600: read by the node agent, never passed on a command line
    launch.json   what the node agent needs to start the kernel (no secrets)
    job.sh        the rendered batch script, as submitted
    job.log       the job's output: agent messages and the kernel's stderr
    agent.json    written by the node agent: node, node-side directory, readiness or failure
    relay.json    written by the login-side relay: its pid and the login-side connection file
    relay.log     the login-side relay's messages

Every file is written atomically (temp file + rename). Commands that create, change or remove a
kernel hold an exclusive lock on ``<state root>/kernels/.<name>.lock``, so two commands at once
cannot interleave.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import KernelNotFound
from .paths import ensure_kernels_root, kernels_root, read_json, write_json


@dataclass
class KernelRecord:
    name: str
    profile: str
    status: str  # submitting, submitted, ready, failed
    job_id: str | None = None
    submit_time: str | None = None  # Slurm's SubmitTime: with job_id, it names the job
    step: dict[str, Any] | None = None  # in someone's allocation: the srun that runs our step,
    # or, on the node itself (on_node), the agent we started there
    on_node: bool = False  # started by a frontend on its own node: no step, no relay
    node: str | None = None
    workspace: str | None = None
    workspace_rw: bool = False
    created: float = field(default_factory=time.time)
    message: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class KernelFiles:
    """The paths of one kernel's state directory."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    record = property(lambda self: self.dir / "record.json")
    key = property(lambda self: self.dir / "key")
    launch = property(lambda self: self.dir / "launch.json")
    script = property(lambda self: self.dir / "job.sh")
    log = property(lambda self: self.dir / "job.log")
    agent = property(lambda self: self.dir / "agent.json")
    relay = property(lambda self: self.dir / "relay.json")
    relay_log = property(lambda self: self.dir / "relay.log")
    curve = property(lambda self: self.dir / "curve.json")  # CurveZMQ keys of the kernel's sockets (0600)
    restart_request = property(lambda self: self.dir / "restart")  # the provisioner asks for a restart in the job
    shutdown_request = property(lambda self: self.dir / "shutdown")  # a shutdown without restart was asked for


def kernel_files(name: str) -> KernelFiles:
    return KernelFiles(kernels_root() / name)


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the per-kernel lock (blocking) for the duration of the block."""
    with file_lock(ensure_kernels_root() / f".{name}.lock"):
        yield


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created 0600) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_kernel_dir(name: str) -> KernelFiles:
    ensure_kernels_root()
    files = kernel_files(name)
    files.dir.mkdir(mode=0o700)
    return files


def save_record(record: KernelRecord) -> None:
    write_json(kernel_files(record.name).record, asdict(record))


def load_record(name: str) -> KernelRecord:
    data = read_json(kernel_files(name).record)
    if data is None:
        known = ", ".join(r.name for r in list_records()) or "none"
        raise KernelNotFound(f"no kernel named {name!r} (your kernels: {known})")
    return KernelRecord.from_json(data)


def list_records() -> list[KernelRecord]:
    root = kernels_root()
    if not root.is_dir():
        return []
    records = []
    for entry in sorted(root.iterdir()):
        data = read_json(entry / "record.json") if entry.is_dir() else None
        if data is not None:
            records.append(KernelRecord.from_json(data))
    return records


def remove_kernel_dir(name: str) -> None:
    shutil.rmtree(kernel_files(name).dir, ignore_errors=True)
