"""No user namespaces inside the sandbox.

A user namespace of its own gives code every capability over it, and with that the whole of the
kernel's user-namespace attack surface (a steady source of privilege escalations). Kernel code
needs none. bubblewrap >= 0.8 forbids them itself (``--disable-userns``). For Apptainer (and an
older bwrap) the agent sets ``user.max_user_namespaces`` to 0 inside the sandbox's own user
namespace, once the kernel is up and before any code of a client runs: the limit holds for every
process in there, whatever system call it uses (``unshare``, ``clone``, ``clone3``).

The sandbox's user namespace belongs to the user, so a process of the user outside it may join
it with every capability there (setns) and set its limits. A multithreaded process cannot join a
user namespace: the agent runs ``python -I -m hpc_kernels.userns PID`` for it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

from .processes import python_module

CLONE_NEWUSER = 0x10000000
LIMIT = "/proc/sys/user/max_user_namespaces"


def same_user_namespace(pid: int) -> bool:
    return os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")


def forbid_user_namespaces(pid: int, python: str = sys.executable) -> str | None:
    """Forbid new user namespaces in the user namespace of process ``pid``. None when done;
    otherwise why not (the process shares ours: the node's own limit applies)."""
    if same_user_namespace(pid):
        return ("the sandbox shares the node's user namespace (a setuid runtime?): whether its code can make "
                "user namespaces is the node's setting (user.max_user_namespaces)")
    proc = subprocess.run(python_module(python, "hpc_kernels.userns", str(pid)), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, cwd="/")
    if proc.returncode != 0:
        raise OSError(f"could not forbid user namespaces in the sandbox: {proc.stderr.strip() or proc.returncode}")
    return None


def _limit_in(pid: int) -> None:
    """In this (single-threaded) process: join ``pid``'s user namespace and set its limit to 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the user namespace of {pid}")
    finally:
        os.close(fd)
    with open(LIMIT, "w") as f:
        f.write("0")
    with open(LIMIT) as f:
        if f.read().strip() != "0":
            raise OSError(f"{LIMIT} did not take 0")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m hpc_kernels.userns PID", file=sys.stderr)
        return 2
    try:
        _limit_in(int(args[0]))
    except OSError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
