#!/usr/bin/env bash
# Install the OS packages a target needs, only those missing (Debian / Raspberry Pi OS).
#   scripts/os-deps.sh demo   -> Mosquitto broker and clients, Python venv support
#   scripts/os-deps.sh test   -> the above plus Prometheus (promtool) and systemd-analyze
set -euo pipefail
target=${1:-demo}
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
have_cmd mosquitto || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
have_cmd mosquitto_pub || need+=(mosquitto-clients)
if [ "$target" = test ] || [ "$target" = bench ]; then
    have_cmd prometheus || need+=(prometheus)
    have_cmd promtool || need+=(prometheus)
    have_cmd systemd-analyze || need+=(systemd)
    have_cmd openssl || need+=(openssl)
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
