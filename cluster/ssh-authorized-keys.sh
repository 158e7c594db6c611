#!/bin/sh
# The compute nodes' sshd AuthorizedKeysCommand: emulates pam_slurm_adopt's access rule, "a user
# may log in to a node only while they have a running job there".
#
#   authorized-keys-command NODE USER [LOG]
#
# Prints USER's ~/.ssh/authorized_keys while `squeue` lists a running job of USER on NODE, and
# nothing otherwise (sshd then answers "Permission denied (publickey)"). Fails closed: when
# squeue fails (slurmctld down), nobody gets in. sshd discards this program's stderr, so the
# reason for a refusal is appended to LOG (the node's sshd log) instead.
#
# up.sh installs a copy as $HK_SSH/authorized-keys-command: sshd runs it only if it and every
# directory above it are root-owned and not group/world-writable, which a repo checkout
# need not be. sshd runs it as root (AuthorizedKeysCommandUser): the homes are 0750.
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
SLURM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF
node=$1 user=$2 log=${3:-/dev/null}

note() { echo "$(date '+%Y-%m-%dT%H:%M:%S') authorized-keys-command[$$]: $*" >>"$log" 2>/dev/null || true; }

rc=0
jobs=$(squeue -h -u "$user" -w "$node" -t R -o %i 2>/dev/null) || rc=$?
if [ "$rc" -ne 0 ]; then
    note "refusing $user on $node: squeue failed (exit $rc)"
    exit 1
fi
if [ -z "$jobs" ]; then
    note "refusing $user on $node: no running job of $user there"
    exit 0
fi
home=$(getent passwd "$user" | cut -d: -f6)
# Read the file as the user, not as root: a symlink in their ~/.ssh must not reach root's files.
exec setpriv --reuid="$(id -u "$user")" --regid="$(id -g "$user")" --init-groups \
    cat "$home/.ssh/authorized_keys"
