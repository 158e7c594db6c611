#!/usr/bin/env bash
# The processes running on a test node (in its network namespace, and below them: sandboxes have
# namespaces of their own), as root sees them: one line per process, "USER PID COMMAND".
#
#   node-procs.sh NODE
#
# The tests run this as the unprivileged test user through sudo (a root-owned copy and a sudoers
# rule for exactly that copy, made by setup.sh), to check that nothing of theirs outlives its job.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

hk_need_root
[[ $# -eq 1 ]] || hk_die "usage: $0 NODE"
node=$1
[[ " ${HK_NODES[*]} " == *" $node "* ]] || hk_die "unknown node $node (nodes: ${HK_NODES[*]})"
mapfile -t pids < <(hk_node_pids "$node")
(( ${#pids[@]} )) || exit 0
ps -o user=,pid=,args= -p "$(IFS=,; echo "${pids[*]}")" || true
