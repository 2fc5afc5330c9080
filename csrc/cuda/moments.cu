// CUDA backend of the streaming moments: a panel-fill kernel, then cuBLAS on the caller's
// stream: syrk/gemm/gemv in plain FP32 by default, or GemmEx on tensor cores (TF32, or a
// 16-bit panel with fp32 sums) when asked. No host synchronisation.
#include <algorithm>
#include <type_traits>

#include "unlock/cuda_utils.h"
#include "unlock/moments.h"

namespace unlock {
namespace {

constexpr int kFillThreads = 256;
constexpr int kMaxGridY = 65535;

// dst[i, :] = sqrt(w_i) (src[i, :] - shift) stored through Out (fp32, or rounded once to 16
// bits); sqrt_w[i] = sqrt(w_i) (ones without weights). Grid: x over columns, y over rows.
template <class In, class Out>
__global__ void fill_panel_kernel(const typename In::storage* __restrict__ src, int64_t sr,
                                  int64_t sc, int64_t rows, int64_t cols,
                                  const float* __restrict__ shift,
                                  const float* __restrict__ weight, int64_t ws,
                                  typename Out::storage* __restrict__ dst,
                                  float* __restrict__ sqrt_w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const float s = weight ? moments_row_scale(weight[i * ws]) : 1.f;
    if (j < cols) {
      dst[i * cols + j] = Out::store(moments_panel_value(In::load(src[i * sr + j * sc]), shift[j], s));
    }
    if (sqrt_w && j == 0) sqrt_w[i] = s;
  }
}

// sum[j] += Σ_i sqrt_w[i] · panel[i, j] in fp32: the first moments of a 16-bit panel, from
// the same rounded values as its Grams. A block takes kSumCols columns (coalesced over j);
// its kSumLanes lanes each sum every kSumLanes-th row, and the lanes are added in a fixed
// tree, so the result does not depend on scheduling.
constexpr int kSumCols = 32;
constexpr int kSumLanes = 32;

template <class Out>
__global__ void panel_sums_kernel(const typename Out::storage* __restrict__ panel,
                                  const float* __restrict__ sqrt_w, int64_t rows, int64_t cols,
                                  float* __restrict__ sum) {
  __shared__ float part[kSumLanes][kSumCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  float acc = 0.f;
  if (j < cols) {
    for (int64_t i = threadIdx.y; i < rows; i += kSumLanes) {
      acc += sqrt_w[i] * Out::load(panel[i * cols + j]);
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int half = kSumLanes / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.y) < half) {
      part[threadIdx.y][threadIdx.x] += part[threadIdx.y + half][threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && j < cols) sum[j] += part[0][threadIdx.x];
}

// Copy the upper triangle of a row-major [d, d] matrix onto its lower triangle, 32x32 tiles.
__global__ void mirror_upper_kernel(float* g, int64_t d) {
  __shared__ float tile[32][33];
  const int64_t bi = blockIdx.y, bj = blockIdx.x;  // target tile: rows bi, columns bj
  if (bj > bi) return;
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {  // load g[bj*32 + k, bi*32 + x]
    const int64_t r = bj * 32 + k, c = bi * 32 + threadIdx.x;
    if (r < d && c < d) tile[k][threadIdx.x] = g[r * d + c];
  }
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {  // write g[bi*32 + k, bj*32 + x]
    const int64_t r = bi * 32 + k, c = bj * 32 + threadIdx.x;
    if (r < d && c < d && r > c) g[r * d + c] = tile[threadIdx.x][k];
  }
}

template <class Out>
void fill(const RowsView& v, int64_t row0, int64_t rows, int64_t cols, const float* shift,
          const float* weight, int64_t ws, typename Out::storage* dst, float* sqrt_w,
          cudaStream_t stream, const char* name) {
  const dim3 grid(static_cast<unsigned>((cols + kFillThreads - 1) / kFillThreads),
                  static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridY)));
  const float* w = weight ? weight + row0 * ws : nullptr;
  dispatch_float(v.dtype, name, [&](auto tag) {
    using In = decltype(tag);
    using T = typename In::storage;
    const T* src = static_cast<const T*>(v.data) + row0 * v.stride_row;
    fill_panel_kernel<In, Out><<<grid, kFillThreads, 0, stream>>>(
        src, v.stride_row, v.stride_col, rows, cols, shift, w, ws, dst, sqrt_w);
  });
  UNLOCK_CUDA_LAUNCHED("fill_panel_kernel");
}

template <class Out>
void panel_sums(const typename Out::storage* panel, const float* sqrt_w, int64_t rows,
                int64_t cols, float* sum, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((cols + kSumCols - 1) / kSumCols);
  panel_sums_kernel<Out><<<blocks, dim3(kSumCols, kSumLanes), 0, stream>>>(panel, sqrt_w, rows,
                                                                          cols, sum);
  UNLOCK_CUDA_LAUNCHED("panel_sums_kernel");
}

// G += A Bᵀ on tensor cores: A [r, m] and B [c, m] column-major of type t, G [r, c] fp32
// column-major with ld r; fp32 sums (TF32 products for kTf32).
void gemm_abt(cublasHandle_t h, MomentsGemm mode, cudaDataType_t t, int r, int c, int m,
              const void* a, int lda, const void* b, int ldb, float* g) {
  const float one = 1.f;
  const cublasComputeType_t compute =
      mode == MomentsGemm::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  UNLOCK_CUBLAS(cublasGemmEx, h, CUBLAS_OP_N, CUBLAS_OP_T, r, c, m, &one, a, t, lda, b, t, ldb,
                &one, g, CUDA_R_32F, r, compute, CUBLAS_GEMM_DEFAULT);
}

constexpr int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

void mirror(float* g, int64_t d, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>((d + 31) / 32);
  mirror_upper_kernel<<<dim3(tiles, tiles), dim3(32, 8), 0, stream>>>(g, d);
  UNLOCK_CUDA_LAUNCHED("mirror_upper_kernel");
}

// The 16-bit panel path: workspace = sqrt_w [chunk] floats, then the x and y panels in 16
// bits, each start 16-byte aligned for the tensor cores.
template <class Out>
void accumulate_half(const MomentsArgs& a, int64_t chunk, float* workspace, cublasHandle_t h,
                     cudaStream_t stream) {
  using T = typename Out::storage;
  const cudaDataType_t type = std::is_same_v<Out, F16> ? CUDA_R_16F : CUDA_R_16BF;
  const int64_t n = a.n, dx = a.dx, dy = a.dy;
  float* sw = workspace;
  T* px = reinterpret_cast<T*>(workspace + round_up(chunk, 4));
  T* py = px + round_up(chunk * dx, 8);
  const int idx = static_cast<int>(dx), idy = static_cast<int>(dy);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int m = static_cast<int>(std::min(chunk, n - r0));
    fill<Out>(a.x, r0, m, dx, a.shift_x, a.weight, a.weight_stride, px, sw, stream, "x");
    panel_sums<Out>(px, sw, m, dx, a.sum_x, stream);
    gemm_abt(h, a.gemm, type, idx, idx, m, px, idx, px, idx, a.gram_xx);
    if (dy > 0) {
      fill<Out>(a.y, r0, m, dy, a.shift_y, a.weight, a.weight_stride, py, nullptr, stream, "y");
      panel_sums<Out>(py, sw, m, dy, a.sum_y, stream);
      gemm_abt(h, a.gemm, type, idy, idy, m, py, idy, py, idy, a.gram_yy);
      gemm_abt(h, a.gemm, type, idy, idx, m, py, idy, px, idx, a.gram_xy);
    }
  }
}

// Floats of workspace a chunk of `rows` needs.
int64_t workspace_need(const MomentsArgs& a, int64_t rows) {
  if (a.gemm != MomentsGemm::kHalf) return rows * (a.dx + a.dy + 1);
  return round_up(rows, 4) + (round_up(rows * a.dx, 8) + round_up(rows * a.dy, 8)) / 2;
}

}  // namespace

void moments_accumulate_cuda(const MomentsArgs& a, int device, float* workspace,
                             int64_t workspace_floats, std::uintptr_t stream_handle) {
  moments_check_args(a);
  const int64_t n = a.n, dx = a.dx, dy = a.dy;
  if (n == 0) return;
  const int64_t chunk = moments_chunk_rows(n, dx, dy, workspace_floats - 16);
  UNLOCK_CHECK_ARG(workspace && workspace_need(a, chunk) <= workspace_floats,
                   "moments: workspace too small, need at least " +
                       std::to_string(workspace_need(a, 1)) + " floats");
  cuda::DeviceGuard guard(device);
  cudaStream_t stream = cuda::as_stream(stream_handle);
  cublasHandle_t h = cuda::cublas_handle(stream);

  if (a.gemm == MomentsGemm::kHalf) {
    // fp16 when every input is fp16, else bfloat16 (its range holds any fp32 activation)
    const bool f16 = a.x.dtype == DType::kFloat16 && (dy == 0 || a.y.dtype == DType::kFloat16);
    if (f16) {
      accumulate_half<F16>(a, chunk, workspace, h, stream);
    } else {
      accumulate_half<BF16>(a, chunk, workspace, h, stream);
    }
  } else {
    float* px = workspace;
    float* py = px + chunk * dx;
    float* sw = py + chunk * dy;
    const float one = 1.f;
    const int idx = static_cast<int>(dx), idy = static_cast<int>(dy);
    const bool tf32 = a.gemm == MomentsGemm::kTf32;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int m = static_cast<int>(std::min(chunk, n - r0));
      // Column-major view: the row-major panel [m, dx] is the matrix Pᵀ [dx, m] with ld dx.
      fill<F32>(a.x, r0, m, dx, a.shift_x, a.weight, a.weight_stride, px, sw, stream, "x");
      UNLOCK_CUBLAS(cublasSgemv, h, CUBLAS_OP_N, idx, m, &one, px, idx, sw, 1, &one, a.sum_x, 1);
      if (tf32) {
        gemm_abt(h, a.gemm, CUDA_R_32F, idx, idx, m, px, idx, px, idx, a.gram_xx);
      } else {
        // Lower triangle in column-major order is the upper triangle of the row-major matrix.
        UNLOCK_CUBLAS(cublasSsyrk, h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, idx, m, &one, px, idx,
                      &one, a.gram_xx, idx);
      }
      if (dy > 0) {
        fill<F32>(a.y, r0, m, dy, a.shift_y, a.weight, a.weight_stride, py, nullptr, stream, "y");
        UNLOCK_CUBLAS(cublasSgemv, h, CUBLAS_OP_N, idy, m, &one, py, idy, sw, 1, &one, a.sum_y,
                      1);
        if (tf32) {
          gemm_abt(h, a.gemm, CUDA_R_32F, idy, idy, m, py, idy, py, idy, a.gram_yy);
        } else {
          UNLOCK_CUBLAS(cublasSsyrk, h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, idy, m, &one, py,
                        idy, &one, a.gram_yy, idy);
        }
        // Row-major G_xy [dx, dy] is the column-major G_xyᵀ [dy, dx] = Py Pxᵀ.
        if (tf32) {
          gemm_abt(h, a.gemm, CUDA_R_32F, idy, idx, m, py, idy, px, idx, a.gram_xy);
        } else {
          UNLOCK_CUBLAS(cublasSgemm, h, CUBLAS_OP_N, CUBLAS_OP_T, idy, idx, m, &one, py, idy, px,
                        idx, &one, a.gram_xy, idy);
        }
      }
    }
  }
  if (!a.upper_only) {
    mirror(a.gram_xx, dx, stream);
    if (dy > 0) mirror(a.gram_yy, dy, stream);
  }
}

}  // namespace unlock
