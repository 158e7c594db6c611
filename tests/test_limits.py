"""Resource limits: the pure parts, and the agent's watch and the kernel's rlimits on real
processes of this machine (in the sandbox on the cluster: test_cluster_runtimes.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_kernels.limits import SandboxWatch, allocation_memory, memory_limit, size_bytes
from hpc_kernels.profiles import ProfileError, validate_profile
from hpc_kernels.runtimes import sandbox_environment

MiB = 1 << 20


def test_size_bytes() -> None:
    assert size_bytes("500M") == 500 * MiB and size_bytes("2G") == 2048 * MiB and size_bytes("100") == 100 * MiB
    with pytest.raises(ValueError):
        size_bytes("lots")


def test_the_memory_limit_follows_the_allocation_and_only_tightens_it() -> None:
    per_node = {"SLURM_MEM_PER_NODE": "4096"}
    per_cpu = {"SLURM_MEM_PER_CPU": "500", "SLURM_CPUS_ON_NODE": "4"}
    assert allocation_memory(per_node) == 4096 * MiB and allocation_memory(per_cpu) == 2000 * MiB
    assert allocation_memory({}) is None
    assert memory_limit("job", per_node) == 4096 * MiB
    assert memory_limit("1G", per_node) == 1024 * MiB
    assert memory_limit("16G", per_node) == 4096 * MiB  # never more than Slurm gave
    assert memory_limit("1G", {}) == 1024 * MiB and memory_limit("job", {}) is None
    assert memory_limit("none", per_node) is None


def test_limits_in_a_profile() -> None:
    checked = validate_profile({"limits": {"memory": "2G", "processes": 256}}, Path("p.yaml"))
    assert checked.get("limits", "memory") == "2G" and checked.get("limits", "processes") == 256
    defaults = validate_profile({}, Path("p.yaml"))
    assert defaults.get("limits", "memory") == "job" and defaults.get("limits", "processes") == 1024
    assert validate_profile({"limits": {"processes": "none"}}, Path("p.yaml")).get("limits", "processes") is None
    with pytest.raises(ProfileError, match=r"limits.memory: 'much' is not valid: expected job"):
        validate_profile({"limits": {"memory": "much"}}, Path("p.yaml"))
    with pytest.raises(ProfileError, match=r"limits.processes: 3 is not valid"):
        validate_profile({"limits": {"processes": 3}}, Path("p.yaml"))


def test_thread_pools_get_the_jobs_cpus() -> None:
    env = sandbox_environment({"SLURM_CPUS_PER_TASK": "4", "PATH": "/bin"}, {})
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "4"
    assert sandbox_environment({"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "1"}, {})["OMP_NUM_THREADS"] == "1"
    assert sandbox_environment({"SLURM_CPUS_PER_TASK": "4"}, {"MKL_NUM_THREADS": "2"})["MKL_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in sandbox_environment({}, {})


def watch_until_breach(root: int, memory: int | None, processes: int | None, timeout: float = 20) -> str | None:
    said: list[str] = []
    watch = SandboxWatch(root, memory, processes, said.append)
    watch.start()
    deadline = time.monotonic() + timeout
    while not said and time.monotonic() < deadline:
        time.sleep(0.2)
    watch.stop()
    return said[0] if said else None


def test_the_watch_ends_on_memory_summed_over_processes() -> None:
    """Three children of 60 MiB each, none over the 100 MiB limit alone."""
    hog = "import time; x = b'\\x01' * (60 << 20); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
children = [subprocess.Popen([sys.executable, "-c", {hog!r}]) for _ in range(3)]
time.sleep(30)
"""])
    try:
        said = watch_until_breach(parent.pid, 100 * MiB, None)
        assert said is not None and "over the limit of 100.0 MiB (limits.memory)" in said, said
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()


def test_memory_shared_after_a_fork_counts_once() -> None:
    """A parent of 80 MiB that forks 3 children (which touch nothing): resident sizes add up to
    320 MiB, the proportional sizes to about 80; a 150 MiB limit holds."""
    parent = subprocess.Popen([sys.executable, "-c", """
import os, time
x = b'\\x01' * (80 << 20)
for _ in range(3):
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
time.sleep(30)
"""])
    try:
        time.sleep(2)
        assert watch_until_breach(parent.pid, 150 * MiB, None, timeout=4) is None
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()


def test_memory_kept_in_a_memfd_or_a_tmpfs_counts() -> None:
    """Before the fix, 1.5 GiB written to a memfd from a 1 GiB kernel was accepted (the node's
    Shmem grew; the kernel stayed ready): pages in a memfd or a tmpfs are in no process's resident
    size until mapped. Here a process (40 MiB of its own) keeps 80 MiB in a memfd, and another, in a
    mount namespace of its own (as a sandbox), 120 MiB in a tmpfs it mounted: each alone goes over a
    100 MiB limit, and the node's own tmpfs mounts are not counted."""
    from hpc_kernels.limits import file_memory_bytes, tmpfs_devices

    memfd = subprocess.Popen([sys.executable, "-c", """
import os, time
x = b'\\x01' * (40 << 20)
fd = os.memfd_create("hog")
for _ in range(80):
    os.write(fd, b'\\x02' * (1 << 20))
print("ready", flush=True)
time.sleep(30)
"""], stdout=subprocess.PIPE, text=True)
    tmpfs = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                              "mount -t tmpfs hog /mnt && head -c 125829120 /dev/zero >/mnt/hog && echo ready && sleep 30"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert memfd.stdout is not None and memfd.stdout.readline().strip() == "ready"
        assert tmpfs.stdout is not None and tmpfs.stdout.readline().strip() == "ready", "unprivileged mount namespace"
        outside = tmpfs_devices()
        assert file_memory_bytes([memfd.pid], outside) >= 80 * MiB
        assert file_memory_bytes([tmpfs.pid], outside) >= 80 * MiB
        assert file_memory_bytes([memfd.pid, memfd.pid], outside) < 90 * MiB, "one memfd counts once"
        assert file_memory_bytes([tmpfs.pid], tmpfs_devices(tmpfs.pid)) == 0, "the node's own tmpfs: not counted"
        for pid in (memfd.pid, tmpfs.pid):
            said = watch_until_breach(pid, 100 * MiB, None)
            assert said is not None and "in files in memory: tmpfs, memfd" in said, said
    finally:
        for proc in (memfd, tmpfs):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("sleepers", "said"), [(18, "stayed at its limit of 20 processes (limits.processes) for 3 s"),
                                              (40, "processes and threads (41) went over the limit of 20")])
def test_the_watch_ends_a_sandbox_at_or_over_its_process_limit(sleepers: int, said: str) -> None:
    """At the limit (RLIMIT_NPROC holding a fork bomb there) for 3 s, or over it (nothing held it)."""
    parent = subprocess.Popen(["sh", "-c", f"for i in $(seq {sleepers}); do sleep 30 & done; wait"])
    try:
        time.sleep(0.5)
        reason = watch_until_breach(parent.pid, None, 20)
        assert reason is not None and said in reason, reason
        assert watch_until_breach(parent.pid, None, 100, timeout=5) is None
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()


def test_the_kernels_memory_rlimit_makes_a_big_allocation_fail() -> None:
    proc = subprocess.run([sys.executable, "-c", """
from hpc_kernels import kernel_limits
kernel_limits.install(None, "", str(200 << 20))
try:
    x = b'\\x01' * (400 << 20)
    print("allocated")
except MemoryError:
    print("MemoryError")
"""], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "MemoryError", proc.stdout + proc.stderr
