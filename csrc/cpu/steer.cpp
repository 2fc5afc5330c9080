// CPU backend of in-place residual steering: per row, one pass for the dot products and one
// for the combination (a third only when the rotate terms cancel); OpenMP over rows when
// there is enough work. The row loops are compiled for the baseline instruction set and,
// with GCC on x86-64, for AVX2/FMA/F16C, chosen at run time.
#include "unlock/steer.h"

#include <cmath>
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

// Portable row loops: element by element through the dtype's scalar conversions (the
// compiler vectorises them where it can).
template <class Tag>
struct ScalarRowIO {
  using T = typename Tag::storage;
  static void dots(const T* __restrict__ h, const float* __restrict__ r, int64_t d, float* out) {
    float hh = 0.f, hr = 0.f, rr = 0.f;
#pragma omp simd reduction(+ : hh, hr, rr)
    for (int64_t j = 0; j < d; ++j) {
      const float v = Tag::load(h[j]);
      hh += v * v;
      hr += v * r[j];
      rr += r[j] * r[j];
    }
    out[0] = hh;
    out[1] = hr;
    out[2] = rr;
  }
  static float uu(const T* __restrict__ h, const float* __restrict__ r, int64_t d,
                  RotateCoefs c) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j) {
      const float u = steer_rotate_dir(Tag::load(h[j]), r[j], c);
      acc += u * u;
    }
    return acc;
  }
  static void apply(T* __restrict__ h, const float* __restrict__ r, int64_t d, SteerCombine k,
                    bool /*finite*/) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) h[j] = Tag::store(steer_apply(Tag::load(h[j]), r[j], k));
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
inline void store8(uint16_t* p, __m256 v, F16, bool) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even; NaNs stay (quiet) NaNs unless the caller vouches that none occur.
inline void store8(uint16_t* p, __m256 v, BF16, bool finite) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i bits =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  if (!finite) {
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    bits = _mm256_blendv_epi8(bits, quiet, nan);
  }
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline __m256 load8(const float* p, F32) { return _mm256_loadu_ps(p); }

// Σ h², Σ h·r, Σ r² over the whole packs of 8: four independent accumulator chains per sum,
// so the loop runs at FMA throughput instead of waiting on one chain's latency.
template <class Tag, class T>
inline int64_t dots8(const T* __restrict__ h, const float* __restrict__ r, int64_t d,
                     float* out) {
  __m256 hh[4], hr[4], rr[4];
  for (int k = 0; k < 4; ++k) hh[k] = hr[k] = rr[k] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = load8(h + j + 8 * k, Tag{}), w = _mm256_loadu_ps(r + j + 8 * k);
      hh[k] = _mm256_fmadd_ps(v, v, hh[k]);
      hr[k] = _mm256_fmadd_ps(v, w, hr[k]);
      rr[k] = _mm256_fmadd_ps(w, w, rr[k]);
    }
  }
  for (; j + 8 <= d; j += 8) {
    const __m256 v = load8(h + j, Tag{}), w = _mm256_loadu_ps(r + j);
    hh[0] = _mm256_fmadd_ps(v, v, hh[0]);
    hr[0] = _mm256_fmadd_ps(v, w, hr[0]);
    rr[0] = _mm256_fmadd_ps(w, w, rr[0]);
  }
  auto total = [](const __m256* a) {
    return hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  };
  out[0] = total(hh);
  out[1] = total(hr);
  out[2] = total(rr);
  return j;
}

template <class Tag>
struct RowIO : ScalarRowIO<Tag> {};

template <>
struct RowIO<F32> : ScalarRowIO<F32> {
  static void dots(const float* __restrict__ h, const float* __restrict__ r, int64_t d,
                   float* out) {
    int64_t j = dots8<F32>(h, r, d, out);
    for (; j < d; ++j) {
      out[0] += h[j] * h[j];
      out[1] += h[j] * r[j];
      out[2] += r[j] * r[j];
    }
  }
};

template <class Tag>
struct RowIO16 {
  static void dots(const uint16_t* __restrict__ h, const float* __restrict__ r, int64_t d,
                   float* out) {
    float sums[3];
    int64_t j = dots8<Tag>(h, r, d, sums);
    float shh = sums[0], shr = sums[1], srr = sums[2];
    for (; j < d; ++j) {
      const float v = Tag::load(h[j]);
      shh += v * v;
      shr += v * r[j];
      srr += r[j] * r[j];
    }
    out[0] = shh;
    out[1] = shr;
    out[2] = srr;
  }
  static float uu(const uint16_t* h, const float* r, int64_t d, RotateCoefs c) {
    return ScalarRowIO<Tag>::uu(h, r, d, c);
  }
  static void apply(uint16_t* __restrict__ h, const float* __restrict__ r, int64_t d,
                    SteerCombine k, bool finite) {
    const __m256 ch = _mm256_set1_ps(k.ch), cr = _mm256_set1_ps(k.cr);
    int64_t j = 0;
    if (finite) {
      for (; j + 8 <= d; j += 8) {
        const __m256 v = _mm256_fmadd_ps(cr, _mm256_loadu_ps(r + j),
                                         _mm256_mul_ps(load8(h + j, Tag{}), ch));
        store8(h + j, v, Tag{}, true);
      }
    } else {
      for (; j + 8 <= d; j += 8) {
        const __m256 v = _mm256_fmadd_ps(cr, _mm256_loadu_ps(r + j),
                                         _mm256_mul_ps(load8(h + j, Tag{}), ch));
        store8(h + j, v, Tag{}, false);
      }
    }
    for (; j < d; ++j) h[j] = Tag::store(steer_apply(Tag::load(h[j]), r[j], k));
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

void steer_tokens_cpu(const SteerTokensArgs& a) {
  steer_tokens_check_args(a);
  dispatch_float(a.dtype, "hidden", [&](auto tag) {
    using Tag = decltype(tag);
#if defined(UNLOCK_STEER_AVX2)
    if (use_avx2()) return avx2::steer_token_rows<Tag>(a);
#endif
    base::steer_token_rows<Tag>(a);
  });
}

}  // namespace unlock
