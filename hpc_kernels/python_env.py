"""A user's own Python environment as the kernel's Python (``--python-env``, ``kernel.python_env``).

Researchers keep their packages in a venv, a uv environment, a conda (or mamba) environment or
a pixi project on the shared file system. :func:`check` looks at one on the login node, before
anything is queued: that it exists, is not node-local storage, is not the home directory (nor
above it), and has ipykernel (its Python is run, outside any sandbox, isolated, in ``/``, with a
short clean environment and a timeout). It works out what the sandbox must show, read-only, for
that Python to run: the environment, the installation its interpreter's links lead to (a venv's
base Python, pyvenv.cfg's ``home``), a conda environment's base when its files link there.
With an Apptainer profile it runs the same probe in the image, with those binds: the image's C
library may be too old for the environment's Python, and that is said before the queue.

Pure parts: :func:`kind_of`, :func:`needed_paths`, :func:`glibc_needed`, :func:`judge`,
:func:`apply`. Edges: :func:`read_layout` (reads the environment's files) and :func:`probe` (runs
its Python).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .paths import exposes_private_files, node_local
from .profiles import Profile

KINDS = ("venv", "uv", "conda", "pixi")
# What to run to give an environment of each kind ipykernel.
INSTALL_HINTS = {
    "venv": "{python} -m pip install ipykernel",
    "uv": "uv pip install --python {python} ipykernel",
    "conda": "conda install -p {path} ipykernel",
    "pixi": "pixi add ipykernel (in the pixi project)",
}
PROBE_TIMEOUT = 60.0
# The probe's whole environment: no PYTHONPATH, no site settings of the caller's shell.
PROBE_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
MAX_LINKS = 40
# Run by the environment's Python: what it is and whether it has ipykernel, as JSON on stdout.
PROBE = r"""
import json, sys
info = {"python": sys.version.split()[0], "prefix": sys.prefix, "base_prefix": sys.base_prefix,
        "base_exec_prefix": sys.base_exec_prefix}
try:
    import ipykernel
    info["ipykernel"] = ipykernel.__version__
except Exception as e:
    info["ipykernel"] = None
    info["ipykernel_error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(info))
"""


@dataclass(frozen=True)
class Layout:
    """What the environment's files say, before its Python runs."""

    path: str  # the environment, symbolic links resolved
    kind: str | None  # one of KINDS; None: not a Python environment
    python: str | None  # <path>/bin/python (a venv's is a link: not resolved)
    links: tuple[str, ...] = ()  # where each link from bin/python on points, hop by hop (absolute)
    outside: tuple[str, ...] = ()  # targets of links in the env's bin/python* and lib/ that lie outside it
    home: str | None = None  # pyvenv.cfg's home: the directory of the base interpreter of a venv
    conda_base: str | None = None  # the conda installation a named environment (<base>/envs/NAME) belongs to


@dataclass
class EnvReport:
    """The verdict on one environment: what it is, what the sandbox will show, what is wrong."""

    path: str
    kind: str | None = None
    python: str | None = None
    python_version: str | None = None
    ipykernel: str | None = None
    made_from: str | None = None  # pyvenv.cfg's home, or the conda base
    binds: list[str] = field(default_factory=list)  # shown read-only in the sandbox
    glibc: str | None = None  # the newest glibc version its interpreter asks for
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# Pure parts


def parse_pyvenv_cfg(text: str) -> dict[str, str]:
    """``key = value`` lines, as ``site.py`` reads them (keys lower-cased)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def kind_of(path: str, pyvenv: Mapping[str, str] | None, conda_meta: bool) -> str | None:
    """venv or uv (a ``pyvenv.cfg``; uv writes its version there), conda or pixi (a ``conda-meta/``;
    pixi keeps its environments in ``<project>/.pixi/envs/NAME``); None for anything else."""
    if pyvenv is not None:
        return "uv" if "uv" in pyvenv else "venv"
    if conda_meta:
        return "pixi" if ".pixi" in path.split("/") else "conda"
    return None


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _under_any(path: str, parents: Sequence[str]) -> bool:
    return any(_under(path, p) for p in parents)


def prefix_of(target: str) -> str:
    """The installation a file belongs to: ``<prefix>`` for ``<prefix>/bin/x`` or ``<prefix>/lib/x``
    (where a Python finds its standard library), else the file's directory."""
    parent = os.path.dirname(target)
    if os.path.basename(parent) in ("bin", "lib", "lib64"):
        return os.path.dirname(parent)
    return parent


def needed_paths(layout: Layout, shown: Sequence[str], also: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """What the sandbox must show for the environment's Python to run, and the problems: the
    environment; for each link out of it, the installation it points into (the conda base when
    it points there); pyvenv.cfg's ``home``'s installation; ``also`` (directories the Python
    reported as its base prefix). Minus what ``shown`` (the system paths) shows already, and paths
    inside another. A path that would show a system path whole (``/``) is a problem."""
    candidates = [layout.path]
    targets = [*layout.links, *layout.outside]
    if layout.home:
        targets.append(os.path.join(layout.home, "python"))
    for target in targets:
        if _under(target, layout.path):
            continue
        if layout.conda_base and _under(target, layout.conda_base):
            candidates.append(layout.conda_base)
            continue
        prefix = prefix_of(target)
        if prefix in ("", "/") or any(_under(s, prefix) for s in shown):
            prefix = os.path.dirname(target)  # /bin/python3 on a system whose /bin is no link
        candidates.append(prefix)
    candidates += [p for p in also if not _under_any(p, shown)]
    needed: list[str] = []
    problems: list[str] = []
    for path in sorted(set(candidates), key=lambda p: (p.count("/"), p)):
        if _under_any(path, shown) or _under_any(path, needed):
            continue
        if path in ("", "/") or any(_under(s, path) for s in shown):
            problems.append(f"its Python needs {path or '/'}, which holds the system paths: it cannot be shown "
                            "to the kernel as a whole")
            continue
        needed.append(path)
    return sorted(needed), problems


_GLIBC = re.compile(rb"GLIBC_(\d+)\.(\d+)")


def glibc_needed(binaries: Sequence[bytes]) -> tuple[int, int] | None:
    """The newest ``GLIBC_x.y`` symbol version these ELF files ask for (their version needs are
    strings in ``.dynstr``), or None: a statically linked or non-glibc interpreter."""
    found = [(int(a), int(b)) for data in binaries for a, b in _GLIBC.findall(data)]
    return max(found) if found else None


def install_hint(kind: str | None, path: str, python: str | None) -> str:
    hint = INSTALL_HINTS.get(kind or "venv", INSTALL_HINTS["venv"])
    return hint.format(path=path, python=python or os.path.join(path, "bin", "python"))


def judge(report: EnvReport, info: dict[str, Any] | None, failure: str | None) -> None:
    """The probe's answer (``info``), or why it gave none (``failure``), into ``report``."""
    if info is None:
        report.problems.append(f"its Python {report.python} did not run: {failure}")
        return
    report.python_version = str(info.get("python") or "") or None
    report.ipykernel = info.get("ipykernel") or None
    if not report.ipykernel:
        report.problems.append(f"ipykernel cannot be imported ({info.get('ipykernel_error') or 'not installed'}); "
                               f"install it: {install_hint(report.kind, report.path, report.python)}")


def start_failure_hint(said: str, runtime: str, python_env: str | None) -> str:
    """What to add to a kernel's start failure (its last words ``said``) when it ran a user's
    environment: the image's C library too old for its interpreter, in plain words; else ""."""
    if not python_env or "GLIBC_" not in said:
        return ""
    where = "the image's" if runtime == "apptainer" else "this node's"
    return (f"\nthe Python of {python_env} needs a newer C library (glibc) than {where}: use an environment made "
            "with the runtime's own Python" + (", bubblewrap, or a newer image" if runtime == "apptainer" else ""))


def apply(profile: Profile, report: EnvReport, origin: str) -> Profile:
    """The profile whose kernel runs the environment's Python, with what it needs bound
    read-only, and its ``bin`` first on the kernel's PATH (bubblewrap; an image keeps its own)."""
    settings = {section: dict(values) for section, values in profile.settings.items()}
    settings["kernel"]["python"] = report.python
    settings["kernel"]["python_env"] = report.path
    settings["runtime"]["binds"] = [*settings["runtime"]["binds"], *(f"{p}:ro" for p in report.binds)]
    kernel_env = dict(settings["kernel"]["env"])
    kernel_env.setdefault("PATH", f"{report.path}/bin:/usr/local/bin:/usr/bin:/bin")
    settings["kernel"]["env"] = kernel_env
    origins = dict(profile.origins)
    for key in ("kernel.python", "runtime.binds", "kernel.env"):
        origins[key] = origin
    return replace(profile, settings=settings, origins=origins)


# ---------------------------------------------------------------------------------------------
# Edges: the environment's files, its Python


def _link_chain(path: str) -> list[str]:
    """Where each link from ``path`` on points, hop by hop, as absolute paths (a venv's
    ``bin/python -> python3.11 -> /home/u/py/bin/python3.11`` gives both targets)."""
    chain = []
    current = path
    for _ in range(MAX_LINKS):
        if not os.path.islink(current):
            break
        target = os.readlink(current)
        current = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(current)), target))
        chain.append(current)
    return chain


def _links_out_of(directory: str, env: str, prefix: str = "") -> list[str]:
    """The targets of the links directly in ``directory`` (named ``prefix``...) that lie outside ``env``."""
    out = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_symlink():
            for target in _link_chain(entry.path):
                if not _under(target, env):
                    out.append(target)
    return out


def environment_dir(given: str) -> tuple[str, str | None]:
    """The environment ``given`` names (symbolic links resolved): a pixi project's default
    environment (``.pixi/envs/default``) when given the project. Also a note for people."""
    real = os.path.realpath(given)
    pixi_default = os.path.join(real, ".pixi", "envs", "default")
    if (not os.path.exists(os.path.join(real, "pyvenv.cfg")) and not os.path.isdir(os.path.join(real, "conda-meta"))
            and os.path.isdir(os.path.join(pixi_default, "conda-meta"))):
        return pixi_default, f"{given} is a pixi project: using its default environment {pixi_default}"
    return real, None


def read_layout(path: str) -> Layout:
    """What the environment at ``path`` (resolved) is, read from its files."""
    pyvenv: dict[str, str] | None = None
    try:
        with open(os.path.join(path, "pyvenv.cfg"), encoding="utf-8", errors="replace") as f:
            pyvenv = parse_pyvenv_cfg(f.read(64 * 1024))
    except OSError:
        pass
    kind = kind_of(path, pyvenv, os.path.isdir(os.path.join(path, "conda-meta")))
    python = next((os.path.join(path, "bin", name) for name in ("python", "python3")
                   if os.path.exists(os.path.join(path, "bin", name))), None)
    base = os.path.dirname(os.path.dirname(path))
    conda_base = base if (kind == "conda" and os.path.basename(os.path.dirname(path)) == "envs"
                          and os.path.isdir(os.path.join(base, "conda-meta"))) else None
    home = (pyvenv or {}).get("home") or None
    return Layout(
        path=path, kind=kind, python=python,
        links=tuple(_link_chain(python)) if python else (),
        # The interpreters in bin/ (a link to some tool elsewhere is not the kernel's business), all of lib/.
        outside=tuple(t for d, names in (("bin", "python"), ("lib", "")) for t in _links_out_of(os.path.join(path, d),
                                                                                                  path, names)),
        home=os.path.normpath(home) if home and os.path.isabs(home) else None,
        conda_base=conda_base,
    )


def probe(argv: Sequence[str], timeout: float = PROBE_TIMEOUT,
          env: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """Run the probe (``argv`` ends with the Python to run it, or a runtime that runs it): its
    answer, or None and why not (its exit code and the last lines it wrote)."""
    try:
        proc = subprocess.run([*argv, "-I", "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd="/", env=dict(PROBE_ENVIRONMENT if env is None else env))
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:.0f} s"
    except OSError as e:
        return None, e.strerror or str(e)
    lines = proc.stdout.strip().splitlines()
    try:
        info = json.loads(lines[-1]) if lines and proc.returncode == 0 else None
    except json.JSONDecodeError:
        info = None
    if isinstance(info, dict):
        return info, None
    said = "\n".join(line for line in proc.stderr.strip().splitlines()[-8:] if not line.startswith("INFO:"))
    return None, f"exit code {proc.returncode}" + (f":\n{said}" if said else "")


def _interpreter_files(python: str) -> list[bytes]:
    """The interpreter's file and its libpython, as bytes (to read the glibc they ask for)."""
    real = os.path.realpath(python)
    paths = [real]
    lib = os.path.join(os.path.dirname(os.path.dirname(real)), "lib")
    try:
        paths += [os.path.join(lib, n) for n in os.listdir(lib) if n.startswith("libpython") and ".so" in n]
    except OSError:
        pass
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                out.append(f.read(64 * 1024 * 1024))
        except OSError:
            pass
    return out


def check(given: str, *, system_paths: Sequence[str], home: str, private: Sequence[str],
          read_write: Sequence[str] = (), node_tmp: str | None = None, image: str | None = None,
          apptainer: str = "apptainer", timeout: float = PROBE_TIMEOUT) -> EnvReport:
    """The verdict on the environment ``given`` (an absolute path) for a kernel whose sandbox
    shows ``system_paths``, must not show ``home`` or ``private`` (hpc-kernels' state), and
    binds ``read_write`` (the workspace with ``--rw``, read-write binds) writable. ``image``: an
    Apptainer profile's image, where the environment's Python is tried too."""
    report = EnvReport(path=given)
    if not os.path.isabs(given):
        report.problems.append(f"{given} is not an absolute path")
        return report
    if not os.path.exists(given):
        report.problems.append(f"{given} does not exist")
        return report
    if not os.path.isdir(given):
        report.problems.append(f"{given} is not a directory (give the environment's directory, not its python)")
        return report
    path, note = environment_dir(given)
    report.path = path
    if note:
        report.notes.append(note)
    why = exposes_private_files(path, home, list(private), what="the Python environment")
    if why:
        report.problems.append(why)
    local = node_local(path, node_tmp)
    if local:
        report.problems.append(local)
    layout = read_layout(path)
    report.kind, report.python = layout.kind, layout.python
    report.made_from = layout.home or layout.conda_base
    if layout.kind is None:
        report.problems.append(f"{path} is not a Python environment: it has neither pyvenv.cfg (venv, uv) nor "
                               "conda-meta/ (conda, mamba, pixi)")
        return report
    if layout.python is None:
        report.problems.append(f"{path} has no bin/python")
        return report
    needed, problems = needed_paths(layout, system_paths)
    writable = [p for p in read_write if any(_under(n, p) or _under(p, n) for n in [*needed, layout.python])]
    if writable:
        # Its Python runs outside the sandbox (here, to check it): the kernel must not be able to change it.
        report.problems.append(f"the environment lies in {writable[0]}, which the kernel may write (read-write "
                               "workspace or bind): code in the kernel could change what hpc-kernels runs outside "
                               "the sandbox; bind that directory read-only, or keep the environment elsewhere")
        return report
    info, failure = probe([layout.python], timeout)
    if info is not None:  # where its standard library really is (a Python may find it elsewhere)
        also = [str(info[k]) for k in ("base_prefix", "base_exec_prefix") if info.get(k)]
        needed, problems = needed_paths(layout, system_paths, also)
    report.problems += problems
    judge(report, info, failure)
    for path_needed in needed:
        why = exposes_private_files(path_needed, home, list(private), what="the path")
        if why and path_needed != path:  # the environment itself: said above
            report.problems.append(f"its Python needs {path_needed} shown to the kernel, but {why}: put that "
                                   "Python in a directory of its own")
        elif any(c in path_needed for c in ",:"):
            report.problems.append(f"its Python needs {path_needed}, which has ',' or ':' in it (they separate "
                                   "bind fields); move or link it elsewhere")
    report.binds = needed
    version = glibc_needed(_interpreter_files(layout.python))
    report.glibc = ".".join(map(str, version)) if version else None
    if image and report.ok:
        _try_in_image(report, image, apptainer, timeout)
    return report


def _try_in_image(report: EnvReport, image: str, apptainer: str, timeout: float) -> None:
    """Run the probe in the Apptainer image, with the environment bound as the kernel will have it."""
    from .images import exec_argv
    from .runtimes import apptainer_process_environment

    executable = shutil.which(apptainer)
    if executable is None:
        report.notes.append(f"not tried in the image {image}: {apptainer!r} is not installed here (the node's job "
                            "log says whether it runs there)")
        return
    if not os.path.exists(image):
        return  # said by the caller (runtime.image does not exist)
    assert report.python is not None
    argv = [*exec_argv(executable, image, [f"{p}:ro" for p in report.binds]), report.python]
    info, failure = probe(argv, timeout, env=apptainer_process_environment(os.environ, {}))
    if info is None:
        libc = (f" Its interpreter asks for glibc {report.glibc}; the image's C library may be older."
                if report.glibc else "")
        if failure and "GLIBC" in failure:
            libc = f" The image's C library (glibc) is older than the one its Python needs ({report.glibc or '?'})."
        report.problems.append(f"its Python does not run in the image {image}: {failure}.{libc} Use bubblewrap, "
                               "an image with a C library as new as the login node's, or an environment made "
                               "with the image's Python")
    elif not info.get("ipykernel"):
        report.problems.append(f"in the image {image}, ipykernel cannot be imported ({info.get('ipykernel_error')})")
    else:
        report.notes.append(f"runs in the image {image} (Python {info.get('python')}, "
                            f"ipykernel {info.get('ipykernel')})")
