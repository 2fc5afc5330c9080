// CUDA backend of the streaming moments: a panel-fill kernel, then cuBLAS syrk/gemm/gemv in
// plain FP32 on the caller's stream. No host synchronisation.
#include <algorithm>

#include "unlock/cuda_utils.h"
#include "unlock/moments.h"

namespace unlock {
namespace {

constexpr int kFillThreads = 256;
constexpr int kMaxGridY = 65535;

// dst[i, :] = sqrt(w_i) (src[i, :] - shift); sqrt_w[i] = sqrt(w_i) (ones without weights).
// Grid: x over columns, y over rows (grid-stride).
template <class Tag>
__global__ void fill_panel_kernel(const typename Tag::storage* __restrict__ src, int64_t sr,
                                  int64_t sc, int64_t rows, int64_t cols,
                                  const float* __restrict__ shift,
                                  const float* __restrict__ weight, int64_t ws,
                                  float* __restrict__ dst, float* __restrict__ sqrt_w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const float s = weight ? moments_row_scale(weight[i * ws]) : 1.f;
    if (j < cols) dst[i * cols + j] = moments_panel_value(Tag::load(src[i * sr + j * sc]), shift[j], s);
    if (sqrt_w && j == 0) sqrt_w[i] = s;
  }
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

void fill(const RowsView& v, int64_t row0, int64_t rows, int64_t cols, const float* shift,
          const float* weight, int64_t ws, float* dst, float* sqrt_w, cudaStream_t stream,
          const char* name) {
  const dim3 grid(static_cast<unsigned>((cols + kFillThreads - 1) / kFillThreads),
                  static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridY)));
  const float* w = weight ? weight + row0 * ws : nullptr;
  dispatch_float(v.dtype, name, [&](auto tag) {
    using Tag = decltype(tag);
    using T = typename Tag::storage;
    const T* src = static_cast<const T*>(v.data) + row0 * v.stride_row;
    fill_panel_kernel<Tag><<<grid, kFillThreads, 0, stream>>>(src, v.stride_row, v.stride_col, rows,
                                                             cols, shift, w, ws, dst, sqrt_w);
  });
  UNLOCK_CUDA_LAUNCHED("fill_panel_kernel");
}

void mirror(float* g, int64_t d, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>((d + 31) / 32);
  mirror_upper_kernel<<<dim3(tiles, tiles), dim3(32, 8), 0, stream>>>(g, d);
  UNLOCK_CUDA_LAUNCHED("mirror_upper_kernel");
}

}  // namespace

void moments_accumulate_cuda(const MomentsArgs& a, int device, float* workspace,
                             int64_t workspace_floats, std::uintptr_t stream_handle) {
  moments_check_args(a);
  const int64_t n = a.n, dx = a.dx, dy = a.dy;
  if (n == 0) return;
  const int64_t chunk = moments_chunk_rows(n, dx, dy, workspace_floats);
  UNLOCK_CHECK_ARG(workspace && chunk * (dx + dy + 1) <= workspace_floats,
                   "moments: workspace too small, need at least " +
                       std::to_string(dx + dy + 1) + " floats");
  cuda::DeviceGuard guard(device);
  cudaStream_t stream = cuda::as_stream(stream_handle);
  cublasHandle_t h = cuda::cublas_handle(stream);

  float* px = workspace;
  float* py = px + chunk * dx;
  float* sw = py + chunk * dy;
  const float one = 1.f;
  const int idx = static_cast<int>(dx), idy = static_cast<int>(dy);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int m = static_cast<int>(std::min(chunk, n - r0));
    // Column-major view: the row-major panel [m, dx] is the matrix Pᵀ [dx, m] with ld dx.
    fill(a.x, r0, m, dx, a.shift_x, a.weight, a.weight_stride, px, sw, stream, "x");
    UNLOCK_CUBLAS(cublasSgemv, h, CUBLAS_OP_N, idx, m, &one, px, idx, sw, 1, &one, a.sum_x, 1);
    // Lower triangle in column-major order is the upper triangle of the row-major matrix.
    UNLOCK_CUBLAS(cublasSsyrk, h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, idx, m, &one, px, idx, &one,
                  a.gram_xx, idx);
    if (dy > 0) {
      fill(a.y, r0, m, dy, a.shift_y, a.weight, a.weight_stride, py, nullptr, stream, "y");
      UNLOCK_CUBLAS(cublasSgemv, h, CUBLAS_OP_N, idy, m, &one, py, idy, sw, 1, &one, a.sum_y, 1);
      UNLOCK_CUBLAS(cublasSsyrk, h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, idy, m, &one, py, idy,
                    &one, a.gram_yy, idy);
      // Row-major G_xy [dx, dy] is the column-major G_xyᵀ [dy, dx] = Py Pxᵀ.
      UNLOCK_CUBLAS(cublasSgemm, h, CUBLAS_OP_N, CUBLAS_OP_T, idy, idx, m, &one, py, idy, px, idx,
                    &one, a.gram_xy, idy);
    }
  }
  if (!a.upper_only) {
    mirror(a.gram_xx, dx, stream);
    if (dy > 0) mirror(a.gram_yy, dy, stream);
  }
}

}  // namespace unlock
