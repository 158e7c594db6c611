"""Per-kernel state on the shared file system.

One private directory per kernel, ``<state root>/kernels/<name>/``::

    record.json   the login side's record (job id, profile, node, status, paths)
    key           the HMAC key, 0600: read by the node agent, never passed on a command line
    launch.json   what the node agent needs to start the kernel (no secrets)
    job.sh        the rendered batch script, as submitted
    job.log       the job's output: agent messages and the kernel's stderr
    agent.json    written by the node agent: node, node-side directory, readiness or failure
    relay-<host>.json  written by the login-side relay on login node <host>: its daemon's pid
                  and the login-side connection file (each login node relays on its own)
    relay.log     the login-side relays' messages

Every file is written atomically (temp file + rename). Commands that create, change or remove a
kernel hold an exclusive lock on ``<state root>/kernels/.<name>.lock``, so two commands at once
cannot interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DamagedState, KernelNotFound
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
    request: dict[str, Any] = field(default_factory=dict)  # command-line settings a resume keeps

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
    # Each login node has its own relay of the kernel (its sockets are in that node's runtime dir).
    relay = property(lambda self: self.dir / f"relay-{socket.gethostname()}.json")
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
    data = read_record(kernel_files(name))
    if data is None:
        known = ", ".join([r.name for r in list_records()] + [f"{d.kernel} (damaged)" for d in damaged_kernels()])
        known = known or "none"
        raise KernelNotFound(f"no kernel named {name!r} (your kernels: {known})")
    return data


def read_record(files: KernelFiles) -> KernelRecord | None:
    """The kernel's record; None when it has none; DamagedState when it cannot be read (a
    file system that lost a write, a hand edit): records are written atomically, never half."""
    try:
        data = read_json(files.record)
        return None if data is None else KernelRecord.from_json(data)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise DamagedState(f"kernel {files.name!r}: its state file {files.record} is damaged ({e}); "
                           f"`hpc-kernel shutdown {files.name}` ends its job if one runs and removes it",
                           files.name) from None


def list_records() -> list[KernelRecord]:
    """Every kernel whose record can be read (see :func:`damaged_kernels` for the others)."""
    records = []
    for files in _kernel_dirs():
        with contextlib.suppress(DamagedState):
            record = read_record(files)
            if record is not None:
                records.append(record)
    return records


def damaged_kernels() -> list[DamagedState]:
    """Why each kernel directory whose record cannot be read is damaged."""
    damaged = []
    for files in _kernel_dirs():
        try:
            read_record(files)
        except DamagedState as e:
            damaged.append(e)
    return damaged


def _kernel_dirs() -> list[KernelFiles]:
    root = kernels_root()
    if not root.is_dir():
        return []
    return [KernelFiles(entry) for entry in sorted(root.iterdir()) if entry.is_dir()]


def state_json(path: Path) -> dict[str, Any]:
    """agent.json or a relay record, {} when missing or unreadable: they say what a process last
    reported; the record (and Slurm) decide, and a damaged one is written again by its owner."""
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
        return {}
    return data if isinstance(data, dict) else {}


def kernel_lives(agent: dict[str, Any]) -> bool:
    """What the agent last said (agent.json): its kernel runs, or is being restarted in the job."""
    return agent.get("state") in ("ready", "starting")


SECRET_FILES = ("key", "curve.json", "tls-ca.pem", "tls-node.pem", "tls-login.pem")


def forget_secrets(files: KernelFiles) -> None:
    """Remove the kernel's HMAC key, CurveZMQ keys and TLS credentials: once its kernel has ended
    for good, nothing may connect to it again, and no secret should outlive it on disk."""
    for name in SECRET_FILES:
        with contextlib.suppress(FileNotFoundError):
            (files.dir / name).unlink()


def remove_kernel_dir(name: str) -> None:
    shutil.rmtree(kernel_files(name).dir, ignore_errors=True)
