# shellcheck shell=bash disable=SC2034  # variables are used by the sourcing scripts
# Shared settings and helpers for the hpc-kernels test cluster scripts.
# Sourced by setup.sh, up.sh, down.sh and status.sh; not meant to be run.

HK_STATE=/var/lib/hpc-kernels-cluster      # everything the cluster writes lives here
HK_RUN=$HK_STATE/run                       # pid files
HK_LOG=$HK_STATE/log                       # daemon logs
HK_CONF=/etc/slurm/slurm.conf              # default path: every user's client finds it
HK_BRIDGE=hkbr0
HK_NET_PREFIX=10.77.7
HK_LOGIN_IP=$HK_NET_PREFIX.1
HK_NODES=(c1 c2)                           # node N gets $HK_NET_PREFIX.1N
HK_LOGIN2=login2                           # a second login node (a netns, reached by ssh), for tests
HK_LOGIN2_IP=$HK_NET_PREFIX.2
HK_HOSTS_MARK='# hpc-kernels-cluster'      # marks our /etc/hosts lines
HK_USERS=(hk-alice hk-bob)
HK_GPU_NODE=c1                             # the node with stand-in GPUs (up.sh: add_standin_gpus)
HK_GPU_DEVICES=(nvidia0:0)                 # device:minor, one per GPU
HK_GPU_CONTROL_DEVICES=(nvidiactl:255)
HK_GROUP=hk-cluster                        # test users; may append to the jobcomp file (sacct -c)
HK_VENV=/opt/hpc-kernels/venv
HK_APPTAINER_PREFIX=/opt/hpc-kernels/apptainer  # Apptainer, unpacked from Debian sid (install-apptainer.sh)
HK_IMAGES=/opt/hpc-kernels/images           # kernel images every node can read
HK_CACHE=/var/cache/hpc-kernels             # downloads and built images kept between runs
HK_FAULT_TOOLS=/opt/hpc-kernels/cluster-tools  # root-owned copies the tests run through sudo (setup.sh)
HK_SSH=$HK_STATE/ssh                       # the nodes' sshd: configs, host keys (up.sh)
HK_KNOWN_HOSTS=/etc/ssh/ssh_known_hosts    # the nodes' host keys, lines marked $HK_HOSTS_MARK
# Daemons are started with a clean, predictable environment.
HK_DAEMON_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "SLURM_CONF=$HK_CONF")

# Close every file descriptor above 2 of the calling shell.
hk_close_inherited_fds() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if (( fd > 2 )); then eval "exec $fd>&-"; fi
    done
}

hk_node_ip() { echo "$HK_NET_PREFIX.1${1#c}"; }

HK_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HK_PACKAGES_FILE=$HK_LIB_DIR/packages.txt   # what setup.sh installs
HK_COMMANDS_FILE=$HK_LIB_DIR/commands.txt   # every external command, with its package

# The Debian release this machine runs, by codename: bookworm (12) or trixie (13). What differs
# between them (Slurm 22.05 / 24.11, Python 3.11 / 3.13, packages) is chosen by this name.
# A later Debian is treated as trixie, with a warning; anything else is refused.
hk_release() {
    local id="" codename="" pretty=""
    # shellcheck disable=SC1091
    [[ -r /etc/os-release ]] && { id=$(. /etc/os-release; echo "${ID:-}"); codename=$(. /etc/os-release; echo "${VERSION_CODENAME:-}"); pretty=$(. /etc/os-release; echo "${PRETTY_NAME:-}"); }
    case $id:$codename in
        debian:bookworm|debian:trixie) echo "$codename" ;;
        debian:*)
            echo "[$(basename "$0")] warning: ${pretty:-this Debian} is neither 12 (bookworm) nor 13 (trixie): using trixie's settings" >&2
            echo trixie ;;
        *) hk_die "the test cluster's scripts run on Debian 12 (bookworm) or 13 (trixie); this is ${pretty:-unknown (no /etc/os-release)}" ;;
    esac
}

# Check that every command of cluster/commands.txt is there after the install (release $1;
# $2=1 also checks the site venv's commands). Stops naming each missing command and its package.
hk_check_commands() {
    local release=$1 with_venv=${2:-0} command provider rest package where missing=()
    local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    while read -r command provider rest; do
        [[ -z $command || $command == \#* ]] && continue
        case $provider in
            @site|@ondemand) continue ;;
            @venv) (( with_venv )) || continue; where=$HK_VENV/bin ;;
            @apptainer) where=$HK_APPTAINER_PREFIX/bin ;;
            *) where=$path ;;
        esac
        PATH=$where command -v "$command" >/dev/null 2>&1 && continue
        if [[ $provider == *=* ]]; then
            package=${provider#*"$release"=}; package=${package%%,*}
        else
            package=$provider
        fi
        case $provider in
            @venv) missing+=("$command (the site venv $HK_VENV: pip install of the repository)") ;;
            @apptainer) missing+=("$command (Apptainer in $HK_APPTAINER_PREFIX: cluster/install-apptainer.sh)") ;;
            *) missing+=("$command (Debian package $package)") ;;
        esac
    done <"$HK_COMMANDS_FILE"
    (( ${#missing[@]} == 0 )) && return 0
    hk_die "after the install, these commands are missing:
$(printf '  %s\n' "${missing[@]}")
Each is listed in $HK_COMMANDS_FILE; $HK_PACKAGES_FILE must name its package for $release."
}

# The packages of cluster/packages.txt for release $1, one per line.
hk_packages() {
    local release=$1 name rest
    while read -r name rest; do
        [[ -z $name || $name == \#* ]] && continue
        rest=${rest%%#*}
        if [[ -z ${rest// /} || " $rest " == *" $release "* ]]; then echo "$name"; fi
    done <"$HK_PACKAGES_FILE"
}

hk_log() { echo "[$(basename "$0")] $*"; }
hk_die() { echo "[$(basename "$0")] ERROR: $*" >&2; exit 1; }

# Install the Debian packages named that are not installed yet (quiet when all are).
hk_install_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    (( ${#missing[@]} )) || return 0
    hk_log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

hk_need_root() { [[ $(id -u) -eq 0 ]] || hk_die "must run as root"; }

# True if PID exists and is not a zombie (PID 1 here reaps slowly: state Z counts as gone).
hk_alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }                      # strip "pid (comm) "; comm may contain spaces
    [[ ${stat%% *} != Z && ${stat%% *} != X ]]
}

# Executable name of PID ("" if gone).
hk_comm() { cat "/proc/$1/comm" 2>/dev/null || true; }

# PID recorded in pid file $1 if that process is alive and named $2, else fail.
hk_pid_from_file() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    hk_alive "$pid" && [[ $(hk_comm "$pid") == "$name" ]] || return 1
    echo "$pid"
}

# Wait up to $1 seconds (float ok) for all PIDs given after it to be gone.
hk_wait_gone() {
    local timeout=$1; shift
    local deadline=$(( $(date +%s%N) + ${timeout%.*} * 1000000000 )) p left
    while :; do
        left=0
        for p in "$@"; do hk_alive "$p" && left=1; done
        (( left == 0 )) && return 0
        (( $(date +%s%N) >= deadline )) && return 1
        sleep 0.1
    done
}

# SIGTERM the PIDs, wait up to $1 s, then SIGKILL what is left and wait for it.
hk_terminate() {
    local timeout=$1; shift
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    hk_wait_gone "$timeout" "$@" && return 0
    kill -KILL "$@" 2>/dev/null || true
    hk_wait_gone 5 "$@" || hk_log "warning: still alive after SIGKILL: $*"
}

# Stop the daemon whose pid file is $1 (named $2). Removes the pid file.
hk_stop_pidfile() {
    local file=$1 name=$2 pid
    if pid=$(hk_pid_from_file "$file" "$name"); then
        hk_log "stopping $name (pid $pid)"
        hk_terminate 10 "$pid"
    fi
    rm -f "$file"
}

hk_slurmd_pidfile() { echo "$HK_RUN/slurmd-$1.pid"; }
hk_sshd_pidfile() { echo "$HK_RUN/sshd-$1.pid"; }

# The given PIDs plus all their (live) descendants, one per line.
hk_with_descendants() {
    (( $# )) || return 0
    ps -e -o pid=,ppid=,stat= | awk -v roots="$*" '
        { ppid[$1] = $2; st[$1] = $3 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1
            do { added = 0
                 for (p in ppid) if (!(p in want) && (ppid[p] in want)) { want[p] = 1; added = 1 }
            } while (added)
            for (p in want) if ((p in st) && st[p] !~ /^Z/) print p
        }'
}

# Live processes inside node $1 (its netns), with their descendants (e.g. bwrap sandboxes,
# which live in a netns of their own).
hk_node_pids() {
    [[ -e /run/netns/$1 ]] || return 0
    # shellcheck disable=SC2046
    hk_with_descendants $(ip netns pids "$1" 2>/dev/null)
}
