#!/usr/bin/env bash
# Power a compute node of the test cluster off or on, as a node failure does (fault tests).
#
#   node-power.sh off NODE   the node's link goes down first (nothing it says reaches anyone any more,
#                            as when a node loses power: no FIN, no RST), then every process on it dies
#                            (SIGKILL: slurmd, slurmstepd, jobs, sshd); its node-local /tmp goes with them
#   node-power.sh on NODE    the link comes back up and up.sh starts its slurmd and sshd again, with a
#                            fresh /tmp; Slurm takes the node back (ReturnToService=2)
#
# The tests run it as the unprivileged test user through sudo (setup.sh installs a root-owned
# copy and a sudoers rule for exactly that copy). Slurm declares the node DOWN after
# SlurmdTimeout (short in this cluster, see up.sh) and ends or requeues its jobs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

hk_need_root
[[ $# -eq 2 && ( $1 == off || $1 == on ) ]] || hk_die "usage: $0 off|on NODE"
action=$1 node=$2
[[ " ${HK_NODES[*]} " == *" $node "* ]] || hk_die "unknown node $node (nodes: ${HK_NODES[*]})"

if [[ $action == off ]]; then
    ip link set "veth-$node" down
    for _ in $(seq 50); do
        mapfile -t pids < <(hk_node_pids "$node")
        (( ${#pids[@]} )) || break
        # All stopped first, then all killed: as at a power cut, no process of the node may see
        # another die and act on it (a loaded machine can pause this loop between two kills).
        kill -STOP "${pids[@]}" 2>/dev/null || true
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.1
    done
    mapfile -t pids < <(hk_node_pids "$node")
    (( ${#pids[@]} == 0 )) || hk_die "processes left on $node: ${pids[*]}"
    rm -f "$(hk_slurmd_pidfile "$node")" "$(hk_sshd_pidfile "$node")"
    hk_log "$node is off"
else
    ip link set "veth-$node" up
    "$HERE/up.sh" >/dev/null
    hk_log "$node is on"
fi
