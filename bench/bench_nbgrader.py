"""nbgrader, measured (``make bench``): autograding N submissions of one assignment through the
cluster's kernels against running the same submissions as one batch job array.

* ``nbgrader autograde`` with the local ``python3`` kernel on this (login) machine: no sandbox,
  no cluster; what nbgrader costs by itself;
* ``nbgrader autograde --ExecutePreprocessor.kernel_name=K`` with a kernelspec from
  ``hpc-kernel kernelspec install``: nbgrader runs the notebooks one after another, each in a
  kernel of its own, so one Slurm job per submission, in turn;
* ``hpc-kernel batch submit SUBMISSIONS... --watch``: the same submitted notebooks executed as
  one ``sbatch --array`` (tasks in parallel on the nodes). This executes and keeps the outputs; it
  does not write nbgrader's gradebook.

Every submission is correct (every autograded test passes) and cheap, so what is measured is the
cost of the way they are run. Prints a Markdown table; docs/performance.md and docs/nbgrader.md
keep the latest figures. It asserts no speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nbformat

ASSIGNMENT, COURSE_ID, POINTS = "ps1", "bench101", 2
CELLS: list[tuple[str, str, dict[str, Any]]] = [
    ("host", "import socket\nprint('host:', socket.gethostname())", {}),
    ("mean", "def mean(xs):\n    ### BEGIN SOLUTION\n    return sum(xs) / len(xs)\n    ### END SOLUTION",
     {"solution": True}),
    ("test_mean", "assert mean([1, 2, 3]) == 2\nassert mean([5]) == 5", {"grade": True, "points": POINTS}),
]
ANSWER = "def mean(xs):\n    return sum(xs) / len(xs)\n"


def cell(source: str, grade_id: str, solution: bool = False, grade: bool = False,
         points: int = 0) -> nbformat.NotebookNode:
    meta = {"grade": grade, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False, **({"points": points} if grade else {})}
    return nbformat.v4.new_code_cell(source, metadata={"nbgrader": meta})


def sh(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def make_course(root: Path, students: list[str], env: dict[str, str]) -> None:
    """A course with one assignment, released by ``generate_assignment``, and a correct
    submission from each student."""
    (root / "source" / ASSIGNMENT).mkdir(parents=True)
    (root / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.course_id = {COURSE_ID!r}\nc.CourseDirectory.root = {str(root)!r}\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [cell(source, grade_id, **flags) for grade_id, source, flags in CELLS]
    nbformat.write(nb, root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    sh("nbgrader", "generate_assignment", ASSIGNMENT, cwd=root, env=env)
    for student in students:
        released = nbformat.read(root / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
        for c in released.cells:
            if c.metadata["nbgrader"]["grade_id"] == "mean":
                c.source = ANSWER
        (root / "submitted" / student / ASSIGNMENT).mkdir(parents=True)
        nbformat.write(released, root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")


def autograde(root: Path, env: dict[str, str], *options: str) -> float:
    t = time.perf_counter()
    sh("nbgrader", "autograde", ASSIGNMENT, *options, cwd=root, env=env)
    return time.perf_counter() - t


def scores(root: Path) -> list[float]:
    from nbgrader.api import Gradebook

    gradebook = Gradebook(f"sqlite:///{root / 'gradebook.db'}", course_id=COURSE_ID)
    try:
        return [s.score for s in gradebook.find_assignment(ASSIGNMENT).submissions]
    finally:
        gradebook.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--students", type=int, default=6, help="submissions (one per student)")
    parser.add_argument("--profile", default="local", help="the profile of the kernelspec and the batch")
    args = parser.parse_args()
    students = [f"student{i:02d}" for i in range(args.students)]

    ws = Path.home() / "hk-bench" / f"nbgrader-{uuid.uuid4().hex[:8]}"
    ws.mkdir(parents=True)
    jupyter = Path(tempfile.mkdtemp(prefix="hk-bench-jupyter-"))
    # nbgrader runs alembic from PATH: this venv's bin first. Kernelspecs of this run only.
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "JUPYTER_PATH": str(jupyter / "share" / "jupyter"), "JUPYTER_DATA_DIR": str(jupyter / "data"),
           "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"), "JUPYTER_CONFIG_DIR": str(jupyter / "config")}
    kernel = f"bench-{args.profile}"
    try:
        sh("hpc-kernel", "kernelspec", "install", "--profile", args.profile, "--name", kernel, "--prefix", str(jupyter))
        local_root, cluster_root = ws / "local", ws / "cluster"
        make_course(local_root, students, env)
        make_course(cluster_root, students, env)

        local_s = autograde(local_root, env, "--ExecutePreprocessor.kernel_name=python3")
        cluster_s = autograde(cluster_root, env, f"--ExecutePreprocessor.kernel_name={kernel}")
        for root in (local_root, cluster_root):
            got = scores(root)
            if got != [POINTS] * len(students):
                raise SystemExit(f"{root.name}: expected {POINTS} points for each of {len(students)}, got {got}")

        # The same submissions, one batch: one notebook per student, one job array.
        inputs = ws / "batch-in"
        inputs.mkdir()
        for student in students:
            shutil.copy(cluster_root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb",
                        inputs / f"{student}.ipynb")
        t = time.perf_counter()
        batch = sh("hpc-kernel", "batch", "submit", *sorted(map(str, inputs.glob("*.ipynb"))), "--profile",
                   args.profile, "--out", str(ws / "batch-out"), "--no-workspace", "--cell-timeout", "60s").split()[-1]
        subprocess.run(["hpc-kernel", "batch", "status", batch, "--watch"], capture_output=True, timeout=1800)
        batch_s = time.perf_counter() - t
        records = json.loads(sh("hpc-kernel", "batch", "results", batch, "--json"))
        if [r["state"] for r in records] != ["COMPLETED"] * len(students):
            raise SystemExit(f"the batch did not complete: {[r['state'] for r in records]}")
        kernel_start = sorted(r["timings"]["kernel_start"] for r in records)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(jupyter, ignore_errors=True)

    n = len(students)
    print(f"hpc-kernels nbgrader benchmark, {time.strftime('%Y-%m-%d %H:%M')}, profile {args.profile}")
    print()
    print(f"| {n} submissions of one assignment | Slurm jobs | seconds | per submission |")
    print("|---|---|---|---|")
    print(f"| `nbgrader autograde`, local `python3` kernel (no sandbox, no cluster) | 0 | {local_s:.1f} | "
          f"{local_s / n:.1f} |")
    print(f"| `nbgrader autograde`, hpc-kernels kernelspec (a kernel job per submission, in turn) | {n} | "
          f"{cluster_s:.1f} | {cluster_s / n:.1f} |")
    print(f"| `hpc-kernel batch submit --watch` (one job array; executes, no gradebook) | 1 array of {n} | "
          f"{batch_s:.1f} | {batch_s / n:.1f} |")
    print()
    print(f"batch tasks, until the sandboxed kernel answered: median {kernel_start[n // 2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
