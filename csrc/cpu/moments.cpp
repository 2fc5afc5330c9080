// CPU backend of the streaming moments: OpenMP panel fill, then OpenBLAS syrk/gemm/gemv.
#include "unlock/moments.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "unlock/blas.h"

namespace unlock {
namespace {

// Floats per panel chunk (16 MiB): large enough for BLAS to run at full speed, small enough
// to stay out of the way of the caller's memory.
constexpr int64_t kChunkFloats = int64_t{1} << 22;
// Below this many elements the panel fill runs on one thread: the fill is O(n·d) next to the
// O(n·d²) products, and waking a thread team costs more than it saves on small batches
// (torch's own OpenMP pool may hold the cores).
constexpr int64_t kParallelFill = int64_t{1} << 20;

// dst[i, :] = sqrt_w[i] * (src[i, :] - shift) for rows [0, rows).
template <class Tag, bool kWeighted>
void fill_panel(const RowsView& v, int64_t row0, int64_t rows, int64_t cols, const float* shift,
                const float* sqrt_w, float* dst) {
  using T = typename Tag::storage;
  const T* base = static_cast<const T*>(v.data);
  const int64_t sr = v.stride_row, sc = v.stride_col;
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelFill)
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = base + (row0 + i) * sr;
    float* out = dst + i * cols;
    const float s = kWeighted ? sqrt_w[i] : 1.f;
    if (sc == 1) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float val = Tag::load(src[j]) - shift[j];
        out[j] = kWeighted ? val * s : val;
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        out[j] = moments_panel_value(Tag::load(src[j * sc]), shift[j], s);
      }
    }
  }
}

void fill(const RowsView& v, int64_t row0, int64_t rows, int64_t cols, const float* shift,
          const float* sqrt_w, float* dst, const char* name) {
  dispatch_float(v.dtype, name, [&](auto tag) {
    using Tag = decltype(tag);
    if (sqrt_w) {
      fill_panel<Tag, true>(v, row0, rows, cols, shift, sqrt_w, dst);
    } else {
      fill_panel<Tag, false>(v, row0, rows, cols, shift, sqrt_w, dst);
    }
  });
}

// Copy the upper triangle of a row-major [d, d] matrix onto its lower triangle.
void mirror_upper(float* g, int64_t d) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (d + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic) if (d >= 1024)
  for (int64_t ti = 0; ti < tiles; ++ti) {
    const int64_t i0 = ti * kTile, i1 = std::min(d, i0 + kTile);
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int64_t j1 = std::min(d, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < std::min(j1, i); ++j) g[i * d + j] = g[j * d + i];
      }
    }
  }
}

}  // namespace

void moments_accumulate_cpu(const MomentsArgs& a) {
  moments_check_args(a);
  UNLOCK_CHECK_ARG(a.gemm == MomentsGemm::kFp32,
                   "moments: precision 'tf32' and 'half' need the CUDA backend; the CPU "
                   "backend multiplies in fp32 only");
  const int64_t n = a.n, dx = a.dx, dy = a.dy;
  if (n == 0) return;

  // Validate and take square roots of the weights before any state changes.
  std::vector<float> sqrt_w;
  if (a.weight) {
    sqrt_w.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float w = a.weight[i * a.weight_stride];
      UNLOCK_CHECK_ARG(std::isfinite(w) && w >= 0.f,
                       "moments: weights must be finite and non-negative, got weight[" +
                           std::to_string(i) + "] = " + std::to_string(w));
      sqrt_w[static_cast<size_t>(i)] = moments_row_scale(w);
    }
  }

  const int64_t chunk = moments_chunk_rows(n, dx, dy, kChunkFloats);
  std::vector<float> panel(static_cast<size_t>(chunk * (dx + dy + 1)));
  float* px = panel.data();
  float* py = px + chunk * dx;
  float* ones = py + chunk * dy;
  std::fill(ones, ones + chunk, 1.f);

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const float* sw = a.weight ? sqrt_w.data() + r0 : nullptr;
    const float* colw = sw ? sw : ones;  // sum += Pᵀ sqrt(w)
    fill(a.x, r0, rows, dx, a.shift_x, sw, px, "x");
    const auto m = static_cast<blasint>(rows);
    cblas_sgemv(CblasRowMajor, CblasTrans, m, static_cast<blasint>(dx), 1.f, px,
                static_cast<blasint>(dx), colw, 1, 1.f, a.sum_x, 1);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(dx), m, 1.f, px,
                static_cast<blasint>(dx), 1.f, a.gram_xx, static_cast<blasint>(dx));
    if (dy > 0) {
      fill(a.y, r0, rows, dy, a.shift_y, sw, py, "y");
      cblas_sgemv(CblasRowMajor, CblasTrans, m, static_cast<blasint>(dy), 1.f, py,
                  static_cast<blasint>(dy), colw, 1, 1.f, a.sum_y, 1);
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(dy), m, 1.f, py,
                  static_cast<blasint>(dy), 1.f, a.gram_yy, static_cast<blasint>(dy));
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(dx),
                  static_cast<blasint>(dy), m, 1.f, px, static_cast<blasint>(dx), py,
                  static_cast<blasint>(dy), 1.f, a.gram_xy, static_cast<blasint>(dy));
    }
  }
  if (!a.upper_only) {
    mirror_upper(a.gram_xx, dx);
    if (dy > 0) mirror_upper(a.gram_yy, dy);
  }
}

}  // namespace unlock
