"""Golden files: the exact batch script of every shipped profile, and what every profile would run
on a node with either runtime, with and without a GPU.

A change to a template, a shipped profile or a runtime's command line shows up here as a diff to
review. After a deliberate change, regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_golden_scripts.py``
and commit the new files with the change.

- ``golden/<profile>.sbatch`` and ``.step``: the profile as shipped, as a new job and as a step of
  the user's allocation (job 4242 here).
- ``golden/<profile>.batch``: the job array of a batch of notebooks (tasks 0-99, 8 at once).
- ``golden/matrix/<profile>.<bwrap|apptainer>.<cpu|gpu>``: the profile turned to that runtime (an
  example image where it has none) and to one GPU or none: the batch script, the agent's
  launch.json, and the runtime command line the agent builds from them on a node where Slurm
  allocated GPU 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path

import pytest

from hpc_kernels import profiles
from hpc_kernels.launcher import launch_spec
from hpc_kernels.profiles import KernelRequest, Profile, parse_profile
from hpc_kernels.render import render_batch_script, render_kernel_script
from hpc_kernels.resources import data_dir
from hpc_kernels.runtimes import (PodmanStorage, SandboxSpec, gpu_device_paths, kernel_argv, podman_command_line,
                                  podman_environment, sandbox_argv, sandbox_environment)

GOLDEN = Path(__file__).parent / "golden"
MATRIX = GOLDEN / "matrix"
SHIPPED = sorted(p.stem for p in data_dir("site-configs").glob("*.yaml"))
HOME = "/home/user"
STATE = Path(f"{HOME}/.local/share/hpc-kernels/kernels/golden")
PYTHON = "/opt/hpc-kernels/venv/bin/python3"
EXAMPLE_IMAGE = "/shared/images/kernel.sif"
EXAMPLE_REFERENCE = "localhost/hpc-kernels/kernel:latest"
RUNTIMES = ("bwrap", "apptainer", "podman")
NODE_DIR = "/tmp/hk-4242-golden"


@pytest.fixture(autouse=True)
def fixed_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same home, state root and no config files, whoever runs the tests."""
    monkeypatch.setenv("HOME", HOME)
    monkeypatch.setenv("XDG_DATA_HOME", f"{HOME}/.local/share")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.delenv("HPC_KERNELS_PATHS_STATE", raising=False)
    monkeypatch.setattr(profiles, "SITE_CONFIG", tmp_path / "no-site-config.yaml")


def shipped(name: str) -> Profile:
    profile = parse_profile(data_dir("site-configs") / f"{name}.yaml")
    return dataclasses.replace(profile, source=Path("site-configs") / f"{name}.yaml")


def script(profile: Profile, allocation: str | None = None) -> str:
    return render_kernel_script(profile, kernel_name="golden", state_dir=STATE, log_path=STATE / "job.log",
                                python=PYTHON, allocation=allocation)


def check(golden: Path, text: str) -> None:
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_every_shipped_profile_has_golden_files() -> None:
    assert SHIPPED, "no shipped profiles found"
    for suffix in ("sbatch", "step", "batch"):
        assert sorted(p.name.removesuffix(f".{suffix}") for p in GOLDEN.glob(f"*.{suffix}")) == SHIPPED
    expected = sorted(f"{n}.{r}.{d}" for n in SHIPPED for r in RUNTIMES for d in ("cpu", "gpu"))
    assert sorted(p.name for p in MATRIX.iterdir()) == expected


@pytest.mark.parametrize("mode", ["sbatch", "step"])
@pytest.mark.parametrize("name", SHIPPED)
def test_script_matches_golden_file(name: str, mode: str) -> None:
    check(GOLDEN / f"{name}.{mode}", script(shipped(name), "4242" if mode == "step" else None))


@pytest.mark.parametrize("name", SHIPPED)
def test_batch_script_matches_golden_file(name: str) -> None:
    batch_dir = Path(f"{HOME}/.local/share/hpc-kernels/batches/golden-1")
    check(GOLDEN / f"{name}.batch", render_batch_script(shipped(name), batch_name="golden-1", batch_dir=batch_dir,
                                                         log_dir=batch_dir / "logs", array="0-99%8", python=PYTHON))


def variant(profile: Profile, runtime: str, device: str) -> Profile:
    settings = {section: dict(values) for section, values in profile.settings.items()}
    settings["runtime"]["kind"] = runtime
    own = profile.get("runtime", "kind") == runtime
    settings["runtime"]["image"] = (profile.get("runtime", "image") if own else None) or \
        {"apptainer": EXAMPLE_IMAGE, "podman": EXAMPLE_REFERENCE}.get(runtime)
    if runtime == "podman":
        settings["runtime"]["executable"] = None
    else:
        settings["runtime"]["image_archive"] = None
    settings["slurm"]["gpus"] = (profile.get("slurm", "gpus") or "1") if device == "gpu" else None
    return dataclasses.replace(profile, settings=settings)


def one_per_line(argv: list[str]) -> str:
    """The command line, a new line before each option, as a person would write it."""
    out = shlex.quote(argv[0])
    for arg in argv[1:]:
        out += (" \\\n    " if arg.startswith("--") else " ") + shlex.quote(arg)
    return out


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", SHIPPED)
def test_launch_matrix_matches_golden_file(name: str, runtime: str, device: str) -> None:
    profile = variant(shipped(name), runtime, device)
    launch = launch_spec(profile, KernelRequest(name="golden", workspace=f"{HOME}/project"), PYTHON)
    gpus = device == "gpu"
    spec = SandboxSpec(node_dir=NODE_DIR, hide=launch["hide"], workspace=launch["workspace"],
                       workspace_rw=launch["workspace_rw"], binds=launch["binds"], gpus=gpus,
                       gpu_devices=gpu_device_paths({"SLURM_JOB_GPUS": "0"}, ["/dev/nvidia0", "/dev/nvidiactl"])
                       if gpus else ())
    command = kernel_argv(launch["kernel_command"], python=launch["kernel_python"],
                          connection_file=f"{NODE_DIR}/kernel.json")
    podman = None
    if runtime == "podman":  # as the agent gives it, with node storage under the node's /tmp
        storage = PodmanStorage("/tmp/hk-podman-1000/storage", "/tmp/hk-podman-1000/run", "/tmp/hk-podman-1000/tmp")
        env = sandbox_environment({"SLURM_JOB_ID": "4242", "LANG": "C.UTF-8", "PATH": "/usr/bin"}, launch["kernel_env"])
        _, names, values = podman_environment({}, env, {"HOME": "/tmp/hk-podman-1000/home"})
        podman = {"podman": podman_command_line(profile.section("runtime"), storage), "name": "hk-4242-golden",
                  "labels": {"hpc-kernels.job": "4242", "hpc-kernels.kernel": "golden", "hpc-kernels.user": "alice"},
                  "env_names": names, "env_values": {**values, "HOME": "/tmp"},
                  "gpu_mode": launch["podman"]["gpus"], "gpu_indices": ["0"] if gpus else []}
    argv = sandbox_argv(runtime, spec, command, executable=launch["runtime_executable"] or runtime,
                        image=launch["image"], empty_dir=f"{NODE_DIR}/empty", podman=podman)
    text = (script(profile) + "\n# ---- launch.json (the agent's instructions; no secret in it)\n"
            + json.dumps(launch, indent=2, sort_keys=True) + "\n\n# ---- the runtime command line on the node\n"
            + one_per_line(argv) + "\n")
    check(MATRIX / f"{name}.{runtime}.{device}", text)
