#!/usr/bin/env bash
# Compile and link the CUDA backend on a machine without a GPU (nothing CUDA runs here), so a
# broken .cu file cannot land. Uses the active Python; installs the cuBLAS/cuSOLVER wheels of
# nvcc's CUDA major version (and the build tools) when they are missing. Also checks that a
# build folder configured CPU-only first (no nvcc visible) still gives the CUDA backend when
# configured again with UNLOCK_CUDA=ON, and that the installed module's RPATH names the
# cuBLAS/cuSOLVER folder, so that it loads without LD_LIBRARY_PATH.
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

cmake_bin=$(command -v cmake)
py_bin=$(command -v "$py")
cmake_args=(-DPython_EXECUTABLE="$py_bin" -DCMAKE_CUDA_ARCHITECTURES="$archs")
if [ ${#generator[@]} -gt 0 ]; then
  cmake_args+=("${generator[@]}" -DCMAKE_MAKE_PROGRAM="$(command -v ninja)")
fi

# A build folder first configured CPU-only (no nvcc visible: the search fails and CMake caches
# CMAKE_CUDA_COMPILER-NOTFOUND) must still give the CUDA backend when configured again with
# UNLOCK_CUDA=ON, as pip's reused build/{wheel_tag} folder would be.
rm -rf "$build_dir"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
no_nvcc_path=$(printf '%s' "$PATH" | tr ':' '\n' |
  while read -r dir; do [ -n "$dir" ] && [ ! -x "$dir/nvcc" ] && echo "$dir"; done | paste -sd:)
env -u CUDACXX PATH="$no_nvcc_path" "$cmake_bin" -S . -B "$build_dir" "${cmake_args[@]}" \
  -DUNLOCK_CUDA=AUTO >"$site/cpu-configure.log" 2>&1 ||
  { cat "$site/cpu-configure.log" >&2; echo "CPU-only configure failed" >&2; exit 1; }
if [ -d /usr/local/cuda/bin ] && grep -q '^CMAKE_CUDA_COMPILER:.*NOTFOUND' "$build_dir/CMakeCache.txt"; then
  echo "+ CPU-only configure first: CMAKE_CUDA_COMPILER-NOTFOUND cached"
else
  echo "+ CPU-only configure first (CMake found no nvcc or found it by a default path)"
fi
# nvcc through CUDACXX, as pip passes it (a -DCMAKE_CUDA_COMPILER would hide a stale cache)
CUDACXX="$nvcc_bin" "$cmake_bin" -S . -B "$build_dir" "${cmake_args[@]}" -DUNLOCK_CUDA=ON
grep -q '^CMAKE_CUDA_COMPILER:.*nvcc' "$build_dir/CMakeCache.txt" ||
  { echo "the CUDA reconfigure of a CPU-only build folder found no nvcc" >&2; exit 1; }
"$cmake_bin" --build "$build_dir" -j "$jobs"

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

# The installed module's RPATH names the cuBLAS/cuSOLVER folder, and in a site-packages
# layout (unlock_fast/ next to nvidia/ and scipy_openblas32/) every library resolves without
# LD_LIBRARY_PATH.
"$cmake_bin" --install "$build_dir" --prefix "$site" >/dev/null
installed=$(find "$site/unlock_fast" -maxdepth 1 -name '_core*.so' | head -n 1)
rpath=$(readelf -d "$installed" | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p')
echo "+ installed RPATH: $rpath"
cublas_dir=$(dirname "$(readlink -f "$(ldd "$so" | sed -n 's/.*libcublas\.so[^ ]* => \([^ ]*\).*/\1/p' | head -n 1)")")
case ":$rpath:" in
  *'$ORIGIN/../nvidia/'*'/lib'*) rel_ok=1 ;;
  *) rel_ok=0 ;;
esac
case ":$rpath:" in
  *":$cublas_dir:"*) abs_ok=1 ;;
  *) abs_ok=0 ;;
esac
if [ "$rel_ok" -eq 0 ] && [ "$abs_ok" -eq 0 ]; then
  echo "the RPATH ($rpath) names neither \$ORIGIN/../nvidia/*/lib nor $cublas_dir" >&2
  exit 1
fi
for pkg in nvidia scipy_openblas32; do
  src=$("$py" -c "import importlib.util as u, os; s = u.find_spec('$pkg'); \
print(list(s.submodule_search_locations)[0] if s else '')")
  [ -n "$src" ] && ln -s "$src" "$site/$pkg"
done
resolved=$(env -u LD_LIBRARY_PATH ldd "$installed")
if grep -q 'not found' <<<"$resolved"; then
  echo "the installed module does not load without LD_LIBRARY_PATH:" >&2
  grep 'not found' <<<"$resolved" >&2
  exit 1
fi
if [ "$rel_ok" -eq 1 ] && ! grep -Eq "libcublas\.so[^ ]* => $site/(unlock_fast/\.\./)?nvidia/" <<<"$resolved"; then
  echo "cuBLAS does not resolve through \$ORIGIN/../nvidia in a site-packages layout" >&2
  exit 1
fi
echo "+ installed module resolves cuBLAS/cuSOLVER through its RPATH: $(env -u LD_LIBRARY_PATH \
  ldd "$installed" | sed -n 's/.*\(libcu\(blas\|solver\)\.so[^ ]*\) => \([^ ]*\).*/\1 => \3/p' | tr '\n' ' ')"

if command -v cuobjdump >/dev/null; then
  echo "+ device code: $(cuobjdump --list-elf "$so" | sed -n 's/.*\(sm_[0-9]*\).*/\1/p' | sort -u | tr '\n' ' ')"
fi
echo "cuda_compile_check: OK"
