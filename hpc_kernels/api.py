"""The public Python API: kernels on the cluster as objects.

    from hpc_kernels import Kernel

    with Kernel.submit(profile="local", name="demo", time="1:00:00", on_progress=print) as k:
        r = k.execute("import socket; socket.gethostname()", timeout=60)
        print(r.status, r.result)

A :class:`Kernel` is a handle on one of the user's kernels, by name: the same kernel
``hpc-kernel list`` shows, in the same sandbox with the same limits. The handle holds no state
of its own beyond a connection; everything it says comes from the kernel's state directory and
Slurm, through :mod:`hpc_kernels.launcher`. Errors are those of :mod:`hpc_kernels.errors`, with
the messages the CLI prints. :class:`AsyncKernel` is the same for asyncio; :class:`Batch` submits
notebooks as a job array (:mod:`hpc_kernels.batch`). See docs/python-api.md.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import launcher
from .errors import HpcKernelsError, KernelGone, ProfileError, RelayError
from .profiles import (
    KernelRequest,
    available_profiles,
    default_profile_name,
    parse_profile,
)
from .state import kernel_files
from .terminal import strip_ansi

__all__ = ["AsyncKernel", "Batch", "BatchTaskInfo", "ExecutionError", "ExecutionResult", "Kernel", "KernelInfo",
           "ProfileInfo"]

Progress = Callable[[str], None]
OutputCallback = Callable[[dict[str, Any]], None]

# After a cell's timeout: how long the interrupted cell has to stop before execute gives up on it.
INTERRUPT_GRACE_SECONDS = 30.0
REQUEUED_MESSAGE = ("Slurm requeued the job (its node failed, or it was preempted): the kernel that ran before is "
                    "gone with its variables; this is a new kernel in the same job")


# ---------------------------------------------------------------------------------------------
# What a cell did


@dataclass(frozen=True)
class ExecutionError:
    """The exception a cell raised: its class name, its message, the traceback as plain text."""

    ename: str
    evalue: str
    traceback: str

    def __str__(self) -> str:
        return self.traceback or f"{self.ename}: {self.evalue}"


@dataclass(frozen=True)
class ExecutionResult:
    """What running a cell gave.

    ``status``: ``ok``; ``error`` (the code raised: see ``error``); ``timeout`` (it ran past its
    timeout and was interrupted; the kernel and its variables are kept); ``aborted`` (the kernel
    did not run it, after an earlier error in the same request queue). ``stdout``/``stderr``: the
    streams' text. ``result``: the text/plain of the cell's value (``execute_result``), or None.
    ``outputs``: every ``display_data`` and ``execute_result`` in order, each as nbformat has it:
    ``{"output_type", "data": {mime type: value}, "metadata"}`` (an ``image/png`` is base64 text).
    """

    status: Literal["ok", "error", "timeout", "aborted"]
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: ExecutionError | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class ResultBuilder:
    """Builds an :class:`ExecutionResult` from a cell's IOPub messages (pure: no I/O)."""

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.outputs: list[dict[str, Any]] = []
        self.result: str | None = None
        self.error: ExecutionError | None = None
        self.execution_count: int | None = None
        self._displays: dict[str, list[int]] = {}  # display_id -> indices in outputs

    def add(self, msg: dict[str, Any]) -> None:
        kind, content = msg.get("msg_type") or msg.get("header", {}).get("msg_type"), msg.get("content", {})
        if kind == "stream":
            (self.stderr if content.get("name") == "stderr" else self.stdout).append(str(content.get("text", "")))
        elif kind in ("display_data", "execute_result"):
            output = {"output_type": kind, "data": dict(content.get("data") or {}),
                      "metadata": dict(content.get("metadata") or {})}
            if kind == "execute_result":
                self.execution_count = content.get("execution_count", self.execution_count)
                self.result = output["data"].get("text/plain")
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                self._displays.setdefault(display_id, []).append(len(self.outputs))
            self.outputs.append(output)
        elif kind == "update_display_data":
            display_id = (content.get("transient") or {}).get("display_id")
            for index in self._displays.get(display_id or "", []):
                self.outputs[index] = {**self.outputs[index], "data": dict(content.get("data") or {}),
                                       "metadata": dict(content.get("metadata") or {})}
        elif kind == "clear_output":
            self.stdout.clear()
            self.stderr.clear()
            self.outputs.clear()
            self._displays.clear()
        elif kind == "error":
            self.error = ExecutionError(ename=str(content.get("ename", "")), evalue=str(content.get("evalue", "")),
                                        traceback=strip_ansi("\n".join(content.get("traceback") or [])))
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count", self.execution_count)

    def finish(self, status: str, reply: dict[str, Any] | None = None) -> ExecutionResult:
        content = (reply or {}).get("content", {})
        if status not in ("timeout",) and content.get("status") in ("ok", "error", "aborted"):
            status = content["status"]
        if status == "error" and self.error is None and content.get("ename"):
            self.error = ExecutionError(str(content.get("ename")), str(content.get("evalue", "")),
                                        strip_ansi("\n".join(content.get("traceback") or [])))
        return ExecutionResult(status=status,  # type: ignore[arg-type]
                               stdout="".join(self.stdout), stderr="".join(self.stderr), result=self.result,
                               error=self.error, outputs=list(self.outputs),
                               execution_count=content.get("execution_count", self.execution_count))


# ---------------------------------------------------------------------------------------------
# What is known of a kernel, a profile


@dataclass(frozen=True)
class KernelInfo:
    """A kernel as ``hpc-kernel status`` shows it. ``state``: pending, starting, ready, failed,
    hibernated or ended. ``message``: why it failed or ended (a limit it went over, Slurm's
    reason), or what happened to it. ``queue_position`` (1: next) and ``expected_start``: while
    it is pending, when Slurm says."""

    name: str
    state: str
    job_id: str | None
    node: str | None
    profile: str
    slurm_state: str
    slurm_reason: str
    message: str
    workspace: str | None
    created: float
    log: str
    expected_start: str | None = None
    queue_position: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _info(current: launcher.KernelView, *, queue: bool = False) -> KernelInfo:
    record, job = current.record, current.job
    position = None
    if queue and job is not None and job.state == "PENDING" and job.fields.get("Partition"):
        from .slurm import queue_position

        try:
            position = queue_position(str(record.job_id), job.fields["Partition"])
        except HpcKernelsError:
            position = None  # Slurm could not say: the state is still worth showing
    return KernelInfo(
        name=record.name, state=current.state, job_id=record.job_id, node=current.node, profile=record.profile,
        slurm_state=job.state if job else "(gone)", slurm_reason=job.reason if job else "",
        message=record.message or str(current.agent.get("message", "")) or (REQUEUED_MESSAGE if current.requeued else ""),
        workspace=record.workspace, created=record.created, log=str(kernel_files(record.name).log),
        expected_start=job.expected_start if job else None, queue_position=position)


@dataclass(frozen=True)
class ProfileInfo:
    """A site profile, as far as someone choosing one needs: where kernels run, what they get."""

    name: str
    description: str
    source: str
    runtime: str = ""
    partition: str | None = None
    time: str = ""
    cpus: int = 0
    mem: str = ""
    gpus: str | None = None
    memory_limit: str = ""
    process_limit: int | None = None
    idle_timeout: float = 0.0
    mcp_idle_timeout: float = 0.0
    allow_hosts: list[str] = field(default_factory=list)
    error: str | None = None  # the profile cannot be used: why

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _profile_infos() -> list[ProfileInfo]:
    infos = []
    for name, path in sorted(available_profiles().items()):
        try:
            p = parse_profile(path)
        except ProfileError as e:
            infos.append(ProfileInfo(name=name, description="", source=str(path), error=str(e).splitlines()[0]))
            continue
        infos.append(ProfileInfo(
            name=name, description=p.description, source=str(path), runtime=p.get("runtime", "kind"),
            partition=p.get("slurm", "partition"), time=p.get("slurm", "time"), cpus=p.get("slurm", "cpus"),
            mem=p.get("slurm", "mem"), gpus=p.get("slurm", "gpus"), memory_limit=p.get("limits", "memory"),
            process_limit=p.get("limits", "processes"), idle_timeout=p.get("limits", "idle_timeout"),
            mcp_idle_timeout=p.get("kernel", "mcp_idle_timeout"), allow_hosts=list(p.get("runtime", "allow_hosts"))))
    return infos


def _quiet(_: str) -> None:
    pass


def _tolerant(progress: Progress) -> Progress:
    """``progress`` for a clean-up: one that raises (again) must not stop it half-way."""
    def say(line: str) -> None:
        try:
            progress(line)
        except BaseException:  # noqa: BLE001, S110 - a second Ctrl-C, the caller's own error
            pass

    return say


def _request(profile: str | None, name: str | None, *, workspace: str | Path | None, rw: bool,
             allow_hosts: Sequence[str], gpus: int | str | None, idle_timeout: str | float | None,
             python_env: str | None, **rest: Any) -> tuple[str, KernelRequest]:
    """The profile's name and the request a submit makes of these options (as the CLI's flags)."""
    profile = profile or default_profile_name()
    if not profile:
        known = ", ".join(sorted(available_profiles())) or "none"
        raise HpcKernelsError(f"give a profile (or set HPC_KERNELS_PROFILE); known profiles: {known}")
    return profile, KernelRequest(
        name=name or f"{profile[:30]}-{secrets.token_hex(3)}",
        workspace=str(Path(workspace).expanduser().resolve()) if workspace else None, workspace_rw=bool(rw),
        allow_hosts=tuple(allow_hosts or ()), gpus=None if gpus is None else str(gpus),
        idle_timeout=None if idle_timeout is None else str(idle_timeout),
        python_env=str(Path(python_env).expanduser().absolute()) if python_env else None, **rest)


# ---------------------------------------------------------------------------------------------
# The kernel


class Kernel:
    """One of the user's kernels on the cluster, by name. Use :meth:`submit` to start one,
    :meth:`attach` for one that runs. As a context manager, it is shut down at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client: Any = None
        self._connection_file: Path | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"

    # -- starting, finding ----------------------------------------------------------------

    @classmethod
    def submit(cls, profile: str | None = None, *, name: str | None = None, time: str | None = None,
               cpus: int | None = None, mem: str | None = None, partition: str | None = None,
               gpus: int | str | None = None, image: str | None = None, python_env: str | None = None,
               workspace: str | Path | None = None, rw: bool = False, allow_hosts: Sequence[str] = (),
               idle_timeout: str | float | None = None, relay: str | None = None, time_warning: str | None = None,
               allocation: str | None = None, wait: bool = True, timeout: float | None = None,
               on_progress: Progress | None = None) -> Kernel:
        """Submit a kernel job and return once its kernel is ready.

        ``profile``: a site profile (default: ``$HPC_KERNELS_PROFILE``). ``name``: the kernel's
        name (default: the profile's name and 6 random hex digits). ``time``, ``cpus``, ``mem``,
        ``partition``, ``gpus`` (N or TYPE:N), ``image``, ``relay``, ``time_warning``,
        ``idle_timeout`` (hibernate after so long idle, e.g. ``"30m"``; 0: never) and
        ``allow_hosts`` (``HOST[:PORT]`` the kernel may reach over https) override the profile
        as the same ``hpc-kernel submit`` flags do. ``python_env``: the kernel runs that
        environment's Python. ``workspace``: a directory bound into the sandbox (read-only;
        ``rw=True``: read-write); None: none, the kernel starts in a private /tmp.
        ``allocation``: a job id to run the kernel as a step of (the user's own salloc).

        ``on_progress`` is called with each change of the job's state (pending and why, the
        node, ready). A KeyboardInterrupt while it waits (Ctrl-C, or raised by ``on_progress``)
        cancels the job and is raised again; so is ``timeout`` (s) running out, as
        KernelStartError. A job that fails before its kernel is ready raises KernelStartError
        with Slurm's reason and the log's tail (the failed kernel stays listed until shut down,
        as with the CLI). ``wait=False``: return once the job is submitted (``hpc-kernel submit
        --no-wait``); :meth:`execute` then waits until the kernel is ready.
        """
        profile_name, request = _request(profile, name, time=time, cpus=cpus, mem=mem, partition=partition,
                                         gpus=gpus, image=image, python_env=python_env, workspace=workspace, rw=rw,
                                         allow_hosts=allow_hosts, idle_timeout=idle_timeout, relay=relay,
                                         time_warning=time_warning, allocation=allocation)
        record = launcher.submit(profile_name, request)
        kernel = cls(record.name)
        if wait:
            kernel._wait_ready(timeout, on_progress or _quiet)
        return kernel

    def _wait_ready(self, timeout: float | None, progress: Progress) -> None:
        """Wait for the kernel after its submit; end it on an interrupt or a relay that fails."""
        try:
            self._connection_file = launcher.ensure_relay(self.name, timeout=timeout, progress=progress)
        except KeyboardInterrupt:
            launcher.shutdown(self.name, progress=_tolerant(progress))
            raise
        except RelayError as e:  # the kernel is ready but cannot be reached: it would only hold its job
            job_id = self.job_id
            launcher.shutdown(self.name, graceful_timeout=0)
            raise RelayError(f"{e}\nkernel {self.name} was shut down and job {job_id} ended; "
                             "`hpc-kernel doctor` tries each transport") from None

    @classmethod
    def attach(cls, name: str) -> Kernel:
        """A handle on kernel ``name``, which exists (KernelNotFound otherwise) in any state."""
        launcher.view(name)
        return cls(name)

    @staticmethod
    def list() -> list[KernelInfo]:
        """Every kernel of this user (one Slurm query for all)."""
        return [_info(current) for current in launcher.view_all()]

    @staticmethod
    def profiles() -> list[ProfileInfo]:
        """Every site profile on the search path; one that cannot be read has ``error`` set."""
        return _profile_infos()

    # -- looking at it ----------------------------------------------------------------------

    def status(self, *, queue_position: bool = False) -> KernelInfo:
        """What is known of the kernel now; with ``queue_position``, while it is pending, where
        it stands in its partition's queue (one more squeue)."""
        return _info(launcher.view(self.name), queue=queue_position)

    @property
    def state(self) -> str:
        """pending, starting, ready, failed, hibernated or ended (asked now)."""
        return launcher.view(self.name).state

    @property
    def job_id(self) -> str | None:
        return launcher.view(self.name).record.job_id

    @property
    def node(self) -> str | None:
        return launcher.view(self.name).node

    @property
    def connection_file(self) -> Path:
        """The login-side connection file (a Jupyter client connects with it); the relay is
        started again if it does not run. Waits while the kernel is not ready yet."""
        return launcher.ensure_relay(self.name)

    def logs(self, lines: int = launcher.LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the job's log (the agent's messages, the kernel's stderr).
        Text the kernel wrote: show it as untrusted text."""
        launcher.view(self.name)
        return launcher.log_tail(kernel_files(self.name).log, lines)

    # -- running code -------------------------------------------------------------------------

    def execute(self, code: str, *, timeout: float | None = None,
                on_output: OutputCallback | None = None) -> ExecutionResult:
        """Run ``code`` and return what it did (see :class:`ExecutionResult`).

        ``timeout`` (s): when it runs out, the cell is interrupted (SIGINT, as
        :meth:`interrupt`) and the result has status ``"timeout"``, with what the cell wrote
        until then; the kernel and its variables are kept. ``on_output`` is called with each
        IOPub message of the cell as it comes (for live output). If the kernel ends while the
        cell runs (killed at its memory limit, its job ended), KernelGone says why, as
        ``hpc-kernel status`` does; its ``result`` holds the output until then; so it does for a
        kernel that had already ended. One cell at a time per handle (a second caller waits).
        A cell that ignores the interrupt for 30 s more is left running (the kernel stays busy).

        The handle stays connected after the cell (the next one starts at once); a connected
        client keeps the kernel from its idle timeout until :meth:`close` (or :meth:`shutdown`).
        """
        from .execute import wait_for_reply

        with self._lock:
            client = self._connected()
            since = launcher.job_submit_time(self.name)
            builder = ResultBuilder()

            def collect(msg: dict[str, Any]) -> None:
                builder.add(msg)
                if on_output is not None:
                    on_output(msg)

            def gone() -> str | None:
                return launcher.gone_reason(self.name, since)

            msg_id = client.execute(code, allow_stdin=False)
            try:
                try:
                    reply = wait_for_reply(client, msg_id, timeout, gone, collect)
                    return builder.finish("ok", reply)
                except TimeoutError:
                    pass
                try:
                    launcher.interrupt(self.name)
                except HpcKernelsError:
                    why = gone()
                    if why:
                        raise KernelGone(why, builder.finish("timeout")) from None
                    raise
                try:
                    reply = wait_for_reply(client, msg_id, INTERRUPT_GRACE_SECONDS, gone, collect)
                except TimeoutError:
                    reply = None
                return builder.finish("timeout", reply)
            except KernelGone:
                self._disconnect()
                raise
            except HpcKernelsError as e:  # wait_for_reply's word that the kernel is gone
                self._disconnect()
                raise KernelGone(str(e), builder.finish("error")) from None

    def _connected(self) -> Any:
        """The client of this handle, connected through the kernel's relay (waits until ready).
        A kernel that has ended is KernelGone with the reason, its record left as it is."""
        current = launcher.view(self.name)
        if current.state in ("ended", "failed", "hibernated"):
            self._disconnect()
            raise KernelGone(launcher.gone_reason(self.name) or f"kernel {self.name!r} is {current.state}")
        connection_file = launcher.ensure_relay(self.name)
        if self._client is not None and connection_file == self._connection_file:
            return self._client
        self._disconnect()
        from jupyter_client import BlockingKernelClient

        from .execute import READY_TIMEOUT

        client = BlockingKernelClient()
        client.load_connection_file(str(connection_file))
        client.start_channels()
        try:
            client.wait_for_ready(timeout=READY_TIMEOUT)
        except RuntimeError as e:
            client.stop_channels()
            why = launcher.gone_reason(self.name)
            raise (KernelGone(why) if why else RelayError(
                f"kernel {self.name} did not answer through {connection_file}: {e}")) from None
        self._client, self._connection_file = client, connection_file
        return client

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.stop_channels()
        self._client = None

    def interrupt(self) -> str:
        """Interrupt the code the kernel runs (SIGINT to the kernel process, through Slurm, as
        ``hpc-kernel interrupt``); returns what was done. The running :meth:`execute` returns
        with the KeyboardInterrupt as its error."""
        return launcher.interrupt(self.name)

    def restart(self, *, timeout: float | None = 120) -> None:
        """End the kernel process and start a new one in the same job (variables are lost);
        returns once the new one is ready."""
        with self._lock:
            self._disconnect()
            generation = launcher.kernel_generation(self.name)
            launcher.restart_now(self.name)
            launcher.wait_for_generation(self.name, generation + 1, timeout=timeout)

    def shutdown(self, *, graceful_timeout: float = 15, on_progress: Progress | None = None) -> None:
        """Shut the kernel down: its job ends, its relay stops, its state is removed (as
        ``hpc-kernel shutdown``)."""
        self._disconnect()
        launcher.shutdown(self.name, graceful_timeout=graceful_timeout, progress=on_progress or _quiet)

    def close(self) -> None:
        """Drop this handle's connection; the kernel runs on."""
        self._disconnect()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        from .errors import KernelNotFound

        try:
            self.shutdown()
        except KernelNotFound:
            pass


# ---------------------------------------------------------------------------------------------
# asyncio


class AsyncKernel:
    """:class:`Kernel` for asyncio: each call runs the blocking one in a worker thread (they wait
    on Slurm and on the kernel's sockets, not on the CPU). Cancelling :meth:`submit` while the
    job is pending ends the job."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    @property
    def name(self) -> str:
        return self.kernel.name

    def __repr__(self) -> str:
        return f"AsyncKernel({self.name!r})"

    @classmethod
    async def submit(cls, profile: str | None = None, *, name: str | None = None, time: str | None = None,
                     cpus: int | None = None, mem: str | None = None, partition: str | None = None,
                     gpus: int | str | None = None, image: str | None = None, python_env: str | None = None,
                     workspace: str | Path | None = None, rw: bool = False, allow_hosts: Sequence[str] = (),
                     idle_timeout: str | float | None = None, relay: str | None = None,
                     time_warning: str | None = None, allocation: str | None = None, wait: bool = True,
                     timeout: float | None = None, on_progress: Progress | None = None) -> AsyncKernel:
        """As :meth:`Kernel.submit`, the same options. ``on_progress`` is called in the event
        loop's thread. Cancelling the task while it waits ends the job (and is raised again)."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def progress(line: str) -> None:
            if cancelled.is_set():
                raise KeyboardInterrupt  # the waiting thread ends the job (Kernel._wait_ready)
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, line)

        profile_name, request = _request(profile, name, time=time, cpus=cpus, mem=mem, partition=partition,
                                         gpus=gpus, image=image, python_env=python_env, workspace=workspace, rw=rw,
                                         allow_hosts=allow_hosts, idle_timeout=idle_timeout, relay=relay,
                                         time_warning=time_warning, allocation=allocation)
        record = await asyncio.to_thread(launcher.submit, profile_name, request)
        kernel = Kernel(record.name)
        if not wait:
            return cls(kernel)
        waiting = asyncio.ensure_future(asyncio.to_thread(kernel._wait_ready, timeout, progress))
        waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen, even after a cancel
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled.set()
            await asyncio.to_thread(launcher.shutdown, kernel.name, graceful_timeout=0)
            raise
        return cls(kernel)

    @classmethod
    async def attach(cls, name: str) -> AsyncKernel:
        return cls(await asyncio.to_thread(Kernel.attach, name))

    @staticmethod
    async def list() -> list[KernelInfo]:
        return await asyncio.to_thread(Kernel.list)

    @staticmethod
    async def profiles() -> list[ProfileInfo]:
        return await asyncio.to_thread(Kernel.profiles)

    async def status(self, *, queue_position: bool = False) -> KernelInfo:
        return await asyncio.to_thread(self.kernel.status, queue_position=queue_position)

    async def execute(self, code: str, *, timeout: float | None = None,
                      on_output: OutputCallback | None = None) -> ExecutionResult:
        """As :meth:`Kernel.execute`; ``on_output`` is called in the event loop's thread."""
        callback = None
        if on_output is not None:
            loop = asyncio.get_running_loop()

            def callback(msg: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(on_output, msg)

        return await asyncio.to_thread(self.kernel.execute, code, timeout=timeout, on_output=callback)

    async def interrupt(self) -> str:
        return await asyncio.to_thread(self.kernel.interrupt)

    async def restart(self, *, timeout: float | None = 120) -> None:
        await asyncio.to_thread(self.kernel.restart, timeout=timeout)

    async def logs(self, lines: int = launcher.LOG_TAIL_LINES) -> str:
        return await asyncio.to_thread(self.kernel.logs, lines)

    async def shutdown(self, *, graceful_timeout: float = 15) -> None:
        await asyncio.to_thread(self.kernel.shutdown, graceful_timeout=graceful_timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self.kernel.close)

    async def __aenter__(self) -> AsyncKernel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        from .errors import KernelNotFound

        try:
            await self.shutdown()
        except KernelNotFound:
            pass




# ---------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class BatchTaskInfo:
    """One task of a batch: a notebook with one parameter set. ``state``: PENDING, RUNNING,
    COMPLETED, FAILED, TIMEOUT, CANCELLED or LOST; ``output``: the executed notebook (once
    written); ``error``: the exception of a failed cell (ename, evalue, traceback)."""

    index: int
    name: str
    notebook: str
    parameters: dict[str, Any]
    state: str
    attempt: int
    node: str | None
    duration: float | None
    message: str
    output: str | None
    error: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Batch:
    """Notebooks over parameter sets as one Slurm job array (``hpc-kernel batch``,
    docs/batch.md). Each task runs a notebook in its own sandboxed kernel, on the cluster,
    without this process."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Batch({self.name!r})"

    @classmethod
    def submit(cls, notebooks: Sequence[str | Path], *, out: str | Path, profile: str | None = None,
               parameters: Sequence[dict[str, Any]] = ({},), name: str | None = None,
               time: str | None = None, cpus: int | None = None, mem: str | None = None,
               partition: str | None = None, gpus: int | str | None = None, image: str | None = None,
               python_env: str | None = None, workspace: str | Path | None = None, rw: bool = False,
               allow_hosts: Sequence[str] = (), max_parallel: int | None = None,
               task_timeout: float | None = None, cell_timeout: float | None = None,
               skip_done: bool = False) -> Batch | None:
        """Submit every notebook with every parameter set (one task each); returns at once.
        ``out``: where executed notebooks and result records go. ``task_timeout``/``cell_timeout``
        in seconds. None when ``skip_done`` found every task already done."""
        from . import batch as batches

        profile_name, kernel = _request(profile, "batch", time=time, cpus=cpus, mem=mem, partition=partition,
                                        gpus=gpus, image=image, python_env=python_env, workspace=workspace, rw=rw,
                                        allow_hosts=allow_hosts, idle_timeout=None, relay=None, time_warning=None,
                                        allocation=None)
        record, _ = batches.submit(batches.BatchRequest(
            notebooks=[Path(n) for n in notebooks], parameter_sets=[dict(p) for p in parameters] or [{}],
            out_dir=Path(out), profile=profile_name, kernel=kernel, max_parallel=max_parallel,
            task_timeout=task_timeout, cell_timeout=cell_timeout, skip_done=skip_done, name=name))
        return None if record is None else cls(record.name)

    @classmethod
    def attach(cls, name: str | None = None) -> Batch:
        """Batch ``name`` (default: the latest one)."""
        from . import batch as batches

        name = name or batches.latest_batch()
        batches.load_batch(name)
        return cls(name)

    @staticmethod
    def list() -> list[str]:
        from . import batch as batches

        return [b.name for b in batches.list_batches()]

    def tasks(self) -> list[BatchTaskInfo]:
        """Every task's state now (result records and one squeue)."""
        from . import batch as batches

        _, statuses = batches.view(self.name)
        return [BatchTaskInfo(index=s.task.index, name=s.task.name, notebook=s.task.notebook,
                              parameters=dict(s.task.parameters), state=s.state, attempt=s.attempt, node=s.node,
                              duration=s.duration, message=s.message,
                              output=s.record.get("output") or None, error=dict(s.error))
                for s in statuses]

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state."""
        from . import batch as batches

        return batches.counts(batches.view(self.name)[1])

    @property
    def done(self) -> bool:
        from .batch import FINAL

        return all(t.state in FINAL for t in self.tasks())

    def wait(self, *, timeout: float | None = None, poll: float = 2.0) -> list[BatchTaskInfo]:
        """Wait until every task has ended; their states. TimeoutError after ``timeout`` s."""
        from .batch import FINAL

        deadline = None if timeout is None else _time.monotonic() + timeout
        while True:
            tasks = self.tasks()
            if all(t.state in FINAL for t in tasks):
                return tasks
            if deadline is not None and _time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.name}: not done within {timeout:.0f} s")
            _time.sleep(poll)

    def retry(self, max_parallel: int | None = None) -> int:
        """Resubmit the tasks that failed, timed out, were cancelled or lost; how many."""
        from . import batch as batches

        _, again = batches.retry(self.name, max_parallel)
        return len(again)

    def cancel(self) -> bool:
        """Cancel every task; whether all had ended within the wait."""
        from . import batch as batches

        return batches.cancel_batch(self.name)[1]
