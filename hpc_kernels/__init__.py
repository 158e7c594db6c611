"""hpc-kernels: sandboxed Jupyter kernels on Slurm compute nodes, reached through a socket relay.

The public API (docs/python-api.md)::

    from hpc_kernels import Kernel, AsyncKernel, Batch

It is imported on first use, not with the package: the node agent and every short ``hpc-kernel``
command import this package too, and need none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("AsyncKernel", "Batch", "BatchTaskInfo", "ExecutionError", "ExecutionResult", "Kernel", "KernelInfo",
        "ProfileInfo")
__all__ = [*_API, "__version__"]

if TYPE_CHECKING:
    from .api import (AsyncKernel, Batch, BatchTaskInfo, ExecutionError, ExecutionResult, Kernel, KernelInfo,
                      ProfileInfo)


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpc_kernels' has no attribute {name!r}")
