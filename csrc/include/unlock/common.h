// Shared definitions of the kernel core: dtype codes, error checks and scalar conversions.
//
// Every kernel takes raw pointers, shapes or strides (in elements), a dtype code and, on the
// GPU, a stream. Nothing here depends on torch or on Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define UNLOCK_HD __host__ __device__ __forceinline__
#else
#define UNLOCK_HD inline
#endif

namespace unlock {

// Dtype codes shared with Python (unlock_fast/ops/core.py, DTYPE_CODES).
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// Bad arguments raise std::invalid_argument (ValueError in Python); failures of a library
// underneath raise std::runtime_error (RuntimeError).
#define UNLOCK_CHECK_ARG(cond, msg)                                            \
  do {                                                                         \
    if (!(cond)) throw std::invalid_argument(std::string("unlock_fast: ") + (msg)); \
  } while (0)

#define UNLOCK_CHECK(cond, msg)                                               \
  do {                                                                        \
    if (!(cond)) throw std::runtime_error(std::string("unlock_fast: ") + (msg)); \
  } while (0)

inline DType dtype_from_code(int code) {
  UNLOCK_CHECK_ARG(code >= 0 && code <= 3, "unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// ---- checks of raw buffer descriptions ------------------------------------------------------
//
// The entry points take addresses, sizes and strides from Python. These checks use nothing
// but those numbers: every stride is non-negative, no index computation overflows int64,
// the rows a kernel writes never alias one another, and a written buffer never overlaps a
// buffer of the same call. They cannot know how large the caller's allocation is.

// One strided dimension of a buffer.
struct Dim {
  int64_t size;
  int64_t stride;  // elements
};

// Elements spanned by a buffer, (size - 1) * stride summed over dims plus one; 0 when a size is
// 0. Raises when a size or stride is negative or the span overflows int64.
inline int64_t span_elements(const char* what, std::initializer_list<Dim> dims) {
  int64_t last = 0;
  for (const Dim& d : dims) {
    UNLOCK_CHECK_ARG(d.size >= 0, std::string(what) + ": negative size " + std::to_string(d.size));
    UNLOCK_CHECK_ARG(d.stride >= 0,
                     std::string(what) + ": negative stride " + std::to_string(d.stride));
    if (d.size == 0) return 0;
    int64_t step = 0;
    const bool overflow = __builtin_mul_overflow(d.size - 1, d.stride, &step) ||
                          __builtin_add_overflow(last, step, &last);
    UNLOCK_CHECK_ARG(!overflow, std::string(what) + ": sizes and strides overflow int64");
  }
  int64_t span = 0;
  UNLOCK_CHECK_ARG(!__builtin_add_overflow(last, int64_t{1}, &span),
                   std::string(what) + ": sizes and strides overflow int64");
  return span;
}

// Whether distinct indices of the dims always address distinct elements: with the dims of size
// > 1 sorted by stride, each stride must pass the last element the inner dims reach. This is
// the usual sufficient rule (a few exotic interleaved layouts fail it and are refused too).
inline bool dims_do_not_overlap(std::initializer_list<Dim> dims) {
  Dim sorted[8];
  int n = 0;
  for (const Dim& d : dims) {
    if (d.size > 1 && n < 8) sorted[n++] = d;
  }
  for (int i = 1; i < n; ++i) {  // insertion sort by stride, at most a handful of dims
    for (int j = i; j > 0 && sorted[j].stride < sorted[j - 1].stride; --j) {
      const Dim t = sorted[j];
      sorted[j] = sorted[j - 1];
      sorted[j - 1] = t;
    }
  }
  int64_t reach = 0;  // largest offset the inner dims address
  for (int i = 0; i < n; ++i) {
    if (sorted[i].stride <= reach) return false;
    int64_t step = 0;
    if (__builtin_mul_overflow(sorted[i].size - 1, sorted[i].stride, &step) ||
        __builtin_add_overflow(reach, step, &reach)) {
      return false;
    }
  }
  return true;
}

// A byte range [begin, begin + bytes) of one buffer, for the overlap checks.
struct ByteRange {
  const char* name;
  std::uintptr_t begin;
  std::uintptr_t bytes;  // 0: absent or empty
};

inline ByteRange byte_range(const char* name, const void* p, int64_t elements,
                            std::size_t elem_size) {
  const auto n = static_cast<std::uintptr_t>(elements > 0 ? elements : 0);
  UNLOCK_CHECK_ARG(n <= UINTPTR_MAX / elem_size, std::string(name) + ": buffer too large");
  return {name, reinterpret_cast<std::uintptr_t>(p), p ? n * elem_size : 0};
}

// Raises when a written range overlaps any other range of the call (written or read).
inline void check_no_overlap(const char* op, std::initializer_list<ByteRange> written,
                             std::initializer_list<ByteRange> read) {
  auto overlaps = [](const ByteRange& a, const ByteRange& b) {
    return a.bytes && b.bytes && a.begin < b.begin + b.bytes && b.begin < a.begin + a.bytes;
  };
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = written.begin(); o != w; ++o) {
      UNLOCK_CHECK_ARG(!overlaps(*w, *o), std::string(op) + ": " + w->name + " and " + o->name +
                                              " overlap in memory; both are written");
    }
    for (const ByteRange& r : read) {
      UNLOCK_CHECK_ARG(!overlaps(*w, r), std::string(op) + ": " + w->name + " overlaps " + r.name +
                                             " in memory; " + w->name + " is written in place");
    }
  }
}

// ---- scalar conversions (bit exact, round to nearest even) -----------------------------------

UNLOCK_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

UNLOCK_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

UNLOCK_HD float bf16_to_f32(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }

UNLOCK_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// half -> float: move exponent and mantissa into place and rebias; subnormal halves are
// renormalised by one float subtraction (no float denormals, so DAZ modes cannot break it).
// Written with selects rather than branches so that loops over it vectorise.
UNLOCK_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  constexpr uint32_t kExp = 0x7c00u << 13;
  const uint32_t o = (static_cast<uint32_t>(h & 0x7fffu) << 13) + ((127u - 15u) << 23);
  const uint32_t e = (static_cast<uint32_t>(h) << 13) & kExp;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const uint32_t small = f32_to_bits(bits_to_f32(o + (1u << 23)) - 0x1p-14f);
  const uint32_t mag = e == kExp ? inf_nan : (e == 0 ? small : o);
  return bits_to_f32(mag | (static_cast<uint32_t>(h & 0x8000u) << 16));
#endif
}

// float -> half, round to nearest even; branch-free for the same reason.
UNLOCK_HD uint16_t f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // subnormal or zero: adding 0.5 makes the FPU round at the half's subnormal step
  const uint32_t small = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3f000000u;
  const uint32_t mag = a > 0x7f800000u   ? 0x7e00u   // NaN
                       : a >= 0x477ff000u ? 0x7c00u  // rounds to inf
                       : a < 0x38800000u  ? small
                                          : normal;
  return static_cast<uint16_t>(sign | mag);
#endif
}

// Load element i of a buffer of the given dtype as float.
UNLOCK_HD float load_as_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Typed element access used by the templated loops of both backends.
struct F32 {
  using storage = float;
  static UNLOCK_HD float load(float v) { return v; }
  static UNLOCK_HD float store(float v) { return v; }
};
struct F16 {
  using storage = uint16_t;
  static UNLOCK_HD float load(uint16_t v) { return f16_to_f32(v); }
  static UNLOCK_HD uint16_t store(float v) { return f32_to_f16(v); }
};
struct BF16 {
  using storage = uint16_t;
  static UNLOCK_HD float load(uint16_t v) { return bf16_to_f32(v); }
  static UNLOCK_HD uint16_t store(float v) { return f32_to_bf16(v); }
};

// Call f(Tag{}) with the access tag of a float32/float16/bfloat16 dtype.
template <class F>
decltype(auto) dispatch_float(DType t, const char* what, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(F32{});
    case DType::kFloat16: return f(F16{});
    case DType::kBFloat16: return f(BF16{});
    default: break;
  }
  throw std::invalid_argument(std::string("unlock_fast: ") + what +
                              " must be float32, float16 or bfloat16, got " + dtype_name(t));
}

}  // namespace unlock
