"""Relay cost and start-up time, measured side by side in one run (``make bench``).

Rows, all against one kernel on a compute node:

* execute round trip of ``x += 1`` (request sent until reply and idle status received),
  through the relay from the login node, and directly over IPC on the compute node
  (a client started with ``srun --overlap`` inside the kernel's job). The two clients take
  turns in batches of 20 against the same kernel, so that drift on the machine hits both alike;
* streaming a large output (``sys.stdout.write`` of N MB) the same two ways;
* time from ``hpc-kernel submit`` to kernel ready, next to a bare ``sbatch`` of a no-op job
  (submitted until COMPLETED), alternating, on the same idle cluster.

Prints a Markdown table; docs/performance.md keeps the latest figures. Nothing here asserts a
speed: it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

CLIENT = r"""
import json, sys, time
from jupyter_client import BlockingKernelClient

c = BlockingKernelClient()
c.load_connection_file(sys.argv[1])
c.start_channels()
c.wait_for_ready(timeout=60)
quiet = lambda msg: None
c.execute_interactive("x = 0", output_hook=quiet, timeout=60)
for _ in range(20):
    c.execute_interactive("x += 1", output_hook=quiet, timeout=60)
print("ready", flush=True)
for line in sys.stdin:
    what, n = line.split()
    if what == "rtt":
        samples = []
        for _ in range(int(n)):
            t = time.perf_counter()
            c.execute_interactive("x += 1", output_hook=quiet, timeout=60)
            samples.append(time.perf_counter() - t)
        print(json.dumps(samples), flush=True)
    elif what == "stream":
        received = 0
        def count(msg):
            global received
            if msg["msg_type"] == "stream":
                received += len(msg["content"]["text"])
        t = time.perf_counter()
        c.execute_interactive(
            "import sys\nchunk = 'y' * 1_000_000\nfor _ in range(%d): sys.stdout.write(chunk)" % int(n),
            output_hook=count, timeout=600)
        seconds = time.perf_counter() - t
        assert received == int(n) * 1_000_000, received
        print(json.dumps(seconds), flush=True)
c.stop_channels()
"""


class Client:
    """A measuring client in its own process, driven line by line, so two can take turns."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            sys.exit(f"client {' '.join(argv[:3])} did not start: {line!r}")

    def ask(self, command: str) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def sh(*argv: str, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def job_state(job_id: str) -> str:
    out = sh("scontrol", "show", "job", "-o", job_id)
    return out.split("JobState=")[1].split()[0]


def bare_sbatch_seconds() -> float:
    t = time.perf_counter()
    job_id = sh("sbatch", "--parsable", "--output=/dev/null", "--wrap", "true").strip()
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.02)
    return time.perf_counter() - t


def submit_seconds(name: str, profile: str = "local") -> float:
    t = time.perf_counter()
    sh("hpc-kernel", "submit", "--profile", profile, "--name", name, "--no-workspace")
    return time.perf_counter() - t


def agent_startup_seconds(name: str) -> float:
    """The agent's own figure: from launching the runtime until the kernel's five sockets exist."""
    status = json.loads(sh("hpc-kernel", "status", name, "--json"))
    return float(json.loads((Path(status["log"]).parent / "agent.json").read_text())["startup_seconds"])


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="execute round trips per row")
    parser.add_argument("--stream-mb", type=int, default=20, help="MB of output to stream per row")
    parser.add_argument("--starts", type=int, default=3, help="submit-to-ready and bare sbatch runs each")
    args = parser.parse_args()

    name = f"bench-{uuid.uuid4().hex[:6]}"
    startups, bares, app_startups = [], [], []
    in_job: dict[str, list[float]] = {"bwrap": [], "apptainer": []}
    try:
        for i in range(args.starts):  # the three kinds of start take turns
            bares.append(bare_sbatch_seconds())
            app_startups.append(submit_seconds(f"{name}-app-{i}", "local-apptainer"))
            in_job["apptainer"].append(agent_startup_seconds(f"{name}-app-{i}"))
            sh("hpc-kernel", "shutdown", f"{name}-app-{i}")
            startups.append(submit_seconds(f"{name}-{i}"))
            in_job["bwrap"].append(agent_startup_seconds(f"{name}-{i}"))
            if i < args.starts - 1:
                sh("hpc-kernel", "shutdown", f"{name}-{i}")
        kernel = f"{name}-{args.starts - 1}"
        status = json.loads(sh("hpc-kernel", "status", kernel, "--json"))
        agent = json.loads((Path(status["log"]).parent / "agent.json").read_text())
        login_cf = sh("hpc-kernel", "connect", kernel).strip()

        relay_client = Client([sys.executable, "-c", CLIENT, login_cf])
        direct_client = Client(["srun", f"--jobid={status['job_id']}", "--overlap", sys.executable, "-c", CLIENT,
                                str(Path(agent["node_dir"]) / "kernel.json")])
        relay: dict[str, list[float]] = {"rtt": [], "stream": []}
        direct: dict[str, list[float]] = {"rtt": [], "stream": []}
        batch = 20
        for _ in range(max(1, args.runs // batch)):  # taking turns, so drift hits both rows alike
            relay["rtt"] += relay_client.ask(f"rtt {batch}")  # type: ignore[operator]
            direct["rtt"] += direct_client.ask(f"rtt {batch}")  # type: ignore[operator]
        for _ in range(2):
            relay["stream"].append(relay_client.ask(f"stream {args.stream_mb}"))  # type: ignore[arg-type]
            direct["stream"].append(direct_client.ask(f"stream {args.stream_mb}"))  # type: ignore[arg-type]
        relay_client.close()
        direct_client.close()
    finally:
        for i in range(args.starts):
            for kernel_name in (f"{name}-{i}", f"{name}-app-{i}"):
                subprocess.run(["hpc-kernel", "shutdown", kernel_name], capture_output=True)

    d_med, r_med = statistics.median(direct["rtt"]) * 1e3, statistics.median(relay["rtt"]) * 1e3
    d_p90, r_p90 = pct(direct["rtt"], 0.9) * 1e3, pct(relay["rtt"], 0.9) * 1e3
    d_mbs, r_mbs = args.stream_mb / min(direct["stream"]), args.stream_mb / min(relay["stream"])
    s_med, b_med, a_med = statistics.median(startups), statistics.median(bares), statistics.median(app_startups)

    print(f"hpc-kernels relay benchmark, {time.strftime('%Y-%m-%d %H:%M')}, node {status['node']}, "
          f"{args.runs} round trips, {args.stream_mb} MB stream, {args.starts} starts\n")
    print("| measure | direct IPC on the node | through the relay (srun) | relay / direct |")
    print("|---|---|---|---|")
    print(f"| execute `x += 1`, median | {d_med:.2f} ms | {r_med:.2f} ms | {r_med / d_med:.2f}x |")
    print(f"| execute `x += 1`, p90 | {d_p90:.2f} ms | {r_p90:.2f} ms | {r_p90 / d_p90:.2f}x |")
    print(f"| stream {args.stream_mb} MB of stdout, best of 2 | {d_mbs:.1f} MB/s | {r_mbs:.1f} MB/s "
          f"| {d_mbs / r_mbs:.2f}x time |")
    print()
    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values) + " s"

    print("| start-up | bare `sbatch --wrap true` until COMPLETED | `submit` until ready, bubblewrap | "
          "`submit` until ready, Apptainer |")
    print("|---|---|---|---|")
    print(f"| median of {args.starts} | {b_med:.2f} s | {s_med:.2f} s ({s_med / b_med:.2f}x) "
          f"| {a_med:.2f} s ({a_med / b_med:.2f}x) |")
    print(f"| all runs | {runs(bares)} | {runs(startups)} | {runs(app_startups)} |")
    print(f"| of which the kernel start in the job (agent: launch to five sockets), median | | "
          f"{statistics.median(in_job['bwrap']):.2f} s | {statistics.median(in_job['apptainer']):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
