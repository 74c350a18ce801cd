#!/usr/bin/env bash
# Installs what the load test runs, from Debian packages, when missing: nginx (the baseline,
# `nginx-light`), wrk (the load generator), curl (admin API calls) and strace (system calls per
# request). Called by `make bench`.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v strace >/dev/null 2>&1 || missing+=(strace)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "benches/load: install ${missing[*]} (Debian packages: nginx-light wrk curl strace)" >&2
    exit 1
fi
echo "benches/load: installing ${missing[*]}" >&2
# The nginx package starts a system nginx on :80 after install; the load test starts its own,
# so keep the service from starting (policy-rc.d, unless the image already has one).
policy=/usr/sbin/policy-rc.d
added_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    added_policy=true
fi
status=0
"${sudo[@]}" apt-get update -qq || status=$?
[ $status -eq 0 ] && { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" || status=$?; }
$added_policy && "${sudo[@]}" rm -f "$policy"
if [ $status -ne 0 ]; then
    echo "benches/load: could not install ${missing[*]} (Debian packages: nginx-light wrk curl strace)" >&2
    exit 1
fi
