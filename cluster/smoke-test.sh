#!/usr/bin/env bash
# End-to-end check of a running test cluster (run as root after up.sh). Exits non-zero on failure.
# Runs everything as hk-alice, the way the test suite does.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
hk_need_root

U=hk-alice
H=$(getent passwd "$U" | cut -d: -f6)
as_user() { (cd "$H" && runuser -u "$U" -- "$@"); }
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok   $*"; }

tag=smoke-$$-$RANDOM
job=$(as_user sbatch --parsable -o "$H/$tag-%j.out" \
    --wrap "hostname; ip -br addr; echo $tag >/tmp/$tag; sleep 60")
trap 'as_user scancel "$job" 2>/dev/null || true; rm -f "$H/$tag-"*.out' EXIT
for _ in $(seq 100); do
    [[ $(as_user squeue -h -j "$job" -o %T) == RUNNING ]] && break; sleep 0.1
done
[[ $(as_user squeue -h -j "$job" -o %N) == c1 ]] || fail "job $job not running on c1: $(as_user squeue -j "$job")"
ok "sbatch job $job running on c1"

[[ $(as_user srun --jobid="$job" --overlap -u hostname | tr -d '\r') == c1 ]] || fail "srun hostname"
ok "srun --overlap into the job: hostname c1"

sleep 0.5   # let the batch script write its /tmp file
[[ $(as_user srun --jobid="$job" --overlap -u cat "/tmp/$tag" | tr -d '\r') == "$tag" ]] ||
    fail "job /tmp file not visible to a second step"
[[ ! -e /tmp/$tag ]] || fail "job /tmp file visible on the login node"
ok "node-local /tmp: shared by steps of the job, invisible on the login node"

{ grep -qx c1 "$H/$tag-$job.out" && grep -q "10.77.7.11/24" "$H/$tag-$job.out"; } || fail "job output: $(cat "$H/$tag-$job.out")"
ok "job output in shared /home (hostname c1, eth0 10.77.7.11)"

out=$(as_user srun --jobid="$job" --overlap -u bwrap --unshare-all --die-with-parent --ro-bind / / \
    --dev /dev --proc /proc --tmpfs /tmp --tmpfs /home /usr/bin/python3 -c \
    'import socket; socket.create_connection(("10.77.7.1", 6817), 2)' 2>&1 || true)
grep -q 'Network is unreachable' <<<"$out" || fail "bwrap network not cut: $out"
as_user srun --jobid="$job" --overlap -u /usr/bin/python3 -c \
    'import socket; socket.create_connection(("10.77.7.1", 6817), 2)' || fail "no network outside bwrap"
ok "bwrap in a job: Network is unreachable (without bwrap: controller reachable)"

s=$(as_user sbatch --parsable -p short -o /dev/null --wrap true) || fail "sbatch -p short"
ok "sbatch -p short (job $s)"
if out=$(as_user sbatch -p nosuch -o /dev/null --wrap true 2>&1); then fail "sbatch -p nosuch succeeded"; fi
grep -q 'Invalid partition name' <<<"$out" || fail "unexpected: $out"
ok "sbatch -p nosuch refused: $(tail -n1 <<<"$out")"

[[ $(as_user sudo -n -u hk-bob id -un) == hk-bob ]] || fail "sudo -n -u hk-bob"
ok "hk-alice: sudo -n -u hk-bob works"

{ [[ -x $HK_VENV/bin/python ]] && as_user "$HK_VENV/bin/python" -c 'import sys'; } || fail "venv not usable by $U"
ok "venv $HK_VENV usable by $U"
echo "smoke test passed"
