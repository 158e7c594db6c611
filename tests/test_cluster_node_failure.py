"""A compute node that fails under running kernels, on the real cluster.

The node is powered off as a power cut does it (cluster/node-power.sh, run as root through the
sudo rule setup.sh installs): its link goes down first, so nothing it says reaches anyone, then
every process on it dies, its node-local /tmp with them. Slurm declares it DOWN after
SlurmdTimeout (20 s in the test cluster; 300 s by default) and requeues or ends its jobs.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import hk, run, start_kernel

from test_cluster_lifecycle import STATE_ROOT, processes_mentioning

NODE_POWER = "/opt/hpc-kernels/cluster-tools/node-power.sh"
LOOP = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(1)"


def node_power(action: str, node: str) -> None:
    run(["sudo", "-n", NODE_POWER, action, node], timeout=120)


def wait_for(what: str, check, timeout: float, every: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def status(name: str) -> dict[str, object]:
    return json.loads(hk("status", name, "--json").stdout)


@pytest.fixture
def failing_node(cluster: None) -> Iterator[list[str]]:
    """The nodes a test powers off are powered on again, whatever happens in it."""
    powered_off: list[str] = []
    yield powered_off
    for node in powered_off:
        node_power("on", node)


@pytest.fixture
def no_requeue_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    return tmp_path


def test_a_failed_node_requeues_one_kernel_and_ends_another(failing_node: list[str], no_requeue_profile: Path) -> None:
    """Two kernels on one node, which fails while a client runs a cell on each:

    - kernel A's job may be requeued (Slurm's default): exec stops and says the job was requeued
      and the kernel lost; status says so; the job starts again on the other node with a new
      kernel that the relay reaches by itself (the same connection file works), whose first cell
      says its variables are lost, and they are;
    - kernel B's job may not (``--no-requeue``): exec and status say NODE_FAIL; nothing of it is
      left on the login node, and no secret on disk.
    """
    a = start_kernel(None, prefix="nfa")
    (no_requeue_profile / "pinned.yaml").write_text(
        f"extends: local\nslurm:\n  extra_options: [--no-requeue, --nodelist={a.node}]\n")
    b = start_kernel(None, prefix="nfb", profile="pinned")
    assert b.node == a.node
    a.exec("x = 41")
    b.exec("y = 1")
    clients = {k.name: subprocess.Popen(["hpc-kernel", "exec", k.name, LOOP], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for k in (a, b)}
    for proc in clients.values():
        assert proc.stdout is not None and proc.stdout.readline().strip() == "0"

    failing_node.append(a.node)
    node_power("off", a.node)
    cut = time.monotonic()
    said = {}
    for name, proc in clients.items():
        out, err = proc.communicate(timeout=120)
        said[name] = (proc.returncode, err, time.monotonic() - cut)
    print({name: round(t, 1) for name, (_, _, t) in said.items()}, "s after the cut")
    # Clients learn it when Slurm does: SlurmdTimeout (20 s here), then its next node check.
    assert all(t < 90 for _, _, t in said.values()), said

    code, err, _ = said[a.name]
    assert code == 1 and f"Slurm requeued job {a.job_id}" in err and "gone with its variables" in err, err
    code, err, _ = said[b.name]
    assert code == 1 and "has ended" in err and "NODE_FAIL" in err, err

    sa = status(a.name)
    assert sa["requeued"] is True and sa["state"] in ("pending", "starting", "ready"), sa
    assert "Slurm requeued the job" in str(sa["message"]), sa
    sb = status(b.name)
    assert sb["state"] == "ended" and sb["slurm_state"] == "NODE_FAIL", sb
    wait_for("kernel B's relay ends and removes its sockets", lambda: not b.connection_file.parent.exists(), 30)
    assert processes_mentioning(str(STATE_ROOT / b.name)) == []
    assert not (STATE_ROOT / b.name / "key").exists()

    # The relay goes on trying while the job is in the queue, past its usual minute; Slurm holds a
    # requeued job for two minutes before it may start again: past that minute, the test lets it start.
    relay_log = STATE_ROOT / a.name / "relay.log"
    wait_for("the relay waits for the requeued job", lambda: f"job {a.job_id} is PENDING" in relay_log.read_text(), 90)
    if status(a.name)["state"] == "pending":
        run(["scontrol", "update", f"jobid={a.job_id}", "StartTime=now"])
    ready = wait_for("kernel A starts again", lambda: (s := status(a.name))["state"] == "ready" and s, 120)
    assert ready["node"] != a.node and ready["requeued"] is True, ready

    # The relay waited through the requeue and reached the new kernel: the old connection file works.
    assert hk("connect", a.name).stdout.strip() == str(a.connection_file)
    wait_for("the relay reaches the new kernel", lambda: f"reconnected to {ready['node']}" in relay_log.read_text(), 30)
    proc = a.exec("print('x' in dir())")
    assert proc.stdout.strip() == "False", proc.stdout
    assert f"Slurm requeued job {a.job_id}" in proc.stderr and "variables from before are lost" in proc.stderr
    assert "Slurm requeued this job (restart 1" in hk("logs", a.name).stdout
    assert "requeued" not in a.exec("print(1)").stderr  # the notice came once

    node_power("on", failing_node.pop())
    for k in (a, b):
        hk("shutdown", k.name)
    assert not (STATE_ROOT / a.name).exists() and not a.connection_file.parent.exists()
