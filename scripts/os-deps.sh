#!/usr/bin/env bash
# Install the OS packages a target needs, only those missing (Debian / Raspberry Pi OS).
#   scripts/os-deps.sh demo   -> Mosquitto broker and clients, Python venv support
#   scripts/os-deps.sh test   -> the above plus Prometheus (promtool), systemd-analyze, strace, and
#                                systemd-nspawn + debootstrap for the test that boots the unit
#                                under systemd in a Debian container (tests/test_systemd_container.py)
#   scripts/os-deps.sh arm64  -> the above plus qemu-user-static (make check-arm64)
set -euo pipefail
target=${1:-demo}
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
have_cmd mosquitto || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
have_cmd mosquitto_pub || need+=(mosquitto-clients)
if [ "$target" = test ] || [ "$target" = bench ] || [ "$target" = arm64 ]; then
    have_cmd prometheus || need+=(prometheus)
    have_cmd promtool || need+=(prometheus)
    have_cmd systemd-analyze || need+=(systemd)
    have_cmd openssl || need+=(openssl)
    have_cmd strace || need+=(strace)
    have_cmd systemd-nspawn || need+=(systemd-container)
    have_cmd debootstrap || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
fi
if [ "$target" = arm64 ]; then
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
fi
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing OS packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# policy-rc.d keeps the Debian packages from starting their own services during install:
# the project starts private brokers and Prometheus servers on free ports itself.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
