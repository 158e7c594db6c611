"""Many kernels relayed at once through one login node (``make bench``; docs/performance.md).

For each transport, kernels are started one batch after another (1, then 10, 50 and 100 in
all) and every one of them is relayed, with a Jupyter client connected to it (heartbeats
running). At each size this measures, on the login node:

* the memory of the login side of all relays: the proportional set size (PSS, so that pages
  shared between processes are counted once) of the user's relay daemon and everything it
  started (srun or ssh per kernel; nothing per kernel for tcp), in total and per kernel;
* its open file descriptors, in total and per kernel;
* the execute round trip of ``x += 1`` to the first kernel (median and p90 of 100), against the
  same with that kernel alone.

The kernels run as steps of one allocation (a holder job on c1) because the test cluster's
nodes have 16 CPUs each: a job per kernel would stop at 32. Nothing on the login side differs:
each kernel still has its own relay, its own stream and its own srun (or ssh, or TLS connection).
The kernel steps' own sruns (one per kernel, there for as long as the step runs) are not part
of the relay and are not counted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench_relay import CLIENT, Client, pct, sh

IDLE_CLIENTS = r"""
import sys
from jupyter_client import BlockingKernelClient

clients = []
for path in sys.argv[1:]:
    c = BlockingKernelClient()
    c.load_connection_file(path)
    c.start_channels()
    c.wait_for_ready(timeout=120)
    clients.append(c)
print("ready", flush=True)
sys.stdin.read()
for c in clients:
    c.stop_channels()
"""


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def login_side(daemon: int) -> tuple[int, int, int]:
    """Processes, PSS (KiB) and open file descriptors of the relay daemon and what it started."""
    pids = tree(daemon)
    return len(pids), sum(pss_kib(p) for p in pids), sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)


def start_kernel(name: str, transport: str, holder: str) -> str:
    env = {**os.environ, "SLURM_JOB_ID": holder}
    proc = subprocess.run(["hpc-kernel", "submit", "--profile", "local", "--name", name, "--no-workspace",
                           "--relay", transport], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"kernel {name} did not start:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def daemon_pid(name: str) -> int:
    from hpc_kernels.state import kernel_files

    return int(json.loads(kernel_files(name).relay.read_text())["pid"])


def measure(transport: str, sizes: list[int], runs: int, holder: str) -> list[dict[str, float]]:
    prefix = f"scale-{transport}-{uuid.uuid4().hex[:4]}"
    names: list[str] = []
    files: list[str] = []
    rows = []
    probe: Client | None = None
    idle: list[subprocess.Popen[str]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for size in sizes:
                new = [f"{prefix}-{i}" for i in range(len(names), size)]
                names += new  # before they start: whatever happens, they are shut down below
                new_files = list(pool.map(lambda n: start_kernel(n, transport, holder), new))
                files += new_files
                if probe is None:
                    probe = Client([sys.executable, "-c", CLIENT, files[0]])
                targets = [f for n, f in zip(new, new_files) if n != names[0]]  # the probe's kernel has its client
                if targets:
                    clients = subprocess.Popen([sys.executable, "-c", IDLE_CLIENTS, *targets],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert clients.stdout is not None
                    if clients.stdout.readline().strip() != "ready":
                        sys.exit("the idle clients did not connect")
                    idle.append(clients)
                time.sleep(3)  # heartbeats going, relays settled
                samples = probe.ask(f"rtt {runs}")
                processes, pss, fds = login_side(daemon_pid(names[0]))
                rows.append({"kernels": size, "processes": processes, "pss_mib": pss / 1024, "fds": fds,
                             "rtt_median_ms": statistics.median(samples) * 1e3,  # type: ignore[arg-type]
                             "rtt_p90_ms": pct(samples, 0.9) * 1e3})  # type: ignore[arg-type]
                print(f"  {transport}: {size} kernels measured", file=sys.stderr)
    finally:
        for clients in idle:
            clients.communicate("", timeout=120)
        if probe is not None:
            probe.close()
        for i in range(0, len(names), 20):  # names that never started are reported, not fatal
            subprocess.run(["hpc-kernel", "shutdown", *names[i:i + 20]], capture_output=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,50,100", help="kernels relayed at once, in steps")
    parser.add_argument("--runs", type=int, default=100, help="round trips measured at each size")
    parser.add_argument("--transport", action="append", choices=["srun", "tcp", "ssh"],
                        help="transports to measure (default: all three)")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.sizes.split(","))
    holder = sh("sbatch", "--parsable", "--nodelist=c1", "--cpus-per-task=16", "--mem=80G", "--time=60",
                "--output=/dev/null", "--job-name=bench-scale-holder", "--wrap", "sleep 3600").strip()
    results = {}
    try:
        while sh("squeue", "-h", "-j", holder, "-o", "%T").strip() != "RUNNING":
            time.sleep(0.2)
        for transport in args.transport or ["srun", "tcp", "ssh"]:
            results[transport] = measure(transport, sizes, args.runs, holder)
    finally:
        subprocess.run(["scancel", holder])

    print(f"hpc-kernels scale benchmark, {time.strftime('%Y-%m-%d %H:%M')}, kernels as steps of one job on c1, "
          f"{args.runs} round trips to the first kernel at each size\n")
    print("| transport | kernels relayed | login-side processes | PSS, all | PSS per kernel | fds per kernel "
          "| round trip median | p90 | median against 1 kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for transport, rows in results.items():
        alone = rows[0]["rtt_median_ms"]
        for row in rows:
            n = row["kernels"]
            print(f"| {transport} | {n} | {row['processes']} | {row['pss_mib']:.1f} MiB | {row['pss_mib'] / n:.2f} MiB "
                  f"| {row['fds'] / n:.1f} | {row['rtt_median_ms']:.2f} ms | {row['rtt_p90_ms']:.2f} ms "
                  f"| {row['rtt_median_ms'] / alone:.2f}x |")
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            added = (last["pss_mib"] - first["pss_mib"]) / (last["kernels"] - first["kernels"])
            print(f"| {transport} | each added kernel | | | {added:.2f} MiB | "
                  f"{(last['fds'] - first['fds']) / (last['kernels'] - first['kernels']):.1f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
