#!/usr/bin/env bash
# Stop the hpc-kernels test cluster started by cluster/up.sh (idempotent).
# Ends only what up.sh started: daemons by the PIDs in their pid files, and whatever still runs
# inside the node network namespaces c1/c2 (slurmstepd, job processes, ssh sessions). Never kills
# by name.
# Keeps $HK_STATE (Slurm state, job ids, logs) so the next up.sh continues from there.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

# The nodes' sshd first (no new logins), with their sessions (children of the listener).
stop_sshd() {
    local n pidfile pid pids
    for n in "${HK_NODES[@]}" "$HK_LOGIN2"; do
        pidfile=$(hk_sshd_pidfile "$n")
        if pid=$(hk_pid_from_file "$pidfile" sshd); then
            pids=$(hk_with_descendants "$pid")
            hk_log "stopping sshd on $n (pid $pid) and its sessions"
            # shellcheck disable=SC2086
            hk_terminate 5 $pids
        fi
        rm -f "$pidfile"
    done
}

cancel_jobs() {
    hk_pid_from_file "$HK_RUN/slurmctld.pid" slurmctld >/dev/null || return 0
    local users u
    users=$(squeue -h -o '%u' 2>/dev/null | sort -u || true)
    [[ -n $users ]] || return 0
    hk_log "cancelling jobs of: ${users//$'\n'/ }"
    for u in $users root; do scancel -u "$u" 2>/dev/null || true; done
    # Give the jobs a moment to end cleanly; leftovers are killed below anyway.
    for _ in $(seq 30); do
        [[ -z $(squeue -h -t R,CG,S -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
}

stop_daemons() {
    local n
    for n in "${HK_NODES[@]}"; do hk_stop_pidfile "$(hk_slurmd_pidfile "$n")" slurmd; done
    hk_stop_pidfile "$HK_RUN/slurmctld.pid" slurmctld
}

# slurmstepd and job processes survive their slurmd: end everything left in the nodes.
kill_node_leftovers() {
    local n pids
    for n in "${HK_NODES[@]}" "$HK_LOGIN2"; do
        pids=$(hk_node_pids "$n")
        [[ -n $pids ]] || continue
        hk_log "ending processes left on $n: ${pids//$'\n'/ }"
        # shellcheck disable=SC2086
        hk_terminate 3 $pids
        # Anything forked meanwhile.
        pids=$(hk_node_pids "$n")
        # shellcheck disable=SC2086
        [[ -z $pids ]] || { kill -KILL $pids 2>/dev/null || true; hk_wait_gone 5 $pids || true; }
    done
}

remove_network() {
    local n
    for n in "${HK_NODES[@]}" "$HK_LOGIN2"; do
        if ip link show "veth-$n" >/dev/null 2>&1; then ip link del "veth-$n"; fi
        if [[ -e /run/netns/$n ]]; then hk_log "deleting netns $n"; ip netns del "$n"; fi
    done
    if ip link show "$HK_BRIDGE" >/dev/null 2>&1; then
        hk_log "deleting bridge $HK_BRIDGE"
        ip link del "$HK_BRIDGE"
    fi
}

remove_hosts_lines() {
    grep -qF -- "$HK_HOSTS_MARK" /etc/hosts || return 0
    hk_log "removing our lines from /etc/hosts"
    local rest
    rest=$(grep -vF -- "$HK_HOSTS_MARK" /etc/hosts || true)
    printf '%s\n' "$rest" >/etc/hosts        # in place: /etc/hosts may be a bind mount
}

remove_known_hosts_lines() {
    grep -qF -- "$HK_HOSTS_MARK" "$HK_KNOWN_HOSTS" 2>/dev/null || return 0
    hk_log "removing our lines from $HK_KNOWN_HOSTS"
    local rest
    rest=$(grep -vF -- "$HK_HOSTS_MARK" "$HK_KNOWN_HOSTS" || true)
    if [[ -n $rest ]]; then printf '%s\n' "$rest" >"$HK_KNOWN_HOSTS"; else rm -f "$HK_KNOWN_HOSTS"; fi
}

remove_standin_gpus() {
    local list=$HK_STATE/standin-devices dev
    [[ -f $list ]] || return 0
    while read -r dev; do
        [[ -c $dev ]] && rm -f "$dev"
    done <"$list"
    rm -f "$list"
}

main() {
    hk_need_root
    stop_sshd
    cancel_jobs
    stop_daemons
    kill_node_leftovers
    hk_stop_pidfile "$HK_RUN/munged.pid" munged
    remove_network
    remove_hosts_lines
    remove_known_hosts_lines
    remove_standin_gpus
}

main "$@"
