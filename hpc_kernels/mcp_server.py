"""``hpc-kernel mcp``: the kernels as Model Context Protocol tools, over stdio, for coding agents.

Built on the official ``mcp`` SDK (``pip install hpc-kernels[mcp]``) and on the public API
(:mod:`hpc_kernels.api`): everything an agent starts is the user's own kernel, in the same
sandbox with the same limits, listed by ``hpc-kernel list`` and ended by ``hpc-kernel shutdown``.
A kernel an agent starts gets the profile's ``kernel.mcp_idle_timeout`` (default 1 h) as its idle
timeout unless the agent gives one: one it leaves behind hibernates and its job ends. See
docs/agents.md.

stdout is the protocol's: nothing else may write to it.
"""

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from .api import AsyncKernel, Batch, ExecutionResult, KernelInfo
from .errors import HpcKernelsError, KernelGone
from .profiles import default_profile_name
from .terminal import for_terminal, strip_ansi

SERVER_NAME = "hpc-kernels"
INSTRUCTIONS = """\
Jupyter kernels (Python) on the cluster's compute nodes, each in its own Slurm job and sandbox.
Start one with start_kernel (list_profiles says which profiles exist: partitions, GPUs, limits),
run code with execute (variables persist between calls, as in a notebook), shut it down with
shutdown when done. The sandbox has no network unless allow_hosts names a host; it sees the
workspace read-only unless rw is set; it cannot see the user's home directory. A kernel left
idle hibernates after its idle timeout and its job ends.
"""
DEFAULT_CELL_TIMEOUT = 600.0
# Text of one output kept for the agent (the rest is cut, and it is told so).
MAX_TEXT = 20_000
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def clean(text: str) -> str:
    """Kernel output for an agent: no terminal control sequences, no colour codes."""
    return strip_ansi(for_terminal(text))


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit // 2] + f"\n[... {len(text) - limit} characters cut ...]\n" + text[-limit // 2:]


def result_blocks(result: ExecutionResult) -> list[tuple[str, str, str]]:
    """What an agent gets of a cell, as (kind, text or base64 data, mime type) blocks: one text
    block with the status, stdout, stderr, the result and the error; then each image output."""
    parts = [f"status: {result.status}"]
    if result.status == "timeout":
        parts.append("the cell ran past its timeout and was interrupted; the kernel and its variables are kept")
    if result.stdout:
        parts.append("stdout:\n" + _cut(clean(result.stdout)))
    if result.stderr:
        parts.append("stderr:\n" + _cut(clean(result.stderr)))
    images: list[tuple[str, str, str]] = []
    for output in result.outputs:
        data = output.get("data", {})
        image = next((t for t in IMAGE_TYPES if isinstance(data.get(t), str)), None)
        if image is not None:
            images.append(("image", str(data[image]).replace("\n", ""), image))
        elif output["output_type"] == "display_data" and "text/plain" in data:
            parts.append("display:\n" + _cut(clean(str(data["text/plain"]))))
    if result.result is not None:
        parts.append("result:\n" + _cut(clean(result.result)))
    if result.error is not None:
        parts.append("error:\n" + _cut(clean(str(result.error))))
    if images:
        parts.append(f"{len(images)} image(s) follow")
    return [("text", "\n\n".join(parts), "text/plain"), *images]


def idle_timeout_for(profile_default: float, given: str | None) -> str | None:
    """The idle timeout of a kernel an agent starts: the one it gives, else the profile's
    ``kernel.mcp_idle_timeout`` (0: the profile's own ``limits.idle_timeout``, None here)."""
    if given is not None:
        return given
    return f"{profile_default:g}" if profile_default > 0 else None


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)


def _status_text(info: KernelInfo) -> str:
    data = {k: v for k, v in info.as_dict().items() if v not in (None, "")}
    if "message" in data:
        data["message"] = clean(str(data["message"]))
    return _json(data)


def build_server() -> Any:
    """The MCP server with every tool (the SDK is imported here: it is an optional extra)."""
    try:
        from mcp.server.mcpserver import Context, MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
        from mcp.types import CallToolResult, ImageContent, TextContent
    except ImportError as e:
        raise HpcKernelsError(f"hpc-kernel mcp needs the mcp package ({e}): pip install 'hpc-kernels[mcp]'") from None

    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS)
    handles: dict[str, AsyncKernel] = {}

    async def handle(name: str) -> AsyncKernel:
        if name not in handles:
            handles[name] = await AsyncKernel.attach(name)
        return handles[name]

    def to_result(blocks: list[tuple[str, str, str]], *, error: bool = False) -> CallToolResult:
        content: list[Any] = [TextContent(type="text", text=body) if kind == "text"
                              else ImageContent(type="image", data=body, mime_type=mime)
                              for kind, body, mime in blocks]
        return CallToolResult(content=content, is_error=error)

    def failing(e: HpcKernelsError) -> ToolError:
        return ToolError(clean(str(e)))

    @server.tool()
    async def list_profiles() -> str:
        """The site's kernel profiles: runtime, Slurm partition, default time, CPUs, memory, GPUs,
        the memory and process limits in the sandbox, idle timeouts, hosts the kernel may reach."""
        return _json([p.as_dict() for p in await AsyncKernel.profiles()])

    @server.tool()
    async def start_kernel(ctx: Context, profile: str | None = None, name: str | None = None,
                           time: str | None = None, cpus: int | None = None, mem: str | None = None,
                           partition: str | None = None, gpus: str | None = None, python_env: str | None = None,
                           workspace: str | None = None, rw: bool = False, allow_hosts: list[str] | None = None,
                           idle_timeout: str | None = None, wait: bool = True) -> str:
        """Start a Python kernel in a Slurm job on a compute node, in a sandbox.

        profile: from list_profiles (default: the user's default profile). name: for the kernel
        (default: generated; every later call names it). time (e.g. 2:00:00), cpus, mem (e.g.
        4G), partition, gpus (N or TYPE:N): over the profile's. python_env: absolute path of a
        venv/conda environment with ipykernel to run the kernel with. workspace: a directory the
        kernel sees (read-only unless rw). allow_hosts: HOST[:PORT] the kernel may reach over
        https (nothing else is reachable). idle_timeout: hibernate (and end the job) after this
        long without a cell, e.g. 30m (default: the profile's kernel.mcp_idle_timeout, 1h).
        wait: return once the kernel is ready (progress is reported while the job is pending);
        false: return once the job is queued (status tells when it starts).
        """
        try:
            infos = {p.name: p for p in await AsyncKernel.profiles()}
            chosen = profile or default_profile_name()
            default_idle = infos[chosen].mcp_idle_timeout if chosen in infos else 0.0
            steps = 0

            def progress(line: str) -> None:
                nonlocal steps
                steps += 1
                asyncio.ensure_future(ctx.report_progress(steps, None, line))

            kernel = await AsyncKernel.submit(
                chosen, name=name, time=time, cpus=cpus, mem=mem, partition=partition, gpus=gpus,
                python_env=python_env, workspace=workspace, rw=rw, allow_hosts=tuple(allow_hosts or ()),
                idle_timeout=idle_timeout_for(default_idle, idle_timeout), wait=wait, on_progress=progress)
        except HpcKernelsError as e:
            raise failing(e) from None
        handles[kernel.name] = kernel
        return _status_text(await kernel.status(queue_position=True))

    @server.tool()
    async def execute(ctx: Context, name: str, code: str, timeout: float = DEFAULT_CELL_TIMEOUT) -> CallToolResult:
        """Run Python code in kernel `name` (variables persist between calls). Returns the status
        (ok, error, timeout), stdout, stderr, the value of the last expression, the error's
        traceback, and images (image/png) the code displayed. A cell still running after
        `timeout` seconds is interrupted; the kernel and its variables are kept. If the kernel
        ends while the code runs (e.g. killed at its memory limit), the result says why."""
        messages = 0

        def on_output(msg: dict[str, Any]) -> None:
            nonlocal messages
            messages += 1
            said = msg.get("content", {}).get("text") if msg.get("msg_type") == "stream" else None
            asyncio.ensure_future(ctx.report_progress(messages, None, clean(said)[-200:] if said else None))

        kernel = None
        try:
            kernel = await handle(name)
            result = await kernel.execute(code, timeout=timeout, on_output=on_output)
        except KernelGone as e:
            blocks = [("text", f"the kernel has ended: {clean(str(e))}", "text/plain")]
            if isinstance(e.result, ExecutionResult):
                blocks += [("text", "what the code wrote before:\n\n" + result_blocks(e.result)[0][1], "text/plain")]
            handles.pop(name, None)
            return to_result(blocks, error=True)
        except HpcKernelsError as e:
            raise failing(e) from None
        finally:
            if kernel is not None:  # a connected client would keep a forgotten kernel from its idle timeout
                await kernel.close()
        return to_result(result_blocks(result))

    @server.tool()
    async def interrupt(name: str) -> str:
        """Interrupt the code kernel `name` runs (as Ctrl-C); the kernel and its variables stay."""
        try:
            return await (await handle(name)).interrupt()
        except HpcKernelsError as e:
            raise failing(e) from None

    @server.tool()
    async def restart(name: str) -> str:
        """Restart kernel `name` in its job: a fresh Python process, all variables lost."""
        try:
            await (await handle(name)).restart()
        except HpcKernelsError as e:
            raise failing(e) from None
        return f"kernel {name} restarted"

    @server.tool()
    async def status(name: str) -> str:
        """Kernel `name` now: state (pending, starting, ready, failed, hibernated, ended), job,
        node, why it ended or failed; while pending, Slurm's reason, queue position and the
        expected start."""
        try:
            return _status_text(await (await handle(name)).status(queue_position=True))
        except HpcKernelsError as e:
            raise failing(e) from None

    @server.tool()
    async def logs(name: str, lines: int = 50) -> str:
        """The last lines of kernel `name`'s job log (the node agent's messages, the kernel's stderr)."""
        try:
            return clean(await (await handle(name)).logs(lines)) or "(the log is empty)"
        except HpcKernelsError as e:
            raise failing(e) from None

    @server.tool()
    async def shutdown(name: str) -> str:
        """Shut kernel `name` down: its job ends and its state is removed."""
        try:
            kernel = handles.pop(name, None) or await AsyncKernel.attach(name)
            await kernel.shutdown()
        except HpcKernelsError as e:
            raise failing(e) from None
        return f"kernel {name} shut down"

    @server.tool()
    async def list_kernels() -> str:
        """Every kernel of the user (also those started outside this agent), with state, job and node."""
        return _json([{k: v for k, v in i.as_dict().items() if k in ("name", "state", "job_id", "node", "profile",
                                                                      "message")}
                      for i in await AsyncKernel.list()])

    @server.tool()
    async def batch_submit(notebooks: list[str], out: str, profile: str | None = None,
                           parameters: list[dict[str, Any]] | None = None, name: str | None = None,
                           time: str | None = None, cpus: int | None = None, mem: str | None = None,
                           partition: str | None = None, gpus: str | None = None,
                           max_parallel: int | None = None, task_timeout: float | None = None,
                           cell_timeout: float | None = None) -> str:
        """Run notebooks (absolute paths) on the cluster as one Slurm job array: each notebook with
        each parameter set (dicts of variable -> value, injected as papermill does) is a task,
        in its own sandboxed kernel. out: the directory for executed notebooks and results.
        Returns the batch's name for batch_status and batch_results."""
        try:
            batch = await asyncio.to_thread(
                Batch.submit, notebooks, out=out, profile=profile, parameters=parameters or [{}], name=name,
                time=time, cpus=cpus, mem=mem, partition=partition, gpus=gpus, max_parallel=max_parallel,
                task_timeout=task_timeout, cell_timeout=cell_timeout)
        except HpcKernelsError as e:
            raise failing(e) from None
        return "every task already done" if batch is None else f"batch {batch.name} submitted"

    @server.tool()
    async def batch_status(name: str | None = None) -> str:
        """How many tasks of batch `name` (default: the latest) are pending, running, completed, failed..."""
        try:
            batch = await asyncio.to_thread(Batch.attach, name)
            counts = await asyncio.to_thread(batch.counts)
        except HpcKernelsError as e:
            raise failing(e) from None
        return _json({"batch": batch.name, "counts": counts})

    @server.tool()
    async def batch_results(name: str | None = None) -> str:
        """Every task of batch `name` (default: the latest): parameters, state, node, duration, the
        executed notebook's path, and the error of a failed cell."""
        try:
            batch = await asyncio.to_thread(Batch.attach, name)
            tasks = await asyncio.to_thread(batch.tasks)
        except HpcKernelsError as e:
            raise failing(e) from None
        rows = []
        for task in tasks:
            row = task.as_dict()
            if row["error"]:
                row["error"] = {k: clean(str(v)) for k, v in row["error"].items()}
            row["message"] = clean(row["message"])
            rows.append(row)
        return _json(rows)

    return server


def tool_names(server: Any) -> list[str]:
    return sorted(t.name for t in server._tool_manager.list_tools())


def main(argv: Sequence[str] = ()) -> int:
    """Serve over stdio until the client closes it. Kernels stay (they are the user's)."""
    server = build_server()
    server.run("stdio")
    return 0
