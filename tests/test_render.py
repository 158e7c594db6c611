"""Rendering the kernel job script from a profile (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.profiles import parse_profile
from hpc_kernels.render import render_kernel_script


def profile_from(tmp_path: Path, text: str):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return parse_profile(path)


def render(profile, tmp_path: Path, **kw) -> str:
    state = tmp_path / "state"
    args = dict(kernel_name="demo", state_dir=state, log_path=state / "job.log", python="/opt/venv/bin/python")
    args.update(kw)
    return render_kernel_script(profile, **args)


def test_script_carries_the_profile(tmp_path: Path) -> None:
    profile = profile_from(tmp_path, """
slurm:
  partition: gpu
  account: proj42
  qos: interactive
  time: "2:00:00"
  cpus: 4
  mem: 8G
  extra_options: ["--exclusive", "--licenses=matlab:1"]
  modules: [cuda/12.2, python/3.11]
""")
    script = render(profile, tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ["#SBATCH --job-name=hk-demo", "#SBATCH --partition=gpu", "#SBATCH --account=proj42",
                     "#SBATCH --qos=interactive", "#SBATCH --time=2:00:00", "#SBATCH --cpus-per-task=4",
                     "#SBATCH --mem=8G", "#SBATCH --exclusive", "#SBATCH --licenses=matlab:1",
                     f"#SBATCH --output={tmp_path}/state/job.log", f"#SBATCH --chdir={tmp_path}/state",
                     "module load cuda/12.2 python/3.11",
                     f"exec /opt/venv/bin/python -I -m hpc_kernels.agent {tmp_path}/state"]:
        assert expected in lines, f"{expected!r} not in:\n{script}"
    # sbatch stops reading #SBATCH lines at the first command: all of them must come first.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])


def test_optional_fields_leave_no_lines(tmp_path: Path) -> None:
    script = render(profile_from(tmp_path, "{}\n"), tmp_path)
    assert "--partition" not in script and "--account" not in script and "module load" not in script


def test_shell_values_are_quoted(tmp_path: Path) -> None:
    script = render(profile_from(tmp_path, "{}\n"), tmp_path, python="/opt/my venv/bin/python")
    assert "exec '/opt/my venv/bin/python' -I -m hpc_kernels.agent" in script


def test_paths_that_cannot_go_into_sbatch_lines_are_refused(tmp_path: Path) -> None:
    profile = profile_from(tmp_path, "{}\n")
    with pytest.raises(HpcKernelsError, match="cannot go into an #SBATCH line"):
        render(profile, tmp_path, state_dir=tmp_path / "with space", log_path=tmp_path / "x.log")
    with pytest.raises(HpcKernelsError, match="cannot go into an #SBATCH line"):
        render(profile, tmp_path, log_path=tmp_path / "job-%j.log")


def test_template_variables_must_exist(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "kernel.sbatch.j2").write_text("#!/bin/bash\n#SBATCH --time={{ slurm.walltime }}\n")
    with pytest.raises(jinja2.UndefinedError):
        render(profile_from(tmp_path, "{}\n"), tmp_path, template_dir=templates)


def test_constraint_reservation_and_job_environment(tmp_path: Path) -> None:
    profile = profile_from(tmp_path, """
slurm:
  constraint: "a100&ib"
  reservation: course-2026
  environment: {HTTPS_PROXY: "http://proxy:3128", LABEL: "it's quoted"}
""")
    lines = render(profile, tmp_path).splitlines()
    assert "#SBATCH --constraint=a100&ib" in lines and "#SBATCH --reservation=course-2026" in lines
    assert "export HTTPS_PROXY=http://proxy:3128" in lines
    assert "export LABEL='it'\"'\"'s quoted'" in lines


def test_a_profile_can_point_at_its_own_templates(tmp_path: Path) -> None:
    from hpc_kernels.launcher import kernel_script

    templates = tmp_path / "site-templates"
    templates.mkdir()
    (templates / "kernel.sbatch.j2").write_text("#!/bin/bash\n# site template for {{ kernel_name }}\n")
    profile = profile_from(tmp_path, f"paths:\n  templates: {templates}\n")
    assert kernel_script(profile, "k1") == "#!/bin/bash\n# site template for k1\n"


def test_a_profile_path_with_control_characters_is_refused(tmp_path: Path) -> None:
    weird = tmp_path / "p\necho INJECTED #"
    weird.mkdir()
    profile = profile_from(weird, "{}\n")
    with pytest.raises(HpcKernelsError, match="control characters"):
        render(profile, tmp_path)
