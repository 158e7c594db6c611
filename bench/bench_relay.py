"""Relay cost and start-up time, measured side by side in one run (``make bench``).

Rows, all against one kernel on a compute node (bubblewrap; the relay does not depend on the
runtime), whose agent also listens for the tcp transport:

* direct IPC on the node (a client started with ``srun --overlap`` inside the kernel's job):
  the limit;
* through the relay over each transport (srun, tcp, ssh), all three relays running at once in
  the user's relay daemon;
* the five sockets through a plain OpenSSH unix-socket tunnel (``ssh -L sock:sock`` to the
  node, one per socket): the usual practice.

Columns: execute round trip of ``x += 1`` (request sent until reply and idle status received),
median and p90; the time to stream N MB of stdout; the time for one ``display_data`` of an
M MB image payload; each as a ratio to direct IPC. For the round trips the five clients are
connected at once and take turns in batches of 20 against the same kernel, so that drift on the
machine hits every row alike. Output goes to every client subscribed to IOPub, so the bulk rows
connect one client at a time (in turns, twice each).

Start-up is bench_startup.py's.

Prints Markdown tables; docs/performance.md keeps the latest figures. Nothing here asserts a
speed: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CLIENT = r"""
import base64, json, os, sys, time
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
    elif what == "display":
        # An image of n MB as the notebook sees it (base64 text), made in the kernel beforehand.
        c.execute_interactive(
            "import base64, os\nfrom IPython.display import publish_display_data\n"
            "payload = base64.b64encode(os.urandom(%d * 750_000)).decode()" % int(n), output_hook=quiet, timeout=60)
        got = []
        t = time.perf_counter()
        c.execute_interactive("publish_display_data({'image/png': payload})", timeout=600,
                              output_hook=lambda msg: got.append(msg) if msg["msg_type"] == "display_data" else None)
        seconds = time.perf_counter() - t
        assert len(got) == 1 and len(got[0]["content"]["data"]["image/png"]) == int(n) * 1_000_000, len(got)
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


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ROWS = ["direct", "srun", "tcp", "ssh", "tunnel"]
TITLES = {"direct": "direct IPC on the node", "srun": "relay, srun", "tcp": "relay, tcp (TLS)",
          "ssh": "relay, ssh", "tunnel": "OpenSSH tunnel of the 5 sockets"}


def open_tunnel(node: str, node_dir: str, key: str) -> tuple[subprocess.Popen[bytes], Path]:
    """The usual practice: ``ssh -L`` of each of the kernel's five unix sockets to a private
    directory here, and a connection file for them. Plain OpenSSH, nothing of ours in between."""
    from hpc_kernels.paths import ensure_private_dir, runtime_root
    from hpc_kernels.relay import connection_info, socket_paths

    here = Path(tempfile.mkdtemp(prefix="bench-tunnel-", dir=ensure_private_dir(runtime_root())))
    forwards = []
    for local, remote in zip(socket_paths(str(here / "kernel")), socket_paths(f"{node_dir}/kernel")):
        forwards += ["-L", f"{local}:{remote}"]
    ssh = subprocess.Popen(["ssh", "-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", *forwards,
                            node], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(p) for p in socket_paths(str(here / "kernel"))):
        if ssh.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the ssh tunnel to {node} did not come up (exit code {ssh.poll()})")
        time.sleep(0.05)
    connection_file = here / "connection.json"
    connection_file.write_text(json.dumps(connection_info(str(here / "kernel"), key)))
    return ssh, connection_file


def ratio(value: float, direct: float) -> str:
    return f"{value / direct:.2f}x"


def transport_rows(args: argparse.Namespace, name: str) -> tuple[str, dict[str, dict[str, list[float]]]]:
    """Every row against one kernel: the measurements, taken in turns."""
    from hpc_kernels.launcher import start_relay
    from hpc_kernels.state import kernel_files

    sh("hpc-kernel", "submit", "--profile", "local", "--name", name, "--no-workspace", "--relay", "tcp")
    files = kernel_files(name)
    status = json.loads(sh("hpc-kernel", "status", name, "--json"))
    agent = json.loads(files.agent.read_text())
    connection_files = {"tcp": str(start_relay(files)),
                        "srun": str(start_relay(files, "srun", record=False)),
                        "ssh": str(start_relay(files, "ssh", record=False))}
    tunnel, tunnel_file = open_tunnel(agent["node"], agent["node_dir"], files.key.read_text().strip())
    connection_files["tunnel"] = str(tunnel_file)
    def client(row: str) -> Client:
        if row == "direct":
            return Client(["srun", f"--jobid={status['job_id']}", "--overlap", sys.executable, "-c", CLIENT,
                           str(Path(agent["node_dir"]) / "kernel.json")])
        return Client([sys.executable, "-c", CLIENT, connection_files[row]])

    clients: dict[str, Client] = {}
    results: dict[str, dict[str, list[float]]] = {row: {"rtt": [], "stream": [], "display": []} for row in ROWS}
    try:
        clients = {row: client(row) for row in ROWS}
        batch = 20
        for _ in range(max(1, args.runs // batch)):  # taking turns, so drift hits every row alike
            for row in ROWS:
                results[row]["rtt"] += clients[row].ask(f"rtt {batch}")  # type: ignore[operator]
        for row in ROWS:
            clients.pop(row).close()
        # Bulk output goes to every client subscribed to IOPub: one client at a time here.
        for _ in range(2):
            for row in ROWS:
                clients[row] = client(row)
                results[row]["stream"].append(clients[row].ask(f"stream {args.stream_mb}"))  # type: ignore[arg-type]
                results[row]["display"].append(clients[row].ask(f"display {args.display_mb}"))  # type: ignore[arg-type]
                clients.pop(row).close()
    finally:
        for remaining in clients.values():
            remaining.close()
        tunnel.terminate()
        tunnel.wait(10)
        shutil.rmtree(tunnel_file.parent, ignore_errors=True)
        subprocess.run(["hpc-kernel", "shutdown", name], capture_output=True)
    return str(status["node"]), results


def print_transport_table(args: argparse.Namespace, results: dict[str, dict[str, list[float]]]) -> None:
    median = {row: statistics.median(results[row]["rtt"]) * 1e3 for row in ROWS}
    p90 = {row: pct(results[row]["rtt"], 0.9) * 1e3 for row in ROWS}
    stream = {row: min(results[row]["stream"]) for row in ROWS}
    display = {row: min(results[row]["display"]) for row in ROWS}
    print("| measure | " + " | ".join(TITLES[row] for row in ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    print("| execute `x += 1`, median | " + " | ".join(
        f"{median[r]:.2f} ms" + ("" if r == "direct" else f" ({ratio(median[r], median['direct'])})") for r in ROWS) + " |")
    print("| execute `x += 1`, p90 | " + " | ".join(
        f"{p90[r]:.2f} ms" + ("" if r == "direct" else f" ({ratio(p90[r], p90['direct'])})") for r in ROWS) + " |")
    print(f"| stream {args.stream_mb} MB of stdout, best of 2 | " + " | ".join(
        f"{stream[r]:.2f} s, {args.stream_mb / stream[r]:.0f} MB/s"
        + ("" if r == "direct" else f" ({stream['direct'] / stream[r]:.2f}x direct's speed)") for r in ROWS) + " |")
    print(f"| one `display_data` of {args.display_mb} MB, best of 2 | " + " | ".join(
        f"{display[r]:.2f} s" + ("" if r == "direct" else f" ({display['direct'] / display[r]:.2f}x direct's speed)")
        for r in ROWS) + " |")
    print("| round trip: how many times faster than the tunnel (median) | " + " | ".join(
        f"{median['tunnel'] / median[r]:.1f}x" for r in ROWS) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="execute round trips per row")
    parser.add_argument("--stream-mb", type=int, default=50, help="MB of output to stream per row")
    parser.add_argument("--display-mb", type=int, default=20, help="MB of one display_data payload")
    args = parser.parse_args()

    name = f"bench-{uuid.uuid4().hex[:6]}"
    node, results = transport_rows(args, f"{name}-relay")
    print(f"hpc-kernels relay benchmark, {time.strftime('%Y-%m-%d %H:%M')}, node {node}, "
          f"{args.runs} round trips, {args.stream_mb} MB stream, {args.display_mb} MB display_data\n")
    print_transport_table(args, results)
    return 0

if __name__ == "__main__":
    sys.exit(main())
