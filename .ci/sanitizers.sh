#!/usr/bin/env bash
# The CPU kernel tests under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Builds unlock_fast._core (CPU backend, Debug) with -fsanitize=address,undefined in its own
# build folder, stages a copy of the Python package with that module in a temporary folder,
# and runs the kernel tests against it with the ASan runtime preloaded. Any sanitizer report
# fails the run. The installed package is neither rebuilt nor touched.
#
#   bash .ci/sanitizers.sh [PYTEST_ARGS...]     env: PYTHON, BUILD_DIR (default build/asan), JOBS
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

py=${PYTHON:-python}
build_dir=${BUILD_DIR:-build/asan}
jobs=${JOBS:-2}
cxx=${CXX:-g++}
tests=(python_tests/test_steer.py python_tests/test_moments.py python_tests/test_rsvd.py
  python_tests/test_ops_boundary.py python_tests/test_kernel_properties.py)

"$py" -c "import pybind11, scipy_openblas32" 2>/dev/null ||
  "$py" -m pip install -q "pybind11>=2.13" "scipy-openblas32>=0.3.28"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
start=$SECONDS
rm -rf "$build_dir"  # a fresh configure: a cached one may hold other flags
cmake -S . -B "$build_dir" "${generator[@]}" -DUNLOCK_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DPython_EXECUTABLE="$(command -v "$py")" >/dev/null
cmake --build "$build_dir" -j "$jobs"
echo "+ sanitized build: $((SECONDS - start)) s"

so=$(find "$build_dir" -maxdepth 1 -name '_core*.so' | head -n 1)
[ -n "$so" ] || { echo "sanitizers: the build made no _core module" >&2; exit 1; }
for runtime in __asan_ __ubsan_; do
  nm -D "$so" | grep "$runtime" >/dev/null ||
    { echo "sanitizers: $so has no ${runtime%_} instrumentation" >&2; exit 1; }
done
asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
  [ -f "$lib" ] || { echo "sanitizers: $cxx has no $lib" >&2; exit 1; }
done

# The package with the sanitized module, first on the path. `python -S` keeps site-packages
# from running .pth hooks (an editable install would otherwise redirect the import to the
# regular build); site-packages is put back on PYTHONPATH after the staged package.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r unlock_fast "$stage/unlock_fast"
find "$stage/unlock_fast" \( -name '_core*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cp "$so" "$stage/unlock_fast/"
site=$("$py" -c 'import os, site; print(os.pathsep.join(site.getsitepackages()))')
mkdir -p "$stage/logs"

run() {
  (cd "$stage" && env PYTHONPATH="$stage${site:+:$site}" LD_PRELOAD="$asan $ubsan" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:log_path=$stage/logs/asan" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$stage/logs/ubsan" \
    OMP_NUM_THREADS="$jobs" "$py" -S "$@")
}

run - "$stage" <<'PY'
import sys
import unlock_fast._core as core
assert core.__file__.startswith(sys.argv[1]), f"imported {core.__file__}, not the sanitized build"
print(f"+ sanitized core: {core.__file__}")
PY

# Canary: a raw call told that the buffer holds one more row than it does must be caught.
if run - >/dev/null 2>&1 <<'PY'
import torch
from unlock_fast import ops
core = ops.core.core_module()
h, v = torch.randn(2, 1, 16), torch.randn(16)
mask = torch.ones(3, 1, dtype=torch.bool)
core.steer_cpu(h.data_ptr(), 0, 3, 1, 16, 16, 16, 0, mask.data_ptr(), 1, 1, v.data_ptr(), 0,
               0.5, 1)
PY
then
  echo "sanitizers: the canary overflow went unreported; is the run sanitized?" >&2
  exit 1
fi
grep -qs heap-buffer-overflow "$stage"/logs/asan.* ||
  { echo "sanitizers: the canary left no ASan report" >&2; exit 1; }
rm -f "$stage"/logs/*
echo "+ canary: ASan reports a heap-buffer-overflow"

start=$SECONDS
status=0
run -m pytest -q -p no:cacheprovider --rootdir="$root" -c "$root/pyproject.toml" \
  "${tests[@]/#/$root/}" "$@" || status=$?
echo "+ tests under ASan/UBSan: $((SECONDS - start)) s"

if compgen -G "$stage/logs/*" >/dev/null; then
  echo "sanitizers: reports found" >&2
  cat "$stage"/logs/* >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitizers: the tests failed (exit $status)" >&2
  exit "$status"
fi
echo "sanitizers: OK"
