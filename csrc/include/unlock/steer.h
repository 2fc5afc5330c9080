// Fused in-place residual steering of selected rows of hidden states [B, S, d].
//
// mode rotate (the paper's rule): h <- normalize(h/|h| + alpha r/|r|) * |h|
// mode add:                       h <- h + alpha r
// Math in fp32; each norm is clamped below at 1e-12 as in the reference. A row is steered
// where positions[b] == s (positions mode) or mask[b, s] is true (mask mode).
#pragma once

#include <cmath>
#include <cstdint>

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

inline void steer_check_args(const SteerArgs& a) {
  UNLOCK_CHECK_ARG(a.hidden && a.vector, "steer: hidden and vector are required");
  UNLOCK_CHECK_ARG(a.batch >= 0 && a.seq >= 0 && a.dim > 0, "steer: bad shape");
  UNLOCK_CHECK_ARG((a.positions == nullptr) != (a.mask == nullptr),
                   "steer: give exactly one of positions or mask");
}

// Raises std::invalid_argument, before touching any row, when a position is outside [-1, S).
void steer_cpu(const SteerArgs& a);

// Asynchronous on `stream`, no host synchronisation. Positions outside [0, S) are skipped
// (checking them would need a device-to-host copy).
void steer_cuda(const SteerArgs& a, int device, std::uintptr_t stream);

}  // namespace unlock
