#!/usr/bin/env bash
# Start the hpc-kernels test cluster (idempotent; a fast check when it is already up).
#
# Layout: this host is the login node and runs slurmctld (10.77.7.1 on bridge hkbr0);
# compute nodes c1 (10.77.7.11) and c2 (10.77.7.12) are network namespaces, each running
# its own slurmd with its own hostname (UTS ns) and a private node-local /tmp (mount ns).
# /home and everything else stays shared, like a cluster file system. Each node also runs an
# OpenSSH server in those namespaces that lets a user in only during a running job of theirs
# there, as a site with pam_slurm_adopt does.
# Run cluster/setup.sh once before. Stop with cluster/down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
# The daemons started here outlive this script: they must not inherit what its caller had open
# (a `flock LOCK make test` lock would then be held by munged for ever).
hk_close_inherited_fds

LOGIN_HOST=$(hostname -s)
RELEASE=$(hk_release)      # bookworm (Slurm 22.05, OpenSSH 9.2) or trixie (Slurm 24.11, OpenSSH 10)
WAIT_SECONDS=30
declare -A STARTED_AT=()   # node -> time its slurmd was started by this run (must re-register)

preflight() {
    hk_need_root
    local c
    for c in slurmctld slurmd sinfo scontrol munged nsenter unshare ip /usr/sbin/sshd ssh-keygen; do
        command -v "$c" >/dev/null || hk_die "$c not found: run cluster/setup.sh first"
    done
    mkdir -p "$HK_RUN" "$HK_LOG" "$HK_STATE/ctld"
    chmod 0755 "$HK_STATE" "$HK_LOG"
    # "sacct -c" (finished jobs without slurmdbd) opens JobCompLoc with O_WRONLY|O_APPEND even
    # to read it, so test users (group $HK_GROUP, made by setup.sh) need write access.
    local jc=$HK_STATE/jobcomp.txt
    [[ -e $jc ]] || install -m 0664 /dev/null "$jc"
    if getent group "$HK_GROUP" >/dev/null; then chgrp "$HK_GROUP" "$jc"; chmod 0664 "$jc"; fi
}

# --- munge ------------------------------------------------------------------------------
start_munged() {
    local pid
    hk_pid_from_file "$HK_RUN/munged.pid" munged >/dev/null && return 0
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || { hk_log "creating munge key"; runuser -u munge -- mungekey -c; }
    # A munged already running on this machine (started by hand earlier): adopt it.
    if ! pid=$(hk_pid_from_file /run/munge/munged.pid munged); then
        hk_log "starting munged"
        rm -f /run/munge/munged.pid
        (cd / && "${HK_DAEMON_ENV[@]}" runuser -u munge -- /usr/sbin/munged) </dev/null >>"$HK_LOG/munged.stdout" 2>&1 ||
            hk_die "munged failed to start: $(tail -n 5 "$HK_LOG/munged.stdout"; tail -n 5 /var/log/munge/munged.log 2>/dev/null)"
        for _ in $(seq 50); do pid=$(hk_pid_from_file /run/munge/munged.pid munged) && break; sleep 0.1; done
        [[ -n ${pid:-} ]] || hk_die "munged did not write /run/munge/munged.pid"
    fi
    echo "$pid" >"$HK_RUN/munged.pid"
}

# --- network: bridge + one netns/veth per node --------------------------------------------
setup_network() {
    if ! ip link show "$HK_BRIDGE" >/dev/null 2>&1; then
        hk_log "creating bridge $HK_BRIDGE ($HK_LOGIN_IP/24)"
        ip link add "$HK_BRIDGE" type bridge
    fi
    ip -br addr show dev "$HK_BRIDGE" | grep -qw "$HK_LOGIN_IP/24" || ip addr add "$HK_LOGIN_IP/24" dev "$HK_BRIDGE"
    ip link set "$HK_BRIDGE" up
    local n
    for n in "${HK_NODES[@]}"; do add_host_netns "$n" "$(hk_node_ip "$n")"; done
    add_host_netns "$HK_LOGIN2" "$HK_LOGIN2_IP"
}

# add_host_netns NAME IP: a network namespace on the bridge, as another host.
add_host_netns() {
    local n=$1 ip=$2
    [[ -e /run/netns/$n ]] || { hk_log "creating netns $n ($ip)"; ip netns add "$n"; }
    if ! ip link show "veth-$n" >/dev/null 2>&1; then
        # Host end veth-NAME joins the bridge; the other end is eth0 inside the namespace.
        ip -n "$n" link del eth0 2>/dev/null || true
        ip link add "veth-$n" type veth peer name eth0 netns "$n"
    fi
    ip link set "veth-$n" master "$HK_BRIDGE" up
    ip -n "$n" -br addr show dev eth0 | grep -qw "$ip/24" || ip -n "$n" addr add "$ip/24" dev eth0
    ip -n "$n" link set lo up
    ip -n "$n" link set eth0 up
}

# --- /etc/hosts: our lines, each marked so down.sh can remove them ------------------------
update_hosts() {
    local want n cur
    want=$(printf '%s %s %s\n' "$HK_LOGIN_IP" "$LOGIN_HOST" "$HK_HOSTS_MARK"
           printf '%s %s %s\n' "$HK_LOGIN2_IP" "$HK_LOGIN2" "$HK_HOSTS_MARK"
           for n in "${HK_NODES[@]}"; do printf '%s %s %s\n' "$(hk_node_ip "$n")" "$n" "$HK_HOSTS_MARK"; done)
    cur=$(grep -F -- "$HK_HOSTS_MARK" /etc/hosts || true)
    [[ $cur == "$want" ]] && return 0
    hk_log "updating /etc/hosts"
    # NB: if the file already maps the login host name to 127.0.0.1 (it does on these VMs),
    # getaddrinfo() on a compute node still prefers 127.0.0.1 (= the node itself), wherever our
    # line is. Jobs that must reach the login node should use $HK_LOGIN_IP.
    # Rewrite in place (not mv): /etc/hosts may be a bind mount in containers.
    local rest
    rest=$(grep -vF -- "$HK_HOSTS_MARK" /etc/hosts || true)
    printf '%s\n%s\n' "$rest" "$want" >/etc/hosts
}

# --- slurm.conf ---------------------------------------------------------------------------
# write_if_changed TMP DEST: install TMP as DEST (0644) unless identical; false if it changed.
write_if_changed() {
    if cmp -s "$1" "$2"; then rm -f "$1"; return 0; fi
    hk_log "writing $2"
    mkdir -p "$(dirname "$2")"
    install -m 0644 "$1" "$2"
    rm -f "$1"
    return 1
}

# --- stand-in GPUs --------------------------------------------------------------------------
# No GPU exists on these machines. So that GPU requests go through Slurm for real (gres.conf,
# scheduling, CUDA_VISIBLE_DEVICES) and the runtimes' GPU plumbing (apptainer --nv, bwrap
# device binds) can be tested, the NVIDIA device nodes are created with their real numbers
# (major 195); with no driver loaded, opening one fails (ENXIO). They are in the shared /dev,
# so every node and the login host see them; only $HK_GPU_NODE declares them to Slurm.
# down.sh removes those this script created. A machine with a real NVIDIA driver is left alone.
add_standin_gpus() {
    [[ -e /proc/driver/nvidia ]] && return 0
    local entry dev minor
    for entry in "${HK_GPU_DEVICES[@]}" "${HK_GPU_CONTROL_DEVICES[@]}"; do
        dev=${entry%%:*} minor=${entry##*:}
        [[ -e /dev/$dev ]] && continue
        mknod -m 0666 "/dev/$dev" c 195 "$minor"
        echo "/dev/$dev" >>"$HK_STATE/standin-devices"
    done
}

write_slurm_conf() {
    local tmp n changed=0
    tmp=$(mktemp)
    cat >"$tmp" <<CONF
# Written by hpc-kernels cluster/up.sh: a throwaway test cluster. Do not edit by hand.
ClusterName=hk
SlurmctldHost=$LOGIN_HOST($HK_LOGIN_IP)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
# A node that stops answering is DOWN after this many seconds (Slurm's default, 300, is too long
# for the node-failure tests); its jobs then end with NODE_FAIL, or are requeued.
SlurmdTimeout=20
MinJobAge=300
# scancel: SIGTERM, then SIGKILL after KillWait seconds (default 30; short for tests)
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
# Finished jobs for "sacct -c" without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=$HK_STATE/jobcomp.txt
StateSaveLocation=$HK_STATE/ctld
SlurmctldPidFile=$HK_RUN/slurmctld.pid
SlurmctldLogFile=$HK_LOG/slurmctld.log
# %n = node name: several slurmd share this file system
SlurmdSpoolDir=$HK_STATE/spool/%n
SlurmdPidFile=$HK_RUN/slurmd-%n.pid
SlurmdLogFile=$HK_LOG/slurmd-%n.log
# Node-local NVMe disk as a countable resource (GB), as some centres request it (--gres=nvme:N):
# lets the shipped site profiles that model them pass "sbatch --test-only" here.
# gpu: c1 has one stand-in GPU (gres.conf; a character device without a driver, see
# add_standin_gpus): GPU requests are scheduled and CUDA_VISIBLE_DEVICES set as on a GPU node.
GresTypes=nvme,gpu
# Each node declares the size of a modest real compute node (16 CPUs, 96000 MB), more than this
# machine has, so that the shipped profiles of real centres fit; slurmd trusts this
# (config_overrides below). Jobs here are tiny and mostly idle kernels.
# The nodes declare more memory than a small test machine may have: trust the configuration.
SlurmdParameters=config_overrides
CONF
    local gres
    for n in "${HK_NODES[@]}"; do
        gres=nvme:no_consume:100
        [[ $n == "$HK_GPU_NODE" ]] && gres+=",gpu:standin:${#HK_GPU_DEVICES[@]}"
        echo "NodeName=$n NodeAddr=$(hk_node_ip "$n") CPUs=16 RealMemory=96000 Gres=$gres State=UNKNOWN" >>"$tmp"
    done
    local all_nodes
    all_nodes=$(IFS=,; echo "${HK_NODES[*]}")
    cat >>"$tmp" <<CONF
PartitionName=debug Nodes=$all_nodes Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=${HK_NODES[0]} MaxTime=01:00:00 State=UP
# Partition names used by the shipped profiles modelled on real centres (site-configs/)
PartitionName=interactive Nodes=$all_nodes MaxTime=7-00:00:00 State=UP
PartitionName=small Nodes=$all_nodes MaxTime=3-00:00:00 State=UP
PartitionName=gpu Nodes=$HK_GPU_NODE MaxTime=1-00:00:00 State=UP
# A partition that never schedules: jobs wait with reason PartitionDown (launch-timeout tests)
PartitionName=down Nodes=${HK_NODES[1]} MaxTime=1:00:00 State=DOWN
CONF
    write_if_changed "$tmp" "$HK_CONF" || changed=1
    tmp=$(mktemp)
    cat >"$tmp" <<CONF
# Written by hpc-kernels cluster/up.sh. Stand-in GPUs: device nodes without a driver (see up.sh).
NodeName=$HK_GPU_NODE Name=gpu Type=standin File=/dev/nvidia[0-$(( ${#HK_GPU_DEVICES[@]} - 1 ))]
CONF
    write_if_changed "$tmp" "$(dirname "$HK_CONF")/gres.conf" || changed=1
    write_cgroup_conf || changed=1
    (( changed )) || return 0
    # Daemons running with an older config: restart them (node changes need a restart).
    if slurm_daemons_running; then
        hk_log "slurm.conf changed: restarting Slurm daemons"
        for n in "${HK_NODES[@]}"; do hk_stop_pidfile "$(hk_slurmd_pidfile "$n")" slurmd; done
        hk_stop_pidfile "$HK_RUN/slurmctld.pid" slurmctld
    fi
}

# Slurm 24.11 (trixie) loads a cgroup plugin even with proctrack/linuxproc and task/none, and
# slurmd then stops: "No filesystem mounted on /sys/fs/cgroup" (a node in a namespace) or
# "Hybrid mode is not supported". CgroupPlugin=disabled (24.11) avoids it; 22.05 (bookworm) knows
# no such value and needs no file. False if the file changed.
write_cgroup_conf() {
    local dst tmp
    dst=$(dirname "$HK_CONF")/cgroup.conf
    if [[ $RELEASE == bookworm ]]; then
        if [[ -f $dst ]] && grep -qF 'hpc-kernels cluster/up.sh' "$dst"; then rm -f "$dst"; return 1; fi
        return 0
    fi
    tmp=$(mktemp)
    printf '%s\n' "# Written by hpc-kernels cluster/up.sh: no cgroups for this test cluster's Slurm." \
        "CgroupPlugin=disabled" >"$tmp"
    write_if_changed "$tmp" "$dst"
}

slurm_daemons_running() {
    local n
    hk_pid_from_file "$HK_RUN/slurmctld.pid" slurmctld >/dev/null && return 0
    for n in "${HK_NODES[@]}"; do
        hk_pid_from_file "$(hk_slurmd_pidfile "$n")" slurmd >/dev/null && return 0
    done
    return 1
}

# --- daemons ------------------------------------------------------------------------------
# wait_pidfile FILE NAME LOG: wait up to 10 s for a daemon to write a live pid into FILE.
wait_pidfile() {
    local pid
    for _ in $(seq 100); do
        pid=$(hk_pid_from_file "$1" "$2") && return 0
        sleep 0.1
    done
    hk_die "$2 did not start; last lines of $3:
$(tail -n 20 "$3" 2>/dev/null)"
}

start_slurmctld() {
    hk_pid_from_file "$HK_RUN/slurmctld.pid" slurmctld >/dev/null && return 0
    hk_log "starting slurmctld"
    rm -f "$HK_RUN/slurmctld.pid"
    # slurmctld daemonizes itself and writes SlurmctldPidFile.
    (cd / && "${HK_DAEMON_ENV[@]}" slurmctld) </dev/null >>"$HK_LOG/slurmctld.stdout" 2>&1 ||
        hk_die "slurmctld failed: $(tail -n 20 "$HK_LOG/slurmctld.stdout" "$HK_LOG/slurmctld.log" 2>/dev/null)"
    wait_pidfile "$HK_RUN/slurmctld.pid" slurmctld "$HK_LOG/slurmctld.log"
}

start_slurmd() {
    local n=$1 pidfile
    pidfile=$(hk_slurmd_pidfile "$n")
    hk_pid_from_file "$pidfile" slurmd >/dev/null && return 0
    hk_log "starting slurmd on $n"
    rm -f "$pidfile"
    mkdir -p "$HK_STATE/spool/$n"
    STARTED_AT[$n]=$(date +%Y-%m-%dT%H:%M:%S)
    # nsenter --net keeps the host's /sys (ip netns exec remounts it and slurmd then fails with
    # "No filesystem mounted on /sys/fs/cgroup"). unshare gives the node its own hostname and a
    # private /tmp. slurmd daemonizes; the daemon stays in these namespaces.
    (cd / && "${HK_DAEMON_ENV[@]}" nsenter --net="/run/netns/$n" \
        unshare --mount --uts --propagation private \
        sh -c "hostname $n; mount -t tmpfs -o mode=1777 tmpfs /tmp; exec slurmd -N $n") \
        </dev/null >>"$HK_LOG/slurmd-$n.stdout" 2>&1 ||
        hk_die "slurmd $n failed: $(tail -n 20 "$HK_LOG/slurmd-$n.stdout" "$HK_LOG/slurmd-$n.log" 2>/dev/null)"
    wait_pidfile "$pidfile" slurmd "$HK_LOG/slurmd-$n.log"
}

# --- sshd on each node, as at a pam_slurm_adopt site --------------------------------------------
# One OpenSSH server per node, in the network, mount and UTS namespaces of that node's slurmd:
# "ssh cN CMD" from the login node runs CMD with hostname cN and the node's private /tmp (where
# a job's kernel sockets are), as on a real node. Each has its own config, host key and pid file
# under $HK_SSH and $HK_RUN, listens on the node's address only, and logs to $HK_LOG/sshd-cN.log.
# Access follows pam_slurm_adopt's rule (ssh-authorized-keys.sh): only during a running job of the
# user on that node. Unlike pam_slurm_adopt, a session is not adopted into the job, so it is not
# ended when the job ends.

install_keys_command() {
    local dst=$HK_SSH/authorized-keys-command
    mkdir -p "$HK_SSH"
    chmod 0755 "$HK_SSH"
    cmp -s "$HERE/ssh-authorized-keys.sh" "$dst" && return 0
    hk_log "installing $dst"
    # A root-owned copy: sshd refuses a command in (or below) a group/world-writable or
    # non-root-owned directory, which a repo checkout may be.
    install -m 0755 -o root -g root "$HERE/ssh-authorized-keys.sh" "$dst"
}

# write_sshd_config HOST ADDRESS: host key (made once) and sshd_config; false if the config changed.
# A compute node lets users in only during a job there; the second login node lets them in always.
write_sshd_config() {
    local n=$1 address=$2 dir=$HK_SSH/$1 tmp access
    mkdir -p "$dir"
    chmod 0755 "$dir"
    if [[ ! -s $dir/ssh_host_ed25519_key ]]; then
        hk_log "creating the ssh host key of $n"
        rm -f "$dir/ssh_host_ed25519_key" "$dir/ssh_host_ed25519_key.pub"
        ssh-keygen -q -t ed25519 -N '' -C "root@$n" -f "$dir/ssh_host_ed25519_key" ||
            hk_die "ssh-keygen failed for $n"
    fi
    if [[ $n == "$HK_LOGIN2" ]]; then
        access="# A login node: the users' own keys.
AuthorizedKeysFile .ssh/authorized_keys"
    else
        access="# pam_slurm_adopt's rule: a user's keys count only while they have a running job on this node.
AuthorizedKeysFile none
AuthorizedKeysCommand $HK_SSH/authorized-keys-command $n %u $HK_LOG/sshd-$n.log
AuthorizedKeysCommandUser root"
    fi
    tmp=$(mktemp)
    cat >"$tmp" <<CONF
# Written by hpc-kernels cluster/up.sh: the sshd of host $n. Do not edit by hand.
# Only this file is read (not /etc/ssh/sshd_config, nor its sshd_config.d).
ListenAddress $address:22
HostKey $dir/ssh_host_ed25519_key
PidFile $(hk_sshd_pidfile "$n")
LogLevel VERBOSE
# Keys only, test users only.
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers ${HK_USERS[*]}
$access
# No PAM: Debian's sshd PAM stack expects a full login system (pam_loginuid, motd, ...).
UsePAM no
X11Forwarding no
# The relay's ssh transport only runs a command over stdio; the benchmarks compare it with a plain
# unix-socket tunnel (ssh -L local.sock:remote.sock), which needs stream-local forwarding.
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
PrintMotd no
PrintLastLog no
$(penalties)
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
    write_if_changed "$tmp" "$dir/sshd_config"
}

# OpenSSH 10 (trixie) delays an address after refused logins (PerSourcePenalties): every ssh
# here comes from the login node's one address, so tests that check a refusal would lock out
# the next user for seconds. OpenSSH 9.2 (bookworm) knows no such option.
penalties() { [[ $RELEASE == bookworm ]] || echo "PerSourcePenalties no"; }

host_ip() { if [[ $1 == "$HK_LOGIN2" ]]; then echo "$HK_LOGIN2_IP"; else hk_node_ip "$1"; fi; }

# The nodes' host keys in the system-wide known hosts, so that a plain "ssh c1" checks them.
update_known_hosts() {
    local want n cur rest
    want=$(for n in "${HK_NODES[@]}" "$HK_LOGIN2"; do
               printf '%s,%s %s %s\n' "$n" "$(host_ip "$n")" \
                   "$(cut -d' ' -f1,2 "$HK_SSH/$n/ssh_host_ed25519_key.pub")" "$HK_HOSTS_MARK"
           done)
    cur=$(grep -F -- "$HK_HOSTS_MARK" "$HK_KNOWN_HOSTS" 2>/dev/null || true)
    [[ $cur == "$want" ]] && return 0
    hk_log "updating $HK_KNOWN_HOSTS"
    rest=$(grep -vF -- "$HK_HOSTS_MARK" "$HK_KNOWN_HOSTS" 2>/dev/null || true)
    if [[ -n $rest ]]; then printf '%s\n%s\n' "$rest" "$want"; else printf '%s\n' "$want"; fi >"$HK_KNOWN_HOSTS"
    chmod 0644 "$HK_KNOWN_HOSTS"
}

# same_namespaces PID1 PID2: both in the same network, mount and UTS namespaces.
same_namespaces() {
    local ns
    for ns in net mnt uts; do
        [[ $(readlink "/proc/$1/ns/$ns" 2>/dev/null) == "$(readlink "/proc/$2/ns/$ns" 2>/dev/null)" ]] || return 1
    done
}

start_sshd() {
    local n=$1 changed=0 pidfile conf log slurmd pid
    pidfile=$(hk_sshd_pidfile "$n") conf=$HK_SSH/$n/sshd_config log=$HK_LOG/sshd-$n.log
    write_sshd_config "$n" "$(hk_node_ip "$n")" || changed=1
    slurmd=$(hk_pid_from_file "$(hk_slurmd_pidfile "$n")" slurmd) || hk_die "slurmd on $n is not running"
    if pid=$(hk_pid_from_file "$pidfile" sshd); then
        # A running sshd is kept unless its config changed or slurmd was restarted (a new slurmd
        # has new namespaces: the old sshd would show a stale /tmp).
        (( changed == 0 )) && same_namespaces "$pid" "$slurmd" && return 0
        hk_log "restarting sshd on $n (config changed or slurmd restarted)"
        hk_stop_pidfile "$pidfile" sshd
    fi
    # The privilege separation directory sshd insists on (the node sees the host's /run).
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    /usr/sbin/sshd -t -f "$conf" 2>>"$log" || hk_die "sshd config $conf is invalid: $(tail -n 5 "$log")"
    hk_log "starting sshd on $n ($(hk_node_ip "$n"):22)"
    rm -f "$pidfile"
    # Join the namespaces of the node's slurmd (not /run/netns only: the mount and UTS namespaces
    # are slurmd's own). sshd re-executes itself, hence the absolute path; it daemonizes.
    # shellcheck disable=SC2094  # the log is read only after sshd's start has failed
    (cd / && "${HK_DAEMON_ENV[@]}" nsenter --target "$slurmd" --net --mount --uts \
        /usr/sbin/sshd -f "$conf" -E "$log") </dev/null >>"$log" 2>&1 ||
        hk_die "sshd $n failed: $(tail -n 20 "$log")"
    wait_pidfile "$pidfile" sshd "$log"
}

# --- a second login node ------------------------------------------------------------------------
# login2 (10.77.7.2): another host on the cluster network, as a site's second login node. Users
# reach it with "ssh login2" (their own keys). Sessions there have hostname login2, and a /tmp and
# /run/user of their own (where the relay daemon's socket and the login-side kernel sockets live),
# and share /home (the kernels' state), /etc (slurm.conf) and munge's socket with this host.
start_login2() {
    local n=$HK_LOGIN2 changed=0 pidfile conf log pid
    pidfile=$(hk_sshd_pidfile "$n") conf=$HK_SSH/$n/sshd_config log=$HK_LOG/sshd-$n.log
    write_sshd_config "$n" "$HK_LOGIN2_IP" || changed=1
    if pid=$(hk_pid_from_file "$pidfile" sshd); then
        (( changed == 0 )) && return 0
        hk_log "restarting sshd on $n (config changed)"
        hk_stop_pidfile "$pidfile" sshd
    fi
    mkdir -p /run/sshd /run/user
    chmod 0755 /run/sshd /run/user
    /usr/sbin/sshd -t -f "$conf" 2>>"$log" || hk_die "sshd config $conf is invalid: $(tail -n 5 "$log")"
    hk_log "starting $n: sshd on $HK_LOGIN2_IP:22"
    rm -f "$pidfile"
    # shellcheck disable=SC2094
    (cd / && "${HK_DAEMON_ENV[@]}" nsenter --net="/run/netns/$n" unshare --mount --uts --propagation private \
        sh -c "hostname $n; mount -t tmpfs -o mode=1777 tmpfs /tmp; mount -t tmpfs -o mode=0755 tmpfs /run/user
               exec /usr/sbin/sshd -f $conf -E $log") </dev/null >>"$log" 2>&1 ||
        hk_die "sshd $n failed: $(tail -n 20 "$log")"
    wait_pidfile "$pidfile" sshd "$log"
}

# --- wait until every node is usable --------------------------------------------------------
wait_nodes() {
    local deadline=$(( SECONDS + WAIT_SECONDS )) n st bad resumed=" " states
    while :; do
        bad=0
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        for n in "${HK_NODES[@]}"; do
            st=$(awk -v n="$n" '$1==n {print $2; exit}' <<<"$states")
            # A restarted slurmctld reports the saved node state at once: for a slurmd started
            # by this run, also wait until it has registered (SlurmdStartTime is updated then).
            if [[ -n ${STARTED_AT[$n]:-} ]]; then
                local reg
                reg=$(scontrol show node "$n" -o 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' || true)
                if [[ ${reg#*=} < ${STARTED_AT[$n]} ]]; then bad=1; continue; fi
                unset "STARTED_AT[$n]"
            fi
            case $st in
                idle|mixed|allocated|completing) ;;
                down|drained|draining|drain|fail|failing)
                    # Responding (no '*') but down or drained: resume it once.
                    bad=1
                    if [[ $resumed != *" $n "* ]]; then
                        hk_log "node $n is $st: resuming"
                        scontrol update nodename="$n" state=resume || true
                        resumed+="$n "
                    fi ;;
                *) bad=1 ;;   # unknown, down*, idle* ... (not registered yet)
            esac
        done
        (( bad == 0 )) && return 0
        if (( SECONDS >= deadline )); then
            echo "--- sinfo:"; sinfo -N -l 2>&1 || true
            echo "--- slurmctld.log:"; tail -n 20 "$HK_LOG/slurmctld.log" 2>/dev/null || true
            for n in "${HK_NODES[@]}"; do
                echo "--- slurmd-$n.log:"; tail -n 20 "$HK_LOG/slurmd-$n.log" 2>/dev/null || true
            done
            hk_die "nodes not idle after ${WAIT_SECONDS}s"
        fi
        sleep 0.2
    done
}

main() {
    preflight
    start_munged
    setup_network
    update_hosts
    add_standin_gpus
    write_slurm_conf
    start_slurmctld
    local n
    for n in "${HK_NODES[@]}"; do start_slurmd "$n"; done
    wait_nodes
    install_keys_command
    for n in "${HK_NODES[@]}"; do start_sshd "$n"; done
    start_login2
    update_known_hosts
    echo "hk cluster up: slurmctld on $LOGIN_HOST ($HK_LOGIN_IP), nodes: $(sinfo -h -N -o '%N=%T' | sort -u | tr '\n' ' ')partitions: $(sinfo -h -o '%P' | tr '\n' ' ')ssh: ${HK_NODES[*]} (during a job there), $HK_LOGIN2 (a second login node)"
}

main "$@"
