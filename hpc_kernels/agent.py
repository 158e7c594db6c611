"""The node agent: the batch step of a kernel job, on the compute node.

``python -m hpc_kernels.agent STATE_DIR`` (from the job script):

1. makes a private (0700) directory on node-local tmp,
2. writes the kernel's connection file there (``transport: ipc``), with the key read from the
   0600 key file in the kernel's state directory on the shared file system,
3. starts the kernel in the sandbox and waits for its five sockets,
4. reports ``starting`` / ``ready`` / ``failed`` / ``ended`` in ``agent.json`` in the state directory,
5. when the kernel ends (or the job is cancelled), removes the directory and exits, ending the job.

The relay's node side (``hpc_kernels.relay node``) runs as a separate srun step (or through ssh)
and connects to the sockets this agent's kernel made; for the tcp transport, the agent itself
runs it: a TLS listener in a thread, its port in ``agent.json``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from .paths import check_socket_path, exposes_private_files, read_json, read_untrusted_json, write_json
from .processes import cmdline, descendants, identity, is_running, unblock_signals, watch_parent
from .relay import NodeListener, connection_info, socket_paths
from . import kernel_egress, kernel_hibernate, kernel_limits, kernel_startup, kernel_time_warning
from .egress import SOCKET_NAME as EGRESS_SOCKET
from .egress import EgressProxy, parse_allowed
from .errors import SlurmError
from .hibernation import CLIENTS_DIR, IdleWatch, copy_checked, snapshot_dir
from .kernel_hibernate import RESTORE
from .limits import SandboxWatch, human, memory_limit
from .node_view import bwrap_can_disable_userns, hidden_here, python_prefixes, shown_system_paths
from .python_env import start_failure_hint
from .userns import forbid_user_namespaces
from . import podman_node
from .runtimes import (
    DEFAULT_SYSTEM_PATHS,
    SANDBOX_HOME,
    SandboxSpec,
    apptainer_process_environment,
    gpu_device_paths,
    gpu_indices,
    has_gpus,
    kernel_argv,
    podman_command_line,
    podman_environment,
    sandbox_argv,
    sandbox_environment,
)
from .node_tmp import (kernel_connection_file, kernel_socket_base, make_node_dir, sandbox_ro, sandbox_rw,
                       sweep_stale_node_dirs)
from .slurm import job_info, jobs_alive
from .state import KernelFiles, forget_secrets, kernel_lives, state_json
from .time_limit import DEADLINE_FILE, DeadlineWriter
from .tls import CredentialFiles

STDERR_TAIL_LINES = 40
PR_SET_CHILD_SUBREAPER = 36
KERNEL_STOP_SECONDS = 5.0
RESTART_GRACE_SECONDS = 1.5
LIMITS_REPORT = "limits.json"  # the kernel says whether RLIMIT_NPROC holds its sandbox
REQUEUE_QUERY_ATTEMPTS = 15
REQUEUE_QUERY_WAIT = 2.0
# What the runtime says of itself on every start: not a reason for a failure.
_NOISE = ("INFO:", "INFO :")
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class AgentError(Exception):
    pass


def choose_node_tmp(configured: str | None, env: Mapping[str, str]) -> str:
    """Where the private directory goes: the profile's ``paths.node_tmp`` (environment variables
    expanded), else the first existing of $SLURM_TMPDIR, $TMPDIR, /tmp. It must be safe to make a
    private directory in (see :func:`check_node_tmp`)."""
    if configured:
        expanded = _expand(configured, env)
        if "$" in expanded:
            raise AgentError(f"paths.node_tmp {configured!r}: a variable in it is not set on this node")
        if not os.path.isdir(expanded):
            raise AgentError(f"paths.node_tmp {configured!r} is {expanded!r}, which is not a directory on this node")
        return check_node_tmp(expanded)
    for candidate in (env.get("SLURM_TMPDIR"), env.get("TMPDIR"), "/tmp"):
        if candidate and os.path.isdir(candidate):
            return check_node_tmp(candidate)
    raise AgentError("no node-local tmp directory: neither $SLURM_TMPDIR, $TMPDIR nor /tmp exists")


def check_node_tmp(path: str) -> str:
    """A directory another user could swap our directory out of, or rename it in, is refused:
    it must belong to root or to us, and, if others may write to it, have the sticky bit."""
    st = os.stat(path)
    if st.st_uid not in (0, os.getuid()):
        raise AgentError(f"node tmp {path} belongs to uid {st.st_uid}, not to you or root: another user "
                         "could reach the kernel's directory there (set paths.node_tmp)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise AgentError(f"node tmp {path} is writable by others without the sticky bit (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): another user could move the kernel's directory (set paths.node_tmp)")
    return path


def _expand(text: str, env: Mapping[str, str]) -> str:
    for name in sorted(env, key=len, reverse=True):
        text = text.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
    return text


def _say(message: str) -> None:
    print(f"[hpc-kernels agent {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Agent:
    def __init__(self, state_dir: Path) -> None:
        self.files = KernelFiles(state_dir)
        self.launch: dict[str, Any] = read_json(self.files.launch) or {}
        self.node = socket.gethostname()
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.node_dir: Path | None = None
        self.kernel: subprocess.Popen[bytes] | None = None
        self.connection_file: Path | None = None
        self.stop_signal: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.stderr_done = threading.Event()
        self.generation = 0  # kernels restarted in this job so far
        self.restart_now = False
        self.kernel_ready = False
        self.listener: NodeListener | None = None
        self.tcp: dict[str, Any] | None = None  # where the relay's tcp transport listens
        self.deadline: DeadlineWriter | None = None  # tells the kernel when the job's time is up
        self.egress: EgressProxy | None = None  # the proxy to runtime.allow_hosts
        self.memory_limit: int | None = None  # limits.memory, in bytes, for the sandbox's processes together
        self.process_limit: int | None = None  # limits.processes
        self.limit_reason: str | None = None  # why the watch ended the kernel
        self.idle_timeout = 0.0  # limits.idle_timeout, in seconds (0: never)
        self.hibernation: dict[str, Any] | None = None  # what was saved, once the idle kernel was
        self.runtime_forbids_userns = False  # bwrap --disable-userns; else the agent forbids them itself
        # podman: the command with its global options, its environment, the container's name, and
        # the container's init (conmon daemonizes: the container is not below `podman run` but,
        # the agent being a subreaper, below the agent)
        self.podman: list[str] | None = None
        self.podman_env: dict[str, str] = {}
        self.container: str | None = None
        self.container_init: int | None = None
        self.podman_job_dir: Path | None = None
        # A job Slurm requeued (its node failed, it was preempted) runs this agent again on a new node.
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.submit_time: str | None = None  # Slurm resets it at a requeue: names this run of the job

    def report(self, state: str, **extra: Any) -> None:
        """Write agent.json; a failure to write (quota, a removed state dir) is said, not raised."""
        try:
            write_json(
                self.files.agent,
                {"state": state, "node": self.node, "job_id": self.job_id, "generation": self.generation,
                 **identity(),
                 # Slurm's name for the node (srun --nodelist); the host name may differ (a FQDN)
                 "slurm_node": os.environ.get("SLURMD_NODENAME"),
                 "node_dir": str(self.node_dir) if self.node_dir else None, "time": time.time(),
                 **({"tcp": self.tcp} if self.tcp else {}),
                 **({"restarts": self.restarts, "submit_time": self.submit_time} if self.restarts else {}),
                 **extra},
            )
        except OSError as e:
            _say(f"could not write {self.files.agent}: {e}")

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum
        if self.kernel is not None and self.kernel.poll() is None:
            self.kernel.terminate()  # bwrap forwards nothing; its sandbox dies with it

    def on_parent_gone(self) -> None:
        """The frontend on this node that started this agent has ended: so does its kernel."""
        _say("the frontend that started this kernel has ended: ending the kernel")
        os.kill(os.getpid(), signal.SIGTERM)

    def on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT (from ``hpc-kernel interrupt``, see :func:`signal_agent`) interrupts the kernel, as a
        local Jupyter kernel is interrupted: the signal goes to the kernel process inside the
        sandbox (bubblewrap forwards no signal), and to its process group if it leads one."""
        pid = self.kernel_pid()
        if pid is None:
            _say("SIGINT: no kernel process to interrupt")
            return
        if not self.kernel_ready:
            # A kernel process still starting runs nothing of the user's yet, and a SIGINT would end
            # it (a frontend's interrupt before a restart can arrive when the next kernel starts).
            _say("SIGINT while the kernel starts: not passed on")
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGINT)
            else:
                os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def kernel_pid(self) -> int | None:
        """The kernel's own process, found below the runtime by its connection file argument
        (podman's: below the agent, in the container)."""
        if self.kernel is None or self.connection_file is None or self.kernel.poll() is not None:
            return None
        if self.podman is not None:
            found = podman_node.container_processes(descendants(os.getpid()), str(self.connection_file))
            if found is None:
                return None
            self.container_init = found[0]
            return found[1]
        for pid in descendants(self.kernel.pid):
            if str(self.connection_file) in cmdline(pid):
                return pid
        return None

    def prepare(self) -> tuple[list[str], dict[str, str]]:
        """Make the node-side directory and connection file; return the sandboxed kernel's argv
        and the environment to start it with."""
        launch = self.launch
        root = choose_node_tmp(launch.get("node_tmp"), os.environ)
        self.sweep(Path(root))
        self.node_dir = make_node_dir(Path(root), self.job_id)
        base = str(kernel_socket_base(self.node_dir))
        for path in socket_paths(base):
            check_socket_path(path, "node-side socket")
        connection_file = self.connection_file = kernel_connection_file(self.node_dir)
        write_json(connection_file, connection_info(base, self.files.key.read_text().strip(),
                                                    read_json(self.files.curve)))
        relay = launch.get("relay") or {}
        if relay.get("listen_tcp"):
            self.listen_tcp(relay.get("tcp_ports"))

        workspace = launch.get("workspace")
        if workspace and not os.path.isdir(workspace):
            raise AgentError(
                f"workspace {workspace} does not exist on {self.node}: it must be on a file system "
                "the compute nodes share (e.g. under your home), not on login-node-local storage"
            )
        python_env = launch.get("python_env")
        if python_env and not os.path.isdir(python_env):
            raise AgentError(f"the Python environment {python_env} does not exist on {self.node}: it must be on a "
                             "file system the compute nodes share")
        hide = hidden_here(launch.get("hide", []))
        binds = launch.get("binds", [])
        missing = [b for b in binds if not os.path.exists(b.partition(":")[0])]
        if missing:
            raise AgentError(f"runtime.binds: {', '.join(missing)} does not exist on {self.node}")
        # Checked again here, where the paths really resolve (links may differ from the login node).
        private = launch.get("private", [])
        for path in [workspace, *(b.partition(":")[0] for b in binds)]:
            why = exposes_private_files(path, private[0], private[1:]) if path and private else None
            if why:
                raise AgentError(f"refused on {self.node}: {why}")
        gpus = has_gpus(os.environ)
        devices = gpu_device_paths(os.environ, glob.glob("/dev/nvidia*")) if gpus else []
        if gpus and not any(d.removeprefix("/dev/nvidia").isdigit() for d in devices):
            _say(f"Slurm allocated GPUs ({os.environ.get('SLURM_STEP_GPUS') or os.environ.get('SLURM_JOB_GPUS')}) "
                 "but no /dev/nvidiaN matches them: bubblewrap binds no GPU (only NVIDIA GPUs are known)")
        kind = launch["runtime"]
        executable = (launch.get("podman") or {}).get("command") if kind == "podman" else None
        executable = executable or launch.get("runtime_executable") or kind
        found = shutil.which(executable)
        if found is None:
            key = "runtime.podman_command" if kind == "podman" else "runtime.executable"
            raise AgentError(f"runtime {kind}: {executable!r} is not installed on {self.node} (not found on "
                             f"PATH={os.environ.get('PATH', '')}); set {key}, or load its module "
                             "with slurm.modules")
        kernel_python = launch.get("kernel_python", launch["python"])
        system_paths, system_links = shown_system_paths(launch.get("system_paths") or DEFAULT_SYSTEM_PATHS)
        newer_bwrap = kind == "bwrap" and bwrap_can_disable_userns(found)  # --disable-userns, --size
        if kind == "bwrap":
            for prefix in python_prefixes(kernel_python, system_paths):  # a Python outside them
                why = exposes_private_files(prefix, private[0], private[1:]) if private else None
                if why:
                    raise AgentError(f"refused on {self.node}: the kernel's Python {kernel_python} lives in {prefix}, "
                                     f"which would have to be shown to the kernel: {why}")
                binds = [*binds, f"{prefix}:ro"]
        spec = SandboxSpec(
            node_dir=str(self.node_dir),
            hide=hide,
            workspace=workspace,
            workspace_rw=bool(launch.get("workspace_rw")),
            binds=binds,
            gpus=gpus,
            gpu_devices=devices,
            system_paths=system_paths,
            system_links=system_links,
            disable_userns=newer_bwrap,
            # each tmpfs of the sandbox at most the memory limit (the watch counts them all together)
            tmpfs_size=memory_limit(str(launch.get("limits_memory") or "job"), os.environ) if newer_bwrap else None,
        )
        self.runtime_forbids_userns = spec.disable_userns
        command = kernel_argv(launch["kernel_command"], python=kernel_python, connection_file=str(connection_file))
        kernel_env = launch.get("kernel_env", {})
        env = sandbox_environment(os.environ, {**self.kernel_startup(kernel_env), **kernel_env})
        if kind == "bwrap":
            return sandbox_argv(kind, spec, command, executable=found), env
        if kind == "podman":
            return self.prepare_podman(Path(root), spec, command, env, found)
        image = launch["image"]
        if not os.path.exists(image):
            raise AgentError(f"runtime.image {image} does not exist on {self.node}: kernel images must be on a "
                             "file system the compute nodes share")
        empty = self.node_dir / "empty"
        empty.mkdir(mode=0o500)
        argv = sandbox_argv(kind, spec, command, executable=found, image=image, empty_dir=str(empty))
        return argv, apptainer_process_environment(os.environ, env)

    def prepare_podman(self, root: Path, spec: SandboxSpec, command: list[str], kernel_env: dict[str, str],
                       podman: str) -> tuple[list[str], dict[str, str]]:
        """Podman's storage and environment on this node, the image in it, leftovers of killed jobs
        removed; the ``podman run`` command line and its environment."""
        settings = self.launch.get("podman") or {}
        mode = settings.get("storage") or "job"
        try:
            where = podman_node.places(root, mode, self.job_id, os.environ)
        except (OSError, podman_node.PodmanNodeError) as e:
            raise AgentError(f"podman: {e}") from None
        self.podman_job_dir = where.job_dir
        self.podman = podman_command_line({"podman_command": podman, "podman_oci_runtime": settings.get("oci_runtime")},
                                          where.storage)
        self.podman_env = {**podman_node.run_environment(os.environ), **where.environment}
        user = os.environ.get("USER") or str(os.getuid())
        kernel_name = self.files.name
        self.container = f"hk-{self.job_id or 'nojob'}-{kernel_name}"
        try:
            self.sweep_podman(where, user)
            podman_node.ensure_image(self.podman, self.podman_env, self.launch["image"], settings.get("image_archive"),
                                     where.user_dir / "load.lock", _say)
        except subprocess.TimeoutExpired as e:
            raise AgentError(f"podman did not answer within {e.timeout:.0f} s: {shlex.join(e.cmd)}") from None
        except podman_node.PodmanNodeError as e:
            raise AgentError(f"podman: {e}") from None
        memory = processes = None
        if self.memory_limit or self.process_limit:
            why_not = podman_node.cgroup_limits_apply(self.podman, self.podman_env)
            if why_not:
                _say(f"podman: no --memory or --pids-limit for the container ({why_not}); the agent's own watch "
                     "enforces limits.memory and limits.processes")
            else:
                memory, processes = self.memory_limit, self.process_limit
        spec = replace(spec, tmpfs_size=self.memory_limit)  # /tmp holds at most the memory limit
        env, names, values = podman_environment(os.environ, kernel_env, self.podman_env)
        argv = sandbox_argv("podman", spec, command, executable=podman, image=self.launch["image"], podman={
            "podman": self.podman, "name": self.container,
            "labels": {podman_node.LABEL_JOB: self.job_id, podman_node.LABEL_KERNEL: kernel_name,
                       podman_node.LABEL_USER: user},
            "env_names": names, "env_values": {**values, "HOME": SANDBOX_HOME},
            "gpu_mode": settings.get("gpus") or "cdi", "gpu_indices": gpu_indices(os.environ),
            "memory": memory, "processes": processes})
        return argv, env

    def sweep_podman(self, where: podman_node.PodmanPlaces, user: str) -> None:
        """Remove what killed jobs of this user left in podman's storage on this node: containers
        (a SIGKILLed agent, a node's reboot) and job storages."""
        assert self.podman is not None
        try:
            removed = podman_node.sweep_containers(self.podman, self.podman_env, self.job_id, user, jobs_alive)
            stale = podman_node.stale_job_dirs(where.user_dir, self.job_id, jobs_alive)
        except SlurmError as e:
            _say(f"left podman containers of earlier jobs alone: Slurm cannot say which ended ({e})")
            return
        if removed:
            _say(f"podman: removed {len(removed)} containers of ended jobs: {', '.join(removed)}")
        for directory in stale:
            storage = podman_node.PodmanStorage(str(directory / "storage"), str(directory / "run"),
                                                str(directory / "tmp"))
            with contextlib.suppress(OSError):  # podman falls back to /tmp without one
                (directory / "xdg").mkdir(mode=0o700, exist_ok=True)
            podman_node.forget_dead_pause_process(storage, directory / "xdg")
            podman = podman_command_line({"podman_command": self.podman[0]}, storage)
            try:
                podman_node.reset_storage(podman, {**self.podman_env, "XDG_RUNTIME_DIR": str(directory / "xdg")})
            except (OSError, subprocess.TimeoutExpired, podman_node.PodmanNodeError) as e:
                _say(f"podman: could not empty the storage {directory} of an ended job: {e}")
                continue
            shutil.rmtree(directory, ignore_errors=True)
            _say(f"podman: removed the storage {directory} of an ended job")

    def remove_container(self) -> None:
        """The container goes with the kernel (`podman run --rm` removes it unless podman was
        killed), and a job's own storage with the job."""
        if self.podman is None or self.container is None:
            return
        try:
            podman_node.run(self.podman, ["rm", "--force", "--ignore", "--time", "0", self.container], self.podman_env)
        except (OSError, subprocess.TimeoutExpired) as e:
            _say(f"podman: could not remove the container {self.container}: {e}")

    def remove_job_storage(self) -> None:
        """The job's own storage (podman_storage job), once nothing of podman runs."""
        if self.podman is None or self.podman_job_dir is None:
            return
        directory, self.podman_job_dir = self.podman_job_dir, None
        try:
            podman_node.reset_storage(self.podman, self.podman_env)
        except (OSError, subprocess.TimeoutExpired, podman_node.PodmanNodeError) as e:
            _say(f"podman: could not empty the job's storage {directory}: {e}")
        end_leftovers()  # what the reset left running, which could write there again
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            _say(f"podman: the job's storage {directory} is left; the user's next kernel on {self.node} removes it")

    def sweep(self, root: Path) -> None:
        """Remove what killed jobs of this user left in this node's tmp (see node_tmp.py)."""
        try:
            removed = sweep_stale_node_dirs(root, self.job_id, jobs_alive)
        except SlurmError as e:
            _say(f"left the node directories of earlier jobs in {root} alone: Slurm cannot say which ended ({e})")
            return
        if removed:
            _say(f"removed {len(removed)} node directories of ended jobs: {', '.join(p.name for p in removed)}")

    def forbid_user_namespaces(self) -> None:
        """Before any client's code runs: no user namespaces inside the sandbox (see userns.py)."""
        pid = self.kernel_pid()
        if pid is None:
            raise AgentError("the kernel's process was not found in the sandbox: cannot forbid user namespaces there")
        why_not = forbid_user_namespaces(pid)
        if why_not:
            _say(why_not)

    def note_requeue(self) -> None:
        """This job ran before and Slurm requeued it: say so in the log, and learn its new
        SubmitTime, by which the login side tells this run's reports from the last one's."""
        job = None
        for attempt in range(REQUEUE_QUERY_ATTEMPTS):  # slurmctld is busiest right after a node failed
            try:
                job = job_info(self.job_id)
                break
            except SlurmError as e:
                _say(f"cannot ask Slurm about this job yet: {e}")
                time.sleep(REQUEUE_QUERY_WAIT)
        self.submit_time = job.submit_time if job else None
        _say(f"Slurm requeued this job (restart {self.restarts}: a node failed, or it was preempted): "
             "starting a new kernel; the earlier kernel and its variables are lost")

    def kernel_startup(self, kernel_env: dict[str, str]) -> dict[str, str]:
        """What runs in the kernel as it starts (:mod:`hpc_kernels.kernel_startup`): the warning
        before the time limit (``kernel.time_warning``) and the bridge to the egress proxy
        (``runtime.allow_hosts``), with the proxy itself and the deadline writer. The variables
        the kernel needs for them."""
        assert self.node_dir is not None
        parts: list[tuple[ModuleType, list[str]]] = []
        warn_before = float(self.launch.get("time_warning") or 0)
        if warn_before > 0 and self.job_id:
            parts.append((kernel_time_warning, [str(sandbox_ro(self.node_dir) / DEADLINE_FILE)]))
        self.memory_limit = memory_limit(str(self.launch.get("limits_memory") or "job"), os.environ)
        processes = self.launch.get("limits_processes")
        self.process_limit = int(processes) if processes else None
        if self.memory_limit or self.process_limit:
            parts.append((kernel_limits, [str(self.process_limit or ""), str(self.memory_limit or ""),
                                          str(sandbox_rw(self.node_dir) / LIMITS_REPORT)]))
            _say(f"limits: memory {human(self.memory_limit) if self.memory_limit else 'none'}, "
                 f"processes {self.process_limit or 'none'}")
        self.idle_timeout = float(self.launch.get("idle_timeout") or 0)
        restore = self.launch.get("restore")
        if self.idle_timeout > 0:
            (self.node_dir / CLIENTS_DIR).mkdir(mode=0o700)  # the relay's node sides count clients there
        if self.idle_timeout > 0 or restore:
            parts.append((kernel_hibernate, [str(sandbox_rw(self.node_dir))]))
        if restore:
            self.copy_restore(Path(restore), self.launch.get("restore_sha256"))
        allow_hosts = [parse_allowed(entry) for entry in self.launch.get("allow_hosts") or []]
        if allow_hosts:
            parts.append((kernel_egress, [str(sandbox_rw(self.node_dir) / EGRESS_SOCKET)]))
        # IPython wants its directory writable (else it takes a temporary one, without our startup file)
        variables = kernel_startup.install(sandbox_rw(self.node_dir), kernel_env, parts)
        if parts and not variables:
            _say("kernel.env sets IPYTHONDIR: the kernel gets no warning before the time limit, no way to "
                 "the allowed hosts and no limits of its own (the agent's watch still ends it over a limit)")
            return {}
        if allow_hosts:
            self.egress = EgressProxy(sandbox_rw(self.node_dir), allow_hosts, _say)
            self.egress.start()
            _say("egress: a proxy for " + ", ".join(f"{h}:{p}" for h, p in allow_hosts) + " (everything else: 403)")
        if warn_before > 0 and self.job_id:
            notice = (f"Slurm requeued job {self.job_id} (restart {self.restarts}: its node failed, or it was "
                      "preempted), so this is a new kernel: variables from before are lost.") if self.restarts else None
            self.deadline = DeadlineWriter(sandbox_ro(self.node_dir), self.job_id, warn_before, _say, notice=notice)
            self.deadline.start()
        return variables

    def listen_tcp(self, port_range: list[int] | None) -> None:
        """The relay's tcp transport: its node side listens in a thread of ours, for the whole job."""
        assert self.node_dir is not None
        credentials = CredentialFiles(self.files.dir)
        if not credentials.node.exists():
            raise AgentError(f"relay.transport tcp: {credentials.node} is missing (made at submit)")
        self.listener = NodeListener(self.node_dir, credentials, port_range)
        try:
            port = self.listener.start()
        except OSError as e:
            raise AgentError(f"relay.transport tcp: cannot listen on {self.node}: {e}") from None
        self.tcp = {"host": self.node, "port": port}
        _say(f"relay: listening for the tcp transport on port {port} (mutual TLS)")

    def _forward_stderr(self, stream: Any) -> None:
        """The runtime's and kernel's stderr goes to the job log; its last lines are kept for
        the failure message (Apptainer's FATAL lines, a Python traceback)."""
        try:
            for raw in iter(stream.readline, b""):
                try:
                    sys.stderr.buffer.write(raw)
                    sys.stderr.flush()
                except OSError:
                    pass  # a full disk must not stop the reading: the kernel would block on stderr
                line = _ANSI_COLOUR.sub("", raw.decode(errors="replace")).rstrip()
                if line:
                    self.stderr_tail.append(line)
        finally:
            self.stderr_done.set()

    def failure_reason(self, lines: int = 6) -> str:
        self.stderr_done.wait(2)
        said = [line for line in self.stderr_tail if not line.startswith(_NOISE) and "level=warning" not in line]
        return "\n".join(said[-lines:])

    def wait_for_sockets(self, timeout: float) -> None:
        assert self.kernel is not None and self.node_dir is not None
        sockets = socket_paths(str(kernel_socket_base(self.node_dir)))
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(s) for s in sockets):
            if self.stop_signal is not None:
                raise AgentError(f"stopped by signal {signal.Signals(self.stop_signal).name} before the kernel was ready")
            code = self.kernel.poll()
            if code is not None:
                reason = self.failure_reason()
                raise AgentError(f"the kernel exited with code {code} before it was ready"
                                 + (f":\n{reason}" if reason else " (it said nothing)")
                                 + start_failure_hint(reason, str(self.launch.get("runtime", "")),
                                                      self.launch.get("python_env")))
            if time.monotonic() > deadline:
                raise AgentError(f"the kernel did not create its sockets within {timeout:.0f} s (kernel.start_timeout)")
            time.sleep(0.02)

    def run(self) -> int:
        _become_subreaper()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        watch_parent(os.environ, self.on_parent_gone)
        signal.signal(signal.SIGINT, self.on_interrupt)
        signal.signal(signal.SIGUSR1, self.on_restart)
        try:
            if self.restarts:
                self.note_requeue()
            try:
                argv, env = self.prepare()
            except Exception as e:
                return self.fail(e)
            _say(f"starting the kernel on {self.node} in {self.node_dir} ({self.launch['runtime']})")
            _say(f"runtime command: {shlex.join(argv)}")  # no secret in it: the key is in a 0600 file
            while True:
                code = self.run_kernel(argv, env)
                if code is None:
                    return 1  # it failed to start: reported
                if self.hibernation is not None:
                    self.cleanup()
                    forget_secrets(self.files)
                    unsaved = self.hibernation["unsaved"]
                    self.report("hibernated", **self.hibernation, message=(
                        f"hibernated after {self.idle_timeout:.0f} s without a cell or a client: "
                        f"{len(self.hibernation['saved'])} variables saved in {self.hibernation['snapshot']}"
                        + (f" (not saved: {', '.join(sorted(unsaved))})" if unsaved else "")
                        + f"; `hpc-kernel submit --resume {self.files.name}` brings them back on a new job"))
                    return 0
                if self.stop_signal is None and self.limit_reason is None and self.take_restart_request():
                    self.remove_container()
                    end_leftovers()
                    if self.deadline is not None:
                        self.deadline.clear_notice()  # said to the kernel the requeue replaced
                    self.generation += 1
                    _say(f"kernel ended (exit code {code}); restarting it in this job (restart {self.generation})")
                    continue
                why = (f"over a limit: {self.limit_reason}" if self.limit_reason else
                       f"signal {signal.Signals(self.stop_signal).name}" if self.stop_signal else f"exit code {code}")
                _say(f"kernel ended ({why}); cleaning up")
                self.cleanup()
                if self.stop_signal is None:
                    # Ended by a signal (scancel, the time limit, preemption), the job may be requeued
                    # and need the key again: the login side removes it once Slurm says the job is over.
                    forget_secrets(self.files)
                self.report("ended", exit_code=code, message=f"kernel ended ({why})")
                return 0 if code == 0 or self.stop_signal else 1
        finally:
            self.cleanup()  # the node-side directory holds the key: it goes on every path

    def run_kernel(self, argv: list[str], env: dict[str, str]) -> int | None:
        """Start one kernel process and wait until it ends: its exit code, or None if it failed to
        become ready (reported as failed)."""
        started = time.monotonic()
        self.kernel_ready = False
        self.restart_now = False
        try:
            assert self.node_dir is not None
            for path in socket_paths(str(kernel_socket_base(self.node_dir))):  # a kernel leaves its sockets behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.report("starting")
            # The kernel's stdout carries only ipykernel's banner for terminal users (a node-side
            # --existing path, "Ctrl-C will not work"): misleading in the job log. Its errors go
            # to stderr, the log; what user code prints travels over IOPub.
            self.kernel = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE)
            self.stderr_done.clear()
            threading.Thread(target=self._forward_stderr, args=(self.kernel.stderr,), daemon=True).start()
            self.wait_for_sockets(float(self.launch.get("start_timeout", 60)))
            if not self.runtime_forbids_userns:
                self.forbid_user_namespaces()
        except Exception as e:
            self.fail(e)
            return None
        self.report("ready", startup_seconds=round(time.monotonic() - started, 3))
        _say(f"kernel ready after {time.monotonic() - started:.2f} s")
        self.kernel_ready = True
        watches: list[SandboxWatch | IdleWatch] = []
        if self.memory_limit or self.process_limit:
            watches.append(SandboxWatch(self.sandbox_root(), self.memory_limit, self.process_limit, self.on_limit,
                                        lambda: bool((read_untrusted_json(sandbox_rw(self.node_dir) / LIMITS_REPORT)
                                                      or {}).get("nproc"))))
        if self.idle_timeout > 0 or self.launch.get("restore"):
            restore = self.launch.get("restore")
            watches.append(IdleWatch(self.node_dir, sandbox_rw(self.node_dir), self.idle_timeout, self.snapshot_dir,
                                     lambda: self.listener.shell_clients() if self.listener else 0,
                                     self.on_hibernated, _say, Path(restore) if restore else None))
        for watch in watches:
            watch.start()
        try:
            return self.kernel.wait()
        finally:
            for watch in watches:
                watch.stop()

    def sandbox_root(self) -> int:
        """The process every process of the sandbox is below: the runtime's (bwrap, apptainer), or
        podman's container's init (conmon daemonizes: the container is not below `podman run`)."""
        assert self.kernel is not None
        if self.podman is not None:
            self.container_init = None
            self.kernel_pid()
            if self.container_init is not None:
                return self.container_init
            _say("podman: the container's processes were not found: the limits watch sees only `podman run`")
        return self.kernel.pid

    def kill_kernel(self) -> None:
        """SIGKILL the kernel: the runtime's process, and podman's container (not below it)."""
        if self.kernel is not None and self.kernel.poll() is None:
            self.kernel.kill()
        if self.container_init is not None:
            with contextlib.suppress(OSError):
                os.kill(self.container_init, signal.SIGKILL)

    def copy_restore(self, source: Path, expected_sha256: str | None) -> None:
        """The saved variables of a hibernated kernel, into the node-side directory for the
        kernel to load (it removes them there once loaded)."""
        assert self.node_dir is not None
        if not source.exists():
            if not self.restarts:
                raise AgentError(f"resume: the saved variables {source} are gone")
            _say(f"resume: the saved variables {source} are gone since the last run of this job: "
                 "starting without them")
            return
        try:
            sha256 = copy_checked(source, sandbox_rw(self.node_dir) / RESTORE)
        except OSError as e:
            raise AgentError(f"resume: cannot read the saved variables {source}: {e}") from None
        if expected_sha256 and sha256 != expected_sha256:
            (sandbox_rw(self.node_dir) / RESTORE).unlink()
            raise AgentError(f"resume: {source} changed after the kernel saved it (its SHA-256 differs); "
                             "not loaded. Start a new kernel, or move the file away")

    def snapshot_dir(self) -> Path:
        return snapshot_dir(self.launch.get("workspace"), self.files.dir.parent.parent, self.files.name)

    def on_hibernated(self, snapshot: Path, report: dict[str, Any], sha256: str) -> None:
        """The idle kernel's variables are saved: end it, and the job."""
        self.hibernation = {"snapshot": str(snapshot), "snapshot_sha256": sha256, "saved": report.get("saved", []),
                            "unsaved": report.get("unsaved", {})}
        unsaved = report.get("unsaved", {})
        _say(f"hibernated: {len(report.get('saved', []))} variables saved to {snapshot}"
             + (f"; not saved: {', '.join(sorted(unsaved))}" if unsaved else ""))
        if self.kernel is not None and self.kernel.poll() is None:
            self.kernel.terminate()

    def on_limit(self, reason: str) -> None:
        """The watch found the sandbox over a limit: end the kernel, and say why."""
        self.limit_reason = reason
        _say(f"ending the kernel: {reason}")
        self.kill_kernel()  # a fork bomb or a memory hog gets no grace period

    def fail(self, e: Exception) -> int:
        """Every failure before readiness is reported the same way."""
        message = f"launch.json lacks {e}" if isinstance(e, KeyError) else str(e)
        if isinstance(e, OSError) and self.kernel is None:
            message = f"could not start the runtime: {e}"
        _say(f"failed: {message}")
        self.cleanup()
        if self.stop_signal is None:  # a signal (preemption, a requeue) may bring this job back
            forget_secrets(self.files)
        self.report("failed", message=message)
        return 1

    def on_restart(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1: end the kernel process now and start a new one in this job (a forced restart).
        Ignored while a kernel is starting: it is the new one already."""
        if not self.kernel_ready:
            return
        self.restart_now = True
        if self.kernel is not None and self.kernel.poll() is None:
            self.kernel.terminate()

    def take_restart_request(self) -> bool:
        """A restart was asked for: a forced one (SIGUSR1) or a graceful one (the restart file).
        jupyter_client writes the latter just after it sent shutdown_request, so a kernel that
        ended cleanly may be a moment ahead of it: wait briefly (listing the directory, which
        also revalidates a network file system's cache), unless the shutdown file says no
        restart is coming."""
        deadline = time.monotonic() + RESTART_GRACE_SECONDS
        requested = self.restart_now
        while not requested:
            try:
                listing = os.listdir(self.files.dir)
            except FileNotFoundError:  # the state is gone (shut down): no restart
                break
            requested = self.files.restart_request.name in listing
            if (requested or self.files.shutdown_request.name in listing or self.kernel is None
                    or self.kernel.returncode != 0 or time.monotonic() > deadline):
                break
            time.sleep(0.05)
        self.restart_now = False
        for request in (self.files.restart_request, self.files.shutdown_request):
            with contextlib.suppress(FileNotFoundError):
                request.unlink()
        return requested

    def cleanup(self) -> None:
        # The node-side directory first: it holds the key, and Slurm may SIGKILL this agent
        # (KillWait) while it waits below for the kernel to end.
        self.remove_node_dir()
        if self.kernel is not None and self.kernel.poll() is None:
            # SIGTERM first: Apptainer's starter passes it on to the container, which then ends
            # whole; bwrap's sandbox dies with bwrap; `podman run` passes it to the container.
            self.kernel.terminate()
            try:
                self.kernel.wait(KERNEL_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill_kernel()
                self.kernel.wait()
        self.remove_container()
        end_leftovers()
        self.remove_job_storage()
        self.podman = None  # done: a second clean-up must not run podman again (it would make its storage anew)
        if self.deadline is not None:
            self.deadline.stop()
            self.deadline = None
        if self.egress is not None:
            self.egress.stop()
            self.egress = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
            self.tcp = None
        self.remove_node_dir()  # what the threads stopped above may have written meanwhile

    def remove_node_dir(self) -> None:
        if self.node_dir is not None:
            shutil.rmtree(self.node_dir, ignore_errors=True)


AGENT_MARKER = "hpc_kernels.agent"


def end_leftovers() -> None:
    """The agent is a child subreaper (see run): whatever a runtime left behind (a container's
    init in its own PID namespace outlives a killed starter) is below us. End it all."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _become_subreaper() -> None:
    """Orphans below the agent are re-parented to it, not to the node's init (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


AGENT_SIGNALS = {"interrupt": signal.SIGINT, "restart": signal.SIGUSR1}


def signal_agent(state_dir: Path, action: str) -> str | None:
    """Signal this kernel's agent, run on its node (``python -m hpc_kernels.agent interrupt|restart
    STATE_DIR`` as a step of the job): SIGINT, which the agent passes to the kernel, or SIGUSR1,
    which restarts the kernel in the job. Only the agent is signalled, whichever way the kernel
    runs; Slurm's own signalling of a step would reach every process in it (bubblewrap dies of
    SIGINT). Returns why it could not, or None."""
    agent = state_json(KernelFiles(state_dir).agent)
    if not kernel_lives(agent) or not is_running(agent, f"{AGENT_MARKER} {state_dir}"):
        return f"no running agent of {state_dir} on {socket.gethostname()} (agent.json: {agent.get('state')})"
    os.kill(int(agent["pid"]), AGENT_SIGNALS[action])
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] in AGENT_SIGNALS:
        problem = signal_agent(Path(args[1]), args[0])
        if problem:
            print(problem, file=sys.stderr)
        return 1 if problem else 0
    if len(args) != 1:
        print("usage: python -m hpc_kernels.agent STATE_DIR | {interrupt,restart} STATE_DIR", file=sys.stderr)
        return 2
    unblock_signals()  # an on-node agent may be started by a bridge, which blocks them
    return Agent(Path(args[0])).run()


if __name__ == "__main__":
    sys.exit(main())
