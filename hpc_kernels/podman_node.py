"""Rootless podman on a compute node: the user's podman directory, the image, leftover containers.

The agent runs podman as the user. Its storage (``runtime.podman_storage``):

- ``job`` (the default): ``<node tmp>/hk-podman-<uid>/job-<job id>/``, removed when the job ends
  (and, if a killed job left it, by the next kernel of the user on that node). Nothing is shared
  between jobs, so each loads the image (a cold start) and has its own pause process, which
  ends with the job without touching another job.
- ``node``: ``<node tmp>/hk-podman-<uid>/`` (0700), kept between jobs, so that a later kernel of
  the user on the node starts warm (the image loaded once per node). The jobs share one pause
  process: the job that started it ends it (Slurm ends every process of a job), and another job
  of the user still running on the node then finds podman refusing commands until it starts a
  new one. For one kernel per user and node at a time. Rootless storage cannot live on NFS;
  node-local tmp is where it can.
- ``site``: podman's own configuration (podman-hpc, a site's storage.conf); no --root given.

Layout of ``hk-podman-<uid>/`` (trust: podman's, outside every sandbox, never bound into one):
``storage/`` (--root: images, containers), ``run/`` (--runroot), ``tmp/`` (--tmpdir: what
``podman load`` unpacks), ``xdg/`` (XDG_RUNTIME_DIR: podman's sockets, the rootless pause
process's pid; a job storage has these four of its own), ``home/`` (podman's HOME and XDG_CONFIG_HOME: empty; podman reads no
configuration of the user's home, which a kernel with a read-write workspace may write),
``load.lock`` (one ``podman load`` at a time for jobs of the user on the node).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .runtimes import PODMAN_PROCESS_ENVIRONMENT, PodmanStorage

USER_DIR_PREFIX = "hk-podman-"
JOB_PREFIX = "job-"
LABEL_JOB = "hpc-kernels.job"
LABEL_KERNEL = "hpc-kernels.kernel"
LABEL_USER = "hpc-kernels.user"
LOAD_TIMEOUT = 900.0
COMMAND_TIMEOUT = 120.0


class PodmanNodeError(Exception):
    pass


@dataclass(frozen=True)
class PodmanPlaces:
    """Where podman keeps its things for one job: ``storage`` None with podman_storage ``site``."""

    user_dir: Path
    storage: PodmanStorage | None
    job_dir: Path | None  # podman_storage job: removed at the job's end
    environment: dict[str, str]  # HOME, XDG_* for the podman process


def user_dir(root: Path, uid: int | None = None) -> Path:
    """``<root>/hk-podman-<uid>``: made 0700 if missing; refused unless it is a real directory of
    ours that nobody else may enter (another user could have made it first, or a link)."""
    uid = os.getuid() if uid is None else uid
    path = root / f"{USER_DIR_PREFIX}{uid}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
        raise PodmanNodeError(f"{path} is not a private directory of uid {uid} (a link, another user's, or open to "
                              f"others: mode {stat.S_IMODE(st.st_mode):o}); podman's storage cannot go there: "
                              "remove it, or set paths.node_tmp")
    return path


def places(root: Path, mode: str, job_id: str, environ: Mapping[str, str]) -> PodmanPlaces:
    """Make (0700) and return what podman uses for this job under storage ``mode``."""
    base = user_dir(root)
    home = base / "home"
    xdg = base / "xdg"
    for directory in (home, xdg):
        directory.mkdir(mode=0o700, exist_ok=True)
    if mode == "site":
        # The site's configuration decides; podman needs a runtime directory all the same.
        env = {"XDG_RUNTIME_DIR": environ.get("XDG_RUNTIME_DIR") or str(xdg)}
        if environ.get("HOME"):
            env["HOME"] = environ["HOME"]
        return PodmanPlaces(base, None, None, env)
    job_dir = base / f"{JOB_PREFIX}{job_id or 'none'}" if mode == "job" else None
    top = job_dir or base
    top.mkdir(mode=0o700, exist_ok=True)
    storage = PodmanStorage(root=str(top / "storage"), runroot=str(top / "run"), tmpdir=str(top / "tmp"))
    # A job's own storage gets its own rootless pause process too: its end removes both.
    runtime_dir = top / "xdg"
    for directory in (storage.runroot, storage.tmpdir, runtime_dir):
        Path(directory).mkdir(mode=0o700, exist_ok=True)
    forget_dead_pause_process(storage, runtime_dir)
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_RUNTIME_DIR": str(runtime_dir)}
    return PodmanPlaces(base, storage, job_dir, env)


def pause_pid_files(storage: PodmanStorage, runtime_dir: Path) -> list[Path]:
    """Where rootless podman records its pause process (the holder of the user namespace every
    podman command of the user joins): in --tmpdir (podman 4), under XDG_RUNTIME_DIR (podman 5)."""
    return [Path(storage.tmpdir) / "pause.pid", runtime_dir / "libpod" / "tmp" / "pause.pid"]


def forget_dead_pause_process(storage: PodmanStorage, runtime_dir: Path) -> None:
    """A job's end kills the pause process it started (every process below the agent goes), and
    podman 5 then refuses to start ("cannot re-exec process to join the existing user
    namespace") until its pid file goes: remove a pid file whose process is not a live pause
    process of this user."""
    for path in pause_pid_files(storage, runtime_dir):
        try:
            pid = int(path.read_text().strip())
            alive = os.stat(f"/proc/{pid}").st_uid == os.getuid() and b"catatonit" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            alive = not path.exists()
        except (OSError, ValueError):
            alive = False
        if not alive:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def run_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Of the job's environment, what podman's own commands (load, ps, rm) may see."""
    return {name: value for name, value in environ.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in PODMAN_PROCESS_ENVIRONMENT)}


def run(podman: Sequence[str], args: Sequence[str], env: Mapping[str, str],
        timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """One podman command, in a session of its own: ``podman system reset`` with no pause process
    left signals its own process group, which would otherwise be the agent's."""
    return subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout, env=dict(env),
                          stdin=subprocess.DEVNULL, cwd="/", start_new_session=True)


def container_processes(pids: Iterable[int], marker: str) -> tuple[int, int] | None:
    """(the container's init, the kernel) among ``pids`` (the agent's descendants): the kernel is
    the process in another PID namespace, not its init (PID 1 there), with ``marker`` (the
    connection file's path) on its command line. ``podman run`` has it on its command line
    too, but runs in the agent's PID namespace."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if len(nspid) > 1 and nspid[-1] != "1" and marker in command:
            return parent, pid
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_image(podman: Sequence[str], env: Mapping[str, str], image: str, archive: str | None, lock: Path,
                 say: Callable[[str], None]) -> None:
    """``image`` in podman's storage: loaded from ``archive`` if it is not there yet. Under a lock,
    since two kernels of the user may start on the node at once (the second waits, then finds it)."""
    if run(podman, ["image", "exists", image], env).returncode == 0:
        return
    if not archive:
        raise PodmanNodeError(f"runtime.image {image} is not in podman's storage on this node, and no "
                              "runtime.image_archive says where to load it from (podman pulls nothing: --pull never)")
    with _locked(lock):
        if run(podman, ["image", "exists", image], env).returncode == 0:
            return
        if not os.path.isfile(archive):
            raise PodmanNodeError(f"runtime.image_archive {archive} does not exist on this node: it must be on a "
                                  "file system the compute nodes share")
        started = time.monotonic()
        loaded = run(podman, ["load", "--quiet", "--input", archive], env, timeout=LOAD_TIMEOUT)
        if loaded.returncode != 0:
            raise PodmanNodeError(f"podman load --input {archive} failed (exit code {loaded.returncode}): "
                                  f"{_said(loaded.stderr)}")
        if run(podman, ["image", "exists", image], env).returncode != 0:
            raise PodmanNodeError(f"runtime.image_archive {archive} holds no image {image} "
                                  f"(it loaded: {_said(loaded.stdout)})")
        say(f"podman: loaded {image} from {archive} in {time.monotonic() - started:.1f} s")


def _said(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if "level=warning" not in line]
    return "\n".join(lines[-5:]) or "(nothing said)"


def stale_containers(listing: Iterable[Mapping[str, object]], own_job: str,
                     alive: Callable[[Iterable[str]], set[str]]) -> list[str]:
    """The names of our containers (labelled with a job) whose job Slurm no longer runs, from
    ``podman ps -a --format json``. ``alive`` raises if Slurm cannot say: then none."""
    ours: dict[str, str] = {}
    for container in listing:
        labels = container.get("Labels") or {}
        names = container.get("Names") or []
        if not isinstance(labels, dict) or not isinstance(names, list) or not names:
            continue
        job = labels.get(LABEL_JOB)
        if isinstance(job, str) and job and job != own_job:
            ours[str(names[0])] = job
    if not ours:
        return []
    running = alive(sorted(set(ours.values())))
    return sorted(name for name, job in ours.items() if job not in running)


def sweep_containers(podman: Sequence[str], env: Mapping[str, str], own_job: str, user: str,
                     alive: Callable[[Iterable[str]], set[str]]) -> list[str]:
    """Remove the user's containers that killed jobs left in this storage; their names."""
    listing = run(podman, ["ps", "--all", "--filter", f"label={LABEL_USER}={user}", "--format", "json"], env)
    if listing.returncode != 0:
        raise PodmanNodeError(f"podman ps failed: {_said(listing.stderr)}")
    try:
        containers = json.loads(listing.stdout or "[]")
    except json.JSONDecodeError:
        raise PodmanNodeError("podman ps said no JSON") from None
    stale = stale_containers(containers if isinstance(containers, list) else [], own_job, alive)
    if stale:
        run(podman, ["rm", "--force", "--ignore", "--time", "0", *stale], env)
    return stale


def stale_job_dirs(user_directory: Path, own_job: str, alive: Callable[[Iterable[str]], set[str]]) -> list[Path]:
    """Job storages (podman_storage job) whose job Slurm no longer runs."""
    found = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(user_directory):
            job = entry.name.removeprefix(JOB_PREFIX)
            if entry.name.startswith(JOB_PREFIX) and job.isdigit() and job != own_job and \
                    entry.is_dir(follow_symlinks=False):
                found[Path(entry.path)] = job
    if not found:
        return []
    running = alive(sorted(set(found.values())))
    return sorted(path for path, job in found.items() if job not in running)


def reset_storage(podman: Sequence[str], env: Mapping[str, str]) -> None:
    """Empty a job's storage (``podman`` names it with its global options, ``env`` its
    XDG_RUNTIME_DIR) once nothing of podman runs on it any more (no conmon, whose clean-up would
    write it again). Its files belong to IDs of the user's namespace too, and podman mounts its
    overlay directory in that namespace, where ``rm`` cannot remove it: ``podman system reset``
    removes it all. It leaves empty directories of the user's, and processes that may write
    some again until they end: the caller ends them, then removes the directory."""
    reset = run(podman, ["system", "reset", "--force"], env)
    if reset.returncode != 0:
        raise PodmanNodeError(f"podman system reset failed (exit code {reset.returncode}): {_said(reset.stderr)}")


def cgroup_limits_apply(podman: Sequence[str], env: Mapping[str, str]) -> str | None:
    """None if rootless podman can apply --memory and --pids-limit on this node, else why not.
    Only cgroup v2 (unified) with the memory and pids controllers delegated to the user can."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "the node's cgroups are v1 or hybrid, where rootless podman applies no resource limits"
    info = run(podman, ["info", "--format", "{{json .Host.CgroupControllers}}"], env)
    try:
        controllers = json.loads(info.stdout) if info.returncode == 0 else None
    except json.JSONDecodeError:
        controllers = None
    if not isinstance(controllers, list):
        return f"podman info could not say which cgroup controllers the user has ({_said(info.stderr)})"
    missing = [c for c in ("memory", "pids") if c not in controllers]
    if missing:
        return f"the cgroup controllers {', '.join(missing)} are not delegated to the user"
    return None
