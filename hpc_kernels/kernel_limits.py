"""Runs inside the kernel: resource limits for the kernel and what it starts (see
:mod:`hpc_kernels.limits`). Installed by :mod:`hpc_kernels.kernel_startup`; stands alone."""

from __future__ import annotations

import resource
from typing import Any


def install(shell: Any, processes: str, memory: str) -> None:
    """``processes``: RLIMIT_NPROC (counted in the sandbox's user namespace); ``memory``: bytes of
    RLIMIT_DATA, so one process's oversized allocation fails with MemoryError. "" leaves one alone.
    Soft and hard limits both: the sandbox has no capability to raise them again."""
    if processes:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(processes), int(processes)))
    if memory:
        resource.setrlimit(resource.RLIMIT_DATA, (int(memory), int(memory)))
