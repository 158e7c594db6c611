#!/usr/bin/env bash
# What a test node holds, as root sees it: the tests check that nothing of theirs outlives a job.
#
#   node-inspect.sh tmp NODE     the node's private /tmp: one line per entry, "OWNER MODE NAME"
#   node-inspect.sh procs NODE   its processes (in its network namespace, and below them: sandboxes
#                                have namespaces of their own): one line each, "USER PID COMMAND"
#
# A node's /tmp is a tmpfs in the mount namespace of its slurmd (up.sh): the login node cannot see
# it, and a user cannot list another job's private directories. The tests run this as the
# unprivileged test user through sudo (a root-owned copy and a sudoers rule for exactly that copy,
# made by setup.sh).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

hk_need_root
[[ $# -eq 2 && ( $1 == tmp || $1 == procs ) ]] || hk_die "usage: $0 tmp|procs NODE"
what=$1 node=$2
[[ " ${HK_NODES[*]} " == *" $node "* ]] || hk_die "unknown node $node (nodes: ${HK_NODES[*]})"
if [[ $what == tmp ]]; then
    pid=$(hk_pid_from_file "$(hk_slurmd_pidfile "$node")" slurmd) || hk_die "slurmd on $node is not running"
    exec nsenter --target "$pid" --mount find /tmp -mindepth 1 -maxdepth 1 -printf '%u %m %f\n'
fi
mapfile -t pids < <(hk_node_pids "$node")
(( ${#pids[@]} )) || exit 0
ps -o user=,pid=,args= -p "$(IFS=,; echo "${pids[*]}")" || true
