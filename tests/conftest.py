"""Fixtures shared by the tests.

Tests marked ``cluster`` run against the project's real Slurm cluster (``make cluster-up``) as an
unprivileged user (``make test`` runs them as hk-alice) and drive the installed ``hpc-kernel``
command. They fail, not skip, when the cluster is missing: a test run that silently checked
nothing would look green.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SECOND_USER = "hk-bob"
TEST_USERS = ("hk-alice", SECOND_USER)
NODES = ("c1", "c2")
# Lists a node's private /tmp or its processes as root (a root-owned copy of cluster/node-inspect.sh;
# the sudo rule is setup.sh's).
NODE_INSPECT = "/opt/hpc-kernels/cluster-tools/node-inspect.sh"
# The shipped test-cluster profile of each sandbox runtime: the kernel tests run for each.
# This login node's relay record in a kernel's state directory (each login node has its own).
RELAY_RECORD = f"relay-{socket.gethostname()}.json"

RUNTIME_PROFILES = {"bwrap": "local", "apptainer": "local-apptainer", "podman": "local-podman"}
# Kernels the whole kernel suite runs against: each sandbox runtime over the default (srun)
# transport, and bubblewrap over the relay's other transports (the relay does not depend on the
# runtime). name -> (profile, relay transport)
FLAVOURS = {"apptainer": ("local-apptainer", "srun"), "bwrap": ("local", "srun"), "podman": ("local-podman", "srun"),
            "bwrap-tcp": ("local", "tcp"), "bwrap-ssh": ("local", "ssh")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith("test_cluster_"):
            item.add_marker(pytest.mark.cluster)


def run(argv: list[str], *, check: bool = True, timeout: float = 180, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def hk(*args: str, check: bool = True, timeout: float = 180, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``hpc-kernel`` command."""
    return run(["hpc-kernel", *args], check=check, timeout=timeout, input=input, env=env)


def default_sigint() -> None:
    """For Popen's preexec_fn: Ctrl-C as at a terminal, even when the suite itself runs in the
    background (the shell then starts every command with SIGINT ignored, and Python keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def as_second_user(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sudo", "-n", "-u", SECOND_USER, "--", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def node_tmp_entries(node: str) -> list[tuple[str, str, str]]:
    """(owner, octal mode, name) of each entry in the node's private /tmp, as root sees them."""
    proc = run(["sudo", "-n", NODE_INSPECT, "tmp", node], timeout=30)
    return [tuple(line.split(" ", 2)) for line in proc.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def node_processes(node: str) -> list[str]:
    """"USER PID COMMAND" of every process on the node (and in its sandboxes)."""
    return [line.strip() for line in run(["sudo", "-n", NODE_INSPECT, "procs", node], timeout=30).stdout.splitlines()
            if line.strip()]


def leftover_processes(nodes: tuple[str, ...] = NODES, wait: float = 30) -> dict[str, list[str]]:
    """The test users' processes still on the nodes, after up to ``wait`` s for a job's end to take them."""
    deadline = time.monotonic() + wait
    while True:
        left = {node: [p for p in node_processes(node) if p.split()[0] in TEST_USERS] for node in nodes}
        if not any(left.values()) or time.monotonic() > deadline:
            return {node: procs for node, procs in left.items() if procs}
        time.sleep(1)


@pytest.fixture(scope="session", autouse=True)
def no_kernel_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a run with cluster tests, no kernel of the test user may be left, and nothing of the
    test users in any node's /tmp: a test (or the code under test) that leaks a kernel, its job,
    or a node-side directory (with its key) fails the run here. Leftover kernels are shut down."""
    yield
    if os.getuid() == 0 or not any(item.get_closest_marker("cluster") for item in request.session.items):
        return
    rows = json.loads(hk("list", "--json", check=False).stdout or "[]")
    for row in rows:
        hk("shutdown", row["name"], check=False)
    assert not rows, f"kernels left behind by the tests: {[(r['name'], r['profile']) for r in rows]}"
    # hk-podman-<uid>: rootless podman's per-user storage, kept between jobs on purpose (warm
    # starts; podman_node.py); test_cluster_podman.py checks no ended job's container is left in it.
    left = {node: [" ".join(e) for e in node_tmp_entries(node) if e[0] in TEST_USERS
                   and not (e[2].startswith("hk-podman-") and e[1] == "700")] for node in NODES}
    assert not any(left.values()), f"left in the nodes' /tmp by the tests: {left}"
    processes = leftover_processes()
    assert not processes, f"processes of the test users outlived their jobs on the nodes: {processes}"


@pytest.fixture(scope="session")
def cluster() -> None:
    """The real cluster must be up, and we must not be root."""
    assert os.getuid() != 0, "cluster tests run as an unprivileged user: use `make test`"
    assert shutil.which("hpc-kernel"), "hpc-kernel is not on PATH: run `make setup`"
    proc = run(["sinfo", "-h", "-o", "%n %t"], check=False, timeout=30)
    assert proc.returncode == 0, f"sinfo failed (is the cluster up? `make cluster-up`):\n{proc.stderr}"
    states = dict(line.split() for line in proc.stdout.splitlines())
    assert {"c1", "c2"} <= set(states), f"expected nodes c1 and c2, sinfo says {states}"


def make_workspace() -> Path:
    """A directory on the shared file system (home), so compute nodes see it."""
    path = Path.home() / "hk-test-workspaces" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    (path / "data.txt").write_text("shared data\n")
    return path


@pytest.fixture
def workspace() -> Iterator[Path]:
    path = make_workspace()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Kernel:
    name: str
    job_id: str
    node: str
    connection_file: Path
    workspace: Path
    profile: str = "local"
    relay: str = "srun"

    def status(self) -> dict[str, object]:
        return json.loads(hk("status", self.name, "--json").stdout)

    def exec(self, code: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return hk("exec", self.name, code, check=check, timeout=timeout)


def start_kernel(workspace: Path | None, *extra: str, prefix: str = "t", profile: str = "local",
                 relay: str | None = None, env: dict[str, str] | None = None) -> Kernel:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    where = ["--workspace", str(workspace)] if workspace else ["--no-workspace"]
    proc = hk("submit", "--profile", profile, "--name", name, *where, *(["--relay", relay] if relay else []), *extra,
              env=env)
    connection_file = Path(proc.stdout.strip().splitlines()[-1])
    status = json.loads(hk("status", name, "--json").stdout)
    assert status["state"] == "ready", status
    return Kernel(name, str(status["job_id"]), str(status["node"]), connection_file, workspace or Path("/tmp"),
                  profile, relay or "srun")


COUNT_SIGINTS = """
import signal, time
caught = []
signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
print("counting", flush=True)
started = time.monotonic()
while time.monotonic() - started < 5:
    pass
print("SIGINTs:", len(caught))
"""


def sigints_from_one_interrupt(name: str) -> int:
    """How many SIGINTs the kernel's process receives from one `hpc-kernel interrupt` (a cell
    that counts them while it spins for 5 s)."""
    proc = subprocess.Popen(["hpc-kernel", "exec", name, COUNT_SIGINTS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "counting"
    hk("interrupt", name)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return int(out.split("SIGINTs:")[1])


@pytest.fixture(params=sorted(RUNTIME_PROFILES))
def runtime_profile(request: pytest.FixtureRequest) -> str:
    """A test that starts its own kernels runs once per sandbox runtime, with this profile."""
    return RUNTIME_PROFILES[request.param]


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A test that starts its own kernels runs once per flavour: (profile, relay transport)."""
    return FLAVOURS[request.param]


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def kernel(request: pytest.FixtureRequest, cluster: None) -> Iterator[Kernel]:
    """One ready kernel per flavour (runtime, transport), shared by a module's tests, shut down at the end."""
    path = make_workspace()
    profile, relay = FLAVOURS[request.param]
    k = start_kernel(path, profile=profile, relay=relay, prefix=request.param[:3])
    yield k
    hk("shutdown", k.name, check=False)
    shutil.rmtree(path, ignore_errors=True)
