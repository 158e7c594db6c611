"""The sandbox command lines (pure functions; the cluster tests run them for real)."""

from __future__ import annotations

from hpc_kernels.runtimes import SANDBOX_HOME, SandboxSpec, bwrap_argv, sandbox_environment


def pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def singles(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_bwrap_isolates_everything() -> None:
    argv = bwrap_argv(SandboxSpec(node_dir="/tmp/hk-1-abc", hide=["/home"]), ["python", "-m", "k"])
    assert argv[0] == "bwrap"
    for flag in ("--unshare-all", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert ("/", "/") in pairs(argv, "--ro-bind")
    assert "/tmp" in singles(argv, "--tmpfs")
    assert ("/tmp/hk-1-abc", "/tmp/hk-1-abc") in pairs(argv, "--bind")
    assert argv[argv.index("--") + 1:] == ["python", "-m", "k"]
    assert singles(argv, "--chdir") == [SANDBOX_HOME]


def test_hidden_paths_are_sorted_and_not_nested() -> None:
    argv = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=["/run", "/home/u/.local/share/x", "/home", "/home/"]), ["k"])
    assert singles(argv, "--tmpfs") == ["/tmp", "/home", "/run"]


def test_root_and_tmp_are_never_hidden_twice() -> None:
    argv = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=["/", "/tmp"]), ["k"])
    assert singles(argv, "--tmpfs") == ["/tmp"]


def test_workspace_read_only_by_default_and_bound_after_hiding() -> None:
    ro = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=["/home"], workspace="/home/u/proj"), ["k"])
    assert ("/home/u/proj", "/home/u/proj") in pairs(ro, "--ro-bind")
    assert ro.index("/home/u/proj") > ro.index("/home"), "a bind under a hidden path must come after the tmpfs"
    assert singles(ro, "--chdir") == ["/home/u/proj"]
    rw = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=[], workspace="/home/u/proj", workspace_rw=True), ["k"])
    assert ("/home/u/proj", "/home/u/proj") in pairs(rw, "--bind")


def test_environment_is_an_allowlist() -> None:
    job_env = {"PATH": "/usr/bin", "SLURM_JOB_ID": "7", "LC_ALL": "C", "CUDA_VISIBLE_DEVICES": "0",
               "HOME": "/home/u", "SSH_AUTH_SOCK": "/tmp/agent", "AWS_SECRET_ACCESS_KEY": "x"}
    env = sandbox_environment(job_env, {"MPLBACKEND": "Agg"})
    assert env["SLURM_JOB_ID"] == "7" and env["LC_ALL"] == "C" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["HOME"] == SANDBOX_HOME and env["MPLBACKEND"] == "Agg"
    assert "SSH_AUTH_SOCK" not in env and "AWS_SECRET_ACCESS_KEY" not in env


def test_hidden_paths_inside_the_workspace_stay_hidden() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=["/home", "/home/u/.local/share/hpc-kernels"], workspace="/home/u")
    argv = bwrap_argv(spec, ["k"])
    bind = argv.index("/home/u")
    assert argv[bind - 1] == "--ro-bind"
    after = argv[bind + 2:]
    assert after[:2] == ["--tmpfs", "/home/u/.local/share/hpc-kernels"]


def test_binds_come_after_hiding_and_keep_hidden_paths_hidden() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=["/scratch", "/scratch/p/secret"],
                       binds=["/scratch/p:ro", "/datasets", "/scratch/out:rw"])
    argv = bwrap_argv(spec, ["k"])
    assert ("/scratch/p", "/scratch/p") in pairs(argv, "--ro-bind")
    assert ("/datasets", "/datasets") in pairs(argv, "--ro-bind"), "read-only unless :rw"
    assert ("/scratch/out", "/scratch/out") in pairs(argv, "--bind")
    assert argv.index("/scratch/p") > argv.index("/scratch"), "binds go on top of the tmpfs"
    assert singles(argv, "--tmpfs")[-1] == "/scratch/p/secret", "re-hidden after the bind"
