#!/usr/bin/env bash
# Register qemu-user-static with binfmt_misc so that ARCH binaries run emulated.
#   scripts/binfmt.sh arm64
# Uses the registration line Debian's qemu-user-static ships in /usr/lib/binfmt.d (flag F:
# the interpreter is opened now, so it also works inside chroots and containers).
set -euo pipefail
arch=${1:?usage: binfmt.sh ARCH}
case "$arch" in
    arm64) name=qemu-aarch64 ;;
    *) echo "binfmt.sh: no emulator known for $arch" >&2; exit 1 ;;
esac
conf=/usr/lib/binfmt.d/$name.conf
[ -f "$conf" ] || { echo "$conf is missing: apt-get install qemu-user-static" >&2; exit 1; }
dir=/proc/sys/fs/binfmt_misc
[ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir"
[ "$(cat "$dir/status")" = enabled ] || echo 1 >"$dir/status"
[ -e "$dir/$name" ] || grep -v '^#' "$conf" >"$dir/register"
