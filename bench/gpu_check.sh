#!/usr/bin/env bash
# The GPU check, in one run (under 8 minutes on an H100/H200): build with the CUDA backend,
# run the kernel tests on CPU and CUDA and every CUDA-marked test of the suite (the hooks on
# a CUDA model, the dense SVD/eigh paths), run the CUDA benchmarks, and write what was seen
# (device named) under $OUT (default bench/results/gpu): gpu_check.json (summary),
# gpu_check.log, build.log, pytest.xml and one JSON per benchmark, in one folder.
# Meant for a machine with an NVIDIA GPU, nvcc, torch with CUDA, and the nvidia-cublas /
# nvidia-cusolver wheels (or a full CUDA toolkit).
#
# If the machine has no scipy-openblas32 (the CPU BLAS the package links) and cannot fetch it,
# put its wheel for that Python in .whl/ first, e.g. (here, with network):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# and carry .whl along (the scipy-openblas32 wheel must be carried to a machine without
# network; add scikit-build-core, pybind11 and ninja the same way if that Python lacks them);
# this script installs any .whl/*.whl it finds. The build runs without build isolation, so
# it sees the nvidia-cublas / nvidia-cusolver wheels that CUDA torch installed.
#
#   bash bench/gpu_check.sh        env: OUT, CUDA_ARCHS (default: this GPU's), PYTHON,
#                                  BUDGET_S (default 470: every step is cut to fit)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$log"
step() { echo "== $* (t=$(($(date +%s) - start)) s)" | tee -a "$log"; }
start=$(date +%s)
budget=${BUDGET_S:-470}
# seconds for a step: its cap, or what is left of the budget if less
left() {
  local rest=$((budget - ($(date +%s) - start)))
  [ "$rest" -lt 1 ] && rest=1 # never 0: `timeout 0` would not time out at all
  [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}
status=0

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 |
  tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
archs=${CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
  head -n 1 | tr -d ' .')}
archs=${archs:-80;90}

if compgen -G ".whl/*.whl" >/dev/null; then
  step "install carried wheels"
  "$py" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$log"
fi

step "build (UNLOCK_CUDA=ON, architectures $archs)"
t0=$(date +%s)
UNLOCK_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$archs" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "$(left 240)" \
  "$py" -m pip install --no-build-isolation --no-deps --force-reinstall -v . \
  >"$out/build.log" 2>&1
build_rc=$?
grep -E "unlock_fast:|CUDA compiler identification" "$out/build.log" | tee -a "$log"
tail -n 3 "$out/build.log" | tee -a "$log"
echo "build exit $build_rc in $(($(date +%s) - t0)) s" | tee -a "$log"
# from outside the source tree and without LD_LIBRARY_PATH, so that the installed package
# is imported and finds cuBLAS/cuSOLVER through its RPATH
(cd /tmp && env -u LD_LIBRARY_PATH "$py" - <<'PY') 2>&1 | tee -a "$log"
import shutil, subprocess, sys
import unlock_fast, unlock_fast._core as c
print("backends", unlock_fast.backends(), "archs", c.cuda_architectures)
def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True).stdout if shutil.which(cmd[0]) else ""
dyn = run("readelf", "-d", c.__file__)
print("RPATH", [l.split("[", 1)[1].rstrip("]") for l in dyn.splitlines() if "PATH)" in l])
# torch has loaded its own cuBLAS by now; ldd shows what the module's RPATH alone finds
deps = run("ldd", c.__file__).splitlines()
print("\n".join(l.strip() for l in deps if "libcu" in l or "not found" in l))
missing = any("not found" in l for l in deps)
sys.exit(0 if unlock_fast.backends()["cuda"] and not missing else 3)
PY
load_rc=${PIPESTATUS[0]}
if [ "$build_rc" -ne 0 ] || [ "$load_rc" -ne 0 ]; then
  echo "{\"build\": \"failed\", \"build_exit\": $build_rc, \"load_exit\": $load_rc}" \
    >"$out/gpu_check.json"
  exit 1
fi

# -P: the source tree stays off sys.path, so the tests import the installed build
step "kernel tests (cpu and cuda)"
tests=()
for f in test_build test_cuda_build test_moments test_moments_buffer test_moments_precision \
  test_steer test_steer_tokens test_rsvd test_ops_boundary; do
  [ -f "python_tests/$f.py" ] && tests+=("python_tests/$f.py")
done
UNLOCK_TEST_DEVICE=cpu,cuda timeout "$(left 150)" "$py" -P -m pytest -q -p no:cacheprovider \
  "${tests[@]}" --junitxml="$out/pytest.xml" 2>&1 | tail -n 25 | tee -a "$log"
test_rc=${PIPESTATUS[0]}

step "the other CUDA-marked tests (hooks on a CUDA model, ...)"
others=()
for f in python_tests/test_*.py; do
  case " ${tests[*]} " in *" $f "*) continue ;; esac
  grep -qE 'mark\.cuda|\bdevice\b' "$f" && others+=("$f")
done
UNLOCK_TEST_DEVICE=cuda timeout "$(left 90)" "$py" -P -m pytest -q -p no:cacheprovider \
  --continue-on-collection-errors -m "cuda and not slow and not vllm" "${others[@]}" 2>&1 |
  tail -n 25 | tee -a "$log"
cuda_rc=${PIPESTATUS[0]}
[ "$cuda_rc" -eq 5 ] && cuda_rc=0 # none selected
{ [ "$test_rc" -eq 0 ] && [ "$cuda_rc" -eq 0 ]; } || status=1

step "benchmarks (cuda)"
bench_rc=0
bench() { # name cap args...
  local name=$1 cap=$2
  shift 2
  local secs
  secs=$(left "$cap")
  if [ "$secs" -lt 15 ]; then
    echo "skipped $name: out of time" | tee -a "$log"
    bench_rc=1
    return
  fi
  step "bench $name (at most $secs s)"
  timeout "$secs" "$py" "$@" --device cuda --out "$out/$name-cuda.json" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
}
bench moments 60 bench/bench_moments.py
bench moments-buffer 45 bench/bench_moments_buffer.py --dims 4096 --blocks 1024
bench steer 60 bench/bench_steer.py
bench steer-graph 40 bench/bench_steer_graph.py
bench rsvd 90 bench/bench_rsvd.py --d 8192 --k 256
# the paper's shapes: Qwen1.5-14B -> 7B widths (d = 5120/4096), one block each, N up to 4096
bench scale 120 bench/bench_scale.py --repeats 1
bench eigh-threshold 90 bench/bench_eigh_threshold.py --repeats 3
[ "$bench_rc" -eq 0 ] || status=1

"$py" - "$out" "$test_rc" "$cuda_rc" "$bench_rc" "$(($(date +%s) - start))" <<'PY' | tee -a "$log"
import json, sys, datetime, torch
out, test_rc, cuda_rc, bench_rc, wall = sys.argv[1], *map(int, sys.argv[2:])
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "build": "ok",
    "kernel_tests": "passed" if test_rc == 0 else f"failed (exit {test_rc})",
    "cuda_tests": "passed" if cuda_rc == 0 else f"failed (exit {cuda_rc})",
    "benchmarks": "ok" if bench_rc == 0 else "failed or cut",
    "wall_s": wall,
}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=2)
print(json.dumps(summary))
PY
exit $status
