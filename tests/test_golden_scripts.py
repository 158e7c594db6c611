"""Golden files: the exact batch script of every shipped profile.

A change to a template or to a shipped profile shows up here as a diff to review. After a
deliberate change, regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_golden_scripts.py`` and
commit the new files with the change. (Apptainer and GPU variants join when those runtimes do.)
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


def test_every_shipped_profile_has_a_golden_file() -> None:
    assert SHIPPED, "no shipped profiles found"
    assert sorted(p.name.removesuffix(".sbatch") for p in GOLDEN.glob("*.sbatch")) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_script_matches_golden_file(name: str) -> None:
    profile = parse_profile(data_dir("site-configs") / f"{name}.yaml")
    profile = dataclasses.replace(profile, source=Path("site-configs") / f"{name}.yaml")
    script = render_kernel_script(profile, kernel_name="golden", state_dir=STATE, log_path=STATE / "job.log",
                                  python="/opt/hpc-kernels/venv/bin/python3")
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
