#!/usr/bin/env bash
# The README's walk-through on the local cluster, run by `make demo` as the unprivileged hk-alice.
set -euo pipefail
cd "$HOME"
mkdir -p "$HOME/demo-workspace"
echo "a file in the workspace" >"$HOME/demo-workspace/README.txt"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# A demo kernel left over from an interrupted run must not block this one.
hpc-kernel shutdown demo >/dev/null 2>&1 || true

step hpc-kernel submit --profile local --name demo --workspace "$HOME/demo-workspace"
hpc-kernel submit --profile local --name demo --workspace "$HOME/demo-workspace"

step hpc-kernel exec demo "'import socket; print(socket.gethostname())'"
hpc-kernel exec demo 'import socket; print(socket.gethostname())'

step hpc-kernel exec demo "'...: the network, home and the workspace from inside the sandbox'"
hpc-kernel exec demo '
import os, socket
try:
    socket.create_connection(("10.77.7.1", 22), timeout=3)
except OSError as e:
    print("network:  ", e)
print("home:     ", os.path.expanduser("~"), "->", sorted(os.listdir("/home")))
print("workspace:", os.getcwd(), os.listdir("."))
try:
    open("new-file", "w")
except OSError as e:
    print("write:    ", e)
'

step 'jupyter console --existing "$(hpc-kernel connect demo)"   # with input from a pipe'
printf 'x = 6 * 7\nprint("the answer is", x)\n' |
    jupyter console --existing "$(hpc-kernel connect demo)" --simple-prompt 2>&1 | grep -v '^$' | tail -n 4

step hpc-kernel list
hpc-kernel list
step hpc-kernel status demo
hpc-kernel status demo
step hpc-kernel logs demo
hpc-kernel logs demo
step hpc-kernel shutdown demo
hpc-kernel shutdown demo

# The same in an Apptainer image, on the GPU partition (c1's GPU is a stand-in: docs/testing.md).
hpc-kernel shutdown demo-gpu >/dev/null 2>&1 || true
step hpc-kernel submit --profile local-apptainer --name demo-gpu --gpus 1 --partition gpu --no-workspace
hpc-kernel submit --profile local-apptainer --name demo-gpu --gpus 1 --partition gpu --no-workspace
step hpc-kernel exec demo-gpu "'...: Python, the GPU Slurm gave, the network'"
hpc-kernel exec demo-gpu '
import os, socket, sys
print("python:   ", sys.executable, sys.version.split()[0], "(the image'"'"'s)")
print("GPU:      ", "CUDA_VISIBLE_DEVICES =", os.environ.get("CUDA_VISIBLE_DEVICES"),
      [d for d in sorted(os.listdir("/dev")) if d.startswith("nvidia")])
try:
    socket.create_connection(("10.77.7.1", 22), timeout=3)
except OSError as e:
    print("network:  ", e)
'
step hpc-kernel shutdown demo-gpu
hpc-kernel shutdown demo-gpu
# The relay's transports this cluster allows (srun, tcp with mutual TLS, ssh), tried on a test job.
step hpc-kernel doctor --profile local
hpc-kernel doctor --profile local
# A batch: one notebook over a 3 x 2 grid, as one job array, each task in the sandbox on its node.
cat >"$HOME/demo-workspace/sweep.ipynb" <<'JSON'
{"nbformat": 4, "nbformat_minor": 5, "metadata": {},
 "cells": [
  {"id": "params", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": null,
   "outputs": [], "source": "alpha = 0.0\nseed = 0"},
  {"id": "work", "cell_type": "code", "metadata": {}, "execution_count": null, "outputs": [],
   "source": "import socket\nprint(socket.gethostname(), alpha, seed)\nalpha * seed"}]}
JSON
printf 'grid:\n  alpha: [0.1, 0.2, 0.3]\n  seed: [1, 2]\n' >"$HOME/demo-workspace/grid.yaml"
rm -rf "$HOME/demo-results"
step hpc-kernel batch submit demo-workspace/sweep.ipynb --params demo-workspace/grid.yaml --profile local \
    --max-parallel 4 --out demo-results --workspace demo-workspace --watch
hpc-kernel batch submit demo-workspace/sweep.ipynb --params demo-workspace/grid.yaml --profile local \
    --max-parallel 4 --out demo-results --workspace demo-workspace --watch
step hpc-kernel batch results
hpc-kernel batch results
step ls demo-results
ls demo-results

step "squeue --me; hpc-kernel list"
squeue --me
hpc-kernel list
