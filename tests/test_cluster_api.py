"""The public Python API (hpc_kernels.Kernel) against real kernels on the test cluster (profile
``local``, bubblewrap): start, run code, its outputs, interrupt, a cell's timeout, restart,
attach, list; a kernel killed at its memory limit and the reason given; a start cancelled by a
KeyboardInterrupt while the job is pending (the ``down`` partition never starts it)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_kernels import AsyncKernel, Batch, Kernel
from hpc_kernels.errors import KernelGone, KernelNotFound

# A PNG made with the standard library only (the kernel may have no matplotlib), shown with IPython.
PNG_CELL = """
import struct, zlib
from IPython.display import Image, display
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
raw = b"".join(b"\\x00" + bytes([255, 0, 0]) * 4 for _ in range(4))
png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
display(Image(data=png))
print("shown")
"""
# Four processes of 150 MiB each: none over 400 MiB alone, together over it (test_cluster_runtimes).
MEMORY_HOG = """
import subprocess, sys, time
hog = "import time; x = b'\\\\x01' * (150 << 20); time.sleep(120)"
children = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
time.sleep(120)
"""


def our_jobs() -> set[str]:
    out = subprocess.run(["squeue", "--me", "--noheader", "--format=%i"], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def kernel(cluster: None) -> Iterator[Kernel]:
    lines: list[str] = []
    with Kernel.submit(profile="local", name=f"api-{uuid.uuid4().hex[:6]}", time="0:20:00",
                       on_progress=lines.append) as k:
        assert any(line.startswith("kernel ready on") for line in lines), lines
        yield k
    with pytest.raises(KernelNotFound):
        Kernel.attach(k.name)


def test_code_runs_on_a_node_and_every_output_comes_back(kernel: Kernel) -> None:
    assert kernel.state == "ready" and kernel.node in ("c1", "c2") and kernel.job_id
    assert kernel.connection_file.exists()
    r = kernel.execute("import socket, sys; print('out'); print('err', file=sys.stderr); socket.gethostname()",
                       timeout=60)
    assert (r.status, r.stdout, r.stderr, r.result) == ("ok", "out\n", "err\n", repr(kernel.node))
    r = kernel.execute(PNG_CELL, timeout=60)
    assert r.ok and r.stdout == "shown\n", r
    assert [o["output_type"] for o in r.outputs] == ["display_data"]
    assert r.outputs[0]["data"]["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    r = kernel.execute("1 / 0")
    assert r.status == "error" and r.error is not None and r.error.ename == "ZeroDivisionError"
    assert "\x1b" not in r.error.traceback and "1 / 0" in r.error.traceback


def test_a_cell_past_its_timeout_is_interrupted_and_the_variables_stay(kernel: Kernel) -> None:
    kernel.execute("kept = 41", timeout=60)
    started = time.monotonic()
    r = kernel.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(120)", timeout=3)
    assert r.status == "timeout" and r.stdout == "sleeping\n", r
    assert r.error is not None and r.error.ename == "KeyboardInterrupt"
    assert time.monotonic() - started < 60
    assert kernel.execute("kept + 1", timeout=60).result == "42"


def test_interrupt_stops_the_running_cell(kernel: Kernel) -> None:
    started = threading.Event()
    results = []

    def run() -> None:
        results.append(kernel.execute("import time\nprint('go', flush=True)\ntime.sleep(120)",
                                      on_output=lambda msg: started.set()))

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    assert "sent SIGINT" in kernel.interrupt()
    thread.join(60)
    assert results and results[0].status == "error" and results[0].error.ename == "KeyboardInterrupt"


def test_restart_attach_and_list(kernel: Kernel) -> None:
    kernel.execute("before_restart = 1", timeout=60)
    kernel.restart()
    other = Kernel.attach(kernel.name)
    try:
        assert other.execute("'before_restart' in dir()", timeout=60).result == "False"
    finally:
        other.close()
    assert kernel.execute("2 + 2", timeout=60).result == "4"  # the first handle reconnects too
    listed = {info.name: info for info in Kernel.list()}
    assert listed[kernel.name].state == "ready" and listed[kernel.name].job_id == kernel.job_id
    assert "local" in {p.name for p in Kernel.profiles()}
    assert "[hpc-kernels agent " in kernel.logs(200)


def test_a_kernel_killed_at_its_memory_limit_says_why(cluster: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "limited.yaml").write_text("extends: local\nlimits:\n  memory: 400M\n")
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    k = Kernel.submit(profile="limited", name=f"api-mem-{uuid.uuid4().hex[:6]}", time="0:10:00")
    try:
        with pytest.raises(KernelGone) as gone:
            k.execute(MEMORY_HOG, timeout=150)
        assert "over the limit of 400.0 MiB (limits.memory)" in str(gone.value), str(gone.value)
        info = k.status()
        assert info.state == "ended" and "limits.memory" in info.message, info
    finally:
        k.shutdown()


def test_a_keyboard_interrupt_while_pending_cancels_the_job(cluster: None) -> None:
    before = our_jobs()
    seen: list[str] = []

    def progress(line: str) -> None:
        seen.append(line)
        if line.startswith("PENDING"):
            raise KeyboardInterrupt

    name = f"api-down-{uuid.uuid4().hex[:6]}"
    with pytest.raises(KeyboardInterrupt):
        Kernel.submit(profile="local", name=name, partition="down", on_progress=progress)
    assert any("PENDING" in line for line in seen), seen
    assert name not in {info.name for info in Kernel.list()}
    assert our_jobs() <= before


def test_cancelling_an_async_submit_while_pending_cancels_the_job(cluster: None) -> None:
    """The asyncio flavour: the task that awaits AsyncKernel.submit is cancelled while the job
    waits in the queue (as the MCP server's start_kernel is when the agent gives up)."""
    before = our_jobs()
    name = f"api-adown-{uuid.uuid4().hex[:6]}"

    async def submit_then_cancel() -> None:
        pending = asyncio.Event()

        def progress(line: str) -> None:
            if line.startswith("PENDING"):
                pending.set()

        task = asyncio.ensure_future(AsyncKernel.submit("local", name=name, partition="down", on_progress=progress))
        await asyncio.wait_for(pending.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(submit_then_cancel())
    assert name not in {info.name for info in Kernel.list()}
    assert our_jobs() <= before


def notebook(path: Path, *cells: str) -> Path:
    """A notebook of code cells (nbformat 4), with a ``parameters`` cell first, as papermill has it."""
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                                                          "display_name": "Python 3"}},
          "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {"tags": ["parameters"] if i == 0 else []},
                     "execution_count": None, "outputs": [], "source": source} for i, source in enumerate(cells)]}
    path.write_text(json.dumps(nb))
    return path


def shared_dir() -> Path:
    """On the shared file system (home): the nodes read the notebook and write the results."""
    path = Path.home() / "hk-test-workspaces" / f"api-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def test_a_batch_through_the_api(cluster: None) -> None:
    """Batch.submit: one notebook over two parameter sets, one job array; wait; each task's state,
    parameters and executed notebook; one that raises is FAILED with the exception."""
    where = shared_dir()
    try:
        nb = notebook(where / "square.ipynb", "n = 1", "assert n != 3, 'three'\nprint(n * n)")
        batch = Batch.submit([nb], out=where / "out", profile="local", parameters=[{"n": 2}, {"n": 3}],
                             task_timeout=120)
        assert batch is not None and batch.name in Batch.list()
        tasks = {t.parameters["n"]: t for t in batch.wait(timeout=240)}
        assert tasks[2].state == "COMPLETED" and tasks[2].output and Path(tasks[2].output).exists(), tasks[2]
        assert tasks[3].state == "FAILED" and tasks[3].error.get("ename") == "AssertionError", tasks[3]
        assert Batch.attach(batch.name).counts() == {"COMPLETED": 1, "FAILED": 1}
    finally:
        shutil.rmtree(where, ignore_errors=True)
