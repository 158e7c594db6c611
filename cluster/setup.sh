#!/usr/bin/env bash
# One-time (idempotent) machine setup for the hpc-kernels test cluster.
#
#   cluster/setup.sh [REPO_DIR]          packages, users (+ ssh keys), sudoers, venv (+ install
#                                        REPO_DIR[test]), Apptainer, and (with REPO_DIR) the kernel image
#   cluster/setup.sh --venv-only REPO_DIR   only (re)install REPO_DIR[test] into the venv (cheap)
#
# Must run as root on Debian 12 or 13. Quiet when there is nothing to do.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

# The packages are in packages.txt (per Debian release), every command they provide that the
# project runs in commands.txt; both are checked by tests/test_commands.py.
# openssh-server: one sshd per compute node (up.sh), as at a pam_slurm_adopt site. Installed on
# its own (install_openssh_server): its postinst must not start a system sshd on this host.
RELEASE=$(hk_release)

create_users() {
    local u
    getent group "$HK_GROUP" >/dev/null || groupadd "$HK_GROUP"
    for u in "${HK_USERS[@]}"; do
        if ! id "$u" >/dev/null 2>&1; then
            hk_log "creating user $u"
            useradd -m -s /bin/bash "$u"
        fi
        # Slurm's "sacct -c" opens JobCompLoc for appending (even to read): the group may write it.
        id -nG "$u" | grep -qw "$HK_GROUP" || usermod -aG "$HK_GROUP" "$u"
        chmod 0750 "$(getent passwd "$u" | cut -d: -f6)"
        # useradd leaves the password field "!" (locked). The nodes' sshd runs without PAM (UsePAM
        # no, see up.sh) and then refuses a locked account even with a valid key: "*" is "no
        # password" without being "locked", so key logins work and password logins still cannot.
        [[ $(getent shadow "$u" | cut -d: -f2) != '!' ]] || usermod -p '*' "$u"
        make_ssh_key "$u"
    done
}

# An ed25519 key pair without passphrase for user $1 (made as that user), its public key in
# ~/.ssh/authorized_keys: "ssh c1 ..." from the login node then works while the user has a job on
# c1 (up.sh's sshd only accepts keys during a running job there, like pam_slurm_adopt).
make_ssh_key() {
    local u=$1 home
    home=$(getent passwd "$u" | cut -d: -f6)
    if [[ ! -s $home/.ssh/id_ed25519 ]]; then
        hk_log "creating ssh key for $u"
        # shellcheck disable=SC2016  # $1, $2 expand in that sh
        runuser -u "$u" -- sh -c 'umask 077; mkdir -p "$1/.ssh" &&
            ssh-keygen -q -t ed25519 -N "" -C "$2@hk-cluster" -f "$1/.ssh/id_ed25519"' sh "$home" "$u"
    fi
    local pub
    pub=$(cat "$home/.ssh/id_ed25519.pub")
    if ! grep -qxF -- "$pub" "$home/.ssh/authorized_keys" 2>/dev/null; then
        # shellcheck disable=SC2016
        runuser -u "$u" -- sh -c 'umask 077; printf "%s\n" "$2" >>"$1/.ssh/authorized_keys"' sh "$home" "$pub"
    fi
}

# openssh-server, without letting its postinst start (or restart) a system sshd on this host's
# port 22: a policy-rc.d that answers 101 ("action forbidden") for the install, unless one is
# already there (Docker-made images have one). The compute nodes' sshd are started by up.sh.
install_openssh_server() {
    dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q 'install ok installed' && return 0
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# hpc-kernels cluster/setup.sh: no service starts while openssh-server installs\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    hk_install_packages openssh-server || { (( ours )) && rm -f "$policy"; return 1; }
    (( ours )) && rm -f "$policy"
    # Check nothing was started anyway (Debian's init script writes /run/sshd.pid).
    local pid
    if pid=$(hk_pid_from_file /run/sshd.pid sshd); then
        hk_log "stopping the system sshd that the package install started (pid $pid)"
        hk_terminate 5 "$pid"
    fi
}

# The fault tests power nodes off and on (node-power.sh), and the tests list the nodes' /tmp and
# processes (node-inspect.sh), as root, through sudo: a root-owned copy
# of the cluster scripts it needs, so that the rule names files no test user can change.
install_fault_tools() {
    local f
    mkdir -p "$HK_FAULT_TOOLS"
    chmod 0755 "$HK_FAULT_TOOLS"
    for f in lib.sh up.sh node-power.sh node-inspect.sh ssh-authorized-keys.sh; do
        cmp -s "$HERE/$f" "$HK_FAULT_TOOLS/$f" || install -m 0755 -o root -g root "$HERE/$f" "$HK_FAULT_TOOLS/$f"
    done
}

install_sudoers() {
    local dst=/etc/sudoers.d/hpc-kernels-test tmp
    tmp=$(mktemp)
    cat >"$tmp" <<SUDO
# hpc-kernels test suite: hk-alice may act as hk-bob (tests that a second user cannot reach a kernel),
# power a test node off and on as a node failure does (tests of faults), and list a node's
# private /tmp and its processes (nothing of a kernel may be left there).
hk-alice ALL=(hk-bob) NOPASSWD: ALL
hk-alice ALL=(root) NOPASSWD: $HK_FAULT_TOOLS/node-power.sh
hk-alice ALL=(root) NOPASSWD: $HK_FAULT_TOOLS/node-inspect.sh
SUDO
    if ! cmp -s "$tmp" "$dst"; then
        visudo -cqf "$tmp" || { rm -f "$tmp"; hk_die "sudoers drop-in did not validate"; }
        mkdir -p /etc/sudoers.d
        install -m 0440 -o root -g root "$tmp" "$dst"
        hk_log "installed $dst"
    fi
    rm -f "$tmp"
    # /etc/sudoers must include the drop-in directory (Debian's does).
    grep -Eq '^[@#]includedir[[:space:]]+/etc/sudoers.d' /etc/sudoers ||
        hk_die "/etc/sudoers does not include /etc/sudoers.d"
    local said
    said=$(runuser -u hk-alice -- sudo -n -u hk-bob id -un 2>"$tmp.err") || true
    [[ $said == hk-bob ]] ||
        hk_die "'runuser -u hk-alice -- sudo -n -u hk-bob id' does not work: $said $(cat "$tmp.err")"
    rm -f "$tmp.err"
}

# The venv every user (and every job on c1/c2) runs. Built from Debian's python3:
# the default python3 on these machines is a pyenv build under /root nobody else can read.
make_venv() {
    if [[ ! -x $HK_VENV/bin/python ]]; then
        hk_log "creating venv $HK_VENV"
        mkdir -p "$(dirname "$HK_VENV")"
        /usr/bin/python3 -m venv "$HK_VENV"
        "$HK_VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    fi
    chmod 0755 "$(dirname "$HK_VENV")"
}

# Install REPO_DIR[test] into the venv and link the hpc-kernel entry point. Cheap to re-run.
install_repo() {
    local repo=${1:-}
    if [[ -z $repo ]]; then
        :
    elif [[ ! -f $repo/pyproject.toml ]]; then
        hk_log "no $repo/pyproject.toml yet: skipping the package install"
    else
        repo=$(cd "$repo" && pwd)
        hk_log "pip install ${repo}[test]"
        # pip builds in the source tree (setuptools leaves build/ and *.egg-info there, owned by
        # root): build from a throwaway copy instead. The install is a copy anyway (not editable).
        local src
        src=$(mktemp -d)
        tar -C "$repo" --exclude=./build --exclude='*.egg-info' --exclude=./.venv --exclude=__pycache__ \
            -cf - . | tar -C "$src" -xf -
        "$HK_VENV/bin/pip" install -q --disable-pip-version-check "${src}[test]" || { rm -rf "$src"; return 1; }
        rm -rf "$src"
    fi
    chmod -R a+rX "$HK_VENV"
    # As a site would install it: hpc-kernel (and the Jupyter client tools it works with) on
    # every user's PATH.
    local tool
    for tool in hpc-kernel jupyter jupyter-console jupyter-kernel jupyter-run; do
        if [[ -x $HK_VENV/bin/$tool ]]; then
            ln -sfn "$HK_VENV/bin/$tool" "/usr/local/bin/$tool"
        fi
    done
}

# Wheels the tests install into environments of their own (a user's venv, uv env, a second
# environment with nbgrader), fetched once from PyPI: the tests then install offline
# (--no-index --find-links). Fetched again only when cluster/test-wheels.txt changes.
HK_WHEELS=/var/cache/hpc-kernels/wheels
cache_test_wheels() {
    local list=$HERE/test-wheels.txt stamp
    [[ -f $list ]] || return 0
    stamp=$(sha256sum "$list" | cut -d' ' -f1)
    if [[ $(cat "$HK_WHEELS/.stamp" 2>/dev/null) != "$stamp" ]]; then
        hk_log "downloading the tests' wheels into $HK_WHEELS"
        mkdir -p "$HK_WHEELS"
        "$HK_VENV/bin/pip" download -q --disable-pip-version-check -d "$HK_WHEELS" -r "$list"
        echo "$stamp" > "$HK_WHEELS/.stamp"
    fi
    chmod -R a+rX "$(dirname "$HK_WHEELS")"
}

main() {
    hk_need_root
    if [[ ${1:-} == --venv-only ]]; then
        make_venv
        install_repo "${2:-}"
        cache_test_wheels
        return
    fi
    local packages
    mapfile -t packages < <(hk_packages "$RELEASE" | grep -vx openssh-server)
    hk_install_packages "${packages[@]}"
    install_openssh_server
    create_users
    install_fault_tools
    install_sudoers
    make_venv
    install_repo "${1:-}"
    cache_test_wheels
    # Apptainer, as a site installs it: on every user's PATH (spython looks for `singularity`).
    "$HERE/install-apptainer.sh"
    ln -sfn "$HK_APPTAINER_PREFIX/bin/apptainer" /usr/local/bin/apptainer
    ln -sfn "$HK_APPTAINER_PREFIX/bin/singularity" /usr/local/bin/singularity
    # Everything the project runs is there now (with a repository, the venv's commands too).
    hk_check_commands "$RELEASE" "$([[ -n ${1:-} ]] && echo 1 || echo 0)"
    [[ -z ${1:-} ]] || "$HERE/kernel-image.sh"
}

main "$@"
