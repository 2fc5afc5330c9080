#!/usr/bin/env bash
# The GPU check, in one run: build with the CUDA backend, run the kernel tests on CPU and CUDA,
# run the CUDA microbenchmarks, and write what was seen (device named) under $OUT (default
# bench/results/gpu). Meant for a machine with an NVIDIA GPU, nvcc, torch with CUDA, and the
# nvidia-cublas / nvidia-cusolver wheels (or a full CUDA toolkit).
#
# If the machine has no scipy-openblas32 (the CPU BLAS the package links) and cannot fetch it,
# put its wheel for that Python in .whl/ first, e.g. (here, with network):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# and carry .whl along; this script installs any .whl/*.whl it finds.
#
#   bash bench/gpu_check.sh        env: OUT, CUDA_ARCHS (default "80;90"), PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$log"
step() { echo "== $*" | tee -a "$log"; }
status=0

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name())" 2>&1 | tee -a "$log"

if compgen -G ".whl/*.whl" >/dev/null; then
  step "install carried wheels"
  "$py" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$log"
fi

step "build (UNLOCK_CUDA=ON)"
t0=$(date +%s)
UNLOCK_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-80;90}" \
  "$py" -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1
build_rc=$?
tail -n 5 "$out/build.log" | tee -a "$log"
echo "build exit $build_rc in $(($(date +%s) - t0)) s" | tee -a "$log"
if [ "$build_rc" -ne 0 ]; then
  echo '{"build": "failed"}' >"$out/gpu_check.json"
  exit 1
fi
# from outside the source tree, so that the installed package is imported
(cd /tmp && "$py" -c "import unlock_fast, unlock_fast._core as c; \
print('backends', unlock_fast.backends(), 'archs', c.cuda_architectures)") 2>&1 | tee -a "$log"

step "kernel tests (cpu and cuda)"
tests=(python_tests/test_build.py python_tests/test_moments.py python_tests/test_steer.py)
[ -f python_tests/test_rsvd.py ] && tests+=(python_tests/test_rsvd.py)
# -P: the source tree stays off sys.path, so the tests import the installed build
UNLOCK_TEST_DEVICE=cpu,cuda "$py" -P -m pytest -q -p no:cacheprovider "${tests[@]}" \
  --junitxml="$out/pytest.xml" 2>&1 | tail -n 25 | tee -a "$log"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -eq 0 ] || status=1

step "benchmarks (cuda)"
bench_rc=0
"$py" bench/bench_moments.py --device cuda --out "$out/moments-cuda.json" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
"$py" bench/bench_steer.py --device cuda --out "$out/steer-cuda.json" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
if grep -q -- "--device" bench/bench_rsvd.py 2>/dev/null; then
  "$py" bench/bench_rsvd.py --device cuda --out "$out/rsvd-cuda.json" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
fi
[ "$bench_rc" -eq 0 ] || status=1

"$py" - "$out" "$test_rc" "$bench_rc" <<'PY' | tee -a "$log"
import json, sys, datetime, torch
out, test_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "build": "ok",
    "tests": "passed" if test_rc == 0 else f"failed (exit {test_rc})",
    "benchmarks": "ok" if bench_rc == 0 else "failed",
}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=2)
print(json.dumps(summary))
PY
exit $status
