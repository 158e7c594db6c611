"""A kernel's life seen from the login node: submit, wait until ready, relay, shut down.

The CLI (and, later, the kernel provisioner) call these functions; each one takes the kernel's
lock while it changes the kernel's state, so two commands at once do not interleave.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import python_env, relay_daemon
from .errors import HpcKernelsError, KernelNotFound, KernelStartError, RelayError
from .node_tmp import kernel_socket_base
from .paths import exposes_private_files, private_paths, read_json, runtime_root, write_json, write_private_file
from .profiles import KernelRequest, Profile, apply_request, check_kernel_name, load_profile
from .processes import cmdline, identity, is_running, parent_variable, python_module, terminate
from .relay import connection_info, login_dirs_of, socket_paths
from .render import job_name_of, render_kernel_script
from .slurm import (
    NODE_STEP_ENVIRONMENT,
    JobInfo,
    cancel,
    job_info,
    job_infos,
    job_steps,
    ours_named,
    srun_into_job,
    submit_batch,
)
from .state import (
    KernelFiles,
    KernelRecord,
    create_kernel_dir,
    forget_secrets,
    kernel_files,
    kernel_lives,
    list_records,
    load_record,
    locked,
    remove_kernel_dir,
    save_record,
    state_json,
)

Progress = Callable[[str], None]
LOG_TAIL_LINES = 25
POLL_SECONDS = 0.1
STEP_STOP_SECONDS = 15.0
MAX_POLL_SECONDS = 5.0
AGENT_SIGNAL_TIMEOUT = 30.0


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Looking at a kernel


@dataclass(frozen=True)
class KernelView:
    """What is known of a kernel right now: the record, Slurm's view of the job, the agent's report."""

    record: KernelRecord
    job: JobInfo | None
    agent: dict[str, Any]
    relay: dict[str, Any]
    step_alive: bool = True  # for a kernel running as a step of the user's allocation: its srun runs

    @property
    def agent_state(self) -> str:
        if self.requeued and self.agent.get("submit_time") != self.job.submit_time:  # type: ignore[union-attr]
            return ""  # a report of the kernel that ran before the requeue
        return str(self.agent.get("state", ""))

    @property
    def requeued(self) -> bool:
        """Slurm requeued the job since it was submitted (its node failed, it was preempted): the
        kernel that ran before is gone with its variables, and a new one starts in the job."""
        return bool(self.job and self.record.submit_time and self.job.submit_time
                    and self.job.submit_time != self.record.submit_time)

    @property
    def job_alive(self) -> bool:
        """The kernel's job (or, in someone's allocation, the kernel's step) has not ended."""
        return self.job is not None and not self.job.finished and self.step_alive

    @property
    def state(self) -> str:
        """One word for people: pending, starting, ready, failed, hibernated or ended."""
        if self.record.status == "failed":
            return "failed"
        if self.job_alive:
            assert self.job is not None
            if self.job.state == "PENDING":
                return "pending"
            if self.agent_state == "ready":
                return "ready"
            if self.agent_state in ("failed", "ended", "hibernated"):
                return self.agent_state
            return "starting"
        return self.agent_state if self.agent_state in ("failed", "hibernated") else "ended"

    @property
    def node(self) -> str | None:
        return self.agent.get("node") or (self.job.node if self.job else None) or self.record.node


def _same_job(record: KernelRecord, job: JobInfo | None) -> JobInfo | None:
    """``job`` if it is the one this record submitted; None for a job that reuses its id. A
    requeue resets SubmitTime too: a job of another SubmitTime is ours if it has our name."""
    if job is None or (record.submit_time and job.submit_time and job.submit_time != record.submit_time
                       and job.name != job_name_of(record.name)):
        return None
    return job


def _view(record: KernelRecord, job: JobInfo | None) -> KernelView:
    files = kernel_files(record.name)
    job = _same_job(record, job)
    step_alive = record.step is None or (job is not None and _step_alive(record))
    current = KernelView(record, job, state_json(files.agent), state_json(files.relay), step_alive)
    if record.job_id and record.status != "submitting" and not current.job_alive:
        forget_secrets(files)  # its job is over (however it ended): nothing may connect again
    return current


def _our_steps(record: KernelRecord) -> list[str]:
    """Slurm's ids of the step running this kernel in the user's allocation (named hk-<name>)."""
    return [step for step, name in job_steps(record.job_id or "").items() if name == f"hk-{record.name}"]


def _step_alive(record: KernelRecord) -> bool:
    """Asked of Slurm, so any login node gets the same answer; while the step is still being
    launched (not yet listed), the srun we started counts, where we started it."""
    assert record.step is not None
    if record.on_node:
        if not _on_this_host(record):  # only the agent's own node can look at it: trust its report
            return kernel_lives(state_json(kernel_files(record.name).agent))
        return is_running(record.step, _step_marker(kernel_files(record.name)))
    return bool(_our_steps(record)) or is_running(record.step, _step_marker(kernel_files(record.name)))


def _on_this_host(record: KernelRecord) -> bool:
    return record.step is not None and record.step.get("host") == socket.gethostname()


def _step_marker(files: KernelFiles) -> str:
    return f"hpc_kernels.agent {files.dir}"


def _end_kernel_job(record: KernelRecord) -> str:
    """End what runs the kernel: our own job is cancelled; in the user's allocation only our
    step is stopped (the allocation is theirs). Returns what was done, for people."""
    if record.step is not None:
        for step in [] if record.on_node else _our_steps(record):
            cancel(step)  # JOB.STEP: only the step, never the allocation
        terminate(record.step, _step_marker(kernel_files(record.name)), STEP_STOP_SECONDS)
        return f"stopped the kernel's {'agent on this node' if record.on_node else 'step'} in job {record.job_id}"
    if record.job_id:
        cancel(record.job_id)
    return f"cancelled job {record.job_id}"


def _wait_kernel_gone(record: KernelRecord, timeout: float) -> bool:
    """Wait until the kernel's job (or step) has ended; False if it is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.step is not None:
            if not _step_alive(record):
                return True
        else:
            job = job_info(record.job_id) if record.job_id else None
            if job is None or job.finished:  # COMPLETING is not finished yet
                return True
        time.sleep(POLL_SECONDS)
    return False


def view(name: str) -> KernelView:
    """What is known of kernel ``name`` right now."""
    record = load_record(name)
    if record.on_node and _on_this_host(record):
        return _view(record, _job_we_run_in(record))
    return _view(record, job_info(record.job_id) if record.job_id else None)


def _job_we_run_in(record: KernelRecord) -> JobInfo | None:
    """An on-node kernel seen from its own node: its job is the one we run in, alive as long as
    its agent is (Slurm ends the agent with the job). Asking slurmctld instead would cost a query
    per look, and frontends and batch tasks look every second."""
    if not record.job_id or not is_running(record.step, _step_marker(kernel_files(record.name))):
        return None
    return JobInfo(job_id=record.job_id, state="RUNNING", reason="", node=socket.gethostname(), exit_code="",
                   fields={})


def view_all() -> list[KernelView]:
    """Every kernel of this user, with one Slurm query for all of them."""
    records = list_records()
    jobs = job_infos([r.job_id for r in records if r.job_id])
    return [_view(r, jobs.get(r.job_id or "")) for r in records]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Submit


def launch_spec(profile: Profile, request: KernelRequest, python: str, *,
                listen_tcp: bool | None = None) -> dict[str, Any]:
    """What the node agent needs (launch.json). No secrets: the key has its own 0600 file.
    ``listen_tcp`` overrides whether the agent listens for the relay's tcp transport."""
    home, state = private_paths()
    return {
        "profile": profile.name,
        "runtime": profile.get("runtime", "kind"),
        "runtime_executable": profile.get("runtime", "executable"),
        "image": profile.get("runtime", "image"),
        **({"podman": podman_spec(profile)} if profile.get("runtime", "kind") == "podman" else {}),
        "python": python,
        "kernel_python": kernel_python(profile, python),
        "kernel_command": profile.get("kernel", "command"),
        "kernel_env": profile.get("kernel", "env"),
        "start_timeout": profile.get("kernel", "start_timeout"),
        "time_warning": profile.get("kernel", "time_warning"),
        "node_tmp": profile.get("paths", "node_tmp"),
        "hide": [*profile.get("runtime", "hide"), home, *state],
        "binds": profile.get("runtime", "binds"),
        "system_paths": profile.get("runtime", "system_paths"),
        "allow_hosts": profile.get("runtime", "allow_hosts"),
        "limits_memory": profile.get("limits", "memory"),
        "limits_processes": profile.get("limits", "processes"),
        "idle_timeout": profile.get("limits", "idle_timeout"),
        **({"python_env": profile.get("kernel", "python_env")} if profile.get("kernel", "python_env") else {}),
        "restore": request.restore,
        "restore_sha256": request.restore_sha256,
        "private": [home, *state],  # the home first: what a workspace or bind must not show
        "workspace": request.workspace,
        "workspace_rw": profile.get("workspace", "mode") == "rw",
        "tune_srun_tcp": profile.get("relay", "tune_srun_tcp"),
        "relay": relay_spec(profile, listen_tcp=listen_tcp),
    }


def podman_spec(profile: Profile) -> dict[str, Any]:
    """The podman runtime's settings in launch.json."""
    return {key: profile.get("runtime", f"podman_{key}") for key in ("command", "oci_runtime", "storage", "gpus")} | {
        "image_archive": profile.get("runtime", "image_archive")}


def relay_spec(profile: Profile, *, listen_tcp: bool | None = None) -> dict[str, Any]:
    """The relay's settings in launch.json: the transport, and whether the agent listens for
    the tcp transport (it does for a tcp kernel; ``hpc-kernel doctor`` asks for it to try tcp)."""
    transport = profile.get("relay", "transport")
    return {
        "transport": transport,
        "listen_tcp": transport == "tcp" if listen_tcp is None else listen_tcp,
        "tcp_ports": profile.get("relay", "tcp_ports"),
        "ssh_options": profile.get("relay", "ssh_options"),
    }


def kernel_python(profile: Profile, node_python: str) -> str:
    """The interpreter ``{python}`` stands for inside the sandbox: ``kernel.python``, else the node's
    (bubblewrap shows the node's file system) or ``python3`` on the image's PATH (Apptainer)."""
    configured = profile.get("kernel", "python")
    if configured:
        return str(configured)
    return node_python if profile.get("runtime", "kind") == "bwrap" else "python3"


def resolve_request(profile_name: str, request: KernelRequest) -> Profile:
    """The profile with the request applied, everything checked: what submit and render use."""
    check_kernel_name(request.name)
    if request.allocation:
        given = [f"--{k}" for k in ("time", "cpus", "mem", "partition", "gpus") if getattr(request, k) is not None]
        if given:
            raise HpcKernelsError(
                f"{', '.join(given)}: inside an allocation (job {request.allocation}) the kernel is a step of it "
                "and has what the allocation has; use --new-job to submit a job with these")
    profile = apply_request(load_profile(profile_name), request)
    private = private_paths()
    if request.workspace and profile.get("runtime", "kind") == "apptainer" and any(c in request.workspace for c in ",:"):
        raise HpcKernelsError(f"workspace {request.workspace}: Apptainer cannot bind a path with ',' or ':' in it "
                              "(they separate its --bind fields); choose or link another directory")
    if request.workspace:
        why = exposes_private_files(request.workspace, *private)
        if why:
            raise HpcKernelsError(f"{why}; choose a project directory with --workspace, or --no-workspace")
    for bind in profile.get("runtime", "binds"):
        why = exposes_private_files(bind.partition(":")[0], *private, what="the bind")
        if why:
            raise HpcKernelsError(f"runtime.binds ({profile.origins.get('runtime.binds', profile.source)}): {why}")
    return profile


def node_python(profile: Profile) -> str:
    return str(profile.get("paths", "python") or sys.executable)


def kernel_script(profile: Profile, name: str, allocation: str | None = None) -> str:
    """The exact script ``submit`` uses for kernel ``name``: a batch script, or in the user's
    allocation ``allocation``, the script that starts the kernel as its step."""
    files = kernel_files(name)
    templates = profile.get("paths", "templates")
    return render_kernel_script(
        profile, kernel_name=name, state_dir=files.dir, log_path=files.log, python=node_python(profile),
        template_dir=Path(templates) if templates else None, allocation=allocation,
    )


def _spawn_detached(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (it outlives this command), output to ``log``, in
    ``/`` (the caller's directory may be a workspace the kernel can write; srun passes it on)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                close_fds=True, cwd="/", env=env)
    finally:
        os.close(fd)


def _start_step(files: KernelFiles) -> dict[str, Any]:
    """Run the step script detached (it outlives this command); return the srun's identity."""
    proc = _spawn_detached(["/bin/bash", str(files.script)], files.log)
    # The script execs srun: wait until the process is srun, so that its identity is srun's.
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _step_marker(files) in cmdline(proc.pid):
                break
            time.sleep(0.01)
    except BaseException:  # interrupted before the record knows the step: end it here
        proc.terminate()
        proc.wait(STEP_STOP_SECONDS)
        raise
    if proc.poll() is not None:
        raise KernelStartError(f"the step could not start (exit code {proc.returncode}):\n{log_tail(files.log)}")
    return identity(proc.pid)


def profile_to_start(profile_name: str, request: KernelRequest) -> Profile:
    """resolve_request, and the image of an Apptainer profile must exist (checked here, where
    submit runs, since a missing image would only fail on the node after the queue)."""
    profile = resolve_request(profile_name, request)
    image = profile.get("runtime", "image")
    if profile.get("runtime", "kind") == "apptainer" and not os.path.exists(image):
        where = profile.origins.get("runtime.image", str(profile.source))
        raise HpcKernelsError(f"runtime.image ({where}): {image} does not exist; build one with "
                              "`hpc-kernel image build`, check one with `hpc-kernel image check`")
    return with_python_env(profile, request.workspace)


def check_python_env(profile: Profile, path: str, workspace: str | None = None) -> python_env.EnvReport:
    """The verdict on Python environment ``path`` (``~`` and variables expanded) for a kernel of
    ``profile`` (its system paths, what it binds read-write, its image) with ``workspace``."""
    home, state = private_paths()
    read_write = [b.partition(":")[0] for b in profile.get("runtime", "binds") if b.endswith(":rw")]
    if workspace and profile.get("workspace", "mode") == "rw":
        read_write.append(workspace)
    apptainer = profile.get("runtime", "kind") == "apptainer"
    return python_env.check(
        os.path.expanduser(os.path.expandvars(path)), system_paths=profile.get("runtime", "system_paths"),
        home=home, private=state, read_write=read_write, node_tmp=profile.get("paths", "node_tmp"),
        image=profile.get("runtime", "image") if apptainer else None,
        apptainer=profile.get("runtime", "executable") or "apptainer")


def with_python_env(profile: Profile, workspace: str | None = None) -> Profile:
    """The profile's ``kernel.python_env`` (or ``--python-env``), checked here, before anything is
    queued, and made the kernel's Python with what it needs bound read-only; the profile as it
    is without one. A problem stops the start with every reason found."""
    path = profile.get("kernel", "python_env")
    if not path:
        return profile
    report = check_python_env(profile, path, workspace)
    where = profile.origins.get("kernel.python_env", str(profile.source))
    what = "--python-env" if where.startswith("command line") else f"kernel.python_env ({where})"
    if not report.ok:
        raise HpcKernelsError(f"{what} {path}: cannot run the kernel (nothing was submitted):\n"
                              + "\n".join(f"  - {problem}" for problem in report.problems)
                              + "\n`hpc-kernel env check PATH` says what is there")
    return python_env.apply(profile, report, what)


def _write_secrets(files: KernelFiles, *, curve: bool, tls: bool = False, key: str | None = None) -> None:
    """The HMAC key (``key``, else a new one), with ``curve`` a CurveZMQ key pair for the
    kernel's sockets, with ``tls`` the relay's tcp transport's certificates (:mod:`hpc_kernels.tls`):
    0600 files on the shared file system, never on a command line or in an environment."""
    write_private_file(files.key, (key or secrets.token_hex(32)) + "\n")
    if tls:
        from .tls import CredentialFiles, make_credentials, write_credentials

        write_credentials(CredentialFiles(files.dir), make_credentials(files.name))
    if curve:
        import zmq

        public, secret = zmq.curve_keypair()
        write_json(files.curve, {"public": public.decode(), "secret": secret.decode()})


def _claim_name(name: str, *, resuming: bool = False) -> KernelFiles:
    """The new kernel's state directory (hold the kernel's lock): a name whose job is gone is
    taken over; a live one is an error, and so is a hibernated one unless it is being resumed."""
    _forget_if_dead(name, resuming=resuming)
    try:
        return create_kernel_dir(name)
    except FileExistsError:
        raise HpcKernelsError(
            f"a kernel named {name!r} already exists; use another --name or `hpc-kernel shutdown {name}`"
        ) from None


def submit(profile_name: str, request: KernelRequest, *, listen_tcp: bool | None = None,
           key: str | None = None) -> KernelRecord:
    """Write the kernel's state, render its job script and submit it. Returns at once.
    ``listen_tcp`` overrides whether the agent listens for the relay's tcp transport; ``key``
    is the HMAC key to sign with (a frontend's own), else a new one."""
    profile = profile_to_start(profile_name, request)
    name = request.name
    python = node_python(profile)
    with locked(name):
        files = _claim_name(name, resuming=request.restore is not None)
        record = KernelRecord(
            name=name,
            profile=profile.name,
            status="submitting",
            workspace=request.workspace,
            workspace_rw=profile.get("workspace", "mode") == "rw",
            request={key: getattr(request, key) for key in CARRIED_ON_RESUME if getattr(request, key)},
        )
        try:
            save_record(record)
            launch = launch_spec(profile, request, python, listen_tcp=listen_tcp)
            _write_secrets(files, curve=request.curve, tls=launch["relay"]["listen_tcp"], key=key)
            write_json(files.launch, launch)
            script = kernel_script(profile, name, request.allocation)
            write_private_file(files.script, script)
            write_private_file(files.log, "")  # Slurm writes to it and keeps its mode: 0600
            submitted: JobInfo | None = None
            if request.allocation:
                submitted = allocation = job_info(request.allocation)
                if allocation is None or not allocation.running:
                    raise HpcKernelsError(
                        f"SLURM_JOB_ID is {request.allocation}, but that job is "
                        f"{allocation.state if allocation else 'not known to Slurm'}; "
                        "leave the allocation's environment or use --new-job")
                record.job_id = request.allocation
                record.step = _start_step(files)
            else:
                record.job_id = submit_batch(script)
                submitted = job_info(record.job_id)
            record.status = "submitted"
            record.submit_time = submitted.submit_time if submitted else None
            save_record(record)
        except BaseException as e:
            # Nothing may outlive a failed submit: not the job (if sbatch gave us one), not the files.
            if record.job_id and (record.step is not None or not request.allocation):
                _end_kernel_job(record)
            if request.restore and files.launch.exists():
                # A resume keeps a failed record, so that `submit --resume` can try again.
                _mark_failed(record, f"the resume did not start: {e}")
            else:
                remove_kernel_dir(name)
            raise
    return record


def _mark_failed(record: KernelRecord, message: str) -> None:
    record.status = "failed"
    record.message = message
    save_record(record)


def abandon_resume(name: str, why: str) -> None:
    """A resumed kernel that will not be used (Ctrl-C while it started, its relay failed): its
    job ends, and it stays as a failed kernel with its saved variables, to resume again."""
    with locked(name):
        current = view(name)
        if current.job_alive:
            _end_kernel_job(current.record)
            _wait_kernel_gone(current.record, 60)
        stop_relay(kernel_files(name))
        _mark_failed(current.record, why)


def resume_request(name: str, request: KernelRequest) -> tuple[str, KernelRequest]:
    """The profile and request that resume hibernated kernel ``name`` on a new job: its profile,
    name and workspace, its saved variables to load, and what ``request`` sets besides."""
    current = view(name)
    if current.state == "hibernated" and current.job_alive:  # its job is still finishing
        _wait_kernel_gone(current.record, 60)
        current = view(name)
    launch = read_json(kernel_files(name).launch) or {}
    if current.state == "hibernated":
        snapshot, sha256 = str(current.agent.get("snapshot") or ""), current.agent.get("snapshot_sha256")
    elif current.state in ("failed", "ended") and launch.get("restore"):
        snapshot, sha256 = str(launch["restore"]), launch.get("restore_sha256")  # a resume that did not start
    else:
        raise HpcKernelsError(f"kernel {name!r} is {current.state}, not hibernated: there is nothing to resume")
    if not snapshot or not os.path.isfile(snapshot):
        raise HpcKernelsError(f"kernel {name!r} hibernated, but its saved variables ({snapshot or 'no file'}) "
                              "are gone; start a new kernel")
    record = current.record
    carried = {key: value for key, value in record.request.items()
               if key in CARRIED_ON_RESUME and not getattr(request, key)
               and not (request.allocation and key in ALLOCATION_FIXED)}
    if "allow_hosts" in carried:
        carried["allow_hosts"] = tuple(carried["allow_hosts"])
    return record.profile, replace(request, **carried, name=name, restore=snapshot, restore_sha256=sha256,
                                   workspace=record.workspace, workspace_rw=record.workspace_rw or request.workspace_rw)


# What a resumed kernel keeps of the command line that started the hibernated one (a flag given
# to --resume wins).
CARRIED_ON_RESUME = ("time", "cpus", "mem", "partition", "gpus", "image", "relay", "time_warning", "allow_hosts",
                     "idle_timeout", "python_env")
ALLOCATION_FIXED = ("time", "cpus", "mem", "partition", "gpus")  # a step of an allocation has the allocation's


def on_a_node_of_a_job(environ: dict[str, str] | None = None) -> bool:
    """This process runs inside a Slurm job on a compute node (a job step's environment), not
    merely with SLURM_JOB_ID set (as in an salloc shell on the login node)."""
    env = os.environ if environ is None else environ
    return bool(env.get("SLURM_JOB_ID") and env.get("SLURMD_NODENAME"))


def starts_on_node(profile_name: str, mode: str) -> bool:
    """Where a frontend's kernel starts (``mode``: a kernelspec's auto, job or node): ``auto`` is
    this node when the frontend runs inside a job on a compute node and the profile's
    ``kernel.on_node`` allows it, else a job."""
    if mode != "auto":
        return mode == "node"
    return on_a_node_of_a_job() and bool(load_profile(profile_name).get("kernel", "on_node"))


def start_on_node(profile_name: str, request: KernelRequest, *, key: str | None = None) -> KernelRecord:
    """Start the kernel in the profile's sandbox on this node, for a frontend that already runs
    in a job here: no job, no step, no relay. The agent runs as our child, in its own session.
    ``key``: as for :func:`submit`."""
    request = replace(request, allocation=None)
    profile = profile_to_start(profile_name, request)
    name = request.name
    python = node_python(profile)
    with locked(name):
        files = _claim_name(name)
        record = KernelRecord(name=name, profile=profile.name, status="submitting", workspace=request.workspace,
                              workspace_rw=profile.get("workspace", "mode") == "rw", on_node=True,
                              job_id=os.environ.get("SLURM_JOB_ID"))
        try:
            save_record(record)
            launch = launch_spec(profile, request, python, listen_tcp=False)  # no relay on the node
            _write_secrets(files, curve=request.curve, key=key)
            write_json(files.launch, launch)
            write_private_file(files.log, "")
            # The agent ends with the frontend that started it (a JupyterLab, a batch task), even
            # where Slurm would not follow it (proctrack/linuxproc loses a reparented process).
            agent = _spawn_detached(python_module(python, "hpc_kernels.agent", str(files.dir)), files.log,
                                    env={**os.environ, **parent_variable()})
            record.step = identity(agent.pid)
            record.status = "submitted"
            save_record(record)
        except BaseException:
            if record.step is not None:
                terminate(record.step, _step_marker(files), STEP_STOP_SECONDS)
            remove_kernel_dir(name)
            raise
    return record


def _forget_if_dead(name: str, *, resuming: bool = False) -> None:
    """A record whose job is gone (failed or ended) does not block its name; anything else does."""
    files = kernel_files(name)
    if not files.record.exists():
        return
    current = view(name)
    if current.state == "hibernated" and not resuming:
        raise HpcKernelsError(
            f"kernel {name!r} is hibernated (its variables are in {current.agent.get('snapshot')}): "
            f"`hpc-kernel submit --resume {name}` brings it back, `hpc-kernel shutdown {name}` discards it; "
            "or use another --name")
    if current.job_alive:
        raise HpcKernelsError(
            f"a kernel named {name!r} already exists (job {current.record.job_id}, {current.state}); "
            f"use another --name or `hpc-kernel shutdown {name}`"
        )
    stop_relay(files)
    remove_kernel_dir(name)


def _start_failure(current: KernelView, files: KernelFiles, why: str) -> KernelStartError:
    job = current.job
    parts = [f"kernel {current.record.name!r} (job {current.record.job_id}) {why}"]
    if job is not None:
        parts.append(f"Slurm: {job.state}" + (f", reason {job.reason}" if job.reason else "")
                     + (f", exit code {job.exit_code}" if job.exit_code and job.exit_code != "0:0" else ""))
    if current.agent.get("message"):
        parts.append(f"agent on {current.agent.get('node')}: {current.agent['message']}")
    tail = log_tail(files.log)
    parts.append(f"last lines of {files.log}:\n{tail}" if tail else f"the job wrote no log ({files.log})")
    return KernelStartError("\n".join(parts))


def wait_until_ready(name: str, *, timeout: float | None = None, progress: Progress = _quiet) -> KernelRecord:
    """Follow the job until its kernel is ready; show each change of state through ``progress``.

    If the job ends or the agent reports failure first, the job is cancelled (if still there),
    the record is marked failed, and KernelStartError carries Slurm's reason and the log tail.
    """
    files = kernel_files(name)
    started = time.monotonic()
    last = ""
    interval = POLL_SECONDS
    while True:
        current = view(name)
        if current.record.status == "ready" and current.job_alive:
            return current.record
        why = None
        if current.agent_state in ("failed", "ended"):
            why = "failed before its kernel was ready"
        elif not current.job_alive:
            why = "ended before its kernel was ready"
        elif timeout is not None and time.monotonic() - started > timeout:
            why = f"was not ready within {timeout:.0f} s; it was cancelled"
        if why:
            if current.job_alive:
                _end_kernel_job(current.record)
                _wait_kernel_gone(current.record, 30)
            time.sleep(0.5)  # the job's last words reach the shared log file
            error = _start_failure(view(name), files, why)
            _update_record(name, status="failed", message=str(error).splitlines()[0])
            raise error
        job = current.job
        assert job is not None
        if current.agent_state == "ready":
            record = _update_record(name, status="ready", node=current.node)
            progress(f"kernel ready on {current.node} (job {job.job_id})")
            return record
        if job.state == "PENDING":
            line = f"PENDING ({job.reason or 'waiting'})"
            if job.expected_start:
                line += f", expected to start {job.expected_start}"
        elif current.agent_state == "starting":
            line = f"RUNNING on {current.node}: starting the kernel"
        else:
            line = f"{job.state} on {job.node}" if job.node else job.state
        if line != last:
            progress(line)
            last = line
        # Quick while the job starts; slower and slower (up to MAX_POLL_SECONDS) while it waits in
        # the queue, so that many waiting kernels do not hammer slurmctld.
        interval = POLL_SECONDS if job.state != "PENDING" else min(interval * 1.5, MAX_POLL_SECONDS)
        time.sleep(interval)


def _update_record(name: str, **changes: Any) -> KernelRecord:
    with locked(name):
        record = load_record(name)
        for key, value in changes.items():
            setattr(record, key, value)
        save_record(record)
        return record


# ---------------------------------------------------------------------------------------------
# The login-side relay


def relay_connection_file(files: KernelFiles) -> Path | None:
    """The login-side connection file, if this kernel's relay runs here and has one."""
    relay = state_json(files.relay)
    connection_file = relay.get("connection_file")
    if connection_file and is_running(relay, relay_daemon.DAEMON_MARKER) and os.path.exists(connection_file):
        return Path(connection_file)
    return None


def ensure_relay(name: str, *, timeout: float | None = None, progress: Progress = _quiet) -> Path:
    """The login-side connection file of a ready kernel, starting (or restarting) its relay."""
    record = wait_until_ready(name, timeout=timeout, progress=progress)
    files = kernel_files(name)
    if record.on_node:  # the client is on the kernel's node: its own sockets, no relay
        return _node_client_connection(files)
    with locked(name):
        load_record(name)  # a shutdown that ran while we waited for the lock removed it
        existing = relay_connection_file(files)
        if existing is not None:
            return existing
        stop_relay(files)  # one that runs without its connection file (say, /run/user was cleaned)
        return start_relay(files)


def start_relay(files: KernelFiles, transport: str | None = None, *, record: bool = True) -> Path:
    """The kernel's login-side relay (over ``transport``, else the kernel's own), started in this
    user's relay daemon here (:mod:`hpc_kernels.relay_daemon`) unless it runs; its connection
    file once it is ready, or RelayError with the reason and its log's tail. Without ``record``
    the kernel's relay record is left alone (a second relay, beside the one `connect` finds)."""
    answer = relay_daemon.request({"op": "start", "state_dir": str(files.dir), "transport": transport,
                                   "record": record}, start=True)
    assert answer is not None
    if answer.get("ok"):
        connection_file = Path(answer["connection_file"])
        if connection_file.parent.parent != runtime_root():  # only a relay directory of ours
            raise RelayError(f"the relay daemon answered {connection_file}, outside {runtime_root()}")
        return connection_file
    tail = log_tail(files.relay_log, 10)
    raise RelayError(str(answer.get("error")) + (f"\nlast lines of {files.relay_log}:\n{tail}" if tail else ""))


def keep_relay_sockets(name: str) -> None:
    """A second name (a hard link) for each login-side socket of the kernel's relay.

    jupyter_client removes a kernel's IPC socket files when it restarts the kernel; for us
    those are the relay's listening sockets, which outlive the restart. Restored by
    :func:`restore_relay_sockets` at the same paths, so clients reconnect where they were."""
    for path, kept in _relay_socket_names(name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(kept)
        with contextlib.suppress(FileNotFoundError):
            os.link(path, kept)


def _node_client_connection(files: KernelFiles) -> Path:
    """For a client on the kernel's node: a connection file whose socket paths are symbolic
    links to the kernel's own sockets, in a private ``client/`` directory of the node-side
    directory, outside what the sandbox can write (the kernel could otherwise point the frontend,
    which runs with the network, elsewhere at its next restart). jupyter_client removes a
    kernel's IPC files when it restarts it; so it removes these links, and the agent's next
    kernel keeps its sockets (:func:`restore_relay_sockets` puts the links back)."""
    node_dir = Path(state_json(files.agent)["node_dir"])
    client = node_dir / "client"
    client.mkdir(mode=0o700, exist_ok=True)
    _link_node_sockets(node_dir)
    connection_file = client / "connection.json"
    if not connection_file.exists():
        write_json(connection_file, connection_info(str(client / "kernel"), files.key.read_text().strip(),
                                                    read_json(files.curve)))
    return connection_file


def _link_node_sockets(node_dir: Path) -> None:
    real_base = kernel_socket_base(node_dir)
    for real, link in zip(socket_paths(str(real_base)), socket_paths(str(node_dir / "client" / "kernel"))):
        if not os.path.lexists(link):
            os.symlink(f"../{real_base.parent.name}/{Path(real).name}", link)


def restore_relay_sockets(name: str) -> None:
    """Put back the socket names jupyter_client removed in a restart (see keep_relay_sockets)."""
    files = kernel_files(name)
    if load_record(name).on_node:
        _link_node_sockets(Path(state_json(files.agent)["node_dir"]))
        return
    for path, kept in _relay_socket_names(name):
        if not os.path.exists(path) and os.path.exists(kept):
            os.link(kept, path)


def _relay_socket_names(name: str) -> list[tuple[str, str]]:
    login_dir = state_json(kernel_files(name).relay).get("login_dir")
    if not login_dir:
        return []
    return [(path, str(Path(login_dir) / f".kept{Path(path).name}")) for path in socket_paths(f"{login_dir}/kernel")]


def stop_relay(files: KernelFiles) -> None:
    """Stop this kernel's relay (if it runs here) and remove any login-side directory it left."""
    relay = state_json(files.relay)
    if is_running(relay, relay_daemon.DAEMON_MARKER):
        relay_daemon.stop_at(relay.get("control"), files.dir)
    relay_daemon.request({"op": "stop", "state_dir": str(files.dir)}, start=False)  # one still starting
    for login_dir in login_dirs_of(files.name):
        shutil.rmtree(login_dir, ignore_errors=True)
    if relay and not is_running(relay, relay_daemon.DAEMON_MARKER):
        with contextlib.suppress(FileNotFoundError):
            files.relay.unlink()


# ---------------------------------------------------------------------------------------------
# Interrupt


def interrupt(name: str) -> str:
    """A signal-mode interrupt: SIGINT to the node agent (a short step on the kernel's node, no
    relay needed), which passes it to the kernel process inside the sandbox. Returns what was
    done, for people."""
    current = _signal_agent(name, "interrupt")
    return f"sent SIGINT to kernel {name} on {current.node} (job {current.record.job_id})"


def restart_now(name: str) -> None:
    """End the kernel process at once and start a new one in the same job (SIGUSR1 to the agent)."""
    _signal_agent(name, "restart")


def expect_shutdown(name: str) -> None:
    """Tell the agent that the kernel is being shut down for good: when it exits, the agent ends
    at once instead of waiting a moment for a restart request."""
    with contextlib.suppress(FileNotFoundError):
        write_private_file(kernel_files(name).shutdown_request, "")


def request_restart(name: str) -> None:
    """Ask the agent to start a new kernel in the same job when the current one ends (with a
    shutdown_request with restart=True)."""
    write_private_file(kernel_files(name).restart_request, "")


def _signal_agent(name: str, action: str) -> KernelView:
    current = view(name)
    if not current.job_alive or current.agent_state != "ready":
        raise HpcKernelsError(f"kernel {name} is {current.state}: there is nothing to {action}")
    files = kernel_files(name)
    if current.record.on_node:  # the agent runs here (or says on which node it does)
        from .agent import signal_agent

        problem = signal_agent(files.dir, action)
        if problem:
            raise HpcKernelsError(f"could not {action} kernel {name}: {problem}")
        return current
    launch = read_json(files.launch) or {}
    argv = srun_into_job(str(current.record.job_id),
                         python_module(launch.get("python", sys.executable), "hpc_kernels.agent", action, str(files.dir)),
                         export=NODE_STEP_ENVIRONMENT, node=current.agent.get("slurm_node"))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=AGENT_SIGNAL_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HpcKernelsError(f"could not {action} kernel {name}: the step on {current.node} did not run within "
                              f"{AGENT_SIGNAL_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()
        raise HpcKernelsError(f"could not {action} kernel {name} on {current.node}: "
                              f"{said or f'exit code {proc.returncode}'}")
    return current


def ended_report(name: str) -> str:
    """Why kernel ``name`` cannot be restarted in its job: Slurm's state and reason, the agent's
    last word and the log's tail."""
    return str(_start_failure(view(name), kernel_files(name),
                              "has ended and did not come back from the restart; it is not submitted again "
                              "(start a new kernel)"))


def gone_reason(name: str, submit_time: str | None = None) -> str | None:
    """None while kernel ``name`` runs (or restarts in its job); else why it is gone, for a
    client that was waiting on it: Slurm's state and reason, the agent's last word, the log.
    ``submit_time`` (see :func:`job_submit_time`): the job's when the client began; a job
    requeued since then runs another kernel."""
    try:
        current = view(name)
    except KernelNotFound:
        return f"kernel {name!r} was shut down"
    if submit_time is not None and current.job is not None and current.job.submit_time != submit_time:
        return (f"kernel {name!r}: Slurm requeued job {current.record.job_id} (its node failed, or it was "
                f"preempted); the kernel that ran the code is gone with its variables. A new kernel starts in "
                "the job: `hpc-kernel status` follows it")
    if current.job_alive and current.agent_state not in ("ended", "failed"):
        return None
    return str(_start_failure(current, kernel_files(name), "has ended"))


def job_submit_time(name: str) -> str | None:
    """The SubmitTime of kernel ``name``'s job now: what :func:`gone_reason` compares with, to
    tell that the job was requeued (and the kernel replaced) while a client waited on it."""
    current = view(name)
    return current.job.submit_time if current.job else None


def kernel_generation(name: str) -> int:
    """How many times the kernel was restarted in its job (agent.json)."""
    return int(state_json(kernel_files(name).agent).get("generation", 0))


def wait_for_generation(name: str, generation: int, *, timeout: float | None = None) -> None:
    """Wait until the agent reports kernel ``generation`` (a restart in the job) ready."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        current = view(name)
        if current.agent.get("generation", 0) >= generation and current.agent_state == "ready":
            return
        if not current.job_alive or current.agent_state in ("failed", "ended"):
            raise _start_failure(current, kernel_files(name), "did not come back from the restart")
        if deadline is not None and time.monotonic() > deadline:
            raise KernelStartError(f"kernel {name} was not ready again within {timeout:.0f} s of the restart")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# Shut down


def remove_damaged(name: str, *, progress: Progress = _quiet) -> None:
    """A kernel whose record cannot be read: end the job or step Slurm still has under its name,
    stop its relay, remove its state."""
    files = kernel_files(name)
    with locked(name):
        for job in ours_named(job_name_of(name)):
            cancel(job)
            progress(f"kernel {name}: cancelled {'step' if '.' in job else 'job'} {job}")
        deadline = time.monotonic() + 60
        while ours_named(job_name_of(name)):
            if time.monotonic() > deadline:
                raise HpcKernelsError(f"kernel {name}: its job is still in the queue a minute after it was "
                                      f"cancelled; state kept in {files.dir}")
            time.sleep(POLL_SECONDS)
        stop_relay(files)
        remove_kernel_dir(name)
    progress(f"kernel {name}: removed its damaged state")


def shutdown(name: str, *, graceful_timeout: float = 15, progress: Progress = _quiet) -> None:
    """Ask the kernel to shut down (``graceful_timeout`` 0: do not ask, end it), make sure the job
    is gone, stop the relay, remove all state."""
    current = view(name)
    files = kernel_files(name)
    record = current.record
    if record.on_node and current.job_alive and not _on_this_host(record):
        raise HpcKernelsError(f"kernel {name} was started by a frontend on {current.node} inside job "
                              f"{record.job_id}; shut it down there (or end job {record.job_id})")
    if graceful_timeout > 0 and current.job_alive and current.agent_state == "ready":
        try:
            connection_file = ensure_relay(name)
            expect_shutdown(name)
            _request_shutdown(connection_file, graceful_timeout)
            if _wait_kernel_gone(record, graceful_timeout):
                progress(f"kernel {name} shut down; " + ("its step ended" if record.step else f"job {record.job_id} ended"))
        except HpcKernelsError as e:
            progress(f"graceful shutdown failed ({e}); ending it")
    with locked(name):
        if view(name).job_alive:
            progress(_end_kernel_job(record))
            if not _wait_kernel_gone(record, 60):
                raise HpcKernelsError(f"job {record.job_id} is still running after it was ended; state kept in {files.dir}")
        stop_relay(files)
        snapshot = _saved_variables(current)
        if snapshot is not None:
            _discard_snapshot(snapshot)
            progress(f"removed the saved variables of kernel {name} ({snapshot})")
        remove_kernel_dir(name)


def _saved_variables(current: KernelView) -> Path | None:
    """The snapshot a hibernated kernel saved, or the one a resumed kernel was started from."""
    if current.state == "hibernated":
        path = current.agent.get("snapshot")
    else:
        path = (read_json(kernel_files(current.record.name).launch) or {}).get("restore")
    return Path(path) if path and os.path.exists(path) else None


def _discard_snapshot(snapshot: Path) -> None:
    for path in (snapshot, snapshot.with_name("report.json")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        snapshot.parent.rmdir()


def _request_shutdown(connection_file: Path, timeout: float) -> None:
    # Imported here: jupyter_client takes a noticeable share of a short command's start-up.
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient()
    client.load_connection_file(str(connection_file))
    client.start_channels()
    try:
        client.shutdown()
        try:
            client.get_control_msg(timeout=timeout)
        except Exception:  # no reply: the job state decides
            pass
    finally:
        client.stop_channels()
