// Shared definitions of the kernel core: dtype codes, error checks and scalar conversions.
//
// Every kernel takes raw pointers, shapes or strides (in elements), a dtype code and, on the
// GPU, a stream. Nothing here depends on torch or on Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
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

// Dtype codes shared with Python (unlock_fast/ops.py, _DTYPE_CODES).
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
