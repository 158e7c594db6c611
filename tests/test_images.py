"""Kernel image definitions and the verdict on an image (pure parts; the cluster tests build and
check a real image with a real Apptainer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.images import (bootstrap_agent, build_argv, build_path, check_argv, image_definition, judge,
                                missing_build_program)


def header(definition: str) -> dict[str, str]:
    lines = definition.split("\n\n", 1)[0].splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_default_is_debian_with_ipykernel_from_apt() -> None:
    definition = image_definition()
    assert header(definition) == {"Bootstrap": "debootstrap", "OSVersion": "bookworm",
                                  "MirrorURL": "http://deb.debian.org/debian", "Include": "python3"}
    assert "apt-get install -y -qq --no-install-recommends python3-ipykernel\n" in definition
    assert "%test" in definition and "import ipykernel_launcher" in definition


def test_suite_mirror_and_packages() -> None:
    definition = image_definition("trixie", mirror="http://mirror.example/debian", packages=["python3-numpy"])
    assert header(definition)["OSVersion"] == "trixie"
    assert header(definition)["MirrorURL"] == "http://mirror.example/debian"
    assert "python3-ipykernel python3-numpy\n" in definition


def test_from_an_image_or_a_registry(tmp_path: Path) -> None:
    assert header(image_definition("docker://python:3.12-slim")) == {"Bootstrap": "docker", "From": "python:3.12-slim"}
    sif = tmp_path / "base.sif"
    sif.write_bytes(b"")
    definition = image_definition(str(sif))
    assert header(definition) == {"Bootstrap": "localimage", "From": str(sif)}
    assert "pip install --no-cache-dir ipykernel" in definition, "ipykernel is added when the base lacks it"


@pytest.mark.parametrize("source, message", [
    ("http://x/y", "expected a Debian suite"),
    ("docker://python 3", "expected a Debian suite"),
    ("/no/such/image.sif", "no such image"),
    ("bookworm; rm -rf /", "expected a Debian suite"),
])
def test_bad_sources(source: str, message: str) -> None:
    with pytest.raises(HpcKernelsError, match=message):
        image_definition(source)


def test_bad_packages_and_packages_on_a_non_debian_source() -> None:
    with pytest.raises(HpcKernelsError, match="expected a Debian package name"):
        image_definition(packages=["numpy\n%post"])
    with pytest.raises(HpcKernelsError, match="--package adds Debian packages to a debootstrap build"):
        image_definition("docker://python:3.12", packages=["python3-numpy"])


def test_unprivileged_builds_use_fakeroot() -> None:
    assert build_argv("apptainer", "o.sif", "k.def", as_root=False) == [
        "apptainer", "build", "--fakeroot", "--force", "o.sif", "k.def"]
    assert "--fakeroot" not in build_argv("apptainer", "o.sif", "k.def", as_root=True)


def test_a_build_needs_its_bootstrap_program_and_says_so_first(tmp_path: Path) -> None:
    """A login node without debootstrap (a RHEL, Rocky or SLES site) is told before the build
    starts what is missing and what works there instead."""
    definition = image_definition()
    assert bootstrap_agent(definition) == "debootstrap"
    empty = tmp_path / "empty"
    empty.mkdir()
    problem = missing_build_program(definition, str(empty), sbin_dirs=())
    assert problem is not None
    assert "debootstrap is not installed here" in problem
    assert "apt-get install debootstrap" in problem and "dnf install debootstrap" in problem
    assert "--from docker://python:3.12-slim" in problem and "--definition FILE" in problem
    with_it = tmp_path / "bin"
    with_it.mkdir()
    (with_it / "debootstrap").write_text("#!/bin/sh\n")
    (with_it / "debootstrap").chmod(0o755)
    assert missing_build_program(definition, f"{empty}:{with_it}", sbin_dirs=()) is None
    # debootstrap lives in /usr/sbin, which an unprivileged user's PATH lacks on Debian
    assert missing_build_program(definition, str(empty), sbin_dirs=(str(with_it),)) is None
    assert build_path("/usr/bin:/bin", ("/usr/sbin", "/bin")) == "/usr/bin:/bin:/usr/sbin"
    # Bootstraps from an image need nothing of the host
    assert missing_build_program(image_definition("docker://python:3.12-slim"), str(empty), sbin_dirs=()) is None
    assert bootstrap_agent("%post\n  echo Bootstrap: yum\n") is None


def test_image_build_without_the_bootstrap_program_fails_at_once(tmp_path: Path) -> None:
    """The real command: a definition that bootstraps with zypper (not on Debian) fails before
    Apptainer is started, and leaves no image."""
    import subprocess
    import sys

    definition = tmp_path / "suse.def"
    definition.write_text("Bootstrap: zypper\nOSVersion: 15.6\n\n%post\n  true\n")
    out = tmp_path / "out.sif"
    proc = subprocess.run([sys.executable, "-I", "-m", "hpc_kernels.cli", "image", "build", str(out),
                           "--definition", str(definition)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "zypper is not installed here" in proc.stderr
    assert not out.exists()


def test_check_starts_the_image_as_the_agent_does() -> None:
    argv = check_argv("apptainer", "/i.sif")
    for flag in ("--containall", "--no-home", "--cleanenv"):
        assert flag in argv
    assert argv[argv.index("--network") + 1] == "none"
    assert argv[argv.index("/i.sif") + 1] == "python3"


def test_judge() -> None:
    good = {"python": "3.11.2", "ipykernel": "6.17.0", "ipykernel_launcher": True, "zmq": "24.0.1"}
    assert judge("/i", good).ok
    missing = judge("/i", {**good, "ipykernel": None, "ipykernel_error": "ModuleNotFoundError: no ipykernel"})
    assert missing.problems == ["ipykernel cannot be imported (ModuleNotFoundError: no ipykernel)"]
    assert "too old" in judge("/i", {**good, "ipykernel": "5.5.6"}).problems[0]
    assert "pyzmq cannot be imported" in judge("/i", {**good, "zmq": None}).problems[0]


@pytest.mark.parametrize("kwargs", [
    {"packages": ["vim\n", "reboot"]},
    {"mirror": "http://deb.debian.org/debian\n%post"},
    {"source": "bookworm\n"},
])
def test_nothing_can_start_a_new_line_of_the_definition(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(HpcKernelsError):
        image_definition(**kwargs)
