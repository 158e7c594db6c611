"""Golden files: the exact batch script of every shipped profile.

A change to a template or to a shipped profile shows up here as a diff to review. After a
deliberate change, regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_golden_scripts.py`` and
commit the new files with the change. The runtime (bubblewrap or Apptainer) does not show in the
script (the node agent reads it from launch.json); GPU requests do, in one --gres line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from hpc_kernels.profiles import parse_profile
from hpc_kernels.render import render_kernel_script
from hpc_kernels.resources import data_dir

GOLDEN = Path(__file__).parent / "golden"
SHIPPED = sorted(p.stem for p in data_dir("site-configs").glob("*.yaml"))
STATE = Path("/home/user/.local/share/hpc-kernels/kernels/golden")


def test_every_shipped_profile_has_golden_files() -> None:
    assert SHIPPED, "no shipped profiles found"
    for suffix in ("sbatch", "step"):
        assert sorted(p.name.removesuffix(f".{suffix}") for p in GOLDEN.glob(f"*.{suffix}")) == SHIPPED


@pytest.mark.parametrize("mode", ["sbatch", "step"])
@pytest.mark.parametrize("name", SHIPPED)
def test_script_matches_golden_file(name: str, mode: str) -> None:
    """``sbatch``: a new job; ``step``: a step of the user's allocation (job 4242 here)."""
    profile = parse_profile(data_dir("site-configs") / f"{name}.yaml")
    profile = dataclasses.replace(profile, source=Path("site-configs") / f"{name}.yaml")
    script = render_kernel_script(profile, kernel_name="golden", state_dir=STATE, log_path=STATE / "job.log",
                                  python="/opt/hpc-kernels/venv/bin/python3",
                                  allocation="4242" if mode == "step" else None)
    golden = GOLDEN / f"{name}.{mode}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
