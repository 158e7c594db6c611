"""Start-up time of each sandbox runtime, measured side by side in one run (``make bench``).

Rows, each on node c1 of the test cluster, taking turns so that drift hits every row alike:

* a bare ``sbatch --wrap true`` until COMPLETED: what Slurm itself costs;
* ``hpc-kernel submit`` until the kernel is ready, with bubblewrap, Apptainer, and podman twice:
  *cold*, storage made for the job (``runtime.podman_storage: job``: the image is loaded from its
  OCI archive into the job's storage each time, as on a node that never ran the image) and
  *warm*, the per-user storage on the node kept between jobs (``podman_storage: node``, the
  default) after one kernel has loaded the image there.

Columns: the median and every run, and the agent's own figure for the part inside the job
(from launching the runtime until the kernel's five sockets exist; for podman that includes
loading the image). Nothing here asserts a speed: it measures. docs/performance.md keeps the
latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

NODE = "c1"
# name -> (profile it extends, extra runtime settings)
ROWS = {
    "bubblewrap": ("local", {}),
    "Apptainer": ("local-apptainer", {}),
    "podman, cold (image loaded in the job)": ("local-podman", {"podman_storage": "job"}),
    "podman, warm (node storage kept)": ("local-podman", {"podman_storage": "node"}),
}


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def job_state(job_id: str) -> str:
    return sh("scontrol", "show", "job", "-o", job_id).split("JobState=")[1].split()[0]


def bare_sbatch_seconds() -> float:
    t = time.perf_counter()
    job_id = sh("sbatch", "--parsable", f"--nodelist={NODE}", "--output=/dev/null", "--wrap", "true").strip()
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.02)
    return time.perf_counter() - t


def write_profiles(directory: Path) -> dict[str, str]:
    """One profile per row, each pinned to NODE; row -> profile name."""
    names = {}
    for i, (row, (base, runtime)) in enumerate(ROWS.items()):
        name = f"bench-startup-{i}"
        lines = [f"extends: {base}", f"description: start-up benchmark, {row}", "slurm:",
                 f"  extra_options: ['--nodelist={NODE}']"]
        if runtime:
            lines += ["runtime:", *(f"  {k}: {v}" for k, v in runtime.items())]
        (directory / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names[row] = name
    return names


def start(name: str, profile: str, env: dict[str, str]) -> tuple[float, float]:
    """``submit`` until ready, and the agent's in-job figure; the kernel is shut down."""
    t = time.perf_counter()
    sh("hpc-kernel", "submit", "--profile", profile, "--name", name, "--no-workspace", env=env)
    total = time.perf_counter() - t
    status = json.loads(sh("hpc-kernel", "status", name, "--json", env=env))
    in_job = float(json.loads((Path(status["log"]).parent / "agent.json").read_text())["startup_seconds"])
    sh("hpc-kernel", "shutdown", name, env=env)
    return total, in_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=3, help="runs of each row")
    args = parser.parse_args()
    prefix = f"bst-{uuid.uuid4().hex[:6]}"
    totals: dict[str, list[float]] = {"bare": []}
    in_job: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hk-bench-profiles-") as directory:
        profiles = write_profiles(Path(directory))
        env = {**os.environ, "HPC_KERNELS_PROFILE_PATH": directory}
        # The warm row's storage gets the image once; what that costs is the cold row.
        start(f"{prefix}-warmup", profiles["podman, warm (node storage kept)"], env)
        for i in range(args.starts):
            totals["bare"].append(bare_sbatch_seconds())
            for row, profile in profiles.items():
                total, job = start(f"{prefix}-{i}-{list(profiles).index(row)}", profile, env)
                totals.setdefault(row, []).append(total)
                in_job.setdefault(row, []).append(job)

    bare = statistics.median(totals["bare"])
    print(f"hpc-kernels start-up benchmark, {time.strftime('%Y-%m-%d %H:%M')}, node {NODE}, {args.starts} runs each\n")
    print("| start-up (median) | until ready | over bare sbatch | in the job (agent) | all runs |")
    print("|---|---|---|---|---|")
    print(f"| bare `sbatch --wrap true` until COMPLETED | {bare:.2f} s | | | "
          + ", ".join(f"{v:.2f}" for v in totals["bare"]) + " |")
    for row in profiles:
        med = statistics.median(totals[row])
        print(f"| `submit`, {row} | {med:.2f} s | +{med - bare:.2f} s | {statistics.median(in_job[row]):.2f} s | "
              + ", ".join(f"{v:.2f}" for v in totals[row]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
