"""Sandbox runtimes: how the kernel's command line is wrapped so that it runs isolated.

Pure functions only: a :class:`SandboxSpec` becomes an argv and an environment. The node agent
runs them. bubblewrap is the only runtime so far; Apptainer comes next (see the issues).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Variables of the job's environment that the kernel may see; everything else (the login
# node's environment, which sbatch exports into the job) stays outside the sandbox.
PASSED_ENVIRONMENT = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
    "SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
    "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_CLUSTER_NAME", "SLURMD_NODENAME",
    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
    "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS",
)

SANDBOX_HOME = "/tmp"


@dataclass(frozen=True)
class SandboxSpec:
    """What the sandbox must look like.

    ``hide`` lists directories replaced by an empty tmpfs (home directories, /run with its
    daemon sockets, ...); only ones that exist on the node should be given. ``node_dir`` is the
    private directory holding the kernel's sockets and connection file, bound read-write.
    """

    node_dir: str
    hide: Sequence[str]
    workspace: str | None = None
    workspace_rw: bool = False
    binds: Sequence[str] = ()  # "PATH", "PATH:ro" or "PATH:rw", bound at the same path
    env: Mapping[str, str] = field(default_factory=dict)


def _hidden_paths(paths: Sequence[str]) -> list[str]:
    """Sorted, without duplicates and without paths already under another hidden path."""
    out: list[str] = []
    for path in sorted({p.rstrip("/") or "/" for p in paths}):
        if path in ("/", "/tmp") or any(path.startswith(parent + "/") for parent in out):
            continue
        out.append(path)
    return out


def bwrap_argv(spec: SandboxSpec, kernel_argv: Sequence[str], bwrap: str = "bwrap") -> list[str]:
    """The bubblewrap command line that runs ``kernel_argv`` in the sandbox.

    Every namespace bwrap knows is unshared (user, pid, ipc, uts, net, cgroup): the network
    namespace has only a loopback device, so any connection out fails with "Network is
    unreachable". The host root is mounted read-only, /tmp is a private tmpfs, home
    directories are hidden, and the sandbox dies with the agent that started it.
    """
    argv = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
    ]
    for path in _hidden_paths(spec.hide):
        argv += ["--tmpfs", path]
    bound = []
    for bind in spec.binds:
        path, _, mode = bind.partition(":")
        argv += ["--bind" if mode == "rw" else "--ro-bind", path, path]
        bound.append(path)
    argv += ["--bind", spec.node_dir, spec.node_dir]
    if spec.workspace:
        argv += ["--bind" if spec.workspace_rw else "--ro-bind", spec.workspace, spec.workspace]
        bound.append(spec.workspace)
    # A hidden path inside something bound (the state directory inside a workspace, say) stays hidden.
    for path in sorted({p.rstrip("/") for p in spec.hide}):
        if any(path.startswith(b.rstrip("/") + "/") for b in bound):
            argv += ["--tmpfs", path]
    argv += ["--chdir", spec.workspace or SANDBOX_HOME, "--", *kernel_argv]
    return argv


def sandbox_environment(job_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The kernel's environment: a short allowlist from the job, HOME in the sandbox, then ``extra``."""
    env = {
        name: value
        for name, value in job_env.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in PASSED_ENVIRONMENT)
    }
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = SANDBOX_HOME
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
