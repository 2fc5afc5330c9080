// CPU backend of in-place residual steering: per row, one pass for the dot products and one
// for the combination (a third only when the rotate terms cancel); OpenMP over rows when
// there is enough work. The row loops are compiled for the baseline instruction set and,
// with GCC on x86-64, for AVX2/FMA/F16C, chosen at run time.
#include "unlock/steer.h"

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UNLOCK_STEER_AVX2 1
#include <immintrin.h>
#endif

namespace unlock {
namespace {

// Below this many elements in total the rows are steered on one thread. Last-token steering
// of a batch (B·d ~ 10⁴-10⁵) stays serial: a thread team would have to be woken while torch's
// own OpenMP pool holds the cores, which costs far more than the row work.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// Portable row conversion: element by element through the dtype's scalar conversions.
template <class Tag>
struct ScalarRowIO {
  using T = typename Tag::storage;
  static void load(const T* __restrict__ h, float* __restrict__ buf, int64_t d) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) buf[j] = Tag::load(h[j]);
  }
  static void store(T* h, const float* src, const float* __restrict__ r, int64_t d,
                    SteerCombine k) {
    // src is either a separate buffer or h itself (fp32), read before written per element
    for (int64_t j = 0; j < d; ++j) h[j] = Tag::store(steer_apply(src[j], r[j], k));
  }
};

namespace base {
template <class Tag>
using RowIO = ScalarRowIO<Tag>;
#include "steer_rows.inc"
}  // namespace base

#if defined(UNLOCK_STEER_AVX2)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// 8 lanes at a time with hardware conversions for the 16-bit dtypes; scalar tails.
inline __m256 load8(const uint16_t* p, F16) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const uint16_t* p, BF16) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store8(uint16_t* p, __m256 v, F16) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(uint16_t* p, __m256 v, BF16) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet, nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <class Tag>
struct RowIO : ScalarRowIO<Tag> {};

template <class Tag>
struct RowIO16 {
  static void load(const uint16_t* __restrict__ h, float* __restrict__ buf, int64_t d) {
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(buf + j, load8(h + j, Tag{}));
    for (; j < d; ++j) buf[j] = Tag::load(h[j]);
  }
  static void store(uint16_t* __restrict__ h, const float* __restrict__ src,
                    const float* __restrict__ r, int64_t d, SteerCombine k) {
    const __m256 ch = _mm256_set1_ps(k.ch), cr = _mm256_set1_ps(k.cr);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
      const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(src + j), ch),
                                     _mm256_mul_ps(cr, _mm256_loadu_ps(r + j)));
      store8(h + j, v, Tag{});
    }
    for (; j < d; ++j) h[j] = Tag::store(steer_apply(src[j], r[j], k));
  }
};
template <>
struct RowIO<F16> : RowIO16<F16> {};
template <>
struct RowIO<BF16> : RowIO16<BF16> {};

#include "steer_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#if defined(UNLOCK_STEER_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

}  // namespace

void steer_cpu(const SteerArgs& a) {
  steer_check_args(a);
  // The (b, s) rows to steer; positions are all checked before any row changes.
  std::vector<std::pair<int64_t, int64_t>> rows;
  if (a.positions) {
    rows.reserve(static_cast<size_t>(a.batch));
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t p = a.positions[b];
      UNLOCK_CHECK_ARG(p >= -1 && p < a.seq, "steer: positions must lie in [-1, " +
                                                 std::to_string(a.seq) + "), got positions[" +
                                                 std::to_string(b) + "] = " + std::to_string(p));
      if (p >= 0) rows.emplace_back(b, p);
    }
  } else {
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t s = 0; s < a.seq; ++s) {
        if (a.mask[b * a.mask_stride_b + s * a.mask_stride_s]) rows.emplace_back(b, s);
      }
    }
  }
  if (rows.empty()) return;
  dispatch_float(a.dtype, "hidden", [&](auto tag) {
    using Tag = decltype(tag);
#if defined(UNLOCK_STEER_AVX2)
    if (use_avx2()) return avx2::steer_rows<Tag>(a, rows);
#endif
    base::steer_rows<Tag>(a, rows);
  });
}

}  // namespace unlock
