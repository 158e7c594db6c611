#!/usr/bin/env bash
# Build the test cluster's kernel image once, and keep it between runs (idempotent).
#
#   cluster/kernel-image.sh
#
# The image is built by `hpc-kernel image build` itself, as the unprivileged test user with
# --fakeroot (the way a researcher builds one; root cannot run the build's %post here: this
# machine withholds CAP_SYS_RESOURCE). The result is kept in $HK_CACHE/images under a key made of
# the definition and the Apptainer version, so a changed definition builds a new image and an
# unchanged one is reused. A cached image is used only after `hpc-kernel image check` passes.
#
# Results, readable by every user and node:
#   $HK_IMAGES/kernel.sif        Debian bookworm, python3-ipykernel
#   $HK_IMAGES/kernel.oci.tar    the same as an OCI archive for podman (`hpc-kernel image export`),
#                                image localhost/hpc-kernels/kernel:latest
#   $HK_IMAGES/no-ipykernel/     the same as a sandbox directory, ipykernel removed (bad-input tests)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

BUILDER=${HK_USERS[0]}
APPTAINER=$HK_APPTAINER_PREFIX/bin/apptainer
export PATH=$HK_APPTAINER_PREFIX/bin:$HK_VENV/bin:$PATH

image_key() {
    { hpc-kernel image build --print-definition; "$APPTAINER" --version; } | sha256sum | cut -c1-16
}

checks_out() {
    runuser -u "$BUILDER" -- env "PATH=$PATH" hpc-kernel image check "$1" >/dev/null 2>&1
}

build() {
    local out=$1 work
    work=$(mktemp -d "$HK_CACHE/images/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT      # a failed or interrupted build leaves nothing behind
    chown "$BUILDER" "$work"
    hk_log "building the kernel image as $BUILDER (about 2 minutes; cached afterwards)"
    if ! (cd "$work" && runuser -u "$BUILDER" -- env "PATH=$PATH" HOME="$(getent passwd "$BUILDER" | cut -d: -f6)" \
            hpc-kernel image build "$work/kernel.sif" >"$work/build.log" 2>&1); then
        tail -n 30 "$work/build.log" >&2
        rm -rf "$work"
        hk_die "the kernel image build failed"
    fi
    install -m 0644 -o root -g root "$work/kernel.sif" "$out"
    rm -rf "$work"
    trap - EXIT
}

# The OCI archive of kernel.sif for the podman runtime, made by `hpc-kernel image export` as the
# test user (an unprivileged unpack, as a site admin without root would make it); rebuilt when the
# SIF's key changes.
export_oci() {
    local key=$1 work
    [[ -s $HK_IMAGES/kernel.oci.tar && -f $HK_IMAGES/kernel.oci.tar.key &&
       $(cat "$HK_IMAGES/kernel.oci.tar.key") == "$key" ]] && return 0
    work=$(mktemp -d "$HK_CACHE/images/oci.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    chown "$BUILDER" "$work"
    hk_log "exporting $HK_IMAGES/kernel.sif as an OCI archive for podman"
    (cd "$work" && runuser -u "$BUILDER" -- env "PATH=$PATH" hpc-kernel image export "$HK_IMAGES/kernel.sif" \
        "$work/kernel.oci.tar") || hk_die "hpc-kernel image export failed"
    install -m 0644 -o root -g root "$work/kernel.oci.tar" "$HK_IMAGES/.kernel.oci.tar.new"
    mv "$HK_IMAGES/.kernel.oci.tar.new" "$HK_IMAGES/kernel.oci.tar"
    rm -rf "$work"
    trap - EXIT
    echo "$key" >"$HK_IMAGES/kernel.oci.tar.key"
}

main() {
    hk_need_root
    [[ -x $APPTAINER ]] || hk_die "no Apptainer in $HK_APPTAINER_PREFIX: run cluster/install-apptainer.sh"
    mkdir -p "$HK_CACHE/images" "$HK_IMAGES"
    chmod 0755 "$HK_IMAGES"
    local key cached
    key=$(image_key)
    cached=$HK_CACHE/images/kernel-$key.sif
    if [[ -f $HK_IMAGES/kernel.sif.key && $(cat "$HK_IMAGES/kernel.sif.key") == "$key" ]] && checks_out "$HK_IMAGES/kernel.sif"; then
        export_oci "$key"
        return 0
    fi
    if [[ ! -s $cached ]] || ! checks_out "$cached"; then
        rm -f "$cached"
        build "$cached"
        checks_out "$cached" || hk_die "the freshly built image $cached fails hpc-kernel image check"
    fi
    hk_log "installing $HK_IMAGES/kernel.sif (key $key)"
    install -m 0644 "$cached" "$HK_IMAGES/.kernel.sif.new"
    mv "$HK_IMAGES/.kernel.sif.new" "$HK_IMAGES/kernel.sif"
    # An image that cannot run a kernel, for the tests of that error: a directory image (Apptainer
    # runs those as they are), made from the real one with ipykernel taken out.
    local work
    work=$(mktemp -d "$HK_CACHE/images/sandbox.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    chown "$BUILDER" "$work"
    runuser -u "$BUILDER" -- "$APPTAINER" -s build --sandbox "$work/no-ipykernel" "$HK_IMAGES/kernel.sif" ||
        hk_die "could not unpack $HK_IMAGES/kernel.sif"
    rm -rf "$work"/no-ipykernel/usr/lib/python3/dist-packages/ipykernel*
    chown -R root:root "$work/no-ipykernel"
    chmod -R a+rX,go-w "$work/no-ipykernel"
    rm -rf "$HK_IMAGES/no-ipykernel"
    mv "$work/no-ipykernel" "$HK_IMAGES/no-ipykernel"
    rm -rf "$work"
    trap - EXIT
    echo "$key" >"$HK_IMAGES/kernel.sif.key"
    export_oci "$key"
}

main "$@"
