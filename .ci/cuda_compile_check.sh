#!/usr/bin/env bash
# Compile and link the CUDA backend on a machine without a GPU (nothing CUDA runs here), so a
# broken .cu file cannot land. Uses the active Python; installs the cuBLAS/cuSOLVER wheels of
# nvcc's CUDA major version (and the build tools) when they are missing.
#
#   bash .ci/cuda_compile_check.sh        env: CUDA_ARCHS (default "80;90"), BUILD_DIR, JOBS
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python}
build_dir=${BUILD_DIR:-build/cuda-compile-check}
archs=${CUDA_ARCHS:-80;90}
jobs=${JOBS:-2}

nvcc_bin=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$nvcc_bin" ]; then
  echo "cuda_compile_check: no nvcc found (PATH, CUDACXX, /usr/local/cuda/bin)" >&2
  exit 1
fi
cuda_major=$("$nvcc_bin" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
echo "+ nvcc $("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p') at $nvcc_bin"

# cuBLAS/cuSOLVER headers and libraries from NVIDIA's wheels, matching nvcc's major version.
have_cuda_libs() {
  "$py" - <<'PY'
import glob, importlib.util, os, sys
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
def found(header):
    return any(glob.glob(os.path.join(r, "*", "include", header)) for r in roots)
sys.exit(0 if found("cublas_v2.h") and found("cusolverDn.h") else 1)
PY
}
if ! have_cuda_libs; then
  if [ "$cuda_major" -ge 13 ]; then
    # cuSOLVER's major version is one below the CUDA release it ships with (12.x for CUDA 13)
    wheels=("nvidia-cublas>=${cuda_major},<$((cuda_major + 1))"
      "nvidia-cusolver>=$((cuda_major - 1)),<${cuda_major}")
  else
    wheels=("nvidia-cublas-cu${cuda_major}" "nvidia-cusolver-cu${cuda_major}")
  fi
  echo "+ pip install ${wheels[*]}"
  "$py" -m pip install -q "${wheels[@]}"
fi
"$py" -c "import pybind11, scipy_openblas32" 2>/dev/null ||
  "$py" -m pip install -q "pybind11>=2.13" "scipy-openblas32>=0.3.28"
generator=()
if command -v ninja >/dev/null || "$py" -m pip install -q ninja; then
  command -v ninja >/dev/null && generator=(-G Ninja)
fi

rm -rf "$build_dir"
cmake -S . -B "$build_dir" "${generator[@]}" -DUNLOCK_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  -DPython_EXECUTABLE="$(command -v "$py")"
cmake --build "$build_dir" -j "$jobs"

so=$(find "$build_dir" -maxdepth 1 -name '_core*.so' | head -n 1)
if [ -z "$so" ]; then
  echo "cuda_compile_check: the build made no _core module" >&2
  exit 1
fi
# Linked against cuBLAS and cuSOLVER, and loadable without a GPU, reporting the CUDA backend.
readelf -d "$so" | grep -q 'libcublas' || { echo "not linked to cuBLAS" >&2; exit 1; }
readelf -d "$so" | grep -q 'libcusolver' || { echo "not linked to cuSOLVER" >&2; exit 1; }
(cd "$build_dir" && "$py" - <<'PY'
import _core
assert _core.cuda_compiled, "cuda_compiled is False in a UNLOCK_CUDA=ON build"
names = [n for n in dir(_core) if n.endswith("_cuda")]
assert "moments_accumulate_cuda" in names and "steer_cuda" in names, names
print(f"+ _core loads: cuda_compiled=True, architectures {_core.cuda_architectures}, "
      f"CUDA entry points: {', '.join(sorted(names))}")
PY
)
if command -v cuobjdump >/dev/null; then
  echo "+ device code: $(cuobjdump --list-elf "$so" | sed -n 's/.*\(sm_[0-9]*\).*/\1/p' | sort -u | tr '\n' ' ')"
fi
echo "cuda_compile_check: OK"
