"""Where hpc-kernels keeps things, and how private directories and files are made.

Two places matter:

* the *state root* on the shared file system (the site's or user's ``paths.state``, else
  ``$XDG_DATA_HOME/hpc-kernels``, usually under the home directory), which both the login node and the compute nodes can read: one directory per
  kernel with its record, key, job script and log;
* the *runtime root* on the login node (``$XDG_RUNTIME_DIR/hpc-kernels``, else
  ``/tmp/hpc-kernels-<uid>``), which holds the login-side relay sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import HpcKernelsError
from .limits import tmpfs_devices
from .profiles import state_setting

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107


def state_root() -> Path:
    """``paths.state`` of the site or the user (:func:`hpc_kernels.profiles.state_setting`),
    else ``$XDG_DATA_HOME/hpc-kernels``."""
    configured = state_setting()
    if configured is not None:
        return Path(configured[0])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "hpc-kernels"


def kernels_root() -> Path:
    return state_root() / "kernels"


def runtime_root() -> Path:
    """``$XDG_RUNTIME_DIR/hpc-kernels``, else ``/tmp/hpc-kernels-<uid>``, unless something that
    is not a directory of ours is there already (another user made it first, to deny us
    service): then ``~/.hpc-kernels-run-<host>``, which no one else can make."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "hpc-kernels"
    shared = Path(tempfile.gettempdir()) / f"hpc-kernels-{os.getuid()}"
    try:
        st = os.lstat(shared)
    except FileNotFoundError:
        return shared
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return shared
    return Path(os.path.expanduser("~")) / f".hpc-kernels-run-{socket.gethostname().split('.')[0]}"


def ensure_kernels_root() -> Path:
    """The state root and its ``kernels/`` directory, both private to us, under parents that no
    one else can write to (else another user could swap a directory of ours for theirs and
    read the keys or change the job scripts)."""
    root = state_root()
    check_parents_private(root)
    ensure_private_dir(root)
    return ensure_private_dir(root / "kernels")


def check_parents_private(path: Path) -> None:
    """Refuse ``path`` if a directory above it (symlinks resolved) belongs to another user (root
    aside), or is writable by others without the sticky bit (as /tmp and /scratch have)."""
    parent = Path(os.path.realpath(path)).parent
    for directory in [parent, *parent.parents]:
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, os.getuid()):
            raise HpcKernelsError(f"state directory {path}: {directory} belongs to uid {st.st_uid}, not to you or root; "
                                  "choose a place of your own for paths.state (e.g. /scratch/$USER/hpc-kernels)")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX and st.st_uid != os.getuid():
            raise HpcKernelsError(f"state directory {path}: {directory} is writable by other users "
                                  f"(mode {stat.S_IMODE(st.st_mode):o}, no sticky bit); choose a place of your own")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make sure it is a directory owned by us with mode 0700.

    An existing directory that someone else owns, or that is a symlink, is refused rather than
    used: in a shared /tmp another user could have made it first.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HpcKernelsError(f"{path} exists and is not a directory; refusing to use it")
    if st.st_uid != os.getuid():
        raise HpcKernelsError(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing to use it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private_file(path: Path, data: str | bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600: readers see the old file or the new one."""
    write_file_atomically(path, data, 0o600)


def write_file_atomically(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`: readers see the old file or the
    new one, never half of one. ``mode`` None: as the umask allows a new file (for outputs that
    belong to the user, not to hpc-kernels)."""
    with atomic_file(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A temporary file beside ``path`` to write into; on leaving, it is flushed to disk and
    renamed over ``path`` (on an error, removed). ``mode`` as in :func:`write_file_atomically`."""
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for every thread at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    write_private_file(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when there is no such file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def open_regular(path: Path) -> BinaryIO:
    """``path`` for reading if it is a regular file of ours, not a link (nor a FIFO, which would
    block): what the sandboxed kernel can write must not make a process outside read another file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise OSError(f"{path} is not a regular file of ours")
    return os.fdopen(fd, "rb")


UNTRUSTED_JSON_MAX_BYTES = 64 * 1024


def read_untrusted_json(path: Path, max_bytes: int = UNTRUSTED_JSON_MAX_BYTES) -> Any | None:
    """The JSON in a file the sandbox can write, or None: read only from a regular file of ours
    (see :func:`open_regular`), at most ``max_bytes``, never raising on what is there."""
    try:
        with open_regular(path) as f:
            data = f.read(max_bytes + 1)
    except OSError:
        return None
    if len(data) > max_bytes:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def check_socket_path(path: str | os.PathLike[str], what: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        raise HpcKernelsError(
            f"{what} {path} is {len(os.fsencode(path))} bytes long; unix socket paths are limited to "
            f"{MAX_UNIX_SOCKET_PATH} bytes. Choose a shorter directory (e.g. set paths.node_tmp in the "
            "profile, or XDG_RUNTIME_DIR on the login node)."
        )


def private_paths() -> tuple[str, list[str]]:
    """What no workspace or bind may show a kernel: the user's home, and hpc-kernels' state."""
    return os.path.expanduser("~"), [str(state_root())]


# Directories that are each node's own on a cluster (and /run/user/<uid>, XDG_RUNTIME_DIR's home).
NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def node_local(path: str, node_tmp: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """Why ``path`` is not on a file system the compute nodes share, as far as the login node can
    tell, or None: it lies in a directory that is each node's own (/tmp, /var/tmp, /dev/shm,
    /run, ``$TMPDIR``, ``$XDG_RUNTIME_DIR``, the profile's ``paths.node_tmp``), or on a tmpfs.
    Anything else may still be missing on the nodes: the agent then says so in the job's words."""
    env = os.environ if environ is None else environ
    real = os.path.realpath(path)
    places = [*NODE_LOCAL_DIRS, env.get("TMPDIR") or "", env.get("XDG_RUNTIME_DIR") or ""]
    if node_tmp:
        expanded = os.path.expandvars(node_tmp)
        if "$" not in expanded:
            places.append(expanded)
    for place in places:
        if not place or not os.path.isabs(place):
            continue
        for variant in {place, os.path.realpath(place)}:
            if real == variant or real.startswith(variant.rstrip("/") + "/"):
                return (f"{path} is in {place}, which each node has of its own: the compute nodes would not "
                        "see it; put it on a file system they share (e.g. under your home or project directory)")
    try:
        device = os.stat(real).st_dev
    except OSError:
        return None
    if f"{os.major(device)}:{os.minor(device)}" in tmpfs_devices():
        return f"{path} is on a tmpfs (this node's memory): the compute nodes would not see it"
    return None


def frontend_workspace(cwd: str | None) -> tuple[str | None, str | None]:
    """A frontend's working directory as its kernel's workspace, or (None, why) when binding it
    would show the kernel the user's home (a frontend started in ~), as `hpc-kernel submit` does."""
    if not cwd:
        return None, None
    why = exposes_private_files(cwd, *private_paths())
    return (None, why) if why else (str(cwd), None)


def exposes_private_files(workspace: str, home: str, private: list[str], what: str = "the workspace") -> str | None:
    """Why binding ``workspace`` (``what``: "the workspace", "the bind") would hand the kernel
    what it must not see, or None.

    Refused: the home directory itself (ssh keys, tokens, every dotfile) or anything above it,
    and anything above, at or inside hpc-kernels' own state (every kernel's key). A project
    directory inside home is fine. Paths are compared after resolving symlinks, so a home that
    is a link into /gpfs is found under /gpfs too.
    """
    ws = os.path.realpath(workspace)
    home_real = os.path.realpath(home)

    def under(path: str, parent: str) -> bool:
        return path == parent or path.startswith(parent.rstrip("/") + "/")

    if under(home_real, ws):
        return f"{what} {workspace} would show the kernel your home directory"
    for path in private:
        real = os.path.realpath(path)
        if under(real, ws) or under(ws, real):
            return f"{what} {workspace} would show the kernel {path}"
    return None
