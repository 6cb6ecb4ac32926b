#!/usr/bin/env bash
# Syntax-check deploy/nginx.conf with the local nginx (`nginx -t`), outside Docker.
#
# usage: deploy/nginx-check.sh [NGINX_CONF]   (exit 0 = valid; 2 = no nginx on PATH)
#
# The config is written for the container: its upstream is the compose service name (resolved
# by Docker's DNS at 127.0.0.11) and it writes under /tmp. A copy is rewritten for the host --
# upstream hosts -> 127.0.0.1, /tmp -> a private temp dir -- and the `resolve` upstream parameter
# (open-source nginx >= 1.27.3; the compose file pins 1.28) is dropped for older local builds.
set -euo pipefail

conf=${1:-"$(dirname "$0")/nginx.conf"}
command -v nginx >/dev/null 2>&1 || { echo "nginx not found on PATH" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

version=$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
sed_args=(
    -e "s#/tmp/#$work/#g"
    -e 's#^\([[:space:]]*server[[:space:]]\{1,\}\)[A-Za-z][A-Za-z0-9_.-]*:\([0-9]\{1,\}\)#\1127.0.0.1:\2#'
)
if [ "$(printf '%s\n' "$version" 1.27.3 | sort -V | head -n1)" != 1.27.3 ]; then
    echo "note: nginx $version < 1.27.3 has no upstream 'resolve'; checking without it"
    sed_args+=(-e 's#\([[:space:]]\)resolve\([[:space:]]\)#\1\2#')
fi
sed "${sed_args[@]}" "$conf" >"$work/nginx.conf"

# Warnings count as failures: "load balancing method redefined", for one, means keepalive came
# before least_conn and silently turned least_conn off.
if ! nginx -t -q -e stderr -p "$work/" -c "$work/nginx.conf" 2>"$work/stderr" || [ -s "$work/stderr" ]; then
    cat "$work/stderr" >&2
    echo "nginx $version: $conf FAILED the check" >&2
    exit 1
fi
echo "nginx $version: $conf is valid"
