#!/usr/bin/env bash
# What is in a test node's private /tmp, as root sees it: one line per entry, "OWNER MODE NAME".
#
#   node-tmp.sh NODE
#
# A node's /tmp is a tmpfs in the mount namespace of its slurmd (up.sh): the login node cannot
# see it, and a user on the node cannot list other users' private directories. The tests run this
# as the unprivileged test user through sudo (a root-owned copy and a sudoers rule for exactly
# that copy, made by setup.sh), to check that nothing of theirs is left on a node.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

hk_need_root
[[ $# -eq 1 ]] || hk_die "usage: $0 NODE"
node=$1
[[ " ${HK_NODES[*]} " == *" $node "* ]] || hk_die "unknown node $node (nodes: ${HK_NODES[*]})"
pid=$(hk_pid_from_file "$(hk_slurmd_pidfile "$node")" slurmd) || hk_die "slurmd on $node is not running"
exec nsenter --target "$pid" --mount find /tmp -mindepth 1 -maxdepth 1 -printf '%u %m %f\n'
