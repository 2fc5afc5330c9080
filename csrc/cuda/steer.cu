// CUDA backend of in-place residual steering: one block per candidate row. The row is read
// in 16-byte packs (4 fp32 or 8 fp16/bf16 values) where the layout allows it, and the three
// dot products |h|², h·r and |r|² come from one pass and one fused block reduction; a second
// pass writes the combination. No host synchronisation.
#include <cstdint>

#include "unlock/cuda_utils.h"
#include "unlock/steer.h"

namespace unlock {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;

struct Dots {
  float hh, hr, rr;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums over the block; every thread gets the same bits (lane 0's butterfly result, so that
// branches on the totals are uniform). Each call site has its own scratch, so no second
// barrier is needed between calls.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  return __shfl_sync(0xffffffffu, warp_sum(v), 0);
}

// The three dot products in one reduction: one barrier instead of three.
__device__ __forceinline__ Dots block_sum3(Dots v, float (*scratch)[3]) {
  v.hh = warp_sum(v.hh);
  v.hr = warp_sum(v.hr);
  v.rr = warp_sum(v.rr);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp][0] = v.hh;
    scratch[warp][1] = v.hr;
    scratch[warp][2] = v.rr;
  }
  __syncthreads();
  const bool in = lane < kWarps;
  Dots t{in ? scratch[lane][0] : 0.f, in ? scratch[lane][1] : 0.f, in ? scratch[lane][2] : 0.f};
  t.hh = __shfl_sync(0xffffffffu, warp_sum(t.hh), 0);
  t.hr = __shfl_sync(0xffffffffu, warp_sum(t.hr), 0);
  t.rr = __shfl_sync(0xffffffffu, warp_sum(t.rr), 0);
  return t;
}

// N consecutive elements starting at p: one 16-byte transaction per 16 bytes when kVec (p is
// then 16-byte aligned), element by element otherwise.
template <int N, bool kVec, class T>
__device__ __forceinline__ void load_pack(const T* p, T (&out)[N]) {
  if constexpr (kVec) {
    static_assert((N * sizeof(T)) % kPackBytes == 0, "a pack is a whole number of 16 bytes");
    constexpr int kWords = static_cast<int>(N * sizeof(T)) / kPackBytes;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      reinterpret_cast<uint4*>(out)[w] = reinterpret_cast<const uint4*>(p)[w];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <int N, bool kVec, class T>
__device__ __forceinline__ void store_pack(T* p, const T (&in)[N]) {
  if constexpr (kVec) {
    constexpr int kWords = static_cast<int>(N * sizeof(T)) / kPackBytes;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      reinterpret_cast<uint4*>(p)[w] = reinterpret_cast<const uint4*>(in)[w];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in[i];
  }
}

// kVec: every row and the vector are 16-byte aligned and d is a multiple of the pack
// (checked on the host by `vectorisable`); otherwise one element per thread and step.
template <class Tag, bool kVec>
__global__ void __launch_bounds__(kThreads) steer_kernel(SteerArgs a) {
  using T = typename Tag::storage;
  constexpr int N = kVec ? kPackBytes / static_cast<int>(sizeof(T)) : 1;
  __shared__ float s_dots[kWarps][3], s_uu[kWarps];
  int64_t b, s;
  if (a.positions) {
    b = blockIdx.x;
    s = a.positions[b];
    // The public entry point checks the positions before launch; one outside [-1, S) that
    // reaches the kernel all the same leaves its row alone (an assertion here would poison the
    // process's CUDA context).
    if (s < 0 || s >= a.seq) return;
  } else {
    b = blockIdx.x / a.seq;
    s = blockIdx.x - b * a.seq;
    if (!a.mask[b * a.mask_stride_b + s * a.mask_stride_s]) return;
  }
  T* h = static_cast<T*>(a.hidden) + b * a.stride_b + s * a.stride_s;
  const float* r = a.vector + b * a.vector_stride_b;
  const int64_t packs = a.dim / N;  // exact when kVec; N = 1 otherwise

  SteerCombine k{1.f, a.alpha};
  if (a.mode == SteerMode::kRotate) {
    Dots acc{0.f, 0.f, 0.f};
    for (int64_t q = threadIdx.x; q < packs; q += kThreads) {
      alignas(kPackBytes) T hv[N];
      alignas(kPackBytes) float rv[N];
      load_pack<N, kVec>(h + q * N, hv);
      load_pack<N, kVec>(r + q * N, rv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float v = Tag::load(hv[i]), w = rv[i];
        acc.hh = fmaf(v, v, acc.hh);
        acc.hr = fmaf(v, w, acc.hr);
        acc.rr = fmaf(w, w, acc.rr);
      }
    }
    const Dots t = block_sum3(acc, s_dots);
    const RotateCoefs c = steer_rotate_coefs(t.hh, t.rr, a.alpha);
    float uu = steer_rotate_uu(t.hh, t.hr, t.rr, c);
    if (uu < 0.f) {  // the two terms cancel: sum u² explicitly (uniform across the block)
      uu = 0.f;
      for (int64_t q = threadIdx.x; q < packs; q += kThreads) {
        alignas(kPackBytes) T hv[N];
        alignas(kPackBytes) float rv[N];
        load_pack<N, kVec>(h + q * N, hv);
        load_pack<N, kVec>(r + q * N, rv);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float u = steer_rotate_dir(Tag::load(hv[i]), rv[i], c);
          uu = fmaf(u, u, uu);
        }
      }
      uu = block_sum(uu, s_uu);
    }
    k = steer_rotate_combine(c, steer_rotate_scale(t.hh, uu));
  }
  for (int64_t q = threadIdx.x; q < packs; q += kThreads) {
    alignas(kPackBytes) T hv[N];
    alignas(kPackBytes) float rv[N];
    load_pack<N, kVec>(h + q * N, hv);
    load_pack<N, kVec>(r + q * N, rv);
#pragma unroll
    for (int i = 0; i < N; ++i) hv[i] = Tag::store(steer_apply(Tag::load(hv[i]), rv[i], k));
    store_pack<N, kVec>(h + q * N, hv);
  }
}

// One block per row of SteerTokensArgs; element-wise loads (the rows steered per step are
// few, and the rows not steered return after reading their slot).
template <class Tag>
__global__ void __launch_bounds__(kThreads) steer_tokens_kernel(SteerTokensArgs a) {
  using T = typename Tag::storage;
  __shared__ float s_dots[kWarps][3], s_uu[kWarps];
  const int64_t i = blockIdx.x;
  const int32_t slot = a.slots[i];
  if (slot < 0 || slot >= a.num_slots) return;
  T* h = static_cast<T*>(a.hidden) + i * a.hidden_stride;
  if (a.residual) {
    T* res = static_cast<T*>(a.residual) + i * a.residual_stride;
    for (int64_t j = threadIdx.x; j < a.dim; j += kThreads) {
      h[j] = Tag::store(__fadd_rn(Tag::load(h[j]), Tag::load(res[j])));
      res[j] = Tag::store(0.f);
    }
    __syncthreads();
  }
  const float* r = a.table + (static_cast<int64_t>(slot) * a.layers + a.layer) * a.dim;
  const float alpha = a.alphas[i];
  if (a.modes[i] == static_cast<uint8_t>(SteerMode::kAdd)) {
    for (int64_t j = threadIdx.x; j < a.dim; j += kThreads) {
      h[j] = Tag::store(__fadd_rn(Tag::load(h[j]), __fmul_rn(alpha, r[j])));
    }
    return;
  }
  Dots acc{0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < a.dim; j += kThreads) {
    const float v = Tag::load(h[j]), w = r[j];
    acc.hh = fmaf(v, v, acc.hh);
    acc.hr = fmaf(v, w, acc.hr);
    acc.rr = fmaf(w, w, acc.rr);
  }
  const Dots t = block_sum3(acc, s_dots);
  const RotateCoefs c = steer_rotate_coefs(t.hh, t.rr, alpha);
  float uu = steer_rotate_uu(t.hh, t.hr, t.rr, c);
  if (uu < 0.f) {
    uu = 0.f;
    for (int64_t j = threadIdx.x; j < a.dim; j += kThreads) {
      const float u = steer_rotate_dir(Tag::load(h[j]), r[j], c);
      uu = fmaf(u, u, uu);
    }
    uu = block_sum(uu, s_uu);
  }
  const SteerCombine k = steer_rotate_combine(c, steer_rotate_scale(t.hh, uu));
  for (int64_t j = threadIdx.x; j < a.dim; j += kThreads) {
    h[j] = Tag::store(steer_apply(Tag::load(h[j]), r[j], k));
  }
}

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kPackBytes == 0; }

// Whether every row start of hidden and of the vector is 16-byte aligned and d is a whole
// number of packs of `elems` hidden elements.
bool vectorisable(const SteerArgs& a, int64_t elems) {
  constexpr int64_t kFloatsPerPack = kPackBytes / static_cast<int64_t>(sizeof(float));
  return a.dim % elems == 0 && a.stride_b % elems == 0 && a.stride_s % elems == 0 &&
         aligned(a.hidden) && aligned(a.vector) && a.vector_stride_b % kFloatsPerPack == 0;
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
    using Tag = decltype(tag);
    constexpr int64_t kElems = kPackBytes / static_cast<int64_t>(sizeof(typename Tag::storage));
    const auto grid = static_cast<unsigned>(blocks);
    if (vectorisable(a, kElems)) {
      steer_kernel<Tag, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      steer_kernel<Tag, false><<<grid, kThreads, 0, stream>>>(a);
    }
  });
  UNLOCK_CUDA_LAUNCHED("steer_kernel");
}

void steer_tokens_cuda(const SteerTokensArgs& a, int device, std::uintptr_t stream_handle) {
  steer_tokens_check_args(a);
  if (a.rows == 0) return;
  UNLOCK_CHECK_ARG(a.rows <= 0x7fffffff, "steer_tokens: too many rows for one launch");
  cuda::DeviceGuard guard(device);
  cudaStream_t stream = cuda::as_stream(stream_handle);
  dispatch_float(a.dtype, "hidden", [&](auto tag) {
    using Tag = decltype(tag);
    steer_tokens_kernel<Tag><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  });
  UNLOCK_CUDA_LAUNCHED("steer_tokens_kernel");
}

}  // namespace unlock
