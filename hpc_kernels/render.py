"""Rendering job scripts from templates: data in, script text out, no side effects."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import jinja2

from . import __version__
from .errors import HpcKernelsError
from .profiles import Profile
from .resources import data_dir

KERNEL_TEMPLATE = "kernel.sbatch.j2"
STEP_TEMPLATE = "kernel.step.j2"
BATCH_TEMPLATE = "batch.sbatch.j2"

# sbatch reads #SBATCH lines itself (no shell): whitespace would split a value, and '%' starts a
# filename pattern in --output, so paths that reach those lines must be plain.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9_.,+@=/\-]*$")


def template_environment(template_dir: Path | None = None) -> jinja2.Environment:
    """Templates from the site's ``template_dir`` first; any it lacks, from the shipped ones."""
    search = [str(template_dir)] if template_dir else []
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*search, str(data_dir("templates"))]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    return env


def _plain_path(path: Path, what: str) -> str:
    text = str(path)
    if not _PLAIN_PATH.match(text):
        raise HpcKernelsError(
            f"{what} {text!r} contains characters that cannot go into an #SBATCH line "
            "(spaces, '%', quotes...); set XDG_DATA_HOME to a plain path"
        )
    return text


def job_name_of(kernel_name: str) -> str:
    """The Slurm job (or step) name of kernel ``kernel_name``."""
    return f"hk-{kernel_name}"


def render_kernel_script(
    profile: Profile,
    *,
    kernel_name: str,
    state_dir: Path,
    log_path: Path,
    python: str,
    template_dir: Path | None = None,
    allocation: str | None = None,
) -> str:
    """The script that runs the node agent for one kernel: an sbatch script for a new job, or,
    given the id of an allocation the user holds, a script that starts the agent as its step."""
    if allocation is not None and not allocation.isdigit():
        raise HpcKernelsError(f"SLURM_JOB_ID {allocation!r} is not a job id")
    template = template_environment(template_dir).get_template(STEP_TEMPLATE if allocation else KERNEL_TEMPLATE)
    return template.render(
        job_id=allocation,
        job_name=job_name_of(kernel_name),
        kernel_name=kernel_name,
        state_dir=_plain_path(state_dir, "state directory"),
        log_path=_plain_path(log_path, "log file"),
        **_profile_context(profile, python),
    )


def _profile_context(profile: Profile, python: str) -> dict[str, Any]:
    """What every job script is rendered with: the profile's Slurm settings and where it came from."""
    for what, text in (("profile name", profile.name), ("profile file", str(profile.source))):
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise HpcKernelsError(f"{what} {text!r} contains control characters; rename it")
    return {"python": python, "slurm": dict(profile.settings["slurm"]), "profile_name": profile.name,
            "profile_source": str(profile.source), "version": __version__}


def render_batch_script(
    profile: Profile,
    *,
    batch_name: str,
    batch_dir: Path,
    log_dir: Path,
    array: str,
    python: str,
    template_dir: Path | None = None,
) -> str:
    """The sbatch script of a batch: one job array (``array``: sbatch's --array value) whose
    tasks each run ``python -m hpc_kernels.batch_task BATCH_DIR``."""
    if not re.fullmatch(r"[0-9,\-]+(%[0-9]+)?", array):
        raise HpcKernelsError(f"--array {array!r}: expected task ids such as 0-8,11%4")
    return template_environment(template_dir).get_template(BATCH_TEMPLATE).render(
        job_name=f"hk-batch-{batch_name}",
        batch_name=batch_name,
        batch_dir=_plain_path(batch_dir, "batch directory"),
        log_dir=_plain_path(log_dir, "log directory"),
        array=array,
        **_profile_context(profile, python),
    )
