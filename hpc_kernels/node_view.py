"""What of the node a bubblewrap sandbox shows, found out on the node by the agent.

The sandbox is deny-by-default: only the profile's ``runtime.system_paths`` (read-only), the
binds and the workspace are in it. This module looks at the node for the agent: which of those
paths exist and which are symbolic links (``/bin -> usr/bin`` on a merged-/usr system), where a
kernel's Python lives when it is outside them, and whether this bwrap can forbid user
namespaces inside. :mod:`hpc_kernels.runtimes` turns the answers into a command line.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Sequence

# bubblewrap learnt --disable-userns (and --size for a tmpfs) in 0.8.0.
DISABLE_USERNS_SINCE = (0, 8, 0)


def shown_system_paths(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The paths that exist here (directories, bound as they are) and the links among them
    (``(path, target)``, made as links in the sandbox so that they resolve the same way)."""
    shown: list[str] = []
    links: list[tuple[str, str]] = []
    for path in paths:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            shown.append(path)
    return shown, links


def hidden_here(paths: Sequence[str]) -> list[str]:
    """The paths to hide that exist on this node, each also under its real path: a home
    ``/home/u`` that links to ``/gpfs/home/u`` is hidden there too (a bind or a system path may
    show ``/gpfs``)."""
    return sorted({p for path in paths if os.path.isdir(path) for p in (path, os.path.realpath(path))})


def _under(path: str, parents: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def python_prefixes(python: str, shown: Sequence[str]) -> list[str]:
    """The directories a kernel's Python needs that the system paths do not show: the prefix
    (``<prefix>/bin/python``) of the interpreter as named and of the file it resolves to (a venv
    links to its base Python). A relative name (found on PATH in the sandbox) needs none."""
    if not os.path.isabs(python):
        return []
    needed = []
    for path in (python, os.path.realpath(python)):
        prefix = os.path.dirname(os.path.dirname(path))
        if prefix not in ("", "/") and not _under(path, shown) and prefix not in needed:
            needed.append(prefix)
    return needed


@functools.lru_cache(maxsize=None)
def bwrap_version(bwrap: str) -> tuple[int, ...]:
    """``bwrap --version`` as numbers; () when it does not say."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(n) for n in match.groups(default="0")) if match else ()


def bwrap_can_disable_userns(bwrap: str) -> bool:
    version = bwrap_version(bwrap)
    return bool(version) and version >= DISABLE_USERNS_SINCE
