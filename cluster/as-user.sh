#!/usr/bin/env bash
# Run a command as an unprivileged test user, with a clean login-like environment, from a
# directory that user can read:   cluster/as-user.sh USER DIR COMMAND [ARG...]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
hk_need_root
(( $# >= 3 )) || hk_die "usage: as-user.sh USER DIR COMMAND [ARG...]"
user=$1 dir=$2
shift 2
home=$(getent passwd "$user" | cut -d: -f6) || hk_die "no user $user: run cluster/setup.sh"
cd "$dir"
exec runuser -u "$user" -- env -i HOME="$home" USER="$user" LOGNAME="$user" SHELL=/bin/bash \
    PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    ${CI:+CI="$CI"} ${PYTEST_ADDOPTS:+PYTEST_ADDOPTS="$PYTEST_ADDOPTS"} "$@"
