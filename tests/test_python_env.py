"""A user's Python environment (``--python-env``): which kind it is, what the sandbox must show for
its Python to run, and the checks made before anything is queued. Directory layouts stand for
conda and pixi environments here (neither can be installed on the test machines: only PyPI, Debian
and npm are reachable); the venv and uv environments run for real in test_cluster_python_env.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpc_kernels.cli import main
from hpc_kernels.errors import ProfileError
from hpc_kernels.images import exec_argv
from hpc_kernels.paths import node_local
from hpc_kernels.profiles import KernelRequest, apply_request, validate_profile
from hpc_kernels.python_env import (
    EnvReport,
    Layout,
    apply,
    check,
    environment_dir,
    glibc_needed,
    kind_of,
    needed_paths,
    parse_pyvenv_cfg,
    read_layout,
    start_failure_hint,
)

SHOWN = ["/usr", "/bin", "/lib", "/etc", "/opt"]
SYSTEM_PYTHON = os.path.realpath("/usr/bin/python3")  # Debian's python3.11


def make_venv(path: Path, home: str, python_target: str, *, uv: bool = False) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "lib").mkdir()
    (path / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n"
                                     + ("uv = 0.13.9\n" if uv else "") + "version_info = 3.11.2\n")
    (path / "bin" / "python3.11").symlink_to(python_target)
    (path / "bin" / "python").symlink_to("python3.11")
    return path


def make_conda(path: Path, python_target: str | None = None) -> Path:
    """The layout of a conda environment: conda-meta/, bin/python (a file, or a link)."""
    (path / "conda-meta").mkdir(parents=True)
    (path / "conda-meta" / "history").write_text("==> 2026-01-01 00:00:00 <==\n")
    (path / "bin").mkdir()
    (path / "lib").mkdir()
    if python_target:
        (path / "bin" / "python").symlink_to(python_target)
    else:
        (path / "bin" / "python").write_text("")
    return path


def test_kinds_from_the_layout() -> None:
    assert kind_of("/p/env", {"home": "/usr/bin"}, False) == "venv"
    assert kind_of("/p/env", {"home": "/usr/bin", "uv": "0.13.9"}, False) == "uv"
    assert kind_of("/home/u/miniforge3/envs/a", None, True) == "conda"
    assert kind_of("/home/u/proj/.pixi/envs/default", None, True) == "pixi"
    assert kind_of("/home/u/notes", None, False) is None
    assert parse_pyvenv_cfg("home = /x/bin\nUV = 1\nnonsense\n") == {"home": "/x/bin", "uv": "1"}


def test_a_venv_of_the_system_python_needs_only_itself(tmp_path: Path) -> None:
    env = make_venv(tmp_path / "env", "/usr/bin", SYSTEM_PYTHON)
    layout = read_layout(str(env))
    assert layout.kind == "venv" and layout.python == str(env / "bin" / "python") and layout.home == "/usr/bin"
    assert layout.links == (str(env / "bin" / "python3.11"), SYSTEM_PYTHON)
    assert needed_paths(layout, SHOWN) == ([str(env)], [])


def test_a_venv_of_a_python_elsewhere_needs_that_pythons_installation(tmp_path: Path) -> None:
    base = tmp_path / "pythons" / "py311"
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "python3.11").write_text("")
    env = make_venv(tmp_path / "env", str(base / "bin"), str(base / "bin" / "python3.11"), uv=True)
    layout = read_layout(str(env))
    assert layout.kind == "uv"
    needed, problems = needed_paths(layout, SHOWN)
    assert needed == [str(env), str(base)] and not problems
    # Only pyvenv.cfg's home says so (a venv made with --copies has no link out).
    copied = Layout(path=str(env), kind="venv", python=str(env / "bin" / "python"), home=str(base / "bin"))
    assert needed_paths(copied, SHOWN)[0] == [str(env), str(base)]
    # What the Python reported as its base prefix counts too; nothing already shown, nothing twice.
    assert needed_paths(copied, SHOWN, [str(base), "/usr"])[0] == [str(env), str(base)]


def test_a_link_into_a_system_directory_that_is_no_link_binds_only_that_directory() -> None:
    layout = Layout(path="/p/env", kind="venv", python="/p/env/bin/python",
                    links=("/p/env/bin/python3", "/sbin2/python3"))
    assert needed_paths(layout, SHOWN) == (["/p/env", "/sbin2"], [])
    # A Python that needs / itself is refused, never bound whole.
    layout = Layout(path="/p/env", kind="venv", python="/p/env/bin/python", links=("/python3",))
    needed, problems = needed_paths(layout, SHOWN)
    assert needed == ["/p/env"] and "holds the system paths" in problems[0]


def test_a_conda_environment_and_its_base(tmp_path: Path) -> None:
    base = tmp_path / "miniforge3"
    make_conda(base)
    (base / "pkgs" / "python-3.11" / "bin").mkdir(parents=True)
    (base / "pkgs" / "python-3.11" / "bin" / "python3.11").write_text("")
    # Files copied or hard-linked from the package cache: the environment alone.
    alone = make_conda(base / "envs" / "alone")
    (alone / "bin" / "mytool").symlink_to(tmp_path / "bin" / "mytool")  # a tool elsewhere: not the kernel's
    layout = read_layout(str(alone))
    assert layout.kind == "conda" and layout.conda_base == str(base) and layout.links == ()
    assert needed_paths(layout, SHOWN)[0] == [str(alone)]
    # Soft-linked (conda's always_softlink, or a link to the base's python): the base too.
    linked = make_conda(base / "envs" / "linked", f"{base}/pkgs/python-3.11/bin/python3.11")
    (linked / "lib" / "python3.11").symlink_to(base / "pkgs" / "python-3.11" / "lib")
    layout = read_layout(str(linked))
    assert layout.outside and needed_paths(layout, SHOWN)[0] == [str(base)]
    # An environment made with -p somewhere else has no base of its own.
    assert read_layout(str(make_conda(tmp_path / "prefix-env"))).conda_base is None


def test_a_pixi_project_and_its_environments(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "pixi.toml").parent.mkdir()
    (project / "pixi.toml").write_text("[project]\nname = 'p'\n")
    default = make_conda(project / ".pixi" / "envs" / "default")
    make_conda(project / ".pixi" / "envs" / "cuda")
    assert environment_dir(str(project)) == (str(default), f"{project} is a pixi project: using its default "
                                                           f"environment {default}")
    assert read_layout(str(default)).kind == "pixi"
    assert environment_dir(str(project / ".pixi" / "envs" / "cuda")) == (str(project / ".pixi" / "envs" / "cuda"), None)


def test_glibc_the_interpreter_asks_for() -> None:
    with open(SYSTEM_PYTHON, "rb") as f:
        version = glibc_needed([f.read()])
    assert version is not None and (2, 17) <= version <= (2, 36)  # Debian 12's glibc is 2.36
    assert glibc_needed([b"\x7fELF static"]) is None
    assert glibc_needed([b"GLIBC_2.2.5\0GLIBC_2.38\0", b"GLIBC_2.34"]) == (2, 38)


def test_node_local_places(tmp_path: Path) -> None:
    assert "which each node has of its own" in (node_local("/tmp/env") or "")
    assert "/dev/shm" in (node_local("/dev/shm/env") or "")
    assert "/scratch/local" in (node_local("/scratch/local/u/env", "/scratch/local") or "")
    assert node_local("/scratch/local/u/env", "$SLURM_TMPDIR") is None  # not known on the login node
    assert node_local("/home/u/env", environ={}) is None
    assert "/run/user/7" in (node_local("/run/user/7/x", environ={"XDG_RUNTIME_DIR": "/run/user/7"}) or "")


def test_check_refuses_with_every_reason(tmp_path: Path) -> None:
    env = make_venv(tmp_path / "env", "/usr/bin", SYSTEM_PYTHON)
    home = str(tmp_path)
    report = check(str(env), system_paths=SHOWN, home="/home/nobody", private=[], read_write=[home])
    assert not report.ok and any("which the kernel may write" in p for p in report.problems), report.problems
    assert report.ipykernel is None  # its Python did not run: the kernel could have changed it
    report = check(str(tmp_path), system_paths=SHOWN, home=home, private=[])
    assert any("would show the kernel your home directory" in p for p in report.problems)
    assert any("not a Python environment" in p for p in report.problems)
    assert check("relative/env", system_paths=SHOWN, home=home, private=[]).problems == [
        "relative/env is not an absolute path"]
    assert check(str(env / "bin" / "python"), system_paths=SHOWN, home="/h", private=[]).problems[0].endswith(
        "is not a directory (give the environment's directory, not its python)")


def test_check_runs_the_python_and_names_the_package_to_install(tmp_path: Path) -> None:
    """A conda layout whose python is a link to Debian's (which has no ipykernel): the probe really
    runs it, isolated, and the hint is conda's."""
    env = make_conda(tmp_path / "envs" / "a", SYSTEM_PYTHON)
    report = check(str(env), system_paths=SHOWN, home="/home/nobody", private=[], node_tmp=None)
    assert report.kind == "conda" and (report.python_version or "").startswith("3."), report
    assert any(f"install it: conda install -p {env} ipykernel" in p for p in report.problems), report.problems
    assert report.binds == [str(env)]


def test_apply_makes_the_environment_the_kernels_python() -> None:
    profile = validate_profile({"runtime": {"binds": ["/data:ro"]}, "kernel": {"env": {"A": "1"}}}, Path("p.yaml"))
    report = EnvReport(path="/p/env", kind="venv", python="/p/env/bin/python", binds=["/p/py", "/p/env"])
    changed = apply(profile, report, "--python-env")
    assert changed.get("kernel", "python") == "/p/env/bin/python"
    assert changed.get("runtime", "binds") == ["/data:ro", "/p/py:ro", "/p/env:ro"]
    assert changed.get("kernel", "env") == {"A": "1", "PATH": "/p/env/bin:/usr/local/bin:/usr/bin:/bin"}
    assert changed.origins["kernel.python"] == "--python-env" and profile.get("kernel", "python") is None


def test_the_profile_key_and_the_flag_are_checked_like_the_others() -> None:
    profile = validate_profile({"kernel": {"python_env": "~/envs/analysis"}}, Path("p.yaml"))
    assert profile.get("kernel", "python_env") == "~/envs/analysis"
    with pytest.raises(ProfileError, match=r"kernel.python_env: 'envs/a' is not valid: expected the absolute path"):
        validate_profile({"kernel": {"python_env": "envs/a"}}, Path("p.yaml"))
    changed = apply_request(profile, KernelRequest(name="k", python_env="/scratch/u/env"))
    assert changed.get("kernel", "python_env") == "/scratch/u/env"
    assert changed.origins["kernel.python_env"] == "command line (--python-env)"


def test_exec_argv_binds_each_path_at_its_own(tmp_path: Path) -> None:
    argv = exec_argv("apptainer", "/i.sif", ["/p/env:ro", "/p/py"])
    binds = argv[argv.index("--pwd") - 4:argv.index("--pwd")]
    assert binds == ["--bind", "/p/env:/p/env:ro", "--bind", "/p/py:/p/py:ro"]
    assert argv[-1] == "/i.sif" and "--containall" in argv and "--cleanenv" in argv


def test_env_check_says_why_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPC_KERNELS_PROFILE", raising=False)
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))  # no site profile named default here
    assert main(["env", "check", str(tmp_path / "nosuch")]) == 1
    out = capsys.readouterr().out
    assert f"problem: {tmp_path}/nosuch does not exist" in out and "cannot run a kernel" in out


def test_a_c_library_too_old_for_the_environment_is_said_in_plain_words() -> None:
    said = "/home/u/env/bin/python: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found"
    hint = start_failure_hint(said, "apptainer", "/home/u/env")
    assert "needs a newer C library (glibc) than the image's" in hint and "bubblewrap" in hint
    assert start_failure_hint(said, "apptainer", None) == ""
    assert start_failure_hint("No module named ipykernel_launcher", "bwrap", "/home/u/env") == ""
