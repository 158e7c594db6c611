#!/usr/bin/env bash
# Show whether the hpc-kernels test cluster is up. Exit 0 if every daemon runs, else 1.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

rc=0
check() {   # check LABEL PIDFILE NAME
    local pid
    if pid=$(hk_pid_from_file "$2" "$3"); then printf '%-12s up (pid %s)\n' "$1" "$pid"
    else printf '%-12s DOWN\n' "$1"; rc=1; fi
}
check munged "$HK_RUN/munged.pid" munged
check slurmctld "$HK_RUN/slurmctld.pid" slurmctld
for n in "${HK_NODES[@]}"; do
    check "slurmd $n" "$(hk_slurmd_pidfile "$n")" slurmd
    check "sshd $n" "$(hk_sshd_pidfile "$n")" sshd
    [[ -e /run/netns/$n ]] || { printf '%-12s no netns\n' "$n"; rc=1; }
done
if (( rc == 0 )); then sinfo; fi
exit $rc
