"""Batches, measured (``make bench``): what a big batch costs the login node and the controller,
and what one task costs on its node next to running the same notebook bare with nbclient.

* a 1000-task batch: ``hpc-kernel batch submit`` (checking, rendering, one sbatch) wall time,
  then ``batch status`` and ``batch results --json`` answering about it (median of 5), then cancel;
* per task, one at a time on c1: a batch task (the runner: sandbox, kernel start, nbclient,
  outputs written) against the same notebook executed bare by nbclient with the node's own
  ipykernel in a fresh Python each time (interpreter and kernel start included, no sandbox),
  both inside Slurm on the same node.

Prints Markdown tables; docs/performance.md keeps the latest figures. It asserts no speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat

# One fresh Python per notebook, as an array task running nbclient (or papermill) would be; with
# the same jsonschema shortcut the batch runner takes (hpc_kernels.notebooks.skip_iri_format_checker).
BARE_ONE = r"""
import sys
sys.modules.setdefault("rfc3987_syntax", None)
import nbformat
from nbclient import NotebookClient

nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells[0].source = f"n = {sys.argv[2]}"
NotebookClient(nb, kernel_name="python3").execute()
"""

BARE = r"""
import json, subprocess, sys, time

samples = []
for n in range(int(sys.argv[2])):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", sys.argv[3], sys.argv[1], str(n)], check=True)
    samples.append(time.perf_counter() - t)
print(json.dumps(samples))
"""


def sh(*argv: str, timeout: float = 900) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return proc.stdout


def timed(*argv: str) -> tuple[float, str]:
    t = time.perf_counter()
    out = sh(*argv)
    return time.perf_counter() - t, out


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", type=int, default=1000, help="tasks in the big batch")
    parser.add_argument("--tasks", type=int, default=10, help="tasks (and bare runs) for the per-task overhead")
    args = parser.parse_args()

    ws = Path.home() / "hk-bench" / uuid.uuid4().hex[:8]
    ws.mkdir(parents=True)
    try:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("n = 0", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell("x = sum(range(n * 1000))\nprint(n, x)")]
        path = ws / "tiny.ipynb"
        nbformat.write(nb, str(path))

        # The big batch: all but a few tasks stay pending while it is looked at.
        (ws / "big.yaml").write_text("grid:\n  n: [" + ", ".join(map(str, range(args.big))) + "]\n")
        submit_s, out = timed("hpc-kernel", "batch", "submit", str(path), "--params", str(ws / "big.yaml"),
                              "--profile", "local", "--out", str(ws / "big"), "--no-workspace", "--max-parallel", "2")
        big = out.strip()
        status_s = [timed("hpc-kernel", "batch", "status", big)[0] for _ in range(5)]
        results_s = [timed("hpc-kernel", "batch", "results", big, "--json")[0] for _ in range(5)]
        cancel_s, _ = timed("hpc-kernel", "batch", "cancel", big)

        # Per task, one at a time on c1.
        (ws / "small.yaml").write_text("grid:\n  n: [" + ", ".join(map(str, range(args.tasks))) + "]\n")
        t = time.perf_counter()
        small = sh("hpc-kernel", "batch", "submit", str(path), "--params", str(ws / "small.yaml"), "--profile", "local",
                   "--partition", "short", "--out", str(ws / "small"), "--no-workspace", "--max-parallel", "1").strip()
        subprocess.run(["hpc-kernel", "batch", "status", small, "--watch"], capture_output=True, timeout=900)
        makespan = time.perf_counter() - t
        records = json.loads(sh("hpc-kernel", "batch", "results", small, "--json"))
        states = {r["state"] for r in records}
        if states != {"COMPLETED"}:
            raise SystemExit(f"the per-task batch did not complete: {states}")
        total = [r["timings"]["total"] for r in records]
        kernel = [r["timings"]["kernel_start"] for r in records]
        execute = [r["timings"]["execute"] for r in records]
        bare = json.loads(sh("srun", "--partition=short", "--nodes=1", "--ntasks=1", "--mem=1G", "--time=10",
                             sys.executable, "-c", BARE, str(path), str(args.tasks), BARE_ONE).strip().splitlines()[-1])
    finally:
        shutil.rmtree(ws, ignore_errors=True)

    print(f"hpc-kernels batch benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print(f"| a batch of {args.big} tasks | seconds |")
    print("|---|---|")
    print(f"| `batch submit` (check, render, one `sbatch --array`) | {submit_s:.2f} |")
    print(f"| `batch status`, median of 5 | {median(status_s):.2f} |")
    print(f"| `batch results --json`, median of 5 | {median(results_s):.2f} |")
    print(f"| `batch cancel` until Slurm ended every task | {cancel_s:.2f} |")
    print()
    b, t_med = median(bare), median(total)
    print(f"| per task, {args.tasks} one at a time on c1, median | seconds | against bare |")
    print("|---|---|---|")
    print(f"| bare nbclient on the node (fresh Python, kernel start, execute; no sandbox) | {b:.2f} | 1.00x |")
    print(f"| batch task: sandbox, kernel start, nbclient, outputs written | {t_med:.2f} | {t_med / b:.2f}x |")
    print(f"| of which: until the sandboxed kernel answered | {median(kernel):.2f} | |")
    print(f"| of which: executing and shutting down | {median(execute):.2f} | |")
    print(f"| array makespan / tasks (Slurm's scheduling and the runner's start included) | "
          f"{makespan / args.tasks:.2f} | {makespan / args.tasks / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
