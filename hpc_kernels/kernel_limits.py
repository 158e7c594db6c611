"""Runs inside the kernel: resource limits for the kernel and what it starts (see
:mod:`hpc_kernels.limits`). Installed by :mod:`hpc_kernels.kernel_startup`; stands alone."""

from __future__ import annotations

import json
import os
import resource
from typing import Any


def counted_per_sandbox() -> bool:
    """RLIMIT_NPROC counts this sandbox's processes only in a user namespace of its own, on Linux
    5.14 or later; elsewhere it counts all of the user's processes on the node, and is not set
    (the agent's watch still ends a kernel at the limit)."""
    try:
        with open("/proc/self/uid_map") as f:
            own_namespace = f.read().split() != ["0", "0", "4294967295"]
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except (OSError, ValueError):
        return False
    return own_namespace and (major, minor) >= (5, 14)


def install(shell: Any, processes: str, memory: str, report: str = "") -> None:
    """``processes``: RLIMIT_NPROC (see :func:`counted_per_sandbox`); ``memory``: bytes of
    RLIMIT_DATA, so one process's oversized allocation fails with MemoryError. "" leaves one alone.
    ``report``: a file to say in whether RLIMIT_NPROC was set.
    Soft and hard limits both: the sandbox has no capability to raise them again."""
    held = bool(processes) and counted_per_sandbox()
    if held:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(processes), int(processes)))
    if report:  # the agent's watch: whether RLIMIT_NPROC holds the processes here
        with open(report, "w", encoding="utf-8") as f:
            json.dump({"nproc": held}, f)
    if memory:
        resource.setrlimit(resource.RLIMIT_DATA, (int(memory), int(memory)))
