"""Code the node agent runs inside the kernel as it starts: the warning before the time limit
(:mod:`hpc_kernels.kernel_time_warning`), the egress bridge (:mod:`hpc_kernels.kernel_egress`),
resource limits (:mod:`hpc_kernels.kernel_limits`) and hibernation (:mod:`hpc_kernels.kernel_hibernate`).

The agent copies each such module (they stand alone: an Apptainer image has only ipykernel)
into the node-side directory, writes an IPython startup file that runs each in a namespace of
its own and calls its ``install(shell, *args)``, and points ``IPYTHONDIR`` there. IPython runs
startup files in the user's namespace, which must stay as the user left it, hence the wrapper.
Kernels that are not IPython's run none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from .paths import write_file_atomically

STARTUP_FILE = "00-hpc-kernels.py"


def startup_file(parts: Sequence[tuple[str, Sequence[str]]]) -> str:
    """The startup file that runs each (code file, install arguments) in ``parts``. A part that
    fails says so on stderr (the job log) and does not stop the others or the kernel."""
    calls = ", ".join(f"({path!r}, {tuple(args)!r})" for path, args in parts)
    return (
        "# Written by hpc-kernels' node agent (hpc_kernels/kernel_startup.py). Do not edit.\n"
        "def _hpc_kernels_startup():\n"
        "    import sys, traceback\n"
        f"    for path, args in [{calls}]:\n"
        "        namespace = {'__name__': 'hpc_kernels_startup', '__file__': path}\n"
        "        try:\n"
        "            with open(path, encoding='utf-8') as f:\n"
        "                exec(compile(f.read(), path, 'exec'), namespace)\n"
        "            namespace['install'](get_ipython(), *args)\n"
        "        except Exception:\n"
        "            print(f'hpc-kernels: {path} failed at kernel start:', file=sys.__stderr__)\n"
        "            traceback.print_exc(file=sys.__stderr__)\n"
        "_hpc_kernels_startup()\n"
        "del _hpc_kernels_startup\n"
    )


def install(node_dir: Path, kernel_env: dict[str, str], parts: Sequence[tuple[ModuleType, Sequence[str]]]) -> dict[str, str]:
    """Copy the modules of ``parts`` into ``node_dir`` and write the startup file that installs
    them with their arguments; the variables the kernel needs to find it. None of it when there
    is nothing to install, or when the profile's ``kernel.env`` sets ``IPYTHONDIR`` itself
    (then it keeps its own, and the caller says what is lost)."""
    if not parts or "IPYTHONDIR" in kernel_env:
        return {}
    startup = node_dir / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, mode=0o700, exist_ok=True)
    copied = []
    for module, args in parts:
        code = node_dir / f"{module.__name__.rpartition('.')[2]}.py"
        write_file_atomically(code, Path(str(module.__file__)).read_bytes(), 0o600)
        copied.append((str(code), list(args)))
    write_file_atomically(startup / STARTUP_FILE, startup_file(copied), 0o600)
    return {"IPYTHONDIR": str(node_dir / "ipython")}
