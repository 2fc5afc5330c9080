// Streaming moments: shifted, weighted first and second moments of activation rows.
//
// For rows x_i [dx] and optional paired rows y_i [dy] with weights w_i >= 0 and fixed shift
// vectors a [dx], b [dy], one call adds
//   sum_x += Σ w_i (x_i - a)                   sum_y += Σ w_i (y_i - b)
//   G_xx  += Σ w_i (x_i - a)(x_i - a)ᵀ          G_yy  += Σ w_i (y_i - b)(y_i - b)ᵀ
//   G_xy  += Σ w_i (x_i - a)(y_i - b)ᵀ
// into fp32 state. Both backends first write the panel P_i = sqrt(w_i) (x_i - a) in fp32 (one
// pass over the input, any dtype and strides), then G_xx += PᵀP (syrk), G_xy += PxᵀPy (gemm)
// and sum_x += Pᵀ sqrt(w) (gemv), so the O(n d²) work runs in BLAS.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "unlock/common.h"

namespace unlock {

// How the CUDA backend multiplies the panel. kFp32: an fp32 panel, FP32 syrk/gemm (exact
// products). kTf32: the same panel, GEMMs on TF32 tensor cores (10-bit mantissa products,
// fp32 sums). kHalf: the panel kept in 16 bits (the input's dtype, bfloat16 for fp32 input:
// each shifted value rounded once), GEMMs on fp16/bf16 tensor cores with fp32 sums. kTf32
// and kHalf update whole Grams (both triangles). The CPU backend runs kFp32 only.
enum class MomentsGemm : int { kFp32 = 0, kTf32 = 1, kHalf = 2 };

// A 2-D strided view of rows of one dtype; strides in elements.
struct RowsView {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_row = 0;
  int64_t stride_col = 1;
};

struct MomentsArgs {
  int64_t n = 0;   // rows in this batch
  int64_t dx = 0;  // columns of x
  int64_t dy = 0;  // columns of y; 0 when there is no y
  RowsView x, y;
  const float* weight = nullptr;  // [n] with stride weight_stride, or nullptr for all ones
  int64_t weight_stride = 1;
  const float* shift_x = nullptr;  // [dx]
  const float* shift_y = nullptr;  // [dy]
  float* sum_x = nullptr;          // [dx]
  float* sum_y = nullptr;          // [dy]
  float* gram_xx = nullptr;        // [dx, dx] row-major
  float* gram_yy = nullptr;        // [dy, dy] row-major
  float* gram_xy = nullptr;        // [dx, dy] row-major
  // Update only the upper triangle (j >= i) of G_xx and G_yy; the strictly lower part is left
  // as it was. Saves the O(d²) mirror per call when the caller symmetrises once at the end.
  bool upper_only = false;
  MomentsGemm gemm = MomentsGemm::kFp32;
};

// Panel entry of one element.
UNLOCK_HD float moments_panel_value(float v, float shift, float sqrt_w) {
  return (v - shift) * sqrt_w;
}

// Row scale of the panel; negative weights give NaN (the CPU backend rejects them first).
UNLOCK_HD float moments_row_scale(float w) { return sqrtf(w); }

// Rows per panel chunk so that one chunk holds about `budget_floats` floats.
inline int64_t moments_chunk_rows(int64_t n, int64_t dx, int64_t dy, int64_t budget_floats) {
  const int64_t per_row = dx + dy + 1;
  int64_t rows = budget_floats / per_row;
  if (rows < 1) rows = 1;
  if (rows > INT32_MAX) rows = INT32_MAX;  // BLAS row counts are 32-bit
  return rows < n ? rows : n;
}

// Checks that do not need to read data: shapes, strides, pointers, and that no state buffer
// overlaps another buffer of the call.
inline void moments_check_args(const MomentsArgs& a) {
  UNLOCK_CHECK_ARG(a.n >= 0 && a.dx > 0 && a.dy >= 0,
                   "moments: bad shape: need n >= 0, dx >= 1 and dy >= 0, got n = " +
                       std::to_string(a.n) + ", dx = " + std::to_string(a.dx) +
                       ", dy = " + std::to_string(a.dy));
  // BLAS takes 32-bit sizes.
  UNLOCK_CHECK_ARG(a.dx <= INT32_MAX && a.dy <= INT32_MAX,
                   "moments: dx and dy must fit 32-bit BLAS sizes");
  UNLOCK_CHECK_ARG(a.x.data && a.shift_x && a.sum_x && a.gram_xx,
                   "moments: x, shift_x, sum_x and gram_xx are required");
  if (a.dy > 0) {
    UNLOCK_CHECK_ARG(a.y.data && a.shift_y && a.sum_y && a.gram_yy && a.gram_xy,
                     "moments: y needs shift_y, sum_y, gram_yy and gram_xy");
  }
  // Inputs are only read: any non-negative strides will do, a stride of 0 included.
  const int64_t x_span =
      span_elements("moments: x", {{a.n, a.x.stride_row}, {a.dx, a.x.stride_col}});
  const int64_t y_span =
      a.dy > 0 ? span_elements("moments: y", {{a.n, a.y.stride_row}, {a.dy, a.y.stride_col}}) : 0;
  const int64_t w_span =
      a.weight ? span_elements("moments: weight", {{a.n, a.weight_stride}}) : 0;
  int64_t gxx = 0, gyy = 0, gxy = 0;
  UNLOCK_CHECK_ARG(!__builtin_mul_overflow(a.dx, a.dx, &gxx) &&
                       !__builtin_mul_overflow(a.dy, a.dy, &gyy) &&
                       !__builtin_mul_overflow(a.dx, a.dy, &gxy),
                   "moments: dx and dy are too large");
  const std::size_t f = sizeof(float);
  const int64_t dy = a.dy;
  check_no_overlap("moments",
                   {byte_range("sum_x", a.sum_x, a.dx, f), byte_range("gram_xx", a.gram_xx, gxx, f),
                    byte_range("sum_y", dy ? a.sum_y : nullptr, dy, f),
                    byte_range("gram_yy", dy ? a.gram_yy : nullptr, gyy, f),
                    byte_range("gram_xy", dy ? a.gram_xy : nullptr, gxy, f)},
                   {byte_range("x", a.x.data, x_span, dtype_size(a.x.dtype)),
                    byte_range("y", dy ? a.y.data : nullptr, y_span, dtype_size(a.y.dtype)),
                    byte_range("weight", a.weight, w_span, f),
                    byte_range("shift_x", a.shift_x, a.dx, f),
                    byte_range("shift_y", dy ? a.shift_y : nullptr, dy, f)});
}

void moments_accumulate_cpu(const MomentsArgs& a);

// `workspace` holds at least moments_chunk_rows(...) * (dx + dy + 1) floats of device memory
// (the caller allocates it, e.g. from torch's caching allocator). Asynchronous on `stream`.
void moments_accumulate_cuda(const MomentsArgs& a, int device, float* workspace,
                             int64_t workspace_floats, std::uintptr_t stream);

}  // namespace unlock
