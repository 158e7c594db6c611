"""The sandbox command lines (pure functions; the cluster tests run them for real)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hpc_kernels.runtimes import (
    SANDBOX_HOME,
    SandboxSpec,
    apptainer_argv,
    apptainer_process_environment,
    bwrap_argv,
    gpu_device_paths,
    has_gpus,
    sandbox_environment,
)


def pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def singles(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_bwrap_isolates_everything() -> None:
    argv = bwrap_argv(SandboxSpec(node_dir="/tmp/hk-1-abc", hide=["/home"]), ["python", "-m", "k"])
    assert argv[0] == "bwrap"
    for flag in ("--unshare-all", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--disable-userns" not in argv, "only where the node's bwrap has it (the agent asks it)"
    assert "--disable-userns" in bwrap_argv(SandboxSpec(node_dir="/d", hide=[], disable_userns=True), ["k"])
    # Deny by default: only the system paths of the node, never its root (/var, /run, /home, /sys)
    assert ("/", "/") not in pairs(argv, "--ro-bind")
    assert {"/usr", "/etc", "/opt"} <= {a for a, b in pairs(argv, "--ro-bind") if a == b}
    assert not any(path.startswith(("/var", "/run", "/sys", "/home")) for path in singles(argv, "--ro-bind"))
    assert "/tmp" in singles(argv, "--tmpfs")
    # The node directory: its rw/ part read-write, ro/ read-only, nothing else of it
    assert pairs(argv, "--bind") == [("/tmp/hk-1-abc/rw", "/tmp/hk-1-abc/rw")]
    assert ("/tmp/hk-1-abc/ro", "/tmp/hk-1-abc/ro") in pairs(argv, "--ro-bind")
    assert "/tmp/hk-1-abc" not in argv
    assert argv[argv.index("--") + 1:] == ["python", "-m", "k"]
    assert singles(argv, "--chdir") == [SANDBOX_HOME]


def test_bwrap_shows_links_as_links_and_sys_only_with_gpus() -> None:
    spec = SandboxSpec(node_dir="/d", hide=[], system_paths=["/usr", "/etc"], system_links=[("/bin", "usr/bin")])
    argv = bwrap_argv(spec, ["k"])
    assert [a for a, b in pairs(argv, "--ro-bind") if a == b][:2] == ["/usr", "/etc"]
    assert pairs(argv, "--symlink") == [("usr/bin", "/bin")]
    assert "/sys" not in argv
    assert ("/sys", "/sys") in pairs(bwrap_argv(SandboxSpec(node_dir="/d", hide=[], gpus=True), ["k"]), "--ro-bind")


def test_hidden_paths_are_sorted_and_not_nested() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=["/opt/x", "/etc/u/.local/share/x", "/etc/u", "/etc/u/", "/home"])
    # /home is not shown at all (not a system path): nothing to hide there
    assert singles(bwrap_argv(spec, ["k"]), "--tmpfs") == ["/tmp", "/etc/u", "/opt/x"]


def test_root_and_tmp_are_never_hidden_twice() -> None:
    argv = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=["/", "/tmp"]), ["k"])
    assert singles(argv, "--tmpfs") == ["/tmp"]


def test_workspace_read_only_by_default_and_bound_after_hiding() -> None:
    ro = bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=["/home"], workspace="/home/u/proj",
                                system_paths=["/usr", "/home"]), ["k"])
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
                       binds=["/scratch/p:ro", "/datasets", "/scratch/out:rw"], system_paths=["/usr", "/scratch"])
    argv = bwrap_argv(spec, ["k"])
    assert ("/scratch/p", "/scratch/p") in pairs(argv, "--ro-bind")
    assert ("/datasets", "/datasets") in pairs(argv, "--ro-bind"), "read-only unless :rw"
    assert ("/scratch/out", "/scratch/out") in pairs(argv, "--bind")
    assert argv.index("/scratch/p") > argv.index("/scratch"), "binds go on top of the tmpfs"
    assert singles(argv, "--tmpfs")[-1] == "/scratch/p/secret", "re-hidden after the bind"


# --- GPUs -------------------------------------------------------------------------------------


def test_gpu_devices_follow_what_slurm_allocated() -> None:
    present = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert gpu_device_paths({"SLURM_JOB_GPUS": "1,2"}, present) == [
        "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert gpu_device_paths({"SLURM_STEP_GPUS": "0", "SLURM_JOB_GPUS": "0,1"}, present)[0] == "/dev/nvidia0", \
        "a step's own GPUs win over the job's"
    assert gpu_device_paths({}, present) == [], "no GPU allocated, no device bound"
    assert gpu_device_paths({"SLURM_JOB_GPUS": "3"}, present) == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert has_gpus({"SLURM_JOB_GPUS": "0"}) and not has_gpus({"SLURM_JOB_GPUS": ""}) and not has_gpus({})


def test_bwrap_binds_gpu_devices_into_its_minimal_dev() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=[], gpu_devices=["/dev/nvidia0", "/dev/nvidiactl"], gpus=True)
    argv = bwrap_argv(spec, ["k"])
    assert pairs(argv, "--dev-bind") == [("/dev/nvidia0", "/dev/nvidia0"), ("/dev/nvidiactl", "/dev/nvidiactl")]
    assert argv.index("--dev-bind") > argv.index("--dev"), "bound on top of the minimal /dev"
    assert "--dev-bind" not in bwrap_argv(SandboxSpec(node_dir="/tmp/d", hide=[]), ["k"])


# --- Apptainer --------------------------------------------------------------------------------


def test_apptainer_isolates_and_runs_the_kernel_in_the_image() -> None:
    spec = SandboxSpec(node_dir="/tmp/hk-1-abc", hide=["/home"], workspace="/home/u/proj")
    argv = apptainer_argv(spec, ["python3", "-m", "k"], "/images/k.sif", apptainer="/usr/bin/apptainer")
    assert argv[:2] == ["/usr/bin/apptainer", "exec"]
    for flag in ("--containall", "--no-home", "--cleanenv"):
        assert flag in argv
    assert argv[argv.index("--net"):argv.index("--net") + 3] == ["--net", "--network", "none"]
    assert singles(argv, "--home") == [SANDBOX_HOME], "HOME inside is the private /tmp, not the user's"
    assert singles(argv, "--no-mount") == ["bind-paths"], "the site's default binds stay out"
    assert "/tmp/hk-1-abc/rw:/tmp/hk-1-abc/rw:rw" in singles(argv, "--bind")
    assert "/tmp/hk-1-abc/ro:/tmp/hk-1-abc/ro:ro" in singles(argv, "--bind")
    assert not any(b.startswith("/tmp/hk-1-abc:") for b in singles(argv, "--bind"))
    assert "/home/u/proj:/home/u/proj:ro" in singles(argv, "--bind"), "the workspace is read-only by default"
    assert singles(argv, "--pwd") == ["/home/u/proj"]
    assert argv[-4:] == ["/images/k.sif", "python3", "-m", "k"]
    assert "--nv" not in argv


def test_apptainer_rw_workspace_binds_and_gpus() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=[], workspace="/w", workspace_rw=True,
                       binds=["/datasets", "/scratch/out:rw"], gpus=True, gpu_devices=["/dev/nvidia0"])
    argv = apptainer_argv(spec, ["k"], "/i.sif")
    assert "/w:/w:rw" in singles(argv, "--bind")
    assert "/datasets:/datasets:ro" in singles(argv, "--bind"), "read-only unless :rw"
    assert "/scratch/out:/scratch/out:rw" in singles(argv, "--bind")
    assert "--nv" in argv and argv.index("--nv") < argv.index("/i.sif")
    assert singles(argv, "--pwd") == ["/w"]


def test_apptainer_hides_paths_inside_binds_with_an_empty_directory() -> None:
    spec = SandboxSpec(node_dir="/tmp/d", hide=["/scratch", "/scratch/p/secret"], binds=["/scratch/p"])
    argv = apptainer_argv(spec, ["k"], "/i.sif", empty_dir="/tmp/d/empty")
    binds = singles(argv, "--bind")
    assert binds.index("/tmp/d/empty:/scratch/p/secret:ro") > binds.index("/scratch/p:/scratch/p:ro")
    with pytest.raises(ValueError, match="empty directory"):
        apptainer_argv(spec, ["k"], "/i.sif")


def test_apptainer_process_environment_carries_the_kernel_env_and_no_site_binds() -> None:
    host = {"PATH": "/usr/bin", "HOME": "/home/u", "APPTAINER_BINDPATH": "/scratch", "SINGULARITY_BIND": "/x",
            "SSH_AUTH_SOCK": "/tmp/a", "APPTAINER_CACHEDIR": "/c", "LANG": "C.UTF-8"}
    kernel = sandbox_environment({"PATH": "/opt/venv/bin", "CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "7"},
                                 {"MPLBACKEND": "Agg"})
    env = apptainer_process_environment(host, kernel)
    assert env["PATH"] == "/usr/bin" and env["APPTAINER_CACHEDIR"] == "/c"
    assert "APPTAINER_BINDPATH" not in env and "SINGULARITY_BIND" not in env and "SSH_AUTH_SOCK" not in env
    assert env["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == "0", "Slurm's GPU choice survives --cleanenv"
    assert env["APPTAINERENV_SLURM_JOB_ID"] == "7" and env["APPTAINERENV_MPLBACKEND"] == "Agg"
    assert "APPTAINERENV_PATH" not in env and "APPTAINERENV_HOME" not in env, "the image keeps its PATH"


def test_bwrap_sizes_every_tmpfs_when_told() -> None:
    spec = SandboxSpec(node_dir="/d", hide=["/etc/secret"], workspace="/etc/w", tmpfs_size=1 << 30,
                       system_paths=["/usr", "/etc"])
    argv = bwrap_argv(spec, ["k"])
    tmpfs = [i for i, a in enumerate(argv) if a == "--tmpfs"]
    assert len(tmpfs) == 2 and all(argv[i - 2:i] == ["--size", str(1 << 30)] for i in tmpfs)
    assert "--size" not in bwrap_argv(SandboxSpec(node_dir="/d", hide=[]), ["k"])


def test_a_hidden_path_is_hidden_under_its_real_path_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A home that is a link (/home/u -> /gpfs/home/u) must not stay readable at /gpfs/home/u."""
    from hpc_kernels.node_view import hidden_here, python_prefixes

    real = tmp_path / "gpfs" / "home" / "u"
    real.mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "u").symlink_to(real)
    assert hidden_here([str(tmp_path / "home" / "u"), str(tmp_path / "nowhere")]) == sorted(
        [str(tmp_path / "home" / "u"), str(real)])
    venv = tmp_path / "gpfs" / "envs" / "e"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    assert python_prefixes(str(venv / "bin" / "python"), ["/usr", "/opt"]) == [str(venv)], \
        "the env's prefix is shown; its base Python (/usr) already is"
    assert python_prefixes("python3", ["/usr"]) == []


# --- podman -----------------------------------------------------------------------------------

from hpc_kernels import podman_node  # noqa: E402
from hpc_kernels.runtimes import (  # noqa: E402
    PodmanStorage,
    gpu_indices,
    podman_argv,
    podman_command_line,
    podman_environment,
    podman_global_argv,
    sandbox_argv as any_sandbox_argv,
)

POD_SPEC = SandboxSpec(node_dir="/tmp/hk-1-abc", hide=["/home", "/home/u/ws/.state", "/srv"], workspace="/home/u/ws",
                       binds=["/data:ro", "/scratch/u:rw"], tmpfs_size=1 << 30)
POD_KERNEL = ["python3", "-m", "ipykernel_launcher", "-f", "/tmp/hk-1-abc/rw/kernel.json"]


def values_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_podman_global_options_name_the_storage_and_the_oci_runtime() -> None:
    storage = PodmanStorage("/tmp/p/storage", "/tmp/p/run", "/tmp/p/tmp")
    assert podman_global_argv(storage, "runc") == [
        "--root", "/tmp/p/storage", "--runroot", "/tmp/p/run", "--tmpdir", "/tmp/p/tmp", "--events-backend", "file",
        "--storage-driver", "overlay", "--runtime", "runc"]
    assert podman_global_argv(None, None) == [], "site storage: podman's own configuration decides"
    assert podman_command_line({"podman_command": "podman-hpc"}) == ["podman-hpc"]


def test_podman_isolates_and_runs_the_kernel_in_the_image() -> None:
    argv = podman_argv(POD_SPEC, POD_KERNEL, "localhost/k:1", podman=["podman", "--runtime", "runc"], name="hk-1-k",
                       labels={"hpc-kernels.job": "1"}, env_names=["LANG"], env_values={"HOME": "/tmp"})
    assert argv[:4] == ["podman", "--runtime", "runc", "run"]
    for flag in ("--rm", "--replace", "--init", "--read-only", "--http-proxy=false", "--read-only-tmpfs=false"):
        assert flag in argv
    assert values_of(argv, "--pull") == ["never"] and values_of(argv, "--name") == ["hk-1-k"]
    assert values_of(argv, "--network") == ["none"] and values_of(argv, "--userns") == ["keep-id"]
    assert values_of(argv, "--cap-drop") == ["ALL"] and values_of(argv, "--security-opt") == ["no-new-privileges"]
    assert values_of(argv, "--label") == ["hpc-kernels.job=1"]
    assert values_of(argv, "--tmpfs")[0] == f"/tmp:rw,nosuid,nodev,size={1 << 30}"
    assert values_of(argv, "--volume") == ["/data:/data:ro", "/scratch/u:/scratch/u:rw", "/tmp/hk-1-abc/rw:/tmp/hk-1-abc/rw:rw",
                                       "/tmp/hk-1-abc/ro:/tmp/hk-1-abc/ro:ro", "/home/u/ws:/home/u/ws:ro"]
    # only hidden paths inside a bind: the image is not the node
    assert values_of(argv, "--tmpfs")[1:] == ["/home/u/ws/.state:ro,nosuid,nodev,noexec,size=4k"]
    assert "--memory" not in argv and "--pids-limit" not in argv, "not given: the node's cgroups cannot"
    assert values_of(argv, "--workdir") == ["/home/u/ws"]
    assert argv[-6:] == ["localhost/k:1", *POD_KERNEL]
    assert not any(arg.startswith(("--volume=/home", "/home:")) for arg in argv), "no home"


def test_podman_workspace_rw_limits_and_no_workspace() -> None:
    spec = SandboxSpec(node_dir="/tmp/hk-1-abc", hide=[], workspace="/w", workspace_rw=True)
    argv = podman_argv(spec, ["k"], "i", name="n", memory=1000, processes=64)
    assert "/w:/w:rw" in values_of(argv, "--volume")
    assert values_of(argv, "--memory") == ["1000"] and values_of(argv, "--memory-swap") == ["1000"]
    assert values_of(argv, "--pids-limit") == ["64"]
    bare = podman_argv(SandboxSpec(node_dir="/n", hide=[]), ["k"], "i", name="n")
    assert values_of(bare, "--workdir") == ["/tmp"] and values_of(bare, "--tmpfs") == ["/tmp:rw,nosuid,nodev"]


def test_podman_refuses_a_path_it_would_split() -> None:
    with pytest.raises(ValueError, match="':' or ','"):
        podman_argv(SandboxSpec(node_dir="/n", hide=[], workspace="/w:x"), ["k"], "i", name="n")


@pytest.mark.parametrize("mode, expected", [
    ("cdi", ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=2"]),
    ("podman-hpc", ["--gpu"]),
    ("devices", ["--device", "/dev/nvidia0:/dev/nvidia0:rwm", "--device", "/dev/nvidiactl:/dev/nvidiactl:rwm"]),
])
def test_podman_gpus_per_mode(mode: str, expected: list[str]) -> None:
    spec = SandboxSpec(node_dir="/n", hide=[], gpus=True, gpu_devices=["/dev/nvidia0", "/dev/nvidiactl"])
    argv = podman_argv(spec, ["k"], "i", name="n", gpu_mode=mode, gpu_indices=gpu_indices({"SLURM_STEP_GPUS": "0,2"}))
    got = [a for i, a in enumerate(argv) if a in ("--device", "--gpu") or (i and argv[i - 1] == "--device")]
    assert got == expected
    no_gpus = podman_argv(SandboxSpec(node_dir="/n", hide=[]), ["k"], "i", name="n", gpu_mode=mode, gpu_indices=["0"])
    assert "--device" not in no_gpus and "--gpu" not in no_gpus


def test_podman_environment_goes_by_name_and_podman_reads_only_its_own() -> None:
    host = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "API_TOKEN": "secret", "CONTAINERS_CONF": "/evil",
            "XDG_CONFIG_HOME": "/home/u/.config", "SLURM_JOB_ID": "7"}
    kernel = {"PATH": "/node/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "SLURM_JOB_ID": "7", "IPYTHONDIR": "/n/rw/ipy",
              "TMPDIR": "/tmp"}
    own = {"HOME": "/tmp/hk-podman-1/home", "XDG_RUNTIME_DIR": "/tmp/hk-podman-1/xdg"}
    env, names, values = podman_environment(host, kernel, own)
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "SLURM_JOB_ID": "7", "IPYTHONDIR": "/n/rw/ipy", **own}
    assert names == ["LANG", "SLURM_JOB_ID", "IPYTHONDIR"]
    assert values == {"HOME": "/tmp", "TMPDIR": "/tmp"}, "what podman itself reads goes with its value"
    argv = podman_argv(SandboxSpec(node_dir="/n", hide=[]), ["k"], "i", name="n", env_names=names, env_values=values)
    assert values_of(argv, "--env") == ["LANG", "SLURM_JOB_ID", "IPYTHONDIR", "HOME=/tmp", "TMPDIR=/tmp"]
    assert "secret" not in " ".join(argv) and "API_TOKEN" not in env


def test_sandbox_argv_dispatches_to_podman() -> None:
    argv = any_sandbox_argv("podman", SandboxSpec(node_dir="/n", hide=[]), ["k"], executable="podman", image="i",
                            podman={"podman": ["podman"], "name": "n"})
    assert argv[:2] == ["podman", "run"]
    with pytest.raises(ValueError, match="needs an image"):
        any_sandbox_argv("podman", SandboxSpec(node_dir="/n", hide=[]), ["k"], executable="podman")


def test_stale_containers_are_those_of_ended_jobs() -> None:
    listing = [{"Names": ["hk-5-a"], "Labels": {"hpc-kernels.job": "5"}},
               {"Names": ["hk-6-b"], "Labels": {"hpc-kernels.job": "6"}},
               {"Names": ["hk-7-c"], "Labels": {"hpc-kernels.job": "7"}},  # this job
               {"Names": ["theirs"], "Labels": {}}, {"Names": [], "Labels": {"hpc-kernels.job": "8"}}]
    asked = []

    def alive(jobs):  # type: ignore[no-untyped-def]
        asked.append(list(jobs))
        return {"6"}

    assert podman_node.stale_containers(listing, "7", alive) == ["hk-5-a"]
    assert asked == [["5", "6"]]
    assert podman_node.stale_containers(listing[2:], "7", alive) == [] and len(asked) == 1


def test_the_podman_user_dir_is_private_and_ours(tmp_path) -> None:  # type: ignore[no-untyped-def]
    where = podman_node.places(tmp_path, "job", "42", {})
    assert where.user_dir.stat().st_mode & 0o777 == 0o700
    assert where.job_dir == where.user_dir / "job-42" and where.storage is not None
    assert where.storage.root == str(where.user_dir / "job-42" / "storage")
    assert where.environment["HOME"] == str(where.user_dir / "home"), "no configuration from the user's home"
    assert podman_node.places(tmp_path, "site", "42", {"HOME": "/home/u"}).storage is None
    other = tmp_path / "o"
    other.mkdir()
    (other / f"hk-podman-{__import__('os').getuid()}").symlink_to(tmp_path)
    with pytest.raises(podman_node.PodmanNodeError, match="not a private directory"):
        podman_node.user_dir(other)
    assert podman_node.stale_job_dirs(where.user_dir, "43", lambda jobs: set()) == [where.job_dir]
    assert podman_node.stale_job_dirs(where.user_dir, "42", lambda jobs: set()) == []


def test_a_dead_pause_process_is_forgotten_a_live_one_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job's end kills the rootless pause process; its pid file would stop podman 5 in the next
    job. Only a live catatonit of ours keeps its file (a real catatonit where installed)."""
    import shutil
    import subprocess
    import sys
    where = podman_node.places(tmp_path, "node", "42", {})
    assert where.storage is not None
    runtime_dir = Path(where.environment["XDG_RUNTIME_DIR"])
    old, new = podman_node.pause_pid_files(where.storage, runtime_dir)
    new.parent.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old.write_text(f"{gone.pid}\n")
    new.write_text(f"{__import__('os').getpid()}\n")  # alive, but not a pause process
    podman_node.forget_dead_pause_process(where.storage, runtime_dir)
    assert not old.exists() and not new.exists()
    if shutil.which("catatonit"):
        pause = subprocess.Popen(["catatonit", "-P"])
        try:
            time.sleep(0.2)
            old.write_text(f"{pause.pid}\n")
            podman_node.forget_dead_pause_process(where.storage, runtime_dir)
            assert old.exists()
        finally:
            pause.kill()
            pause.wait()
