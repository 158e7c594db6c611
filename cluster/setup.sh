#!/usr/bin/env bash
# One-time (idempotent) machine setup for the hpc-kernels test cluster.
#
#   cluster/setup.sh [REPO_DIR]          packages, users, sudoers, venv (+ install REPO_DIR[test]),
#                                        Apptainer, and (with REPO_DIR) the kernel image
#   cluster/setup.sh --venv-only REPO_DIR   only (re)install REPO_DIR[test] into the venv (cheap)
#
# Must run as root on Debian 12. Quiet when there is nothing to do.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

PACKAGES=(slurm-wlm munge bubblewrap python3 python3-venv python3-dev sudo iproute2 procps psmisc util-linux
          chromium    # chromium: the browser tests of JupyterLab (driven by Playwright, no browser download)
          ruby)       # ruby: renders the Open OnDemand app's ERB templates in the tests, as OnDemand does

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
    done
}

install_sudoers() {
    local dst=/etc/sudoers.d/hpc-kernels-test tmp
    tmp=$(mktemp)
    cat >"$tmp" <<'SUDO'
# hpc-kernels test suite: hk-alice may act as hk-bob (tests that a second user cannot reach a kernel).
hk-alice ALL=(hk-bob) NOPASSWD: ALL
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
    [[ $(runuser -u hk-alice -- sudo -n -u hk-bob id -un 2>&1) == hk-bob ]] ||
        hk_die "'runuser -u hk-alice -- sudo -n -u hk-bob id' does not work"
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

main() {
    hk_need_root
    if [[ ${1:-} == --venv-only ]]; then
        make_venv
        install_repo "${2:-}"
        return
    fi
    hk_install_packages "${PACKAGES[@]}"
    create_users
    install_sudoers
    make_venv
    install_repo "${1:-}"
    # Apptainer, as a site installs it: on every user's PATH (spython looks for `singularity`).
    "$HERE/install-apptainer.sh"
    ln -sfn "$HK_APPTAINER_PREFIX/bin/apptainer" /usr/local/bin/apptainer
    ln -sfn "$HK_APPTAINER_PREFIX/bin/singularity" /usr/local/bin/singularity
    [[ -z ${1:-} ]] || "$HERE/kernel-image.sh"
}

main "$@"
