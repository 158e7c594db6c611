"""Kernelspecs without the cluster: the argv-only kind (``kernelspec install --argv-only``), and
which installed kernelspecs are ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_kernels import kernelspecs
from hpc_kernels.profiles import load_profile


def test_an_argv_only_kernelspec_names_no_provisioner_and_runs_the_bridge() -> None:
    spec = kernelspecs.kernelspec(load_profile("local"), python="/site/bin/python", relay="tcp", provisioner=False)
    assert "kernel_provisioner" not in spec["metadata"]
    assert spec["argv"] == ["/site/bin/python", "-I", "-m", "hpc_kernels.bridge", "-f", "{connection_file}",
                            "--profile", "local", "--relay", "tcp"]
    assert kernelspecs.profile_of(spec) == "local"
    with_provisioner = kernelspecs.kernelspec(load_profile("local"), python="/site/bin/python", relay="tcp")
    assert {k: v for k, v in with_provisioner.items() if k != "metadata"} == {
        k: v for k, v in spec.items() if k != "metadata"}, "the same argv, display name and interrupt mode"
    assert kernelspecs.profile_of(with_provisioner) == "local"


@pytest.mark.parametrize("spec", [
    {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]},
    {"argv": ["python", "-m"]},
    {"argv": []},
    {"metadata": {"kernel_provisioner": {"provisioner_name": "other"}}, "argv": ["x"]},
])
def test_other_kernelspecs_are_not_ours(spec: dict) -> None:  # type: ignore[type-arg]
    assert kernelspecs.profile_of(spec) is None


def test_list_and_remove_find_argv_only_kernelspecs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    spec = kernelspecs.kernelspec(load_profile("local"), provisioner=False)
    where = kernelspecs.install("argv-only", spec, prefix=str(tmp_path))
    other = tmp_path / "share" / "jupyter" / "kernels" / "someone-elses"
    other.mkdir()
    (other / "kernel.json").write_text(json.dumps({"argv": ["python", "-m", "ipykernel_launcher"],
                                                   "display_name": "x", "language": "python"}))
    assert set(kernelspecs.ours()) == {"argv-only"}
    assert Path(kernelspecs.ours()["argv-only"][0]) == Path(where)
    kernelspecs.remove("argv-only")
    assert not kernelspecs.ours()
