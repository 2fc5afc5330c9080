// CUDA backend of in-place residual steering: one block per candidate row, one pass for the
// dot products (warp-shuffle reductions), one for the combination; no host synchronisation.
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

// Sum over the block; every thread gets the same bits (lane 0's butterfly result, so that
// branches on the total are uniform). `scratch` holds kWarps floats, one array per call site.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  return __shfl_sync(0xffffffffu, warp_sum(v), 0);
}

template <class Tag>
__global__ void __launch_bounds__(kThreads) steer_kernel(SteerArgs a) {
  using T = typename Tag::storage;
  __shared__ float s_hh[kWarps], s_hr[kWarps], s_rr[kWarps], s_uu[kWarps];
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

  SteerCombine k{1.f, a.alpha};
  if (a.mode == SteerMode::kRotate) {
    float hh = 0.f, hr = 0.f, rr = 0.f;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const float v = Tag::load(h[j]), w = r[j];
      hh += v * v;
      hr += v * w;
      rr += w * w;
    }
    hh = block_sum(hh, s_hh);
    hr = block_sum(hr, s_hr);
    rr = block_sum(rr, s_rr);
    const RotateCoefs c = steer_rotate_coefs(hh, rr, a.alpha);
    float uu = steer_rotate_uu(hh, hr, rr, c);
    if (uu < 0.f) {  // the two terms cancel: sum u² explicitly (uniform across the block)
      uu = 0.f;
      for (int64_t j = threadIdx.x; j < d; j += kThreads) {
        const float u = steer_rotate_dir(Tag::load(h[j]), r[j], c);
        uu += u * u;
      }
      uu = block_sum(uu, s_uu);
    }
    k = steer_rotate_combine(c, steer_rotate_scale(hh, uu));
  }
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    h[j] = Tag::store(steer_apply(Tag::load(h[j]), r[j], k));
  }
}

}  // namespace

void steer_cuda(const SteerArgs& a, int device, std::uintptr_t stream_handle) {
  steer_check_args(a);
  const int64_t blocks = a.positions ? a.batch : a.batch * a.seq;
  if (blocks == 0) return;
  UNLOCK_CHECK_ARG(blocks <= 0x7fffffff, "steer: too many rows for one launch");
  cuda::DeviceGuard guard(device);
  cudaStream_t stream = cuda::as_stream(stream_handle);
  dispatch_float(a.dtype, "hidden", [&](auto tag) {
    steer_kernel<decltype(tag)><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  });
  UNLOCK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace unlock
