#!/usr/bin/env bash
# make check-arm64: the project on arm64 (Raspberry Pi OS 64-bit), emulated with qemu-user-static.
#   scripts/check-arm64.sh HOST_PYTHON
#
# 1. A Debian 12 arm64 tree (scripts/debian-rootfs.sh; cached, about 14 min to build once).
# 2. The wheel of this checkout and arm64 binary wheels of its dependencies (cached wheelhouse)
#    installed in /opt/edge-lstm/venv inside the tree, as on a Pi.
# 3. In the tree (chroot, emulated): the test suite's fast lane minus what needs TensorFlow, the
#    demo from an empty directory, and the model's forecasts over the whole bundled series.
# 4. Here (native): the same demo and forecasts; the two are compared. The arm64 shared objects
#    are checked for 16K-page alignment (the Pi 5's kernel), which emulation cannot exercise.
#
# LiteRT reads /proc/cpuinfo to pick its kernels; under qemu-user the emulated process would see
# the host's x86 file and LiteRT segfaults while loading a model. The chroot therefore sees a
# Raspberry Pi 4's cpuinfo (scripts/arm64/cpuinfo) and qemu emulates a Cortex-A72 (QEMU_CPU).
# Results go to out/arm64/ (summary.txt); docs/deploy.md quotes the last run.
set -euo pipefail
python=${1:?usage: check-arm64.sh HOST_PYTHON}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache=${EDGE_LSTM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-lstm}
tree=$cache/rootfs-bookworm-arm64
out=$root/out/arm64
[ "$(id -u)" -eq 0 ] || { echo "check-arm64 needs root (chroot, mounts, binfmt_misc)" >&2; exit 1; }
t0=$(date +%s)
"$here/binfmt.sh" arm64
"$here/debian-rootfs.sh" arm64 "$tree"
t_tree=$(date +%s)

rm -rf "$out" && mkdir -p "$out/dist"
stage=$(mktemp -d) && trap 'rm -rf "$stage"' EXIT
# A snapshot of the checkout: the wheel is built from it and the emulated tests run it, so both
# stay the same version even when the checkout moves on during the half hour the tests take.
src=$stage/src && mkdir -p "$src"
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./out --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='.*_cache' --exclude=.hypothesis -cf - . | tar -C "$src" -xf -
cd "$src"
PYTHONPATH=$src "$python" - "$out/dist" "$stage/wheels" <<'EOF'
import shutil, sys
from pathlib import Path
from tests.support.wheels import build_wheel, wheelhouse
build_wheel(Path(sys.argv[1]))
src = wheelhouse("3.11", "aarch64", extra=["pytest>=8", "hypothesis>=6.100"])
shutil.copytree(src, sys.argv[2])
EOF

inside=$(cat <<'EOF'
set -euo pipefail
echo "machine: $(uname -m), $(python3 --version), $(grep -m1 'CPU part' /proc/cpuinfo)"
[ -x /opt/edge-lstm/venv/bin/python ] || python3 -m venv /opt/edge-lstm/venv
pip=(/opt/edge-lstm/venv/bin/pip install -q --no-index --find-links /srv/wheels)
"${pip[@]}" --force-reinstall --no-deps /srv/out/dist/edge_lstm-*.whl
"${pip[@]}" /srv/out/dist/edge_lstm-*.whl pytest hypothesis
/opt/edge-lstm/venv/bin/python -c 'import platform, numpy, ai_edge_litert; print("python", platform.machine(), "numpy", numpy.__version__)'
/opt/edge-lstm/venv/bin/pip list 2>/dev/null | grep -iE '^(ai-edge-litert|numpy|paho-mqtt|prometheus.client) ' || true
start=$(date +%s)
cd /tmp && /opt/edge-lstm/venv/bin/edge-lstm demo --ticks 400 --rate 50 >/srv/out/demo-arm64.txt 2>/srv/out/demo-arm64.err
echo "demo: $(( $(date +%s) - start )) s"
/opt/edge-lstm/venv/bin/python /srv/edge-lstm/scripts/arm64/forecasts.py /srv/out/forecasts-arm64.npy
cd /srv/edge-lstm
start=$(date +%s)
# The fast lane without the tests that need TensorFlow (the converter), a wheel build, systemd
# or Prometheus, which the device never runs.
PYTHONDONTWRITEBYTECODE=1 /opt/edge-lstm/venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
    --ignore=tests/test_converter.py --ignore=tests/test_converter_data.py --ignore=tests/test_bench_smoke.py \
    --ignore=tests/test_install.py --ignore=tests/test_systemd_container.py --ignore=tests/test_deploy.py \
    --ignore=tests/test_prometheus_live.py -o cache_dir=/tmp/pytest-cache \
    --deselect tests/test_reference.py::test_reference_equals_tflite_float32_for_the_bundled_model \
    ${EMULATED_DESELECT:-} tests >/srv/out/pytest-arm64.txt 2>&1 || true  # judged by compare.py
tail -15 /srv/out/pytest-arm64.txt
echo "tests: $(( $(date +%s) - start )) s"
EOF
)

# Timing-bound tests: under emulation (10-50x slower) they run out of their time limits. They
# run natively in CI (make test); on an arm64 host (no emulation) they run here too.
deselect=()
if [ "$(uname -m)" != aarch64 ]; then
    # TLS handshake: the daemon does not connect within the test's 20 s.
    deselect+=(tests/test_security.py::test_tls_client_certificate_works_and_bad_certificates_fail_clearly)
    # Password + ACL: two daemons' broker connections do not come up within the default wait.
    deselect+=(tests/test_security.py::test_password_and_acl_confine_the_daemon_and_refusals_are_reported)
    # Broker restart: emulated reconnects take longer than the outage, so readings arrive late.
    deselect+=(tests/test_reliability_broker.py::test_broker_restart_mid_stream_loses_no_reading)
    # Stream explosion: 100,000 readings are not all handled within the test's deadline.
    deselect+=(tests/test_reliability_input.py::test_stream_explosion_holds_the_table_at_capacity)
    # Checkpoint kill loop: no save finishes before its kill, so the loop has nothing to count.
    deselect+=(tests/test_reliability_state.py::test_checkpoint_writer_killed_at_random_points_always_leaves_a_loadable_file)
    # Overload: its peak-RSS bound is of the daemon; qemu-user's translated code counts into the
    # emulated process's RSS (294 MB against the 200 MB bound in the run of 2026-11-29).
    deselect+=(tests/test_reliability_input.py::test_overload_keeps_memory_capped_and_counts_every_reading)
fi
printf '%s\n' "${deselect[@]}" >"$out/deselected-emulated.txt"
deselect_args=$(printf -- '--deselect %s ' "${deselect[@]}")
[ ${#deselect[@]} -gt 0 ] || deselect_args=""

# A private mount namespace: every mount below disappears with it.
unshare --mount --propagation private -- bash -euo pipefail -s "$tree" "$src" "$stage/wheels" "$out" "$here/arm64/cpuinfo" "$inside" "$deselect_args" <<'EOF'
tree=$1 root=$2 wheels=$3 out=$4 cpuinfo=$5 inside=$6 deselect=$7
mkdir -p "$tree/srv/edge-lstm" "$tree/srv/wheels" "$tree/srv/out"
mount -t proc proc "$tree/proc"
mount --bind "$cpuinfo" "$tree/proc/cpuinfo"
mount --rbind /sys "$tree/sys"
mount --rbind /dev "$tree/dev"
mount -t tmpfs tmpfs "$tree/tmp"
mount --bind "$root" "$tree/srv/edge-lstm" && mount -o remount,bind,ro "$tree/srv/edge-lstm"
mount --bind "$wheels" "$tree/srv/wheels"
mount --bind "$out" "$tree/srv/out"
chroot "$tree" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
    QEMU_CPU=cortex-a72 EMULATED_DESELECT="$deselect" /bin/bash -c "$inside" 2>&1 | tee "$out/arm64.log"
EOF
t_arm=$(date +%s)

# The same on this machine, then the comparison.
(cd "$stage" && PYTHONPATH=$src "$python" -m edge_lstm demo --ticks 400 --rate 50 >"$out/demo-native.txt") || true
PYTHONPATH=$src "$python" "$src/scripts/arm64/forecasts.py" "$out/forecasts-native.npy" >/dev/null
status=0
PYTHONPATH=$src "$python" "$src/scripts/arm64/compare.py" "$out" | tee "$out/summary.txt" || status=1
# What emulation cannot show: Pi 5 kernels use 16K pages (qemu-user has the host's 4K).
"$python" "$here/arm64/pagesize.py" "$tree/opt/edge-lstm/venv/lib" "$tree/usr/lib/python3.11" \
    "$tree/usr/lib/aarch64-linux-gnu" | tee -a "$out/summary.txt" || status=1
echo "times: tree $((t_tree - t0)) s (0 when cached), arm64 install+demo+tests $((t_arm - t_tree)) s" | tee -a "$out/summary.txt"
exit $status
