#!/usr/bin/env bash
# Build (or reuse) a Debian 12 root file system for the container tests.
#   scripts/debian-rootfs.sh ARCH DEST        ARCH: amd64 (the systemd test) or arm64 (make check-arm64)
#
# The tree holds what a Raspberry Pi OS install of edge-lstm has: Python 3.11 with venv support,
# Mosquitto and (on the host's own architecture, where the tree is booted) systemd as init. It is built once and reused while the package list below
# and the Debian suite stay the same (DEST/.edge-lstm-rootfs records both); packages added to
# the list are installed into the existing tree (minutes) rather than rebuilding it. A foreign ARCH is
# built with qemu-user-static: the second debootstrap stage then runs emulated (about 14 min
# for arm64 on two cores, against about 2 min natively).
set -euo pipefail
arch=${1:?usage: debian-rootfs.sh ARCH DEST}
dest=${2:?usage: debian-rootfs.sh ARCH DEST}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv: the documented install path; Mosquitto: the broker of the demo and the tests;
# procps: ps and kill, which every Raspberry Pi OS has and the tests use.
packages=procps,python3,python3-venv,mosquitto,mosquitto-clients
if [ "$arch" = "$(dpkg --print-architecture)" ]; then
    # The systemd test boots the tree: systemd-sysv gives /sbin/init, dbus the bus systemctl
    # and systemd-analyze use, libnss-systemd the names of DynamicUser= users, sudo and
    # openssl the documented install commands as written.
    packages=systemd,systemd-sysv,dbus,libnss-systemd,sudo,openssl,$packages
fi
stamp="suite=$suite arch=$arch packages=$packages"

host_arch=$(dpkg --print-architecture)
if [ -f "$dest/.edge-lstm-rootfs" ]; then
    built=$(cat "$dest/.edge-lstm-rootfs")
    [ "$built" = "$stamp" ] && exit 0
    # Same suite and architecture, packages only added to the list: install just those into the
    # existing tree (apt-get in a chroot; emulated for a foreign ARCH) instead of rebuilding it.
    if [ "${built%% packages=*}" = "suite=$suite arch=$arch" ]; then
        have=",${built#* packages=},"
        added=() dropped=0
        for p in ${packages//,/ }; do [[ $have == *",$p,"* ]] || added+=("$p"); done
        for p in ${have//,/ }; do [[ ",$packages," == *",$p,"* ]] || dropped=1; done
        if [ "$dropped" -eq 0 ] && [ ${#added[@]} -gt 0 ]; then
            [ "$arch" = "$host_arch" ] || "$(dirname "$0")/binfmt.sh" "$arch"
            echo "adding ${added[*]} to the root file system in $dest" >&2
            start=$(date +%s)
            cp -L /etc/resolv.conf "$dest/etc/resolv.conf"
            unshare --mount --propagation private -- bash -euo pipefail -s "$dest" "${added[@]}" \
                >>"$dest.log" 2>&1 <<'EOF' || { tail -30 "$dest.log" >&2; exit 1; }
dest=$1 && shift
mount -t proc proc "$dest/proc"
mount --rbind /dev "$dest/dev"
# No service of the tree starts while packages install.
printf '#!/bin/sh\nexit 101\n' >"$dest/usr/sbin/policy-rc.d" && chmod +x "$dest/usr/sbin/policy-rc.d"
trap 'rm -f "$dest/usr/sbin/policy-rc.d"' EXIT
run() { chroot "$dest" /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin DEBIAN_FRONTEND=noninteractive "$@"; }
run apt-get update -qq
run apt-get install -y -qq --no-install-recommends "$@"
run apt-get clean
rm -rf "$dest/var/lib/apt/lists/"*_Packages
EOF
            printf '%s' "$stamp" >"$dest/.edge-lstm-rootfs"
            echo "root file system updated in $(( $(date +%s) - start )) s" >&2
            exit 0
        fi
    fi
fi
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: scripts/os-deps.sh test installs it" >&2; exit 1; }
done
foreign=()
if [ "$arch" != "$host_arch" ]; then
    "$(dirname "$0")/binfmt.sh" "$arch"
    foreign=(--foreign)
fi

start=$(date +%s)
tmp="$dest.tmp"
rm -rf "$tmp" "$dest"
mkdir -p "$(dirname "$dest")" "$dest.debs"
echo "building a Debian $suite $arch root file system in $dest (once; reused afterwards)" >&2
debootstrap --variant=minbase --arch="$arch" --include="$packages" --cache-dir="$(realpath "$dest.debs")" \
    "${foreign[@]}" "$suite" "$tmp" "$mirror" >"$dest.log" 2>&1 || { tail -30 "$dest.log" >&2; exit 1; }
if [ ${#foreign[@]} -gt 0 ]; then
    # The second stage runs the target's own maintainer scripts, emulated by binfmt_misc.
    chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$dest.log" 2>&1 || { tail -30 "$dest.log" >&2; exit 1; }
fi
# An empty machine-id: each boot of a copy gets its own.
rm -f "$tmp/etc/machine-id" && : >"$tmp/etc/machine-id"
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*_Packages
printf '%s' "$stamp" >"$tmp/.edge-lstm-rootfs"
mv "$tmp" "$dest"
echo "root file system ready in $(( $(date +%s) - start )) s" >&2
