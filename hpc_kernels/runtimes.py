"""Sandbox runtimes: how the kernel's command line is wrapped so that it runs isolated.

Pure functions only: a :class:`SandboxSpec` becomes an argv and an environment. The node agent
runs them. Three runtimes: bubblewrap (the node's own root file system, read-only), Apptainer
(a kernel image) and rootless podman (an OCI image). All give the kernel no network, no home, a private /tmp, the node-side socket
directory, the workspace (read-only unless asked) and, when Slurm gave the job GPUs, those GPUs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .node_tmp import sandbox_ro, sandbox_rw

# Variables of the job's environment that the kernel may see; everything else (the login
# node's environment, which sbatch exports into the job) stays outside the sandbox.
PASSED_ENVIRONMENT = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
    "SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
    "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_CLUSTER_NAME", "SLURMD_NODENAME",
    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE",
    "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS",
)

SANDBOX_HOME = "/tmp"

# Set to the job's CPUs in the kernel's environment unless the job or the profile sets them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

RUNTIME_KINDS = ("bwrap", "apptainer", "podman")

# runtime.podman_storage: where podman keeps images and containers. ``node``: a per-user storage
# on node-local tmp, kept between jobs; ``job``: one for the job, removed at its end; ``site``:
# podman's own configuration (podman-hpc, a storage.conf), no --root/--runroot given.
PODMAN_STORAGE_MODES = ("node", "job", "site")
# runtime.podman_gpus: how the GPUs Slurm gave reach the container. ``cdi``: --device
# nvidia.com/gpu=N (the NVIDIA Container Toolkit's CDI spec); ``podman-hpc``: its --gpu;
# ``devices``: the device nodes themselves (the driver libraries must be in the image).
PODMAN_GPU_MODES = ("cdi", "podman-hpc", "devices")

_IMAGE_REFERENCE = re.compile(
    r"[a-z0-9][a-z0-9._\-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._\-]*)*(:[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})?"
    r"(@sha256:[0-9a-f]{64})?")

# What of the node bubblewrap shows the kernel (read-only), unless a profile says otherwise
# (runtime.system_paths): the programs, libraries and configuration a Python needs, and /opt,
# where sites keep software. Nothing else of the node: no /var (Slurm's spool, with the job's
# step sockets), no /run (daemon sockets), no /home, no /sys.
DEFAULT_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")

# NVIDIA device nodes every GPU process needs besides its /dev/nvidiaN (those present are bound).
NVIDIA_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")

# Of the job's environment, what the Apptainer binary itself may see. Site modules often set
# APPTAINER_BINDPATH and the like, which would bind more of the node into the container: only
# these pass (the kernel's own variables reach it as APPTAINERENV_*).
APPTAINER_PROCESS_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_*", "TZ",
                                 "APPTAINER_TMPDIR", "APPTAINER_CACHEDIR")


@dataclass(frozen=True)
class SandboxSpec:
    """What the sandbox must look like.

    bubblewrap shows only ``system_paths`` of the node (read-only; ``system_links`` are those
    that are symbolic links there, as /bin -> usr/bin: (path, target)), the binds and the
    workspace. ``hide`` lists directories replaced by an empty tmpfs (home directories, ...);
    only ones that exist on the node should be given. ``node_dir`` is the
    kernel's private directory on the node: only its ``rw/`` part (the kernel's sockets and
    reports, its connection file) is bound read-write, its ``ro/`` part (the deadline) read-only,
    and the rest (what processes outside read and trust) not at all.
    """

    node_dir: str
    hide: Sequence[str]
    workspace: str | None = None
    workspace_rw: bool = False
    binds: Sequence[str] = ()  # "PATH", "PATH:ro" or "PATH:rw", bound at the same path
    gpu_devices: Sequence[str] = ()  # device nodes of the GPUs Slurm allocated (bwrap binds them)
    gpus: bool = False  # Slurm allocated GPUs: Apptainer adds --nv
    system_paths: Sequence[str] = DEFAULT_SYSTEM_PATHS
    system_links: Sequence[tuple[str, str]] = ()
    disable_userns: bool = False  # bubblewrap >= 0.8: no user namespaces inside (--disable-userns)
    tmpfs_size: int | None = None  # bubblewrap >= 0.8: each tmpfs at most this many bytes (--size)


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
    unreachable"; with ``disable_userns`` the kernel can make no user namespace of its own. Of
    the node's files only the system paths are there, read-only (deny by default: what is not
    named is not in the sandbox); /tmp is a private tmpfs, home directories are hidden, and the
    sandbox dies with the agent that started it.
    """
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
    if spec.disable_userns:
        argv += ["--unshare-user", "--disable-userns"]
    for path in spec.system_paths:
        argv += ["--ro-bind", path, path]
    for path, target in spec.system_links:
        argv += ["--symlink", target, path]
    size = ["--size", str(spec.tmpfs_size)] if spec.tmpfs_size else []
    argv += ["--dev", "/dev", "--proc", "/proc", *size, "--tmpfs", "/tmp"]
    if spec.gpus:
        argv += ["--ro-bind", "/sys", "/sys"]  # GPU libraries find their devices there
    for path in _hidden_paths(spec.hide):
        if any(_under(path, shown) for shown in spec.system_paths):
            argv += [*size, "--tmpfs", path]
    bound = []
    for bind in spec.binds:
        path, _, mode = bind.partition(":")
        argv += ["--bind" if mode == "rw" else "--ro-bind", path, path]
        bound.append(path)
    rw, ro = str(sandbox_rw(Path(spec.node_dir))), str(sandbox_ro(Path(spec.node_dir)))
    argv += ["--bind", rw, rw, "--ro-bind", ro, ro]
    if spec.workspace:
        argv += ["--bind" if spec.workspace_rw else "--ro-bind", spec.workspace, spec.workspace]
        bound.append(spec.workspace)
    # A hidden path inside something bound (the state directory inside a workspace, say) stays hidden.
    for path in _hidden_inside(spec.hide, bound):
        argv += [*size, "--tmpfs", path]
    # --dev gave the sandbox a minimal /dev: the GPUs must be bound in (the driver libraries are
    # already there, with the rest of the node's root file system).
    for device in spec.gpu_devices:
        argv += ["--dev-bind", device, device]
    argv += ["--chdir", spec.workspace or SANDBOX_HOME, "--", *kernel_argv]
    return argv


def _under(path: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return path == parent or path.startswith(parent + "/")


def _hidden_inside(hide: Sequence[str], bound: Sequence[str]) -> list[str]:
    """The hidden paths that lie inside a bound path: they must be hidden again after the bind."""
    return [path for path in sorted({p.rstrip("/") for p in hide})
            if any(path.startswith(b.rstrip("/") + "/") for b in bound)]


def apptainer_argv(spec: SandboxSpec, kernel_argv: Sequence[str], image: str, apptainer: str = "apptainer",
                   empty_dir: str | None = None) -> list[str]:
    """The Apptainer command line that runs ``kernel_argv`` in ``image``.

    ``--containall`` gives private PID, IPC and /tmp, a minimal /dev and a clean environment;
    ``--no-home`` keeps the home directory out (HOME is /tmp inside); ``--net --network none``
    leaves only a loopback device. The kernel's environment reaches it as APPTAINERENV_*
    variables (:func:`apptainer_process_environment`), never on the command line.
    ``empty_dir`` (an empty directory) is bound over hidden paths that lie inside a bind.
    """
    argv = [
        apptainer, "exec",
        "--containall", "--no-home", "--home", SANDBOX_HOME, "--cleanenv",
        "--net", "--network", "none",
        "--no-mount", "bind-paths",  # the site's "bind path" defaults in apptainer.conf
    ]
    bound = []
    for bind in spec.binds:
        path, _, mode = bind.partition(":")
        argv += ["--bind", f"{path}:{path}:{'rw' if mode == 'rw' else 'ro'}"]
        bound.append(path)
    rw, ro = str(sandbox_rw(Path(spec.node_dir))), str(sandbox_ro(Path(spec.node_dir)))
    argv += ["--bind", f"{rw}:{rw}:rw", "--bind", f"{ro}:{ro}:ro"]
    if spec.workspace:
        argv += ["--bind", f"{spec.workspace}:{spec.workspace}:{'rw' if spec.workspace_rw else 'ro'}"]
        bound.append(spec.workspace)
    hidden_inside = _hidden_inside(spec.hide, bound)
    if hidden_inside and empty_dir is None:
        raise ValueError(f"an empty directory is needed to hide {', '.join(hidden_inside)} inside a bind")
    for path in hidden_inside:
        argv += ["--bind", f"{empty_dir}:{path}:ro"]
    if spec.gpus:
        argv.append("--nv")
    argv += ["--pwd", spec.workspace or SANDBOX_HOME, image, *kernel_argv]
    return argv


def is_image_reference(text: str) -> bool:
    """An OCI image reference (``registry/name:tag``, ``name@sha256:...``), nothing else: no
    option, no transport prefix (``docker://``), no white space."""
    return bool(_IMAGE_REFERENCE.fullmatch(text))


@dataclass(frozen=True)
class PodmanStorage:
    """Where rootless podman keeps its images and containers (``--root``), its run-time state
    (``--runroot``) and its temporary files (``--tmpdir``: what ``podman load`` unpacks), and
    with which storage driver: overlay (native in rootless podman on Linux >= 5.13) shares the
    image's layer between containers; vfs, podman's fallback, copies it for every container."""

    root: str
    runroot: str
    tmpdir: str
    driver: str | None = "overlay"


def podman_global_argv(storage: PodmanStorage | None = None, oci_runtime: str | None = None) -> list[str]:
    """Podman's global options (before ``run``, ``load``, ``ps``, ...): the storage unless the
    site's configuration chooses it (``storage`` None: runtime.podman_storage ``site``), and the
    OCI runtime (``--runtime``: runc where crun cannot handle the node's cgroups). With our own
    storage the events go to a file in it: a batch job has no journald session of the user's."""
    argv: list[str] = []
    if storage is not None:
        argv += ["--root", storage.root, "--runroot", storage.runroot, "--tmpdir", storage.tmpdir,
                 "--events-backend", "file"]
        if storage.driver:
            argv += ["--storage-driver", storage.driver]
    if oci_runtime:
        argv += ["--runtime", oci_runtime]
    return argv


def podman_command_line(runtime: Mapping[str, object], storage: PodmanStorage | None = None) -> list[str]:
    """The podman command with its global options, from a profile's ``runtime`` settings."""
    command = str(runtime.get("podman_command") or "podman")
    oci_runtime = runtime.get("podman_oci_runtime")
    return [command, *podman_global_argv(storage, str(oci_runtime) if oci_runtime else None)]


# Of the job's environment, what the podman process itself may see (the kernel's own variables
# reach the container by name, --env NAME, from this environment). HOME, XDG_* and TMPDIR are the
# agent's (see podman_environment): podman reads its configuration from there, and a user's
# ~/.config/containers in a workspace the kernel may write must not configure the next kernel.
PODMAN_PROCESS_ENVIRONMENT = ("PATH", "LANG", "LC_*", "TZ", "USER", "LOGNAME")
# What podman (and containers/storage, conmon) reads of its own environment: never taken from
# the kernel's environment into podman's.
PODMAN_READS = ("HOME", "XDG_*", "TMPDIR", "CONTAINERS_*", "CONTAINER_*", "PODMAN_*", "STORAGE_*", "BUILDAH_*",
                "REGISTRY_AUTH_FILE", "DOCKER_*", "_CONTAINERS_*", "NOTIFY_SOCKET", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy", "NO_PROXY", "no_proxy", "FTP_PROXY", "ftp_proxy")


# What every container of a kernel (and `hpc-kernel image check`'s) is started with.
PODMAN_ISOLATION = (
    "--network", "none", "--uts", "host", "--userns", "keep-id",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    "--read-only", "--read-only-tmpfs=false",  # no writable /run, /var/tmp: only the /tmp given
    "--http-proxy=false",  # podman would pass the node's proxy variables into the container
)


def podman_argv(spec: SandboxSpec, kernel_argv: Sequence[str], image: str, *, podman: Sequence[str] = ("podman",),
                name: str, labels: Mapping[str, str] | None = None, env_names: Sequence[str] = (),
                env_values: Mapping[str, str] | None = None, gpu_mode: str = "cdi",
                gpu_indices: Sequence[str] = (), memory: int | None = None,
                processes: int | None = None) -> list[str]:
    """The ``podman run`` command line that runs ``kernel_argv`` in ``image``.

    ``podman`` is the podman command with its global options (:func:`podman_command_line`).
    Rootless podman: the container's root file system is the image, read-only; ``--network
    none`` leaves a loopback device only; ``--userns keep-id`` runs the kernel as the user
    (files it writes in a read-write workspace are the user's); every capability is dropped and
    no-new-privileges set; /tmp is a tmpfs of at most ``spec.tmpfs_size``; the node's UTS
    namespace is kept (the node's host name; changing it needs a capability the kernel has not).
    Nothing of the node but the binds, the node directory's ``rw/`` and ``ro/`` and the workspace
    is there: no home (HOME is /tmp). ``env_names`` pass by name, their values from podman's
    own environment (never on the command line); ``env_values`` are constants given with their
    value (HOME). ``memory`` and ``processes`` become --memory and --pids-limit: only where the
    node's cgroups let rootless podman apply them (the caller knows). The container is named
    ``name`` (replacing a leftover of that name) and labelled, so that what a killed job leaves
    can be found and removed. GPUs per ``gpu_mode``: ``cdi`` (--device nvidia.com/gpu=N),
    ``podman-hpc`` (its --gpu), ``devices`` (``spec.gpu_devices`` themselves).
    """
    argv = [*podman, "run", "--rm", "--replace", "--pull", "never", "--init", "--name", name]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    argv += [*PODMAN_ISOLATION,
             "--log-driver", "none"]  # stdout and stderr reach `podman run` (the job log); no copy in the storage
    size = f",size={spec.tmpfs_size}" if spec.tmpfs_size else ""
    argv += ["--tmpfs", f"{SANDBOX_HOME}:rw,nosuid,nodev{size}"]
    if memory:
        argv += ["--memory", str(memory), "--memory-swap", str(memory)]
    if processes:
        argv += ["--pids-limit", str(processes)]
    bound = []
    for bind in spec.binds:
        path, _, mode = bind.partition(":")
        argv += ["--volume", _volume(path, "rw" if mode == "rw" else "ro")]
        bound.append(path)
    rw, ro = str(sandbox_rw(Path(spec.node_dir))), str(sandbox_ro(Path(spec.node_dir)))
    argv += ["--volume", _volume(rw, "rw"), "--volume", _volume(ro, "ro")]
    if spec.workspace:
        argv += ["--volume", _volume(spec.workspace, "rw" if spec.workspace_rw else "ro")]
        bound.append(spec.workspace)
    # The image is not the node: only what is bound from the node can show a hidden path.
    for path in _hidden_inside(spec.hide, bound):
        argv += ["--tmpfs", f"{_no_colon(path)}:ro,nosuid,nodev,noexec,size=4k"]
    if spec.gpus:
        if gpu_mode == "cdi":
            for index in gpu_indices:
                argv += ["--device", f"nvidia.com/gpu={index}"]
        elif gpu_mode == "podman-hpc":
            argv.append("--gpu")
        elif gpu_mode == "devices":
            for device in spec.gpu_devices:
                argv += ["--device", _volume(device, "rwm")]
        else:
            raise ValueError(f"unknown runtime.podman_gpus {gpu_mode!r}")
    for env_name in env_names:
        argv += ["--env", env_name]
    for env_name, value in (env_values or {}).items():
        argv += ["--env", f"{env_name}={value}"]
    argv += ["--workdir", spec.workspace or SANDBOX_HOME, image, *kernel_argv]
    return argv


def _no_colon(path: str) -> str:
    if ":" in path or "," in path:
        raise ValueError(f"podman cannot bind {path}: it has ':' or ',' in it")
    return path


def _volume(path: str, options: str) -> str:
    path = _no_colon(path)
    return f"{path}:{path}:{options}"


def podman_environment(host_env: Mapping[str, str], kernel_env: Mapping[str, str],
                       podman_env: Mapping[str, str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The environment of the ``podman`` process, and the kernel's variables for podman_argv:
    the names that go by name (their values in that environment) and the constants that go with
    their value. The process gets a short allowlist of the job's, ``podman_env`` (the agent's
    HOME, XDG_RUNTIME_DIR, ...: where podman keeps its state), and the kernel's variables, except
    those podman itself would read (PODMAN_READS): those, and HOME (/tmp in the container), go
    with their value. PATH stays the image's: the node's PATH means nothing inside an image."""
    env = _allowed(host_env, PODMAN_PROCESS_ENVIRONMENT)
    env.update(podman_env)
    names: list[str] = []
    values: dict[str, str] = {}
    for name, value in kernel_env.items():
        if name == "PATH":
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in PODMAN_READS) or (name in env and env[name] != value):
            values[name] = value
        else:
            env[name] = value
            names.append(name)
    return env, names, values


def gpu_indices(job_env: Mapping[str, str]) -> list[str]:
    """The indices of the GPUs Slurm allocated to this step (``SLURM_STEP_GPUS``, in a batch step
    ``SLURM_JOB_GPUS``)."""
    indices = job_env.get("SLURM_STEP_GPUS") or job_env.get("SLURM_JOB_GPUS") or ""
    return [i.strip() for i in indices.split(",") if i.strip().isdigit()]


def kernel_argv(command: Sequence[str], *, python: str, connection_file: str) -> list[str]:
    """The profile's ``kernel.command`` with ``{python}`` and ``{connection_file}`` filled in."""
    return [arg.format(python=python, connection_file=connection_file) for arg in command]


def sandbox_argv(kind: str, spec: SandboxSpec, kernel_argv: Sequence[str], *, executable: str,
                 image: str | None = None, empty_dir: str | None = None,
                 podman: Mapping[str, Any] | None = None) -> list[str]:
    """The command line of runtime ``kind`` for ``kernel_argv``. For podman, ``podman`` holds
    podman_argv's keyword arguments (its ``podman`` command line among them)."""
    if kind == "bwrap":
        return bwrap_argv(spec, kernel_argv, bwrap=executable)
    if kind == "apptainer":
        if not image:
            raise ValueError("the apptainer runtime needs an image")
        return apptainer_argv(spec, kernel_argv, image, apptainer=executable, empty_dir=empty_dir)
    if kind == "podman":
        if not image or podman is None:
            raise ValueError("the podman runtime needs an image and its settings")
        return podman_argv(spec, kernel_argv, image, **podman)
    raise ValueError(f"unknown runtime {kind!r}")


def gpu_device_paths(job_env: Mapping[str, str], existing: Sequence[str]) -> list[str]:
    """The device nodes of the GPUs Slurm allocated to this step (``SLURM_STEP_GPUS``, in a batch
    step ``SLURM_JOB_GPUS``: indices into gres.conf's ``File=/dev/nvidia[...]``), with the control
    devices; only those in ``existing`` (the device nodes present on the node)."""
    wanted = [f"/dev/nvidia{i}" for i in gpu_indices(job_env)]
    if not wanted:
        return []
    present = set(existing)
    return [d for d in (*wanted, *NVIDIA_CONTROL_DEVICES) if d in present]


def has_gpus(job_env: Mapping[str, str]) -> bool:
    """Slurm allocated GPUs to this job (or step)."""
    return bool((job_env.get("SLURM_STEP_GPUS") or job_env.get("SLURM_JOB_GPUS") or "").strip())


def apptainer_process_environment(host_env: Mapping[str, str], kernel_env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the ``apptainer`` process: a short allowlist of the job's, plus the
    kernel's environment as APPTAINERENV_* (what --cleanenv lets through). PATH and HOME stay the
    image's and /tmp: the node's PATH means nothing inside an image."""
    env = _allowed(host_env, APPTAINER_PROCESS_ENVIRONMENT)
    for name, value in kernel_env.items():
        if name not in ("PATH", "HOME"):
            env[f"APPTAINERENV_{name}"] = value
    return env


def _allowed(env: Mapping[str, str], patterns: Sequence[str]) -> dict[str, str]:
    return {name: value for name, value in env.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}


def sandbox_environment(job_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The kernel's environment: a short allowlist from the job, HOME in the sandbox, then ``extra``."""
    env = _allowed(job_env, PASSED_ENVIRONMENT)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = SANDBOX_HOME
    env["PYTHONUNBUFFERED"] = "1"
    # Thread pools (OpenMP, BLAS) size themselves by the node's CPUs, not the job's: a numpy cell on
    # a 128-core node with 4 CPUs allocated would start 128 threads.
    cpus = job_env.get("SLURM_CPUS_PER_TASK") or job_env.get("SLURM_CPUS_ON_NODE") or ""
    if cpus.isdigit():
        for name in THREAD_VARIABLES:
            env.setdefault(name, cpus)
    # debugpy's warning about frozen modules (Python 3.11+) fills every job log otherwise.
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env.update(extra)
    return env
