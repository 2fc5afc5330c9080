// Fused in-place residual steering of selected rows of hidden states [B, S, d].
//
// mode rotate (the paper's rule): h <- normalize(h/|h| + alpha r/|r|) * |h|
// mode add:                       h <- h + alpha r
// Math in fp32; each norm is clamped below at 1e-12 as in the reference. A row is steered
// where positions[b] == s (positions mode) or mask[b, s] is true (mask mode).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "unlock/common.h"

namespace unlock {

enum class SteerMode : int { kRotate = 0, kAdd = 1 };

struct SteerArgs {
  void* hidden = nullptr;  // [B, S, d], last dim contiguous
  DType dtype = DType::kFloat32;
  int64_t batch = 0, seq = 0, dim = 0;
  int64_t stride_b = 0, stride_s = 0;  // elements
  const int64_t* positions = nullptr;  // [B]; -1 skips the row
  const bool* mask = nullptr;          // [B, S] when positions is null
  int64_t mask_stride_b = 0, mask_stride_s = 0;
  const float* vector = nullptr;  // [d] shared, or [B, d] with vector_stride_b = row stride
  int64_t vector_stride_b = 0;    // 0: one vector for the whole batch
  float alpha = 0.f;
  SteerMode mode = SteerMode::kRotate;
};

constexpr float kSteerEps = 1e-12f;

// Coefficients of the rotate rule after the first pass gave hh = |h|² and rr = |r|².
struct RotateCoefs {
  float inv_hn;     // 1 / max(|h|, eps)
  float a_over_rn;  // alpha / max(|r|, eps)
};

UNLOCK_HD RotateCoefs steer_rotate_coefs(float hh, float rr, float alpha) {
  return {1.f / fmaxf(sqrtf(hh), kSteerEps), alpha / fmaxf(sqrtf(rr), kSteerEps)};
}

// u = h/|h| + alpha r/|r|, one element.
UNLOCK_HD float steer_rotate_dir(float h, float r, RotateCoefs c) {
  return h * c.inv_hn + c.a_over_rn * r;
}

// |u|² from the three dot products of the first pass, without a second pass over the row.
// Returns a negative value when the two terms cancel so much (|u|² < 1/8 of |h/|h||² +
// |alpha r/|r||²) that this form would lose digits; the caller then sums u² explicitly.
UNLOCK_HD float steer_rotate_uu(float hh, float hr, float rr, RotateCoefs c) {
  const float p = hh * c.inv_hn * c.inv_hn;
  const float q = rr * c.a_over_rn * c.a_over_rn;
  const float uu = p + q + 2.f * hr * c.inv_hn * c.a_over_rn;
  return uu >= 0.125f * (p + q) ? uu : -1.f;
}

// Factor that takes u to the output: |h| / max(|u|, eps).
UNLOCK_HD float steer_rotate_scale(float hh, float uu) {
  return sqrtf(hh) / fmaxf(sqrtf(uu), kSteerEps);
}

// The output row is ch * h + cr * r: rotate uses ch = scale/|h|, cr = scale·alpha/|r|,
// add uses ch = 1, cr = alpha.
struct SteerCombine {
  float ch, cr;
};

UNLOCK_HD SteerCombine steer_rotate_combine(RotateCoefs c, float scale) {
  return {c.inv_hn * scale, c.a_over_rn * scale};
}

UNLOCK_HD float steer_apply(float h, float r, SteerCombine k) { return h * k.ch + k.cr * r; }

// Checks that need no data: shapes, strides, pointers, and that the rows written neither alias
// one another nor overlap the vector, positions or mask.
inline void steer_check_args(const SteerArgs& a) {
  UNLOCK_CHECK_ARG(a.hidden && a.vector, "steer: hidden and vector are required");
  UNLOCK_CHECK_ARG(a.batch >= 0 && a.seq >= 0 && a.dim > 0,
                   "steer: bad shape: hidden must be [B, S, d] with B, S >= 0 and d >= 1, got [" +
                       std::to_string(a.batch) + ", " + std::to_string(a.seq) + ", " +
                       std::to_string(a.dim) + "]");
  UNLOCK_CHECK_ARG((a.positions == nullptr) != (a.mask == nullptr),
                   "steer: give exactly one of positions or mask");
  auto shape = [&a] {  // built only for a message
    return "hidden [" + std::to_string(a.batch) + ", " + std::to_string(a.seq) + ", " +
           std::to_string(a.dim) + "] with strides [" + std::to_string(a.stride_b) + ", " +
           std::to_string(a.stride_s) + ", 1]";
  };
  const int64_t hidden_span = span_elements("steer: hidden", {{a.batch, a.stride_b},
                                                              {a.seq, a.stride_s},
                                                              {a.dim, 1}});
  UNLOCK_CHECK_ARG(dims_do_not_overlap({{a.batch, a.stride_b}, {a.seq, a.stride_s}, {a.dim, 1}}),
                   "steer: the rows of " + shape() +
                       " overlap in memory, so one element would be steered more than once");
  UNLOCK_CHECK_ARG(a.vector_stride_b == 0 || a.vector_stride_b >= a.dim,
                   "steer: vector_stride_b must be 0 (one shared vector) or >= d = " +
                       std::to_string(a.dim) + ", got " + std::to_string(a.vector_stride_b));
  const int64_t vector_span = span_elements(
      "steer: vector", {{a.vector_stride_b ? a.batch : 1, a.vector_stride_b}, {a.dim, 1}});
  const int64_t select_span =
      a.mask ? span_elements("steer: mask", {{a.batch, a.mask_stride_b}, {a.seq, a.mask_stride_s}})
             : a.batch;
  const std::size_t hsize = dtype_size(a.dtype);
  UNLOCK_CHECK_ARG(hsize == 2 || hsize == 4,
                   std::string("steer: hidden must be float32, float16 or bfloat16, got ") +
                       dtype_name(a.dtype));
  check_no_overlap("steer", {byte_range("hidden", a.hidden, hidden_span, hsize)},
                   {byte_range("vector", a.vector, vector_span, sizeof(float)),
                    a.mask ? byte_range("mask", a.mask, select_span, sizeof(bool))
                           : byte_range("positions", a.positions, select_span, sizeof(int64_t))});
}

// Per-token steering for a serving engine: rows [N, d] of a flattened batch, each with its own
// key slot, alpha and mode, read from persistent buffers so that the launch never depends on
// the data (no host sync, fixed shapes; capturable in a CUDA graph).
//
// Row i with 0 <= slots[i] < num_slots is steered with table[slots[i], layer] (fp32 [d]);
// any other slot (-1 = none) leaves the row alone, so a step that steers nothing costs one
// pass over the slots. With a residual ([N, d], the same dtype), the stream is
// h + residual: it is rounded to the dtype, steered into hidden, and the residual row is
// zeroed (hidden + residual then equals the steered stream exactly). add computes
// h + fl(alpha * r) with two roundings, as torch's `h + alpha * r` and the add of steer_.
struct SteerTokensArgs {
  void* hidden = nullptr;    // [N, d], last dim contiguous
  void* residual = nullptr;  // [N, d] or null
  DType dtype = DType::kFloat32;
  int64_t rows = 0, dim = 0;
  int64_t hidden_stride = 0, residual_stride = 0;  // elements between rows
  const float* table = nullptr;                    // [num_slots, layers, d] contiguous
  int64_t num_slots = 0, layers = 0, layer = 0;
  const int32_t* slots = nullptr;  // [>= N]
  const float* alphas = nullptr;   // [>= N]
  const uint8_t* modes = nullptr;  // [>= N], SteerMode codes
};

inline void steer_tokens_check_args(const SteerTokensArgs& a) {
  UNLOCK_CHECK_ARG(a.hidden && a.table && a.slots && a.alphas && a.modes,
                   "steer_tokens: hidden, table, slots, alphas and modes are required");
  UNLOCK_CHECK_ARG(a.rows >= 0 && a.dim > 0, "steer_tokens: hidden must be [N, d] with d >= 1");
  UNLOCK_CHECK_ARG(a.num_slots >= 0 && a.layers > 0 && a.layer >= 0 && a.layer < a.layers,
                   "steer_tokens: layer " + std::to_string(a.layer) + " is outside [0, " +
                       std::to_string(a.layers) + ")");
  UNLOCK_CHECK_ARG(a.hidden_stride >= a.dim && (!a.residual || a.residual_stride >= a.dim),
                   "steer_tokens: rows of hidden and residual must not overlap");
  const std::size_t hsize = dtype_size(a.dtype);
  UNLOCK_CHECK_ARG(hsize == 2 || hsize == 4,
                   std::string("steer_tokens: hidden must be float32, float16 or bfloat16, got ") +
                       dtype_name(a.dtype));
}

// A position outside [-1, S) is an error on both backends; nothing is clamped or skipped.

// Raises std::invalid_argument, before touching any row, when a position is outside [-1, S).
void steer_cpu(const SteerArgs& a);

// Asynchronous on `stream`, no host synchronisation. One block per candidate row, 16-byte
// loads where the rows and the vector are 16-byte aligned and d is a whole number of packs,
// and one fused block reduction for |h|², h·r and |r|². The Python entry point checks the
// positions before launch; a row whose position is outside [-1, S) is left alone here
// (never a device-side assertion, which would make the process's CUDA context unusable).
void steer_cuda(const SteerArgs& a, int device, std::uintptr_t stream);

void steer_tokens_cpu(const SteerTokensArgs& a);
// Asynchronous on `stream`; one block per row, rows with no slot return at once.
void steer_tokens_cuda(const SteerTokensArgs& a, int device, std::uintptr_t stream);

}  // namespace unlock
