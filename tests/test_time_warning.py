"""The warning before the time limit: the pure parts, then a real ipykernel on this machine
(no Slurm: the agent's side is tested on the cluster in test_cluster_lifecycle.py) reading a
deadline file written here."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from hpc_kernels import kernel_startup, kernel_time_warning
from hpc_kernels.kernel_time_warning import due_warning, warning_text, warning_times
from hpc_kernels.paths import write_json
from hpc_kernels.profiles import KernelRequest, ProfileError, apply_request, parse_profile
from hpc_kernels.resources import data_dir
from hpc_kernels.time_limit import DEADLINE_FILE, job_time

SITE_CONFIGS = data_dir("site-configs")  # the installed ones: the tests run from a copy of tests/


def test_warning_times() -> None:
    assert warning_times(0) == []
    assert warning_times(90) == [90]
    assert warning_times(600) == [600, 60]


def test_a_job_shorter_than_the_warning_is_not_warned_at_its_start() -> None:
    deadline = {"start": 0.0, "end": 300.0, "warn_before": 600}  # a 5-minute job, a 10-minute warning
    assert due_warning(deadline, 10.0, set()) is None
    assert due_warning(deadline, 245.0, set()) == (300.0, 60)  # a minute before still is
    assert due_warning({"start": None, "end": None, "warn_before": 600}, 0.0, set()) is None  # no limit


def test_due_warning_once_per_threshold_and_again_after_a_new_end() -> None:
    deadline = {"end": 1000.0, "warn_before": 600}
    given: set[tuple[float, float]] = set()
    assert due_warning(deadline, 300.0, given) is None  # 700 s left
    assert due_warning(deadline, 450.0, given) == (1000.0, 600)
    given.add((1000.0, 600))
    assert due_warning(deadline, 460.0, given) is None
    assert due_warning(deadline, 945.0, given) == (1000.0, 60)
    assert due_warning(deadline, 1001.0, given) is None  # over: nothing to say
    # Both thresholds passed while the kernel could not say anything: one warning, the nearer one.
    assert due_warning(deadline, 950.0, set()) == (1000.0, 60)
    # The limit was raised: warned again at the new end.
    assert due_warning({"end": 4000.0, "warn_before": 600}, 3500.0, given) == (4000.0, 600)
    assert due_warning({"end": "soon"}, 0.0, set()) is None


def test_warning_text() -> None:
    text = warning_text({"end": 1000.0, "job_id": "42"}, 400.0)
    assert "job 42 reaches its time limit in 10 min 00 s" in text
    assert "save your work" in text
    assert "in 5 s" in warning_text({"end": 1000.0}, 995.0)


def test_end_time_from_scontrol_fields() -> None:
    assert job_time({"EndTime": "2026-11-24T05:30:00"}) == 1795498200.0
    assert job_time({"EndTime": "Unknown"}) is None
    assert job_time({}) is None


@pytest.mark.parametrize(("value", "seconds"), [("10m", 600.0), ("90s", 90.0), ("1h30m", 5400.0), ("0", 0.0),
                                                 (120, 120.0), ("1:00:00", 3600.0)])
def test_time_warning_setting(value: object, seconds: float) -> None:
    profile = parse_profile(SITE_CONFIGS / "local.yaml")
    assert profile.get("kernel", "time_warning") == 600.0  # the default
    assert apply_request(profile, KernelRequest(name="k", time_warning=str(value))).get("kernel", "time_warning") == seconds


def test_time_warning_mistake_names_the_flag() -> None:
    profile = parse_profile(SITE_CONFIGS / "local.yaml")
    with pytest.raises(ProfileError, match=r"--time-warning: 'soon' is not valid: expected a duration"):
        apply_request(profile, KernelRequest(name="k", time_warning="soon"))


@pytest.fixture
def kernel_with_warning(tmp_path: Path) -> Iterator[tuple[KernelManager, Path]]:
    node_dir = tmp_path / "node"
    node_dir.mkdir(mode=0o700)
    deadline = node_dir / DEADLINE_FILE
    write_json(deadline, {"job_id": "7", "end": time.time() + 3600, "warn_before": 60})
    env = {**os.environ, **kernel_startup.install(node_dir, {}, [(kernel_time_warning, [str(deadline)])])}
    km = KernelManager(kernel_name="python3")  # ipykernel's own spec: this Python
    km.start_kernel(env=env)
    try:
        yield km, deadline
    finally:
        km.shutdown_kernel(now=True)


def run_cell(km: KernelManager, code: str, timeout: float = 60) -> str:
    """The cell's stderr, as a client that shows only its own cell's output sees it."""
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        stderr: list[str] = []

        def output(msg: dict) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                stderr.append(msg["content"]["text"])

        reply = client.execute_interactive(code, timeout=timeout, output_hook=output)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(stderr)
    finally:
        client.stop_channels()


def test_a_running_cell_is_warned(kernel_with_warning: tuple[KernelManager, Path]) -> None:
    km, deadline = kernel_with_warning
    assert "WARNING" not in run_cell(km, "x = 1")
    # While this cell runs, the limit comes close (as after `scontrol update TimeLimit=`).
    said = run_cell(km, f"""
import json, time
with open({str(deadline)!r} + '.new', 'w') as f:
    json.dump({{"job_id": "7", "end": time.time() + 50, "warn_before": 60}}, f)
import os; os.replace({str(deadline)!r} + '.new', {str(deadline)!r})
time.sleep(8)
""")
    assert "[hpc-kernels] WARNING: job 7 reaches its time limit in" in said
    assert said.count("WARNING") == 1
    # The user's namespace holds nothing of the warning's.
    ours = ["TimeWarning", "install", "due_warning", "path", "args", "traceback", "warning_text", "warning_times", "read_deadline", "threading",
            "POLL_SECONDS", "namespace", "startup_file"]
    names = run_cell(km, f"import sys; print(sorted(n for n in globals() if n in {ours!r} or 'hpc' in n), file=sys.stderr)")
    assert names.strip() == "[]"


def test_a_part_that_fails_leaves_the_kernel_and_the_others_alone(tmp_path: Path) -> None:
    text = kernel_startup.startup_file([("/nonexistent/part.py", []), (str(tmp_path / "ok.py"), ["a"])])
    (tmp_path / "ok.py").write_text("def install(shell, arg):\n    shell.ran = arg\n")

    class Shell:
        ran = None

    shell = Shell()
    exec(compile(text, "startup", "exec"), {"get_ipython": lambda: shell})
    assert shell.ran == "a"


def test_a_notice_is_shown_once_at_the_first_cell(kernel_with_warning: tuple[KernelManager, Path]) -> None:
    """What the agent of a requeued job says to its new kernel's users."""
    km, deadline = kernel_with_warning
    write_json(deadline, {"job_id": "7", "end": time.time() + 3600, "warn_before": 60, "notice": "Slurm requeued job 7"})
    time.sleep(6)
    assert "[hpc-kernels] Slurm requeued job 7" in run_cell(km, "x = 1")
    assert "requeued" not in run_cell(km, "x = 2")


def test_a_warning_while_idle_is_shown_at_the_next_cell(kernel_with_warning: tuple[KernelManager, Path]) -> None:
    km, deadline = kernel_with_warning
    run_cell(km, "x = 1")
    write_json(deadline, {"job_id": "7", "end": time.time() + 50, "warn_before": 60})
    time.sleep(7)  # the kernel reads the file every 5 s
    said = run_cell(km, "y = 2")
    assert "[hpc-kernels] WARNING: job 7 reaches its time limit" in said
    assert "WARNING" not in run_cell(km, "z = 3")  # said once
