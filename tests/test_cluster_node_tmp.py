"""Nothing of a kernel stays in a compute node's /tmp once its job has ended: not its directory,
its key or its sockets, however the job ended.

A node's /tmp is listed as root sees it, through the node's own mount namespace
(cluster/node-inspect.sh tmp, run through sudo): the test user could not see another job's private
directory, nor another user's. Partition ``short`` has only c1, so every job here lands there.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import nbformat

from conftest import hk, node_tmp_entries, run

NODE = "c1"
PARTITION = "short"


def ours(node: str) -> list[str]:
    """The test users' entries in the node's /tmp."""
    return [f"{owner} {mode} {name}" for owner, mode, name in node_tmp_entries(node)
            if owner in ("hk-alice", "hk-bob")]


def node_dirs_of(job_id: str) -> list[str]:
    return [name for owner, _, name in node_tmp_entries(NODE) if name.startswith(f"hk-{job_id}-")]


def wait_job_gone(job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip()
        if state in ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def wait_steps_gone(job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], check=False).stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"the steps of job {job_id} did not end within {timeout} s")


def test_scancel_of_a_job_with_several_kernels_leaves_nothing_on_the_node(cluster: None) -> None:
    """Three kernels as steps of one allocation, then scancel of the whole job: each agent takes
    its directory (key, sockets) with it."""
    granted = run(["salloc", "--no-shell", "--nodes=1", "--time=10", f"--partition={PARTITION}"]).stderr
    allocation = granted.split("Granted job allocation ")[1].split()[0]
    names = [f"sw-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    try:
        for name in names:
            hk("submit", "--profile", "local", "--name", name, "--no-workspace", env={"SLURM_JOB_ID": allocation})
        dirs = node_dirs_of(allocation)
        assert len(dirs) == 3, f"each kernel has its directory on {NODE}: {dirs}"
        run(["scancel", allocation])
        wait_job_gone(allocation)
        assert node_dirs_of(allocation) == []
        assert ours(NODE) == [], f"left on {NODE}: {ours(NODE)}"
    finally:
        run(["scancel", allocation], check=False)
        for name in names:
            hk("shutdown", name, check=False)


def test_a_killed_agent_leaves_its_directory_and_the_next_kernel_sweeps_it(cluster: None) -> None:
    """SIGKILL (scancel --signal=KILL; Slurm's own after KillWait) gives an agent no chance to
    clean. What it left (seen here, so this test cannot pass vacuously) is removed by the next
    kernel of the same user on that node, before that kernel starts; a running job's directory is
    not touched."""
    keep = f"keep-{uuid.uuid4().hex[:6]}"
    killed = [f"kill-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    nxt = f"next-{uuid.uuid4().hex[:6]}"
    try:
        hk("submit", "--profile", "local", "--name", keep, "--no-workspace", "--partition", PARTITION)
        keep_job = json.loads(hk("status", keep, "--json").stdout)["job_id"]
        jobs = []
        for name in killed:
            hk("submit", "--profile", "local", "--name", name, "--no-workspace", "--partition", PARTITION)
            jobs.append(str(json.loads(hk("status", name, "--json").stdout)["job_id"]))
        for job in jobs:
            # The batch step is the agent (the batch script execs it): KILL it, and the job ends.
            run(["scancel", "--batch", "--signal=KILL", job])
        for job in jobs:
            wait_job_gone(job)
        left = {job: node_dirs_of(job) for job in jobs}
        assert all(len(d) == 1 for d in left.values()), f"a killed agent leaves its directory: {left}"
        before = node_dirs_of(str(keep_job))
        assert len(before) == 1

        hk("submit", "--profile", "local", "--name", nxt, "--no-workspace", "--partition", PARTITION)
        for job in jobs:
            assert node_dirs_of(job) == [], f"the next kernel removed job {job}'s directory"
        assert node_dirs_of(str(keep_job)) == before, "a running job's directory stays"
        assert "keep" in hk("exec", keep, "print('keep')").stdout, "and its kernel works on"
        log = hk("logs", nxt).stdout
        assert "node directories of ended jobs" in log and all(f"hk-{job}-" in log for job in jobs), log
    finally:
        for name in [keep, *killed, nxt]:
            hk("shutdown", name, check=False)
    assert ours(NODE) == [], f"left on {NODE}: {ours(NODE)}"


def test_a_batch_task_leaves_no_runtime_directory_on_its_node(cluster: None, workspace: Path) -> None:
    """A batch task ends its on-node kernel with a shutdown, which also stops the kernel's relay
    if one runs there: that must not make (and leave) an empty /tmp/hpc-kernels-<uid> on the
    node. Seen before the fix: the demo's batch left one on c1."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print(6 * 7)"))
    nbformat.write(nb, str(workspace / "one.ipynb"))
    name = f"tmpb-{uuid.uuid4().hex[:6]}"
    hk("batch", "submit", str(workspace / "one.ipynb"), "--out", str(workspace / "out"), "--profile", "local",
       "--partition", PARTITION, "--name", name, "--no-workspace", "--watch", timeout=300)
    assert json.loads(hk("batch", "results", name, "--json").stdout)[0]["state"] == "COMPLETED"
    deadline = time.monotonic() + 60  # the task's result is written before its kernel is shut down
    while run(["squeue", "--me", "-h", f"--partition={PARTITION}", "-o", "%i"]).stdout.strip():
        assert time.monotonic() < deadline, "the batch's job did not end"
        time.sleep(0.5)
    assert f"hpc-kernels-{os.getuid()}" not in [e.split()[-1] for e in ours(NODE)], ours(NODE)
