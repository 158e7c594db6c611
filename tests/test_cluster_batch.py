"""Batches on the real cluster: one job array per batch, each task's notebook executed by nbclient
against a kernel in the profile's sandbox on the task's node.

The module's grid batch (3 x 3 parameters, one of which raises) is submitted once and looked at
by several tests in order: it ran as one array on both nodes, each output holds its own values,
the raising task is FAILED with its traceback, retry reruns only it, --skip-done skips the rest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from conftest import hk, make_workspace, run
from test_cluster_security import probe_as_second_user


def batch(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return hk("batch", *args, check=check, timeout=timeout)


def notebook(path: Path, *sources: str, parameters: str | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    if parameters is not None:
        nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in sources)
    nbformat.write(nb, str(path))
    return path


def results(name: str) -> list[dict[str, Any]]:
    return json.loads(batch("results", name, "--json").stdout)


def status(name: str) -> dict[str, Any]:
    return json.loads(batch("status", name, "--json").stdout)


def watch(name: str, timeout: float = 300) -> int:
    return batch("status", name, "--watch", check=False, timeout=timeout).returncode


def stdout_of(output: Path) -> str:
    nb = nbformat.read(str(output), as_version=4)
    return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "stream")


def leftovers(out: Path) -> list[str]:
    """Temporary files of atomic writes: none may stay."""
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))


def no_live_elements(job_ids: list[str]) -> bool:
    proc = run(["squeue", "--noheader", "--array", "--states=PENDING,RUNNING,COMPLETING,CONFIGURING",
                f"--jobs={','.join(job_ids)}", "--format=%i %T"], check=False)
    return proc.stdout.strip() == ""


GRID_CELL = """
import os, socket
print(socket.gethostname(), alpha, seed)
if os.path.exists(f"fail-{alpha}-{seed}"):
    raise RuntimeError(f"told to fail: alpha={alpha} seed={seed}")
alpha * seed
"""


@pytest.fixture(scope="module")
def grid(cluster: None) -> Iterator[dict[str, Any]]:
    ws = make_workspace()
    notebook(ws / "analysis.ipynb", GRID_CELL, parameters="alpha = 0.0\nseed = 0")
    (ws / "grid.yaml").write_text("grid:\n  alpha: [0.1, 0.2, 0.3]\n  seed: [1, 2, 3]\n")
    (ws / "fail-0.2-3").write_text("")
    out = ws / "out"
    # 8 of a node's 16 CPUs per task and 4 at once: the array needs both nodes.
    proc = batch("submit", str(ws / "analysis.ipynb"), "--params", str(ws / "grid.yaml"), "--profile", "local",
                 "--max-parallel", "4", "--cpus", "8", "--out", str(out), "--workspace", str(ws), "--watch",
                 check=False)
    assert proc.returncode == 1, proc.stderr  # one task fails
    name = proc.stdout.strip().splitlines()[0]
    yield {"name": name, "ws": ws, "out": out}
    batch("cancel", name, check=False)
    shutil.rmtree(ws, ignore_errors=True)


def test_grid_runs_as_one_array_on_both_nodes(grid: dict[str, Any]) -> None:
    summary = status(grid["name"])
    assert len(summary["job_ids"]) == 1 and summary["tasks"] == 9 and summary["done"]
    assert summary["counts"] == {"COMPLETED": 8, "FAILED": 1}
    records = results(grid["name"])
    assert [r["batch_task"] for r in records] == list(range(9))
    assert {r["array_job_id"] for r in records} == set(summary["job_ids"])
    assert len({r["job_id"] for r in records}) == 9
    assert {r["node"] for r in records} == {"c1", "c2"}
    script = (Path(records[0]["log"]).parent.parent / "job-1.sh").read_text()
    assert "#SBATCH --array=0-8%4" in script


def test_each_output_holds_its_own_parameters(grid: dict[str, Any]) -> None:
    for record in results(grid["name"]):
        if record["state"] != "COMPLETED":
            continue
        alpha, seed = record["parameters"]["alpha"], record["parameters"]["seed"]
        output = Path(record["output"])
        assert output == grid["out"] / f"analysis_alpha={alpha}_seed={seed}.ipynb"
        nb = nbformat.read(str(output), as_version=4)
        nbformat.validate(nb)
        assert nb.cells[1].metadata["tags"] == ["injected-parameters"]
        assert stdout_of(output) == f"{record['node']} {alpha} {seed}\n"
        result = nb.cells[2].outputs[-1]
        assert result.output_type == "execute_result" and float(result.data["text/plain"]) == pytest.approx(alpha * seed)
        assert nb.metadata.hpc_kernels["parameters"] == record["parameters"]
        assert nb.metadata.hpc_kernels["node"] == record["node"]
        assert record["timings"]["kernel_start"] > 0 and record["timings"]["execute"] > 0
    assert leftovers(grid["out"]) == []


def test_a_task_that_raises_is_failed_with_its_traceback(grid: dict[str, Any]) -> None:
    [failed] = [r for r in results(grid["name"]) if r["state"] != "COMPLETED"]
    assert failed["state"] == "FAILED" and failed["parameters"] == {"alpha": 0.2, "seed": 3}
    assert failed["error"]["ename"] == "RuntimeError"
    assert "told to fail: alpha=0.2 seed=3" in failed["error"]["traceback"]
    assert failed["error"]["cell"] == 2
    out = grid["out"]
    assert not (out / "analysis_alpha=0.2_seed=3.ipynb").exists()  # nothing partial under the final name
    assert "told to fail" in json.dumps(nbformat.read(str(out / "analysis_alpha=0.2_seed=3.failed.ipynb"), 4))
    table = batch("results", grid["name"]).stdout
    row = next(line for line in table.splitlines() if line.startswith("5 "))
    assert "FAILED" in row and "RuntimeError: told to fail" in row
    rows = list(__import__("csv").DictReader(batch("results", grid["name"], "--csv").stdout.splitlines()))
    assert [r["state"] for r in rows].count("COMPLETED") == 8 and rows[5]["error_name"] == "RuntimeError"


def test_retry_reruns_only_the_failed_task(grid: dict[str, Any]) -> None:
    name, out = grid["name"], grid["out"]
    before = {r["batch_task"]: Path(r["output"]).stat().st_mtime for r in results(name) if r["state"] == "COMPLETED"}
    (grid["ws"] / "fail-0.2-3").unlink()
    proc = batch("retry", name)
    assert "resubmitted 1 tasks (1 FAILED)" in proc.stderr
    assert watch(name) == 0
    summary = status(name)
    assert len(summary["job_ids"]) == 2 and summary["counts"] == {"COMPLETED": 9}
    records = {r["batch_task"]: r for r in results(name)}
    assert records[5]["attempt"] == 2 and records[5]["array_job_id"] == summary["job_ids"][1]
    assert all(records[i]["attempt"] == 1 for i in before)
    assert {i: Path(records[i]["output"]).stat().st_mtime for i in before} == before
    assert (out / "analysis_alpha=0.2_seed=3.ipynb").exists()
    assert not (out / "analysis_alpha=0.2_seed=3.failed.ipynb").exists()
    assert "nothing to retry" in batch("retry", name).stderr


def test_a_batch_is_private_to_its_user_and_its_results_follow_the_umask(grid: dict[str, Any]) -> None:
    state = Path(results(grid["name"])[0]["log"]).parent.parent
    found = probe_as_second_user([str(state), str(state / "batch.json"), str(state / "logs")])
    assert all(v.startswith("PermissionError") for v in found.values()), found
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    mine = grid["out"] / "made-by-the-test"
    mine.write_text("")
    expected = mine.stat().st_mode & 0o777  # what this user's umask gives a new file
    for record in results(grid["name"]):
        for path in (Path(record["output"]), grid["out"] / f"{record['name']}.result.json"):
            assert path.stat().st_mode & 0o777 == expected, path


def test_skip_done_submits_only_what_has_no_completed_result(grid: dict[str, Any]) -> None:
    ws, out = grid["ws"], grid["out"]
    args = ["submit", str(ws / "analysis.ipynb"), "--params", str(ws / "grid.yaml"), "--profile", "local",
            "--out", str(out), "--workspace", str(ws), "--skip-done"]
    proc = batch(*args)
    assert "all 9 tasks already have a completed result" in proc.stderr and proc.stdout.strip() == ""
    (out / "analysis_alpha=0.3_seed=1.result.json").unlink()
    proc = batch(*args, "--watch")
    name = proc.stdout.strip().splitlines()[0]
    assert "(8 skipped: already done)" in proc.stderr
    [record] = results(name)
    assert record["state"] == "COMPLETED" and record["parameters"] == {"alpha": 0.3, "seed": 1}


OUTCOMES = [
    "import os, time\nif mode == 'crash':\n    os._exit(1)\nif mode == 'hang':\n    print('hanging', flush=True)\n"
    "    time.sleep(600)\nprint('ok')",
    *["import time\nif mode == 'slow':\n    time.sleep(4)"] * 10,
]


def test_raise_crash_cell_timeout_and_task_timeout_are_each_recorded(cluster: None) -> None:
    """One batch, four tasks: one completes, one's kernel dies, one cell hangs past --cell-timeout,
    and one runs ten slow cells past the task's --timeout. The others carry on."""
    ws = make_workspace()
    try:
        notebook(ws / "outcomes.ipynb", *OUTCOMES, parameters="mode = 'ok'")
        out = ws / "out"
        (ws / "modes.yaml").write_text("grid:\n  mode: [ok, crash, hang, slow]\n")
        proc = batch("submit", str(ws / "outcomes.ipynb"), "--params", str(ws / "modes.yaml"), "--profile", "local",
                     "--out", str(out), "--no-workspace", "--cell-timeout", "8s", "--timeout", "25s",
                     "--max-parallel", "4")
        name = proc.stdout.strip()
        started = time.monotonic()
        assert watch(name) == 1
        records = {r["parameters"]["mode"]: r for r in results(name)}
        assert {mode: r["state"] for mode, r in records.items()} == {
            "ok": "COMPLETED", "crash": "FAILED", "hang": "TIMEOUT", "slow": "TIMEOUT"}
        assert records["crash"]["error"]["ename"] == "DeadKernelError"
        assert "exit code 1" in records["crash"]["message"]
        assert records["hang"]["error"]["ename"] == "CellTimeoutError"
        assert records["slow"]["error"]["ename"] == "TaskTimeout"
        assert 25 <= records["slow"]["duration"] < 25 + 20 and time.monotonic() - started < 120
        assert (out / "outcomes_mode=ok.ipynb").exists()
        for mode in ("crash", "hang", "slow"):
            assert not (out / f"outcomes_mode={mode}.ipynb").exists()
        assert "hanging" in stdout_of(out / "outcomes_mode=hang.failed.ipynb")
        assert leftovers(out) == []
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_cancel_stops_the_rest_and_leaves_nothing(cluster: None) -> None:
    ws = make_workspace()
    try:
        notebook(ws / "sleepy.ipynb", "import time\nprint('sleeping', flush=True)\ntime.sleep(600)",
                 parameters="n = 0")
        out = ws / "out"
        (ws / "four.yaml").write_text("grid:\n  n: [1, 2, 3, 4]\n")
        name = batch("submit", str(ws / "sleepy.ipynb"), "--params", str(ws / "four.yaml"), "--profile", "local",
                     "--out", str(out), "--no-workspace", "--max-parallel", "2").stdout.strip()
        deadline = time.monotonic() + 60
        while status(name)["counts"].get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, status(name)
            time.sleep(1)
        time.sleep(3)  # the running tasks' kernels are busy sleeping
        batch("cancel", name)
        summary = status(name)
        assert summary["counts"] == {"CANCELLED": 4} and summary["done"]
        records = results(name)
        assert sum(1 for r in records if r.get("signal") == "SIGTERM") == 2  # the two that ran said so themselves
        assert no_live_elements(summary["job_ids"])
        assert sorted(p.name for p in out.iterdir() if p.suffix == ".ipynb") == []
        assert leftovers(out) == []
        assert json.loads(hk("list", "--json").stdout) == []  # no task's kernel is left
        assert "resubmitted 4 tasks (4 CANCELLED)" in batch("retry", name).stderr
        batch("cancel", name)
        assert status(name)["counts"] == {"CANCELLED": 4}
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_cancel_while_the_kernel_starts_leaves_no_kernel(cluster: None) -> None:
    """Cancelled the moment Slurm starts it: the task may not have its kernel yet, or be starting
    it. Either way it records CANCELLED and no kernel is left."""
    ws = make_workspace()
    try:
        notebook(ws / "sleepy.ipynb", "import time\ntime.sleep(600)")
        out = ws / "out"
        name = batch("submit", str(ws / "sleepy.ipynb"), "--profile", "local", "--out", str(out),
                     "--no-workspace").stdout.strip()
        deadline = time.monotonic() + 60
        while status(name)["counts"].get("RUNNING", 0) < 1:
            assert time.monotonic() < deadline, status(name)
            time.sleep(0.2)
        batch("cancel", name)
        summary = status(name)
        assert summary["counts"] == {"CANCELLED": 1} and no_live_elements(summary["job_ids"])
        assert json.loads(hk("list", "--json").stdout) == []
        assert leftovers(out) == []
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_many_notebooks_without_parameters_as_for_grading(cluster: None) -> None:
    """Three students' notebooks, two with the same file name in different directories, one
    that raises: one array, one output each, none overwriting another."""
    ws = make_workspace()
    try:
        for student, code in (("ann", "print('ann', 6 * 7)"), ("bo", "print('bo', 1 / 0)")):
            (ws / student).mkdir()
            notebook(ws / student / "hw.ipynb", code)
        notebook(ws / "cy.ipynb", "print('cy', 2 ** 10)")
        out = ws / "graded"
        proc = batch("submit", str(ws / "ann" / "hw.ipynb"), str(ws / "bo" / "hw.ipynb"), str(ws / "cy.ipynb"),
                     "--profile", "local", "--timeout", "2m", "--out", str(out), "--no-workspace", "--watch",
                     check=False)
        assert proc.returncode == 1, proc.stderr
        name = proc.stdout.strip().splitlines()[0]
        assert len(status(name)["job_ids"]) == 1
        records = {Path(r["notebook"]).parent.name + "/" + Path(r["notebook"]).name: r for r in results(name)}
        ann, bo, cy = records["ann/hw.ipynb"], records["bo/hw.ipynb"], records[f"{ws.name}/cy.ipynb"]
        assert (ann["state"], bo["state"], cy["state"]) == ("COMPLETED", "FAILED", "COMPLETED")
        assert bo["error"]["ename"] == "ZeroDivisionError"
        assert ann["name"] != bo["name"] and ann["name"].startswith("hw-") and cy["name"] == "cy"
        assert stdout_of(Path(ann["output"])) == "ann 42\n" and stdout_of(Path(cy["output"])) == "cy 1024\n"
    finally:
        shutil.rmtree(ws, ignore_errors=True)


SANDBOX_PROBE = """
import json, os, socket
found = {}
try:
    socket.create_connection(("10.77.7.1", 6817), timeout=5)
    found["network"] = "connected"
except OSError as e:
    found["network"] = e.strerror or str(e)
found["home"] = os.path.exists(os.path.join(HK_TEST_HOME, ".hk-secret"))
try:
    open("written-by-the-kernel", "w")
    found["write"] = "ok"
except OSError as e:
    found["write"] = e.strerror
found["data"] = open("data.txt").read().strip()
print(json.dumps(found))
"""


def test_the_sandbox_holds_inside_a_task(runtime_profile: str, cluster: None) -> None:
    ws = make_workspace()
    secret = Path.home() / ".hk-secret"
    secret.write_text("not for notebooks\n")
    try:
        notebook(ws / "probe.ipynb", SANDBOX_PROBE, parameters="HK_TEST_HOME = ''")
        out = ws / "out"
        name = batch("submit", str(ws / "probe.ipynb"), "--param", f"HK_TEST_HOME={Path.home()}",
                     "--profile", runtime_profile, "--out", str(out), "--workspace", str(ws)).stdout.strip()
        assert watch(name) == 0
        [record] = results(name)
        found = json.loads(stdout_of(Path(record["output"])).strip().splitlines()[-1])
        assert found == {"network": "Network is unreachable", "home": False, "write": "Read-only file system",
                         "data": "shared data"}, found
    finally:
        secret.unlink(missing_ok=True)
        shutil.rmtree(ws, ignore_errors=True)


@pytest.mark.parametrize(("args", "expected"), [
    (["--partition", "nosuch"], "sbatch refused the job: sbatch: error: invalid partition specified: nosuch"),
    (["--max-parallel", "0"], "--max-parallel 0: expected 1 or more"),
    (["--timeout", "soon"], "--timeout 'soon': expected a duration"),
    (["--profile", "nosuch"], "nosuch"),
    (["--param", "1x=2"], "'1x' is not a valid Python variable name"),
])
def test_bad_input_is_refused_before_anything_runs(args: list[str], expected: str, cluster: None) -> None:
    ws = make_workspace()
    try:
        notebook(ws / "nb.ipynb", "print(1)")
        before = batch("list").stdout, run(["squeue", "--me", "--noheader", "--states=all", "-o", "%i"]).stdout
        proc = batch("submit", str(ws / "nb.ipynb"), "--out", str(ws / "out"), "--no-workspace",
                     *(["--profile", "local"] if "--profile" not in args else []), *args, check=False)
        assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        after = batch("list").stdout, run(["squeue", "--me", "--noheader", "--states=all", "-o", "%i"]).stdout
        assert after == before  # no batch, no job
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_bad_files_name_the_file(cluster: None) -> None:
    ws = make_workspace()
    try:
        (ws / "broken.ipynb").write_text("{not json")
        proc = batch("submit", str(ws / "broken.ipynb"), "--out", str(ws / "out"), "--profile", "local",
                     check=False)
        assert proc.returncode == 1 and f"{ws}/broken.ipynb: not a Jupyter notebook" in proc.stderr
        notebook(ws / "nb.ipynb", "print(1)")
        (ws / "p.yaml").write_text("grid:\n  alpha: 1\n")
        proc = batch("submit", str(ws / "nb.ipynb"), "--params", str(ws / "p.yaml"), "--out", str(ws / "out"),
                     "--profile", "local", check=False)
        assert proc.returncode == 1 and f"{ws}/p.yaml:2: grid.alpha: expected a non-empty list" in proc.stderr
        proc = batch("status", "no-such-batch", check=False)
        assert proc.returncode == 1 and "no batch named 'no-such-batch'" in proc.stderr
    finally:
        shutil.rmtree(ws, ignore_errors=True)
