"""Kernel images for the Apptainer runtime: build one, and check that one can run a kernel.

An image is built from an Apptainer definition rendered from ``templates/kernel-image.def.j2``
(Debian via debootstrap by default, or on top of an existing image or OCI source), or from a
definition of the site's own. ``check`` starts the image the way the node agent will (contained,
no network) and asks its Python what it has, so that a broken image is found before anyone waits
in a queue.

Apptainer is called directly. spython (Apptainer's Python client) calls the binary by its old
name ``singularity`` and builds with sudo by default; neither suits a login node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, podman_node
from .errors import HpcKernelsError
from .oci_archive import REF_NAME, write_oci_archive
from .render import template_environment
from .runtimes import (PODMAN_ISOLATION, SANDBOX_HOME, PodmanStorage, apptainer_process_environment, is_image_reference,
                       podman_command_line)

DEFINITION_TEMPLATE = "kernel-image.def.j2"
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Sources Apptainer can bootstrap from, by URI scheme.
_URI_BOOTSTRAPS = {"docker": "docker", "oras": "oras", "library": "library", "docker-archive": "docker-archive"}
# Matched whole (fullmatch): nothing may end a line of the definition and start another.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
_SAFE = re.compile(r"[A-Za-z0-9_.,:/@%+=~\-]+")
MIN_IPYKERNEL = (6, 0)
# Bootstrap agents that run a program of the host that builds the image (Apptainer finds it on
# PATH), that program, and what it builds.
HOST_BOOTSTRAP_PROGRAMS = {
    "debootstrap": ("debootstrap", "Debian or Ubuntu"),
    "yum": ("yum", "an RPM distribution"),
    "zypper": ("zypper", "SUSE"),
    "arch": ("pacstrap", "Arch Linux"),
    "busybox": ("busybox", "BusyBox"),
}
# Not on an unprivileged user's PATH on Debian, but where debootstrap lives.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# Run inside the image: what a kernel needs, as JSON on stdout.
PROBE = r"""
import json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
for module in ("ipykernel", "zmq", "jupyter_client"):
    try:
        info[module] = __import__(module).__version__
    except Exception as e:
        info[module] = None
        info[module + "_error"] = f"{type(e).__name__}: {e}"
try:
    import ipykernel_launcher  # noqa: F401
    info["ipykernel_launcher"] = True
except Exception:
    info["ipykernel_launcher"] = False
print(json.dumps(info))
"""


def image_definition(source: str | None = None, *, mirror: str = DEFAULT_MIRROR,
                     packages: Sequence[str] = ()) -> str:
    """The definition of a kernel image. ``source``: a Debian suite (``bookworm``, the default),
    an existing image (an absolute path to a SIF file or sandbox directory), or a URI
    (``docker://python:3.12-slim``, ``oras://...``). ``packages``: more Debian packages
    (debootstrap only)."""
    source = source or DEFAULT_SUITE
    scheme, sep, rest = source.partition("://")
    if sep:
        if scheme not in _URI_BOOTSTRAPS or not rest or not _SAFE.fullmatch(rest):
            raise HpcKernelsError(f"--from {source!r}: expected a Debian suite, an absolute path, or a URI "
                                  f"({', '.join(s + '://' for s in _URI_BOOTSTRAPS)})")
        bootstrap, source = _URI_BOOTSTRAPS[scheme], rest
    elif source.startswith("/"):
        if not _SAFE.fullmatch(source):
            raise HpcKernelsError(f"--from {source!r}: the path may not contain spaces or quotes")
        if not os.path.exists(source):
            raise HpcKernelsError(f"--from {source}: no such image or directory")
        bootstrap = "localimage"
    elif _WORD.fullmatch(source):
        bootstrap = "debootstrap"
    else:
        raise HpcKernelsError(f"--from {source!r}: expected a Debian suite (e.g. bookworm), an absolute path "
                              "to an image, or a URI such as docker://python:3.12-slim")
    if not _SAFE.fullmatch(mirror):
        raise HpcKernelsError(f"--mirror {mirror!r}: expected a URL")
    for package in packages:
        if not _WORD.fullmatch(package):
            raise HpcKernelsError(f"--package {package!r}: expected a Debian package name")
    if packages and bootstrap != "debootstrap":
        raise HpcKernelsError("--package adds Debian packages to a debootstrap build; with --from an image, "
                              "write a definition of your own (--print-definition shows ours) and use --definition")
    template = template_environment().get_template(DEFINITION_TEMPLATE)
    return template.render(bootstrap=bootstrap, source=source, mirror=mirror, packages=list(packages),
                           version=__version__).lstrip()


def bootstrap_agent(definition: str) -> str | None:
    """The ``Bootstrap:`` agent of a definition's header (None if it names none)."""
    for line in definition.splitlines():
        match = re.match(r"\s*Bootstrap\s*:\s*(\S+)", line, re.IGNORECASE)
        if match:
            return match.group(1).lower()
        if line.lstrip().startswith("%"):  # the header ends at the first section
            break
    return None


def build_path(path: str, sbin_dirs: Sequence[str] = SBIN_DIRS) -> str:
    """PATH for ``apptainer build``: the caller's, then the sbin directories it lacks."""
    parts = [p for p in path.split(os.pathsep) if p]
    return os.pathsep.join(parts + [d for d in sbin_dirs if d not in parts])


def missing_build_program(definition: str, path: str, sbin_dirs: Sequence[str] = SBIN_DIRS) -> str | None:
    """Why this host cannot build the definition, or None: the program its bootstrap agent runs
    (debootstrap, yum, ...) must be on ``path`` (sbin directories included). Said before the
    build starts, rather than in Apptainer's words after its first minute."""
    agent = bootstrap_agent(definition)
    if agent not in HOST_BOOTSTRAP_PROGRAMS:
        return None
    program, builds = HOST_BOOTSTRAP_PROGRAMS[agent]
    if shutil.which(program, path=build_path(path, sbin_dirs)):
        return None
    install = {
        "debootstrap": "on Debian/Ubuntu `apt-get install debootstrap`, on RHEL/Rocky/Alma `dnf install "
                       "debootstrap` (EPEL), on SLES `zypper install debootstrap`",
    }.get(program, f"install {program}")
    return (f"this definition bootstraps {builds} with {program} (Bootstrap: {agent}), and {program} is not "
            f"installed here (not found on PATH or in {', '.join(sbin_dirs) or 'sbin'}). Either install it ({install}), "
            "or build on top of an image, which needs no program of this host: "
            "`hpc-kernel image build OUT.sif --from docker://python:3.12-slim` (ipykernel is installed there "
            "with pip), `--from /path/to/image.sif`, or a definition of your own with --definition FILE "
            "(Bootstrap: docker, localimage, oras or library)")


def build_argv(apptainer: str, output: str, definition: str, *, as_root: bool) -> list[str]:
    """``apptainer build``; unprivileged users build with --fakeroot (it needs /etc/subuid)."""
    return [apptainer, "build", *([] if as_root else ["--fakeroot"]), "--force", output, definition]


def build_image(output: Path, definition: str, *, apptainer: str = "apptainer") -> None:
    """Build ``output`` from the definition text. The image appears at ``output`` only when the
    build (with its %test) succeeded; a failed or interrupted build leaves nothing there."""
    path = os.environ.get("PATH", os.defpath)
    problem = missing_build_program(definition, path)
    if problem:
        raise HpcKernelsError(problem)
    executable = _find(apptainer)
    output = output.resolve()
    if output.suffix != ".sif":
        raise HpcKernelsError(f"{output}: an image file name ends in .sif")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpcKernelsError(f"cannot create {output.parent}: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="hk-image-") as work:
        definition_path = Path(work) / "kernel.def"
        definition_path.write_text(definition)
        partial = output.parent / f".{output.name}.{os.getpid()}.partial"
        try:
            proc = subprocess.run(build_argv(executable, str(partial), str(definition_path),
                                             as_root=os.getuid() == 0),
                                  env={**os.environ, "PATH": build_path(path)})
            if proc.returncode != 0:
                raise HpcKernelsError(f"apptainer build failed (exit code {proc.returncode}); its output is above")
            os.chmod(partial, 0o644)
            os.replace(partial, output)
        finally:
            if partial.exists():
                partial.unlink()


@dataclass
class ImageReport:
    """What an image's Python has, and what stops it from running a kernel."""

    image: str
    info: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def exec_argv(apptainer: str, image: str, binds: Sequence[str] = ()) -> list[str]:
    """``apptainer exec`` of ``image`` as the agent starts it (runtimes.apptainer_argv, with only
    ``binds``: ``PATH:ro`` or ``PATH:rw``, each at its own path); the command follows."""
    argv = [apptainer, "exec", "--containall", "--no-home", "--home", SANDBOX_HOME, "--cleanenv",
            "--net", "--network", "none", "--no-mount", "bind-paths"]
    for bind in binds:
        path, _, mode = bind.partition(":")
        argv += ["--bind", f"{path}:{path}:{'rw' if mode == 'rw' else 'ro'}"]
    return [*argv, "--pwd", SANDBOX_HOME, image]


def check_argv(apptainer: str, image: str, python: str = "python3") -> list[str]:
    """Start the image as the agent does (runtimes.apptainer_argv, without the binds)."""
    return [*exec_argv(apptainer, image), python, "-c", PROBE]


def judge(image: str, info: dict[str, object]) -> ImageReport:
    """Pure: the probe's answer becomes a report."""
    report = ImageReport(image, info)
    version = str(info.get("ipykernel") or "")
    if not version:
        report.problems.append(f"ipykernel cannot be imported ({info.get('ipykernel_error', 'not installed')})")
    elif tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < MIN_IPYKERNEL:
        report.problems.append(f"ipykernel {version} is too old (at least {'.'.join(map(str, MIN_IPYKERNEL))})")
    elif not info.get("ipykernel_launcher"):
        report.problems.append("ipykernel_launcher cannot be imported")
    if not info.get("zmq"):
        report.problems.append(f"pyzmq cannot be imported ({info.get('zmq_error', 'not installed')})")
    return report


def check_image(image: str, *, apptainer: str = "apptainer", python: str = "python3",
                timeout: float = 120) -> ImageReport:
    """Run the probe in ``image``; a report with problems if it cannot run a kernel."""
    if not os.path.exists(image):
        return ImageReport(image, problems=[f"{image} does not exist"])
    executable = _find(apptainer)
    try:
        proc = subprocess.run(check_argv(executable, image, python), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL,
                              env=apptainer_process_environment(os.environ, {}))
    except subprocess.TimeoutExpired:
        return ImageReport(image, problems=[f"{python} in the image did not answer within {timeout:.0f} s"])
    return _report(image, proc, python)


def unpack_argv(apptainer: str, image: str, directory: str) -> list[str]:
    """``apptainer build --sandbox``: the image's root file system as a directory (unprivileged)."""
    return [apptainer, "build", "--force", "--sandbox", directory, image]


def export_oci(image: Path, output: Path, reference: str, *, apptainer: str = "apptainer",
               compressed: bool = False) -> str:
    """Turn an Apptainer image into an OCI archive that ``podman load`` takes, the image named
    ``reference``; return its manifest digest. Only a complete archive appears at ``output``."""
    if not image.exists():
        raise HpcKernelsError(f"{image} does not exist")
    if not is_image_reference(reference):
        raise HpcKernelsError(f"--name {reference!r}: expected an image reference like "
                              "localhost/hpc-kernels/kernel:latest")
    executable = _find(apptainer)
    with tempfile.TemporaryDirectory(prefix="hk-export-") as work:
        root = Path(work) / "root"
        proc = subprocess.run(unpack_argv(executable, str(image), str(root)), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env=apptainer_process_environment(os.environ, {}))
        if proc.returncode != 0:
            raise HpcKernelsError(f"apptainer could not unpack {image} (exit code {proc.returncode}):\n"
                                  + proc.stderr.strip())
        try:
            return write_oci_archive(root, output.resolve(), reference, compressed=compressed)
        except OSError as e:
            raise HpcKernelsError(f"cannot write {output}: {e.strerror or e}") from None
        finally:
            _make_removable(root)


def _make_removable(root: Path) -> None:
    """An unpacked image may hold directories without write permission: give them the owner's, so
    that the temporary directory can go."""
    for directory, _, _ in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)


def archive_reference(archive: Path) -> str | None:
    """The image name an OCI archive carries (what ``podman load`` tags it with), if one."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("index.json")
            data = json.loads(member.read(1 << 20)) if member else {}
    except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError):
        return None
    for entry in data.get("manifests", []) if isinstance(data, dict) else []:
        name = (entry.get("annotations") or {}).get(REF_NAME) if isinstance(entry, dict) else None
        if isinstance(name, str) and is_image_reference(name):
            return name
    return None


def podman_check_argv(podman: Sequence[str], reference: str, python: str = "python3") -> list[str]:
    """Start ``reference`` as the agent does (runtimes.podman_argv's isolation, no binds) and probe.
    ``podman`` is the podman command with its global options."""
    return [*podman, "run", "--rm", "--pull", "never", *PODMAN_ISOLATION,
            "--tmpfs", SANDBOX_HOME, "--env", f"HOME={SANDBOX_HOME}", "--workdir", SANDBOX_HOME,
            reference, python, "-c", PROBE]


def check_podman_image(reference: str, podman: Sequence[str], *, archive: Path | None = None,
                       env: Mapping[str, str] | None = None, python: str = "python3",
                       timeout: float = 300) -> ImageReport:
    """Run the probe in a podman image, first loading ``archive`` when the image is not in the
    storage ``podman`` (the command and its global options) names."""
    run_env = dict(env if env is not None else os.environ)

    def podman_says(args: list[str]) -> subprocess.CompletedProcess[str]:
        return podman_node.run(podman, args, run_env, timeout=timeout)

    try:
        if podman_says(["image", "exists", reference]).returncode != 0:
            if archive is None:
                return ImageReport(reference, problems=[f"{reference} is not in podman's image storage here "
                                                        "(and no runtime.image_archive to load it from)"])
            if not archive.is_file():
                return ImageReport(reference, problems=[f"{archive} does not exist"])
            loaded = podman_says(["load", "--input", str(archive)])
            if loaded.returncode != 0:
                return ImageReport(reference, problems=[f"podman load --input {archive} failed "
                                                        f"(exit code {loaded.returncode}): {loaded.stderr.strip()}"])
            if podman_says(["image", "exists", reference]).returncode != 0:
                named = archive_reference(archive)
                return ImageReport(reference, problems=[f"{archive} holds {named or 'an image with no name'}, "
                                                        f"not {reference}"])
        proc = podman_node.run(podman_check_argv(podman, reference, python), [], run_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ImageReport(reference, problems=[f"podman did not answer within {timeout:.0f} s"])
    return _report(reference, proc, python)


@contextlib.contextmanager
def scratch_podman(runtime: Mapping[str, object]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Podman as a profile's ``runtime`` settings run it (its command, OCI runtime), with a
    throw-away storage for one check on this host: the command line and the environment to run it
    in. The user's own podman storage is not touched (with ``podman_storage: site``, podman's own
    configuration is used as it is); the scratch storage goes at the end, files of other IDs of the
    user namespace and overlay mounts included (``podman system reset``)."""
    if runtime.get("podman_storage") == "site":
        yield podman_command_line(runtime), dict(os.environ)
        return
    with tempfile.TemporaryDirectory(prefix="hk-image-check-") as work:
        runtime_dir = Path(work) / "xdg"
        runtime_dir.mkdir(mode=0o700)
        argv = podman_command_line(runtime, PodmanStorage(f"{work}/root", f"{work}/run", f"{work}/tmp"))
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
        try:
            yield argv, env
        finally:
            # Also ends the pause process rootless podman leaves running for its user namespace.
            podman_node.run(argv, ["system", "reset", "--force"], env)


def _report(image: str, proc: subprocess.CompletedProcess[str], python: str) -> ImageReport:
    lines = proc.stdout.strip().splitlines()
    try:
        info = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        info = None
    if proc.returncode != 0 or not isinstance(info, dict):
        said = "\n".join(line for line in proc.stderr.strip().splitlines() if not line.startswith("INFO:"))
        return ImageReport(image, problems=[f"{python} did not run in the image (exit code {proc.returncode})"
                                            + (f":\n{said}" if said else "")])
    return judge(image, info)


def _find(apptainer: str) -> str:
    found = shutil.which(apptainer)
    if found is None:
        raise HpcKernelsError(f"{apptainer!r} is not installed here (not found on PATH); "
                              "load its module or give --apptainer PATH")
    return found
