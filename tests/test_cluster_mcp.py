"""``hpc-kernel mcp`` driven by the MCP SDK's own stdio client, as an agent would, against real
kernels on the test cluster: start a kernel, run a cell that shows a PNG (the agent gets MCP
image content), a cell past its timeout, an interrupt, a kernel killed at its memory limit (the
agent is told why), shut down; a kernel the agent forgets hibernates at its idle timeout while the
server runs; a batch of two notebooks submitted, followed and its results read; nothing is left
in the queue."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from test_cluster_api import MEMORY_HOG, PNG_CELL, notebook, our_jobs, shared_dir

STATE_ROOT = Path.home() / ".local" / "share" / "hpc-kernels" / "kernels"


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    return await session.call_tool(tool, arguments, read_timeout_seconds=300)


async def agent_session(tmp_path: Path) -> None:
    (tmp_path / "limited.yaml").write_text("extends: local\nlimits:\n  memory: 400M\n")
    server = StdioServerParameters(command="hpc-kernel", args=["mcp"],
                                   env={**os.environ, "HPC_KERNELS_PROFILE_PATH": str(tmp_path)})
    name = f"mcp-{uuid.uuid4().hex[:6]}"
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"start_kernel", "execute", "interrupt", "status", "shutdown", "batch_submit"} <= tools
        profiles = json.loads(text_of(await call(session, "list_profiles")))
        assert {p["name"]: p["memory_limit"] for p in profiles}["limited"] == "400M"

        progress: list[str | None] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(message)

        started = await session.call_tool("start_kernel", {"profile": "limited", "name": name, "time": "0:15:00"},
                                          read_timeout_seconds=300, progress_callback=on_progress)
        assert not started.is_error, text_of(started)
        status = json.loads(text_of(started))
        assert status["state"] == "ready" and status["node"] in ("c1", "c2"), status
        assert any(m and m.startswith("kernel ready on") for m in progress), progress
        launch = json.loads((STATE_ROOT / name / "launch.json").read_text())
        assert launch["idle_timeout"] == 3600.0, "an agent's kernel gets kernel.mcp_idle_timeout by default"
        # A kernel the agent forgets: after one cell, it hibernates at its idle timeout while the
        # server still runs (the server holds no connection to it between calls).
        forgotten = f"mcp-idle-{uuid.uuid4().hex[:6]}"
        idle = await call(session, "start_kernel", profile="local", name=forgotten, idle_timeout="8s", time="0:10:00")
        assert not idle.is_error, text_of(idle)
        assert "status: ok" in text_of(await call(session, "execute", name=forgotten, code="y = 1"))
        listed = json.loads(text_of(await call(session, "list_kernels")))
        assert name in {k["name"] for k in listed}
        # It is the user's own kernel: the CLI sees it too.
        cli = await asyncio.to_thread(subprocess.run, ["hpc-kernel", "list"], capture_output=True, text=True, check=True)
        assert name in cli.stdout

        # A batch runs meanwhile, on its own (its tasks are jobs of their own).
        where = shared_dir()
        nb = notebook(where / "double.ipynb", "n = 1", "print(2 * n)")
        submitted = await call(session, "batch_submit", notebooks=[str(nb)], out=str(where / "out"), profile="local",
                               parameters=[{"n": 1}, {"n": 2}], task_timeout=120)
        assert not submitted.is_error and text_of(submitted).startswith("batch "), text_of(submitted)
        batch = text_of(submitted).split()[1]

        plot = await call(session, "execute", name=name, code=PNG_CELL)
        assert not plot.is_error and "status: ok" in text_of(plot) and "shown" in text_of(plot), text_of(plot)
        images = [b for b in plot.content if b.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png" and images[0].data.startswith("iVBORw0KGgo")

        await call(session, "execute", name=name, code="kept = 41")
        slow = await call(session, "execute", name=name, code="import time; time.sleep(120)", timeout=3)
        assert "status: timeout" in text_of(slow) and "KeyboardInterrupt" in text_of(slow), text_of(slow)
        kept = await call(session, "execute", name=name, code="kept + 1")
        assert "result:\n42" in text_of(kept), text_of(kept)

        going = asyncio.Event()

        async def on_output(done: float, total: float | None, message: str | None) -> None:
            if message and "go" in message:
                going.set()

        running = asyncio.ensure_future(session.call_tool(
            "execute", {"name": name, "code": "import time\nprint('go', flush=True)\ntime.sleep(120)"},
            read_timeout_seconds=300, progress_callback=on_output))
        await asyncio.wait_for(going.wait(), 60)  # the cell runs: its output came as progress
        said = await call(session, "interrupt", name=name)
        assert not said.is_error and "SIGINT" in text_of(said), text_of(said)
        stopped = await asyncio.wait_for(running, 60)
        assert "status: error" in text_of(stopped) and "KeyboardInterrupt" in text_of(stopped), text_of(stopped)

        killed = await call(session, "execute", name=name, code=MEMORY_HOG, timeout=150)
        assert killed.is_error, text_of(killed)
        assert "over the limit of 400.0 MiB (limits.memory)" in text_of(killed), text_of(killed)
        status = json.loads(text_of(await call(session, "status", name=name)))
        assert status["state"] == "ended" and "limits.memory" in status["message"], status

        for _ in range(60):
            status = json.loads(text_of(await call(session, "status", name=forgotten)))
            if status["state"] != "ready":
                break
            await asyncio.sleep(1)
        assert status["state"] == "hibernated", status
        assert not (await call(session, "shutdown", name=forgotten)).is_error

        for _ in range(120):
            counts = json.loads(text_of(await call(session, "batch_status", name=batch)))["counts"]
            if set(counts) <= {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "LOST"}:
                break
            await asyncio.sleep(2)
        assert counts == {"COMPLETED": 2}, counts
        results = json.loads(text_of(await call(session, "batch_results", name=batch)))
        assert sorted(r["parameters"]["n"] for r in results if r["state"] == "COMPLETED") == [1, 2], results
        shutil.rmtree(where, ignore_errors=True)

        done = await call(session, "shutdown", name=name)
        assert not done.is_error, text_of(done)
        gone = await call(session, "status", name=name)
        assert gone.is_error and "no kernel named" in text_of(gone), text_of(gone)


def test_an_agent_drives_a_kernel_through_the_mcp_server(cluster: None, tmp_path: Path) -> None:
    before = our_jobs()
    asyncio.run(agent_session(tmp_path))
    assert our_jobs() <= before
