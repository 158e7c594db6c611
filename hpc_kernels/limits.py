"""Resource limits of the sandbox (``limits`` in a profile), kept without cgroups.

Slurm confines a job where the site runs ``task/cgroup`` (``ConstrainRAMSpace``,
``ConstrainCores``); that is the real boundary, and it is the site's. hpc-kernels adds a limit
of its own around the kernel, the same on every site, so that a runaway cell ends the kernel
with a reason rather than starving the node or the user's other work in the job:

- in the kernel (:mod:`hpc_kernels.kernel_limits`): ``RLIMIT_NPROC`` stops a fork bomb from
  growing where it counts only the sandbox (a user namespace of its own, Linux 5.14 or later),
  and ``RLIMIT_DATA`` makes one process's oversized allocation fail with ``MemoryError``;
- in the agent (:class:`SandboxWatch`): every second it sums the memory of the sandbox's
  processes (resident, then proportional when that is over) and what they keep in memory as
  files (the tmpfs mounts the sandbox made for itself, memfd objects: in no process's resident
  size until mapped), and counts their tasks; over the memory limit, or at the process limit
  for 3 s, it ends the kernel and says why. bubblewrap also sizes each tmpfs to the limit.

The memory limit follows the allocation (``SLURM_MEM_PER_NODE``, or per CPU times CPUs) unless
the profile sets a smaller one.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping

from .processes import descendants

CHECK_SECONDS = 1.0
PROCESS_LIMIT_GRACE = 3  # checks at the process limit before the kernel is ended
# The watch counts the sandbox's processes and threads from outside; RLIMIT_NPROC inside counts
# a few it cannot see (and none it can): "at the limit" is within a tenth of it.
PROCESS_LIMIT_SHARE = 0.9
RUNTIME_TASKS = 8  # the runtime's own processes outside the sandbox's user namespace, seen from outside
_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # Slurm's: no unit is MB


def size_bytes(text: str) -> int:
    """A Slurm size (``500M``, ``4G``; a bare number is megabytes) in bytes."""
    match = _SIZE.match(text.strip().upper())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def allocation_memory(env: Mapping[str, str]) -> int | None:
    """The memory Slurm gave the job on this node, in bytes; None when it does not say."""
    if env.get("SLURM_MEM_PER_NODE", "").isdigit():
        return int(env["SLURM_MEM_PER_NODE"]) << 20
    cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or ""
    if env.get("SLURM_MEM_PER_CPU", "").isdigit() and cpus.isdigit():
        return int(env["SLURM_MEM_PER_CPU"]) * int(cpus) << 20
    return None


def memory_limit(setting: str, env: Mapping[str, str]) -> int | None:
    """``limits.memory``: ``job`` (the allocation), ``none``, or a size that tightens the allocation."""
    if setting == "none":
        return None
    allocation = allocation_memory(env)
    if setting == "job":
        return allocation
    wanted = size_bytes(setting)
    return min(wanted, allocation) if allocation else wanted


def human(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def resident_bytes(pids: list[int]) -> int:
    """Resident memory summed over ``pids``: cheap, but memory shared after a fork counts once
    per process (see :func:`proportional_bytes`)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return total


def proportional_bytes(pids: list[int]) -> int:
    """Proportional set size summed over ``pids`` (each shared page split among its sharers):
    what the processes really hold together. Costlier to read than the resident size."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            pass
    return total


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in a path as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def tmpfs_mounts(pid: int | str = "self") -> list[tuple[str, str]]:
    """(device ``major:minor``, mount point) of each tmpfs mount in ``pid``'s mount namespace."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    return [(fields[2], _unescape(fields[4])) for fields in lines
            if "-" in fields and fields[fields.index("-") + 1] == "tmpfs"]


def tmpfs_devices(pid: int | str = "self") -> set[str]:
    """The devices of the tmpfs mounts in ``pid``'s mount namespace."""
    return {device for device, _ in tmpfs_mounts(pid)}


def file_memory_bytes(pids: list[int], outside: set[str]) -> int:
    """Memory the sandbox holds as files, each counted once: the used space of every tmpfs in
    its mount namespaces that is not one of ``outside`` (the node's own: a bind of the node's
    /tmp is not the sandbox's), and the size of every memfd its processes hold open."""
    total = 0
    namespaces: set[str] = set()
    devices: set[str] = set(outside)
    inodes: set[tuple[int, int]] = set()
    for pid in pids:
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if namespace not in namespaces:
            namespaces.add(namespace)
            for device, mountpoint in tmpfs_mounts(pid):
                if device in devices:
                    continue
                devices.add(device)
                try:
                    st = os.statvfs(f"/proc/{pid}/root{mountpoint}")
                except OSError:
                    continue
                total += (st.f_blocks - st.f_bfree) * st.f_frsize
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in inodes:
                inodes.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def task_count(pids: list[int]) -> int:
    """Processes and their threads: what RLIMIT_NPROC counts."""
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


class SandboxWatch:
    """Watches the processes below the runtime (``root``: the bwrap or apptainer process) and
    calls ``breach(reason)`` once if they go over a limit."""

    def __init__(self, root: int, memory: int | None, processes: int | None, breach: Callable[[str], None],
                 nproc_holds: Callable[[], bool] = lambda: False) -> None:
        self.root = root
        self.nproc_holds = nproc_holds  # RLIMIT_NPROC holds the sandbox at the limit (the kernel said so)
        self.memory = memory
        self.processes = processes
        self.breach = breach
        self.stop_event = threading.Event()
        self.at_process_limit = 0
        self.outside = tmpfs_devices()  # the node's tmpfs mounts, seen from the agent

    def start(self) -> None:
        threading.Thread(target=self._run, name="sandbox-watch", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()

    def check(self) -> str | None:
        """Why the sandbox is over a limit now, or None."""
        pids = [self.root, *descendants(self.root)]
        files = file_memory_bytes(pids, self.outside) if self.memory is not None else 0
        if self.memory is not None and resident_bytes(pids) + files > self.memory:
            used = proportional_bytes(pids)  # only now: memory shared after a fork counts once
            if used + files > self.memory:
                held = f" ({human(files)} of it in files in memory: tmpfs, memfd)" if files >= 1 << 20 else ""
                return (f"its processes used {human(used + files)} of memory{held}, over the limit of "
                        f"{human(self.memory)} (limits.memory)")
        tasks = task_count(pids) if self.processes is not None else 0
        if self.processes is not None and tasks > self.processes + RUNTIME_TASKS and not self.nproc_holds():
            return f"its processes and threads ({tasks}) went over the limit of {self.processes} (limits.processes)"
        if self.processes is not None and tasks >= self.processes * PROCESS_LIMIT_SHARE:
            self.at_process_limit += 1
            if self.at_process_limit >= PROCESS_LIMIT_GRACE:
                return (f"it stayed at its limit of {self.processes} processes (limits.processes) for "
                        f"{PROCESS_LIMIT_GRACE * CHECK_SECONDS:.0f} s: a fork bomb?")
        else:
            self.at_process_limit = 0
        return None

    def _run(self) -> None:
        while not self.stop_event.wait(CHECK_SECONDS):
            reason = self.check()
            if reason is not None:
                self.breach(reason)
                return
