#!/usr/bin/env bash
# Install Apptainer into a private prefix (idempotent; quiet when it is already there).
#
#   cluster/install-apptainer.sh [PREFIX]      default /opt/hpc-kernels/apptainer
#
# Apptainer is not in Debian 12. Debian's own package (suite sid) needs a newer glibc than
# bookworm's, so it is unpacked with that glibc (and the libraries it needs, from trixie) into
# one prefix, and its two ELF entry points are pointed at the prefix's loader and libraries.
# The system's apt sources are not touched: apt reads a sources list of our own.
# The .deb files are kept in $HK_CACHE/debs, so a reinstall (a fresh prefix) needs no network.
# Afterwards $PREFIX/bin/apptainer (and a `singularity` link, which spython calls) run as any user.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

PREFIX=${1:-$HK_APPTAINER_PREFIX}
DEBS=$HK_CACHE/debs
APT_DIR=$HK_CACHE/apt
# package/suite: the suite each comes from
WANTED=(apptainer/sid libc6/trixie libseccomp2/trixie libsqlite3-0/trixie)
LIB=usr/lib/x86_64-linux-gnu

installed() {
    [[ -x $PREFIX/bin/apptainer ]] && "$PREFIX/bin/apptainer" --version >/dev/null 2>&1
}

download_debs() {
    local want=() w
    for w in "${WANTED[@]}"; do
        compgen -G "$DEBS/${w%%/*}_*.deb" >/dev/null || want+=("$w")
    done
    (( ${#want[@]} )) || return 0
    hk_log "downloading ${want[*]} (apt sources of our own: trixie and sid)"
    mkdir -p "$DEBS" "$APT_DIR/lists/partial"
    cat >"$APT_DIR/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
EOF
    # Check-Valid-Until=false: a mirror that serves a frozen snapshot keeps sid's Release file past
    # its Valid-Until date (seen: "is expired"); the signatures are still checked.
    local apt=(apt-get -qq -o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o Acquire::Check-Valid-Until=false
               -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
               -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
    "${apt[@]}" update
    (cd "$DEBS" && "${apt[@]}" download "${want[@]}")
}

unpack() {
    local deb
    tmp=$(mktemp -d "$(dirname "$PREFIX")/.apptainer.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT      # a failed unpack leaves nothing behind
    for deb in "$DEBS"/*.deb; do dpkg-deb -x "$deb" "$tmp"; done
    local loader=$PREFIX/$LIB/ld-linux-x86-64.so.2
    for exe in usr/bin/apptainer "$LIB/apptainer/bin/starter"; do
        # --force-rpath (DT_RPATH, searched before the system's dirs), or libsqlite3 picks the system's libm.
        patchelf --set-interpreter "$loader" --force-rpath --set-rpath "$PREFIX/$LIB" "$tmp/$exe"
    done
    # The relocated binary looks for its configuration relative to itself.
    mkdir -p "$tmp/usr/etc" "$tmp/usr/lib/etc" "$tmp/usr/lib/var/lib/apptainer/mnt/session" "$tmp/bin"
    cp -a "$tmp/etc/apptainer" "$tmp/usr/etc/apptainer"
    cp -a "$tmp/etc/apptainer" "$tmp/usr/lib/etc/apptainer"
    ln -s ../usr/bin/apptainer "$tmp/bin/apptainer"
    ln -s ../usr/bin/apptainer "$tmp/bin/singularity"
    chmod -R a+rX "$tmp"
    rm -rf "$PREFIX"
    mv "$tmp" "$PREFIX"
    trap - EXIT
}

main() {
    hk_need_root
    # What this needs and what Apptainer runs (squashfuse, mksquashfs, debootstrap, ...) are
    # installed by setup.sh from packages.txt.
    local tool
    for tool in patchelf dpkg-deb apt-get; do
        command -v "$tool" >/dev/null || hk_die "$tool is missing: run cluster/setup.sh (it installs cluster/packages.txt)"
    done
    # SIF images are mounted with squashfuse by unprivileged users: /dev/fuse must be theirs to open.
    [[ -c /dev/fuse ]] && chmod 0666 /dev/fuse
    installed && return 0
    download_debs
    unpack
    installed || hk_die "$PREFIX/bin/apptainer does not run: $("$PREFIX/bin/apptainer" --version 2>&1 | tail -n 3)"
    hk_log "installed $("$PREFIX/bin/apptainer" --version) in $PREFIX"
}

main "$@"
