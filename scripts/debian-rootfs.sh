#!/usr/bin/env bash
# Build (or reuse) a Debian 12 root file system for the container tests.
#   scripts/debian-rootfs.sh ARCH DEST        ARCH: amd64 (the systemd test) or arm64 (make check-arm64)
#
# The tree holds what a Raspberry Pi OS install of edge-lstm has: Python 3.11 with venv support,
# Mosquitto and (on the host's own architecture, where the tree is booted) systemd as init. It is built once and reused while the package list below
# and the Debian suite stay the same (DEST/.edge-lstm-rootfs records both). A foreign ARCH is
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

if [ -f "$dest/.edge-lstm-rootfs" ] && [ "$(cat "$dest/.edge-lstm-rootfs")" = "$stamp" ]; then
    exit 0
fi
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: scripts/os-deps.sh test installs it" >&2; exit 1; }
done
host_arch=$(dpkg --print-architecture)
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
