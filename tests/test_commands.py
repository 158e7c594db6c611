"""Every external command the project runs is in ``cluster/commands.txt``, with the Debian package
that provides it, and every such package is in ``cluster/packages.txt``, which ``setup.sh``
installs. A command that slips in without an install step (``debootstrap`` did once: a green CI
on a machine where it had been installed by hand hid it) fails here, not on a fresh machine.

The scan (``command_scan.py``) reads the package, the job and image templates, the cluster
scripts, the Makefile, ``.ci/run``, the tests and the benchmarks; it runs nothing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from command_scan import (Use, definition_commands, makefile_commands, python_commands, shell_commands,
                          shell_functions)

import hpc_kernels
from hpc_kernels.runtimes import RUNTIME_KINDS

# The tests run from a copy of tests/ with cluster/, the Makefile and .ci/ beside it (make test),
# against the installed package; or from a checkout.
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(hpc_kernels.__file__).resolve().parent
TEMPLATES = ROOT / "templates" if (ROOT / "templates").is_dir() else PACKAGE / "templates"
COMMANDS_FILE = ROOT / "cluster" / "commands.txt"
PACKAGES_FILE = ROOT / "cluster" / "packages.txt"
RELEASES = ("bookworm", "trixie")
SPECIAL_PROVIDERS = {"@venv", "@apptainer", "@site", "@ondemand"}


@dataclass(frozen=True)
class Listed:
    command: str
    packages: dict[str, str]  # release -> Debian package; empty for a special provider
    provider: str
    note: str

    @property
    def indirect(self) -> bool:
        """Run not by our code but by a program we run (``by apptainer build``)."""
        return self.note.startswith("by ")


def parse_commands(text: str) -> dict[str, Listed]:
    listed: dict[str, Listed] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(None, 2)
        assert len(fields) >= 2, f"commands.txt:{number}: expected COMMAND PROVIDER [note]"
        command, provider = fields[0], fields[1]
        assert command not in listed, f"commands.txt:{number}: {command} is listed twice"
        packages: dict[str, str] = {}
        if provider not in SPECIAL_PROVIDERS:
            if "=" in provider:
                packages = dict(part.split("=", 1) for part in provider.split(","))
                assert set(packages) == set(RELEASES), f"commands.txt:{number}: name a package for {RELEASES}"
            else:
                packages = {release: provider for release in RELEASES}
        listed[command] = Listed(command, packages, provider, fields[2] if len(fields) > 2 else "")
    return listed


def parse_packages(text: str) -> dict[str, set[str]]:
    """Release -> the packages setup.sh installs there."""
    by_release: dict[str, set[str]] = {release: set() for release in RELEASES}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name, releases = words[0], words[1:] or list(RELEASES)
        for release in releases:
            assert release in RELEASES, f"packages.txt: {name}: unknown release {release}"
            by_release[release].add(name)
    return by_release


def _files(root: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted(p for pattern in patterns for p in root.glob(pattern) if p.is_file())


def scan() -> list[Use]:
    """Every place in the project that runs an external command."""
    uses: list[Use] = []
    python_files = _files(PACKAGE, ["**/*.py"]) + _files(ROOT, ["tests/*.py", "bench/*.py"])
    for path in python_files:
        uses += python_commands(path.read_text(), str(path))
    shell_files = (_files(ROOT, ["cluster/*.sh", ".ci/run"])
                   + _files(TEMPLATES, ["*.sbatch.j2", "*.step.j2", "ood/template/*.sh.erb.j2"]))
    functions: set[str] = set()
    for path in shell_files:
        functions |= shell_functions(path.read_text())
    arrays: dict[str, str] = {}
    library = ROOT / "cluster" / "lib.sh"  # sourced by the others: its arrays (HK_DAEMON_ENV) count there
    if library.exists():
        list(shell_commands(library.read_text(), str(library), ignore=functions, arrays=arrays))
    for path in shell_files:
        uses += shell_commands(path.read_text(), str(path), ignore=functions, arrays=arrays)
    for path in _files(TEMPLATES, ["*.def.j2"]):
        uses += definition_commands(path.read_text(), str(path))
    if (ROOT / "Makefile").exists():
        uses += makefile_commands((ROOT / "Makefile").read_text(), str(ROOT / "Makefile"))
    # The agent runs a runtime by its kind's name unless a profile sets runtime.executable.
    uses += [Use(kind, "hpc_kernels/runtimes.py (RUNTIME_KINDS)") for kind in RUNTIME_KINDS]
    return uses


def unlisted(uses: Iterable[Use], listed: dict[str, Listed]) -> dict[str, list[str]]:
    missing: dict[str, list[str]] = defaultdict(list)
    for use in uses:
        if use.command not in listed:
            missing[use.command].append(use.where)
    return dict(missing)


@pytest.fixture(scope="module")
def listed() -> dict[str, Listed]:
    assert COMMANDS_FILE.exists(), f"{COMMANDS_FILE} is missing (make test copies cluster/ beside tests/)"
    return parse_commands(COMMANDS_FILE.read_text())


@pytest.fixture(scope="module")
def uses() -> list[Use]:
    found = scan()
    assert len({u.command for u in found}) > 40, "the scan found almost nothing: is it reading the sources?"
    return found


def test_every_command_the_project_runs_is_listed(uses: list[Use], listed: dict[str, Listed]) -> None:
    missing = unlisted(uses, listed)
    assert not missing, "commands run but not in cluster/commands.txt (add each with its Debian package):\n" + \
        "\n".join(f"  {command}: {', '.join(where[:3])}" for command, where in sorted(missing.items()))


def test_every_listed_command_is_still_run(uses: list[Use], listed: dict[str, Listed]) -> None:
    """The list does not rot: a command nothing runs any more is taken off (or says what runs it)."""
    found = {u.command for u in uses}
    stale = sorted(c for c, entry in listed.items() if c not in found and not entry.indirect)
    assert not stale, f"listed in cluster/commands.txt but run nowhere: {stale}"


def test_every_package_named_is_installed_by_setup(listed: dict[str, Listed]) -> None:
    installed = parse_packages(PACKAGES_FILE.read_text())
    for release in RELEASES:
        missing = sorted({f"{e.packages[release]} ({e.command})" for e in listed.values()
                          if e.packages and e.packages[release] not in installed[release]})
        assert not missing, f"not in cluster/packages.txt for {release}: {missing}"


def test_a_command_taken_off_the_list_is_caught(uses: list[Use], listed: dict[str, Listed]) -> None:
    """The net works: without its line, debootstrap (which the kernel image's definition makes
    Apptainer run) is reported, with the template that needs it."""
    without = {c: e for c, e in listed.items() if c != "debootstrap"}
    missing = unlisted(uses, without)
    assert list(missing) == ["debootstrap"]
    assert any("kernel-image.def.j2" in where for where in missing["debootstrap"])


# --- the scan itself, on small examples -----------------------------------------------------


def commands_in_shell(text: str) -> list[str]:
    return [u.command for u in shell_commands(text, "x.sh")]


def test_shell_scan() -> None:
    script = """#!/bin/bash
# a comment that isn't code: don't read "quotes" here; rm -rf /
set -eu
helper() { echo hi; }
PACKAGES=(slurm-wlm    # the array's words are no commands
          ruby)
apt=(apt-get -qq -o X=1)
"${apt[@]}" update
run=(env -i PATH=/bin)
"${run[@]}" nsenter --net=/run/netns/c1 unshare --mount --propagation private sh -c "hostname c1; exec slurmd"
for n in a b; do helper "$n" && grep -q x /etc/hosts || true; done
case $state in
    idle|mixed) ;;
    down)
        scontrol update ;;
esac
x=$(tail -n 3 "$(dirname "$0")/log" | sort)
(( ${#PACKAGES[@]} )) || exit 1
cat >"$f" <<EOF
not_a_command --here
EOF
sudo -n -u bob -- id -un
/usr/sbin/sshd -t
echo 'a quote
spanning lines; rm -rf /'
LANG=C awk '{print}' file
"""
    assert commands_in_shell(script) == [
        "apt-get", "env", "nsenter", "unshare", "sh", "hostname", "slurmd", "grep", "scontrol",
        "tail", "dirname", "sort", "cat", "sudo", "id", "sshd", "awk"]


def test_python_scan() -> None:
    source = '''
import shutil, subprocess
subprocess.run(["sbatch", "--parsable"], input="x")
argv = ["scancel", str(1)]
def ssh_argv(node):
    return ["ssh", "-T", node]
def columns():
    return ["name", "state"]
shutil.which("bwrap")
CHROME = "/usr/bin/chromium"
names = ["not", "a", "command"]
'''
    assert sorted(u.command for u in python_commands(source, "x.py")) == [
        "bwrap", "chromium", "sbatch", "scancel", "ssh"]


def test_definition_scan() -> None:
    definition = "{% if bootstrap == \"debootstrap\" %}\nBootstrap: debootstrap\n{% else %}\nBootstrap: {{ b }}\n"
    assert [u.command for u in definition_commands(definition, "k.def")] == ["debootstrap", "debootstrap"]
    assert [u.command for u in definition_commands("Bootstrap: docker\nFrom: python\n", "k.def")] == []
    assert re.search("yum", next(definition_commands("Bootstrap: yum\n", "k.def")).command)
