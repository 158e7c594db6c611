"""A ``jupyter_client`` kernel provisioner: any Jupyter frontend starts these kernels.

A kernelspec made by ``hpc-kernel kernelspec install`` names this provisioner (entry point
``hpc-kernels`` in ``jupyter_client.kernel_provisioners``) and a profile. Starting the kernel
submits the kernel job and waits for it, however long it waits in the queue (a pending job is
not a slow start), then starts the relay and hands jupyter_client the login-side connection
info. Restart starts a new kernel process in the same job; shutdown ends the job.

Slurm and the file system are reached through :mod:`hpc_kernels.launcher`, in a worker thread,
so that the frontend's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Enum, Float, Unicode

from . import frontend_watch, launcher
from .errors import HpcKernelsError, KernelNotFound, KernelStartError
from .paths import frontend_workspace
from .profiles import KernelRequest, check_kernel_name

POLL_SECONDS = 1.0
# A restart has no queue to wait in: the new kernel is up in seconds, or something is wrong.
RESTART_TIMEOUT = 180.0


class HpcKernelProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel in a Slurm job, in the profile's sandbox, reached through the relay."""

    profile = Unicode(help="the hpc-kernels profile (set in the kernelspec)").tag(config=True)
    workspace = Unicode("", help="directory bound into the sandbox (default: the kernel's cwd)").tag(config=True)
    workspace_rw = Bool(False, help="bind the workspace read-write (default: the profile's workspace.mode)").tag(config=True)
    image = Unicode("", help="the Apptainer image, instead of the profile's runtime.image").tag(config=True)
    relay = Unicode("", help="the relay's transport, instead of the profile's relay.transport").tag(config=True)
    python_env = Unicode("", help="the user's own Python environment for the kernel, instead of the profile's "
                         "kernel.python_env").tag(config=True)
    kernel_name = Unicode("", help="the hpc-kernels name of the kernel (default: jupyter-<kernel id>)").tag(config=True)
    launch_timeout = Float(0.0, help="seconds to wait for the job (0: as long as it takes)").tag(config=True)
    mode = Enum(["auto", "job", "node"], "auto", help=(
        "job: a Slurm job (or a step of the allocation) reached through the relay; node: the sandbox on "
        "this node, for a frontend that runs in a job here (no job, no relay); auto: node when this runs "
        "inside a job on a compute node and the profile's kernel.on_node allows it")).tag(config=True)
    orphan_timeout = Float(20.0, help=(
        "seconds a kernel in a job outlives the process that started it (a Jupyter server killed, a script "
        "that exits without shutting it down), for another process to take it over with "
        "load_provisioner_info; then it is shut down (hpc_kernels.frontend_watch)")).tag(config=True)

    name: str | None = None
    _waiter: concurrent.futures.ThreadPoolExecutor | None = None
    curve: bool = False
    generation: int = 0
    restarting: bool = False
    ended: int | None = None  # the exit code once the job is gone

    @property
    def has_process(self) -> bool:
        return self.name is not None and self.ended is None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        self.curve = self._wants_curve(kwargs.pop("transport_encryption", None))
        kwargs["cmd"] = list(self.kernel_spec.argv)  # never run: jupyter_client wants one
        if self.name is None:
            kernel_id = getattr(self.parent, "kernel_id", None) or uuid.uuid4().hex
            self.name = self.kernel_name or f"jupyter-{str(kernel_id).replace('-', '')[:12]}"
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self.name is not None
        if self.ended is not None and not self.restarting:
            # A restart of a kernel whose job has ended (jupyter_client's restarter, or the user):
            # no new job behind the user's back; say what happened to the old one.
            raise KernelStartError(await asyncio.to_thread(launcher.ended_report, self.name))
        if self.restarting:
            await self._in_waiter(launcher.wait_for_generation, self.name, self.generation + 1,
                                  timeout=self.launch_timeout or RESTART_TIMEOUT)
            await asyncio.to_thread(launcher.restore_relay_sockets, self.name)
            connection_file = await asyncio.to_thread(launcher.ensure_relay, self.name)
            self.restarting = False
        else:
            request = KernelRequest(name=self.name, workspace=self._workspace(kwargs.get("cwd")), curve=self.curve,
                                    workspace_rw=self.workspace_rw, image=self.image or None,
                                    relay=self.relay or None, python_env=self.python_env or None)
            on_node = await asyncio.to_thread(launcher.starts_on_node, self.profile, self.mode)
            start = launcher.start_on_node if on_node else launcher.submit
            # Once started, the submit finishes even if the frontend gives up meanwhile, so that
            # whatever it made is then ended (below), never left behind.
            started = asyncio.ensure_future(asyncio.to_thread(start, self.profile, request))
            try:
                await asyncio.shield(started)
                self.log.info("hpc-kernels: %s kernel %s (profile %s)", "starting on this node" if on_node
                              else "submitted", self.name, self.profile)
                if not on_node:  # an on-node agent already ends with us (HPC_KERNELS_PARENT)
                    await asyncio.to_thread(frontend_watch.claim, self.name, self.orphan_timeout)
                await self._in_waiter(launcher.wait_until_ready, self.name, timeout=self.launch_timeout or None,
                                      progress=self._progress)
                connection_file = await asyncio.to_thread(launcher.ensure_relay, self.name)
            except BaseException:
                with contextlib.suppress(BaseException):
                    await started
                await asyncio.to_thread(self._forget)
                raise
        self.generation = await asyncio.to_thread(launcher.kernel_generation, self.name)
        self.ended = None
        info = json.loads(connection_file.read_text())
        info["key"] = info["key"].encode()  # jupyter_client compares it with its own, as bytes
        self.connection_info = info
        return info  # type: ignore[no-any-return]

    async def _in_waiter(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Long waits (the queue, a restart) in a thread of this kernel's own, so that many queued
        kernels do not fill the event loop's shared pool that every poll and interrupt needs."""
        if self._waiter is None:
            self._waiter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpc-kernels")
        return await asyncio.get_running_loop().run_in_executor(self._waiter, partial(function, *args, **kwargs))

    def _wants_curve(self, asked: str | None) -> bool:
        """CurveZMQ on the kernel's sockets, as jupyter_client decides for a local kernel: the
        frontend's transport_encryption policy ('auto': if the kernelspec declares support;
        'required': always). The relay carries the encrypted ZMTP as it is."""
        km = self.parent
        if km is None or not hasattr(km, "_transport_encryption_policy"):
            return False
        policy = km._transport_encryption_policy(asked or getattr(km, "transport_encryption", "disabled"))
        return bool(policy == "required" or (policy == "auto" and km._kernel_supports_curve_encryption()))

    def _workspace(self, cwd: str | None) -> str | None:
        """The configured workspace, else the kernel's working directory, unless that would show
        the kernel the user's home (a frontend started in ~): then none, as `hpc-kernel submit` does."""
        if self.workspace:
            return self.workspace
        workspace, why = frontend_workspace(cwd)
        if why:
            self.log.warning("hpc-kernels: no workspace bound: %s", why)
        return workspace

    def _progress(self, line: str) -> None:
        self.log.info("hpc-kernels %s: %s", self.name, line)

    def _forget(self) -> None:
        """A start that failed or was given up: end whatever was started and drop the state."""
        if self.name is not None:
            try:
                launcher.shutdown(self.name)
            except HpcKernelsError as e:
                self.log.warning("hpc-kernels: cleaning up %s: %s", self.name, e)
        self.name, self.ended = None, 1

    async def poll(self) -> int | None:
        """None while this kernel process runs; else an exit code. A kernel whose job ended says
        so once in the log; it is not resubmitted behind the user's back (the restarter may call
        launch_kernel, which then fails with the reason)."""
        if self.name is None or self.ended is not None:
            return self.ended if self.ended is not None else 0
        try:
            current = await asyncio.to_thread(launcher.view, self.name)
        except KernelNotFound:  # its state was removed (hpc-kernel shutdown)
            self.ended = 1
            return 1
        except HpcKernelsError as e:  # Slurm did not answer this time: no news is not death
            self.log.warning("hpc-kernels: cannot tell whether %s runs: %s", self.name, e)
            return None
        if not current.job_alive:
            self.ended = 1
            self.log.warning("hpc-kernels: the job of kernel %s has ended (%s)", self.name,
                             current.job.state if current.job else "gone")
            return 1
        if current.agent.get("generation", 0) != self.generation or current.agent_state != "ready":
            return 0  # this kernel process ended; the job may start the next one (restart)
        return None

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(POLL_SECONDS)
        return code

    async def send_signal(self, signum: int) -> None:
        if self.name is None:
            return
        if signum == signal.SIGINT:
            try:
                await asyncio.to_thread(launcher.interrupt, self.name)
            except HpcKernelsError as e:  # a kernel that is not running has nothing to interrupt
                self.log.warning("hpc-kernels: %s", e)
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            await self.kill()
        else:
            self.log.warning("hpc-kernels: signal %s is not passed to a remote kernel", signum)

    async def kill(self, restart: bool = False) -> None:
        """End the kernel process, never the job: jupyter_client calls this without ``restart``
        within a restart too (``restart_kernel(now=True)``, or a kernel slow to exit). The agent
        starts the next kernel in the job; a real shutdown ends the job in :meth:`cleanup`."""
        if self.name is None or self.ended is not None:
            return
        await self._prepare_restart()
        try:
            await asyncio.to_thread(launcher.restart_now, self.name)
        except HpcKernelsError as e:  # the job is gone: launch_kernel or cleanup say so
            self.log.warning("hpc-kernels: cannot end the kernel process of %s: %s", self.name, e)

    async def terminate(self, restart: bool = False) -> None:
        await self.kill(restart=restart)

    async def shutdown_requested(self, restart: bool = False) -> None:
        if self.name is None:
            return
        if restart:
            await self._prepare_restart()
            await asyncio.to_thread(launcher.request_restart, self.name)
        else:
            await asyncio.to_thread(launcher.expect_shutdown, self.name)

    async def _prepare_restart(self) -> None:
        """jupyter_client is about to remove the kernel's IPC files, which are the relay's
        sockets here: keep a second name for each, to put them back after the restart."""
        if not self.restarting and self.name is not None:
            await asyncio.to_thread(launcher.keep_relay_sockets, self.name)
            self.restarting = True

    async def cleanup(self, restart: bool = False) -> None:
        if restart or self.name is None:
            return
        try:
            await asyncio.to_thread(launcher.shutdown, self.name)
        except KernelNotFound:
            pass
        self.name, self.ended, self.restarting, self.generation = None, None, False, 0
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
            self._waiter = None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        # A graceful shutdown crosses the relay and ends a job: give it more than a local kernel.
        return max(recommended, 20.0)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """What another process needs to take this kernel over (:meth:`load_provisioner_info`):
        JSON as it is. The HMAC key is left out: it stays in the kernel's 0600 state, where the
        taking process reads it."""
        info = await super().get_provisioner_info()
        connection = {k: v for k, v in dict(info.get("connection_info") or {}).items() if k != "key"}
        info.update(connection_info=connection, name=self.name, generation=self.generation, profile=self.profile)
        return info  # type: ignore[no-any-return]

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Take over a running kernel, in this or another process, from the info its first
        provisioner gave (:meth:`get_provisioner_info`). The kernel's relay is started here if it
        does not run (on another login node, say); ``connection_info`` is then the login-side
        connection here, with the key (pass it to ``KernelManager.load_connection_info``), and
        the kernel now ends with this process (within ``orphan_timeout``). The first process must
        not have been gone for longer than its own ``orphan_timeout``: its kernel is shut down then."""
        await super().load_provisioner_info(provisioner_info)
        name = provisioner_info.get("name")
        if not isinstance(name, str):
            raise HpcKernelsError(f"provisioner info: 'name' is {name!r}: expected the hpc-kernels name of the "
                                  "kernel, as get_provisioner_info gives it")
        check_kernel_name(name)
        connection_file, generation = await asyncio.to_thread(self._take_over, name)
        self.name, self.generation, self.ended, self.restarting = name, generation, None, False
        self.profile = provisioner_info.get("profile") or self.profile
        info = json.loads(connection_file.read_text())
        info["key"] = info["key"].encode()
        self.connection_info = info
        if hasattr(self.parent, "_attempted_start"):
            # jupyter_client (8.10) renews a KernelManager's `ready` future for each start and
            # shutdown only once it started a kernel itself; without this a restart of the kernel
            # taken over fails with InvalidStateError (a future resolved twice).
            self.parent._attempted_start = True

    def _take_over(self, name: str) -> tuple[Path, int]:
        current = launcher.view(name)
        if current.record.on_node:
            raise HpcKernelsError(f"kernel {name!r} runs on the node of its frontend's job {current.record.job_id} "
                                  "and ends with that frontend: it cannot be taken over")
        if not current.job_alive or current.agent_state != "ready":
            raise HpcKernelsError(f"kernel {name!r} is {current.state}: there is no running kernel to take over")
        connection_file = launcher.ensure_relay(name)
        frontend_watch.claim(name, self.orphan_timeout)
        return connection_file, launcher.kernel_generation(name)

