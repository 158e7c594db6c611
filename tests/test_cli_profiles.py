"""`hpc-kernel profiles list/show/validate` and `render`, through the CLI's own entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_kernels.cli import main


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-user-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("HPC_KERNELS_PROFILE", raising=False)
    return tmp_path


def test_validate_exits_nonzero_on_any_error(profile_dir: Path, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "base.yaml").write_text("slurm:\n  account: proj\n")
    (site / "cpu.yaml").write_text("extends: base\nslurm:\n  partition: debug\n")
    (site / "bad.yaml").write_text("extends: base\nslurm:\n  cpus: many\n")
    assert main(["profiles", "validate", str(site / "base.yaml"), str(site / "cpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"ok: {site / 'cpu.yaml'}" in out
    assert main(["profiles", "validate", str(site / "cpu.yaml"), str(site / "bad.yaml")]) == 1
    captured = capsys.readouterr()
    assert f"ok: {site / 'cpu.yaml'}" in captured.out
    assert f"error: {site / 'bad.yaml'}:3: slurm.cpus: 'many' is not valid" in captured.err


def test_list_shows_sources_and_marks_invalid_profiles(profile_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (profile_dir / "gpu.yaml").write_text("description: GPUs\nslurm: {partition: gpu}\n")
    (profile_dir / "broken.yaml").write_text("slurm: {time: never}\n")
    assert main(["profiles", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "RUNTIME", "PARTITION", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert str(profile_dir / "gpu.yaml") in rows["gpu"] and "bwrap" in rows["gpu"] and "GPUs" in rows["gpu"]
    assert "INVALID" in rows["broken"] and "slurm.time" in rows["broken"]
    assert "local" in rows


def test_show_explain_names_the_origin_of_each_value(profile_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (profile_dir / "mine.yaml").write_text("extends: local\nslurm:\n  cpus: 4\n")
    assert main(["profiles", "show", "mine", "--explain"]) == 0
    out = capsys.readouterr().out
    cpus = next(line for line in out.splitlines() if line.strip().startswith("cpus:"))
    assert cpus.split("#")[1].strip() == f"{profile_dir / 'mine.yaml'}:3"
    partition = next(line for line in out.splitlines() if line.strip().startswith("partition:"))
    assert partition.split("#")[1].strip().endswith("local.yaml:6")
    qos = next(line for line in out.splitlines() if line.strip().startswith("qos:"))
    assert qos.split("#")[1].strip() == "default"


def test_render_prints_the_script_submit_would_send(profile_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--profile", "local", "--name", "r1", "--time", "0:30:00", "--no-workspace"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --time=0:30:00" in script and "#SBATCH --job-name=hk-r1" in script
    assert f"{profile_dir / 'data'}/hpc-kernels/kernels/r1" in script
    assert not (profile_dir / "data" / "hpc-kernels" / "kernels" / "r1").exists(), "render writes nothing"


def test_no_profile_and_no_default_lists_the_known_ones(profile_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--no-workspace"]) == 1
    assert "give --profile NAME" in capsys.readouterr().err


def test_a_site_default_profile_is_used(profile_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (profile_dir / "default.yaml").write_text("extends: local\nslurm: {partition: short}\n")
    assert main(["render", "--no-workspace"]) == 0
    assert "#SBATCH --partition=short" in capsys.readouterr().out
