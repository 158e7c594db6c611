"""What is particular to the podman runtime, on the real cluster (rootless podman 4.3 + runc on c1/c2).

Everything every runtime must do (the kernel suite, the security and escape tests, relay
transports, batch, provisioner) runs for podman through conftest's RUNTIME_PROFILES and FLAVOURS;
here only what podman adds: the container's name, labels and removal (at shutdown, after a
SIGKILLed agent), keep-id ownership, the job's storage (outside the sandbox, gone with the job),
the per-user storage kept on the node (warm for the next kernel). One module kernel (read-write
workspace) serves most tests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Kernel, hk, make_workspace, run, start_kernel

PROFILE = "local-podman"
UID = os.getuid()
USER_DIR = f"/tmp/hk-podman-{UID}"


def podman_on(kernel: Kernel, *args: str, storage: str | None = None) -> str:
    """Run podman as the user on the kernel's node, inside its job, on a storage of the agent's:
    the kernel's own (podman_storage job, the default), or ``storage``."""
    top = storage or f"{USER_DIR}/job-{kernel.job_id}"
    podman = ["podman", "--root", f"{top}/storage", "--runroot", f"{top}/run", "--tmpdir", f"{top}/tmp",
              "--events-backend", "file", "--storage-driver", "overlay", "--runtime", "runc", *args]
    # A pause process this command starts (none of the storage's agents runs) would outlive the
    # step: Slurm's proctrack/linuxproc loses processes that daemonize. End it here.
    pause = f"{top}/tmp/pause.pid"
    script = (f'before=$(cat {pause} 2>/dev/null); "$@"; rc=$?; after=$(cat {pause} 2>/dev/null); '
              f'if [ -n "$after" ] && [ "$after" != "$before" ]; then kill -9 "$after"; fi; exit $rc')
    argv = ["srun", f"--jobid={kernel.job_id}", "--overlap", "--nodes=1", "--ntasks=1", "env",
            f"HOME={USER_DIR}/home", f"XDG_CONFIG_HOME={USER_DIR}/home/.config", f"XDG_RUNTIME_DIR={top}/xdg",
            "sh", "-c", script, "podman-on", *podman]
    return run(argv, timeout=120).stdout


def containers(kernel: Kernel, storage: str | None = None) -> dict[str, dict[str, str]]:
    """Name -> labels of every container in a storage of the user's on the kernel's node."""
    listing = json.loads(podman_on(kernel, "ps", "--all", "--format", "json", storage=storage) or "[]")
    return {c["Names"][0]: c.get("Labels") or {} for c in listing}


def state_dir(kernel: Kernel) -> Path:
    return Path(str(kernel.status()["log"])).parent


def pinned_profile(tmp_path: Path, node: str) -> dict[str, str]:
    """A profile on ``node`` whose kernels keep podman's storage on the node between jobs."""
    (tmp_path / "pinned-podman.yaml").write_text(f"extends: {PROFILE}\nslurm:\n  extra_options: [--nodelist={node}]\n"
                                                 "runtime:\n  podman_storage: node\n")
    return {"HPC_KERNELS_PROFILE_PATH": str(tmp_path)}


@pytest.fixture(scope="module")
def kernel(cluster: None) -> Iterator[Kernel]:
    path = make_workspace()
    k = start_kernel(path, "--rw", prefix="pod", profile=PROFILE)
    yield k
    hk("shutdown", k.name, check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_the_container_is_named_and_labelled_after_job_and_kernel(kernel: Kernel) -> None:
    labels = containers(kernel)[f"hk-{kernel.job_id}-{kernel.name}"]
    assert labels["hpc-kernels.job"] == kernel.job_id
    assert labels["hpc-kernels.kernel"] == kernel.name
    assert labels["hpc-kernels.user"] == os.environ.get("USER", "hk-alice")


def test_files_the_kernel_writes_in_a_rw_workspace_are_the_users(kernel: Kernel) -> None:
    kernel.exec("import os; open('made-inside.txt', 'w').write('x'); os.mkdir('dir-inside')")
    for name in ("made-inside.txt", "dir-inside"):
        st = (kernel.workspace / name).stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), name


PROBE = r"""
import json, os, socket
user_home = os.path.dirname(os.path.dirname(os.getcwd()))  # the workspace is ~/hk-test-workspaces/<name>
out = {"uid": os.getuid(), "home": os.path.expanduser("~"), "home_dirs": sorted(os.listdir("/home")),
       "in_user_home": sorted(os.listdir(user_home)), "workspaces": sorted(os.listdir(os.path.dirname(os.getcwd()))),
       "storage": os.path.exists(%r), "cap_eff": open("/proc/self/status").read().split("CapEff:")[1].split()[0],
       "pids": len([p for p in os.listdir("/proc") if p.isdigit()]), "ifaces": sorted(n for _, n in socket.if_nameindex())}
try:
    socket.create_connection(("10.77.7.1", 22), timeout=3); out["net"] = "connected"
except OSError as e:
    out["net"] = type(e).__name__
try:
    open("/usr/hk-write-test", "w"); out["root_rw"] = True
except OSError:
    out["root_rw"] = False
print(json.dumps(out))
""" % USER_DIR


def test_no_network_no_home_no_storage_no_capabilities_inside(kernel: Kernel) -> None:
    seen = json.loads(kernel.exec(PROBE).stdout.strip().splitlines()[-1])
    assert seen["uid"] == os.getuid(), "keep-id: the kernel runs as the user"
    assert seen["home"] == "/tmp"
    # of the home only the path down to the workspace (mount points), nothing else of it
    assert seen["home_dirs"] == [Path.home().name], seen["home_dirs"]
    assert seen["in_user_home"] == ["hk-test-workspaces"] and seen["workspaces"] == [kernel.workspace.name]
    assert seen["storage"] is False, "podman's storage on the node is not reachable from inside"
    assert seen["cap_eff"] == "0000000000000000"
    assert seen["ifaces"] == ["lo"] and seen["net"] != "connected"
    assert seen["root_rw"] is False
    assert seen["pids"] <= 6, f"the container sees only its own processes: {seen['pids']}"


def test_a_killed_agents_container_is_removed_and_the_next_kernel_starts_warm(kernel: Kernel, tmp_path: Path) -> None:
    """podman_storage node: SIGKILL to the agent, Slurm ends the job; the container it left in the
    user's storage on the node is removed by the next kernel of the user on that node, which starts
    without loading the image (the first kernel there loaded it)."""
    env = pinned_profile(tmp_path, kernel.node)
    victim = start_kernel(None, prefix="pok", profile="pinned-podman", env=env)
    assert victim.node == kernel.node
    agent = json.loads((state_dir(victim) / "agent.json").read_text())
    assert f"hk-{victim.job_id}-{victim.name}" in containers(kernel, USER_DIR)
    run(["srun", f"--jobid={victim.job_id}", "--overlap", "--nodes=1", "--ntasks=1", "kill", "-KILL", str(agent["pid"])])
    deadline = time.monotonic() + 60
    while run(["squeue", "-h", "-j", victim.job_id], check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(1)
    hk("shutdown", victim.name, check=False)
    warm = start_kernel(None, prefix="pow", profile="pinned-podman", env=env)
    try:
        log = hk("logs", warm.name).stdout
        assert "podman: loaded" not in log, "the image was already in the node's storage: a warm start"
        left = containers(kernel, USER_DIR)
        assert f"hk-{victim.job_id}-{victim.name}" not in left, f"the killed job's container is left: {left}"
        assert f"hk-{warm.job_id}-{warm.name}" in left
    finally:
        hk("shutdown", warm.name, check=False)
    assert f"hk-{warm.job_id}-{warm.name}" not in containers(kernel, USER_DIR), "removed at shutdown"
    # The victim's pause process, started below the agent SIGKILLed above, escaped its job: this
    # cluster's Slurm tracks a job's processes by parentage (proctrack/linuxproc), where
    # proctrack/cgroup would have ended it with the job. The warm kernel used it and left it.
    run(["srun", f"--jobid={kernel.job_id}", "--overlap", "--nodes=1", "--ntasks=1", "sh", "-c",
         f"kill -9 $(cat {USER_DIR}/tmp/pause.pid) 2>/dev/null; true"], timeout=60)
