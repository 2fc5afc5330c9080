// CUDA backend of in-place residual steering: one block per candidate row, warp-shuffle
// reductions, no host synchronisation.
#include "unlock/cuda_utils.h"
#include "unlock/steer.h"

namespace unlock {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the total. `scratch` holds kWarps floats and is not
// reused by the caller for another reduction without a barrier in between.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

template <class Tag>
__global__ void __launch_bounds__(kThreads) steer_kernel(SteerArgs a) {
  using T = typename Tag::storage;
  __shared__ float s_hh[kWarps], s_rr[kWarps], s_uu[kWarps];
  int64_t b, s;
  if (a.positions) {
    b = blockIdx.x;
    s = a.positions[b];
    if (s < 0 || s >= a.seq) return;
  } else {
    b = blockIdx.x / a.seq;
    s = blockIdx.x - b * a.seq;
    if (!a.mask[b * a.mask_stride_b + s * a.mask_stride_s]) return;
  }
  T* h = static_cast<T*>(a.hidden) + b * a.stride_b + s * a.stride_s;
  const float* r = a.vector + b * a.vector_stride_b;
  const int64_t d = a.dim;

  if (a.mode == SteerMode::kAdd) {
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      h[j] = Tag::store(steer_add(Tag::load(h[j]), r[j], a.alpha));
    }
    return;
  }
  float hh = 0.f, rr = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float v = Tag::load(h[j]), w = r[j];
    hh += v * v;
    rr += w * w;
  }
  hh = block_sum(hh, s_hh);
  rr = block_sum(rr, s_rr);
  const RotateCoefs c = steer_rotate_coefs(hh, rr, a.alpha);
  float uu = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float u = steer_rotate_dir(Tag::load(h[j]), r[j], c);
    uu += u * u;
  }
  uu = block_sum(uu, s_uu);
  const float scale = steer_rotate_scale(hh, uu);
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    h[j] = Tag::store(steer_rotate_dir(Tag::load(h[j]), r[j], c) * scale);
  }
}

}  // namespace

void steer_cuda(const SteerArgs& a, int device, std::uintptr_t stream_handle) {
  steer_check_args(a);
  const int64_t blocks = a.positions ? a.batch : a.batch * a.seq;
  if (blocks == 0) return;
  UNLOCK_CHECK_ARG(blocks <= 0x7fffffff, "steer: too many rows for one launch");
  UNLOCK_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t stream = cuda::as_stream(stream_handle);
  dispatch_float(a.dtype, "hidden", [&](auto tag) {
    steer_kernel<decltype(tag)><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  });
  UNLOCK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace unlock
