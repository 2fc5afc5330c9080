// Randomized low-rank eigensolver and SVD (range finder + Rayleigh-Ritz), math once.
//
// eigh: the top-k eigenpairs of a symmetric (PSD) matrix A [d, d].
//   l = min(k + oversample, d); Ω [d, l] is a seeded Gaussian test matrix.
//   Y = A Ω; n_iter times: Y <- A basis(Y); Q = orth(Y) (Householder);
//   B = Qᵀ A Q [l, l]; B = V diag(w) Vᵀ (dense eigh); eigenvectors Q V, top k.
// svd: the top-k singular triplets of a general M [rows, cols].
//   Y = M Ω; n_iter times: Y <- M basis(Mᵀ basis(Y)); Q = orth(Y);
//   Z = Mᵀ Q = Q_z R (Householder); R = U_r diag(s) V_rᵀ (dense SVD);
//   U = Q V_r, Vh = (Q_z U_r)ᵀ, top k.
// basis(Y) is the P·L factor of a partially pivoted LU of Y: it spans the same space, is
// well conditioned and never breaks down on rank-deficient Y, and costs less than a
// Householder QR; only the last basis before Rayleigh-Ritz needs to be orthonormal.
// When the sketch would cost about as much as a dense decomposition, the dense one runs
// instead (see rsvd_plan). Signs: each eigenvector / left singular vector has its entry of
// largest magnitude positive (the lowest index wins ties); Vh rows follow their U columns.
//
// Determinism: Ω comes from a counter-based generator (SplitMix64 + Box-Muller), so it
// depends only on (seed, shape); with a fixed BLAS thread count each backend returns
// bit-identical results for the same input and seed.
//
// Both backends run the same algorithm (rsvd_eigh_run / rsvd_svd_run below) through a
// small set of column-major primitives ("Ops"): LAPACK/OpenBLAS on the CPU, cuBLAS/cuSOLVER
// and a few kernels on CUDA. Buffers of the caller are row-major; a row-major [r, c] buffer
// is the column-major [c, r] matrix, which is how the algorithm reads it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "unlock/common.h"

namespace unlock {

enum class RsvdMethod : int {
  kAuto = 0,        // randomized unless a dense decomposition is about as cheap
  kRandomized = 1,  // always the sketch
  kExact = 2,       // always the dense decomposition
};

// One call. Row-major, contiguous buffers of `dtype` (float32 or float64).
struct RsvdArgs {
  const void* input = nullptr;  // eigh: a [d, d] (rows == cols == d); svd: m [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t k = 0;           // 1 <= k <= min(rows, cols)
  int64_t oversample = 0;  // >= 0
  int64_t n_iter = 0;      // power iterations, >= 0
  uint64_t seed = 0;
  DType dtype = DType::kFloat32;
  RsvdMethod method = RsvdMethod::kAuto;
  void* values = nullptr;  // [k] descending: eigenvalues / singular values
  void* left = nullptr;    // eigh: eigenvectors [d, k]; svd: U [rows, k]
  void* right = nullptr;   // svd: Vh [k, cols]; unused by eigh
  void* workspace = nullptr;  // at least rsvd_*_workspace_*(args) bytes (CPU or device memory)
  std::size_t workspace_bytes = 0;
};

// ---- CPU backend (csrc/cpu/rsvd.cpp) ---------------------------------------------------------
// The workspace functions read only the sizes, dtype and method of `a`.
std::size_t rsvd_eigh_workspace_cpu(const RsvdArgs& a);
void rsvd_eigh_cpu(const RsvdArgs& a);
std::size_t rsvd_svd_workspace_cpu(const RsvdArgs& a);
void rsvd_svd_cpu(const RsvdArgs& a);

// ---- CUDA backend (csrc/cuda/rsvd.cu) --------------------------------------------------------
// Asynchronous on `stream`; no host synchronisation. A failed dense LAPACK step (it needs
// NaN/Inf input) is not reported, since that would need a sync; the output is then NaN.
std::size_t rsvd_eigh_workspace_cuda(const RsvdArgs& a, int device);
void rsvd_eigh_cuda(const RsvdArgs& a, int device, std::uintptr_t stream);
std::size_t rsvd_svd_workspace_cuda(const RsvdArgs& a, int device);
void rsvd_svd_cuda(const RsvdArgs& a, int device, std::uintptr_t stream);

// ---- the Gaussian test matrix -----------------------------------------------------------------

constexpr uint64_t kRsvdGolden = 0x9E3779B97F4A7C15ull;

// SplitMix64 output function.
UNLOCK_HD uint64_t rsvd_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Stream key of a seed.
UNLOCK_HD uint64_t rsvd_key(uint64_t seed) { return rsvd_mix64(seed ^ 0x5EEDC0DE2604A11Full); }

// Entries 2p and 2p+1 (column-major order) of the test matrix: one 64-bit draw gives two
// 32-bit uniforms in (0, 1), Box-Muller turns them into two standard normals. Computed in
// double; the float32 matrix rounds these values.
UNLOCK_HD void rsvd_gaussian_pair(uint64_t key, uint64_t p, double* z0, double* z1) {
  const uint64_t w = rsvd_mix64(key + (p + 1) * kRsvdGolden);
  const double u1 = (static_cast<double>(w >> 32) + 0.5) * 0x1p-32;
  const double u2 = (static_cast<double>(w & 0xffffffffull) + 0.5) * 0x1p-32;
  const double r = sqrt(-2.0 * log(u1));
  const double t = 6.283185307179586 * u2;
  *z0 = r * cos(t);
  *z1 = r * sin(t);
}

// Write entries [2 p, 2 p + 2) ∩ [0, count) of the test matrix into x.
template <class T>
UNLOCK_HD void rsvd_fill_gaussian_pair(T* x, int64_t count, uint64_t key, int64_t p) {
  double z0, z1;
  rsvd_gaussian_pair(key, static_cast<uint64_t>(p), &z0, &z1);
  x[2 * p] = static_cast<T>(z0);
  if (2 * p + 1 < count) x[2 * p + 1] = static_cast<T>(z1);
}

// ---- small per-element rules shared by both backends --------------------------------------

// Column j of P·L from the packed output of getrf on an [m, n] column (m >= n, 1-based
// pivots): zero above the diagonal, one on it, the multipliers below, then the row
// interchanges undone in reverse order.
template <class T>
UNLOCK_HD void rsvd_lu_basis_column(T* col, int64_t j, const int* ipiv, int64_t n) {
  for (int64_t i = 0; i < j; ++i) col[i] = T(0);
  col[j] = T(1);
  for (int64_t i = n - 1; i >= 0; --i) {
    const int64_t p = ipiv[i] - 1;
    if (p != i) {
      const T t = col[i];
      col[i] = col[p];
      col[p] = t;
    }
  }
}

// Whether candidate (|value| a, index i) beats the current best (b, bi) for the sign rule:
// larger magnitude, the lower index on ties.
template <class T>
UNLOCK_HD bool rsvd_sign_better(T a, int64_t i, T b, int64_t bi) {
  return a > b || (a == b && i < bi);
}

// ---- plan and workspace ------------------------------------------------------------------------

struct RsvdPlan {
  int64_t l = 0;       // sketch width: min(k + oversample, min(rows, cols))
  bool exact = false;  // dense decomposition instead of the sketch
};

// How much dearer a dense decomposition is, relative to products with the full matrix, on
// each backend. The sketch costs `passes` products of width l; the dense solver about
// dense_cost * r / l of them (measured with OpenBLAS on the CPU: syevr top-k ~ d/l,
// gesdd ~ 8 r/l). GPU dense eigensolvers are further behind their GEMM (a guess, not
// measured): the CUDA backend takes the dense path later.
constexpr double kRsvdCpuDenseFactor = 1.0;
constexpr double kRsvdCudaDenseFactor = 4.0;

inline RsvdPlan rsvd_plan(bool symmetric, int64_t rows, int64_t cols, int64_t k,
                          int64_t oversample, int64_t n_iter, RsvdMethod method,
                          double backend_factor) {
  RsvdPlan p;
  const int64_t r = rows < cols ? rows : cols;
  p.l = oversample < r - k ? k + oversample : r;  // min(k + oversample, r) without overflow
  if (method == RsvdMethod::kExact) {
    p.exact = true;
  } else if (method == RsvdMethod::kAuto) {
    const double passes = symmetric ? double(n_iter) + 2.0 : 2.0 * double(n_iter) + 2.0;
    const double dense_cost = (symmetric ? 1.0 : 8.0) * backend_factor;
    p.exact = passes * double(p.l) >= dense_cost * double(r);
  }
  return p;
}

inline void rsvd_check_args(const RsvdArgs& a, bool symmetric, bool need_buffers) {
  const char* name = symmetric ? "eigh_topk" : "svd_topk";
  UNLOCK_CHECK_ARG(a.rows >= 1 && a.cols >= 1, std::string(name) + ": empty matrix");
  UNLOCK_CHECK_ARG(!symmetric || a.rows == a.cols, std::string(name) + ": matrix must be square");
  const int64_t r = a.rows < a.cols ? a.rows : a.cols;
  UNLOCK_CHECK_ARG(a.k >= 1 && a.k <= r, std::string(name) + ": k must be in [1, " +
                                             std::to_string(r) + "], got " + std::to_string(a.k));
  UNLOCK_CHECK_ARG(a.oversample >= 0 && a.n_iter >= 0,
                   std::string(name) + ": oversample and n_iter must be >= 0");
  UNLOCK_CHECK_ARG(a.dtype == DType::kFloat32 || a.dtype == DType::kFloat64,
                   std::string(name) + ": dtype must be float32 or float64, got " +
                       dtype_name(a.dtype));
  UNLOCK_CHECK_ARG(int64_t(a.method) >= 0 && int64_t(a.method) <= 2,
                   std::string(name) + ": unknown method code");
  // LAPACK takes 32-bit sizes.
  UNLOCK_CHECK_ARG(a.rows < (int64_t{1} << 31) && a.cols < (int64_t{1} << 31) &&
                       a.rows * a.cols < (int64_t{1} << 31),
                   std::string(name) + ": matrix too large for 32-bit LAPACK indices");
  if (need_buffers) {
    UNLOCK_CHECK_ARG(a.input && a.values && a.left && (symmetric || a.right),
                     std::string(name) + ": null buffer");
    const std::size_t t = dtype_size(a.dtype);
    check_no_overlap(name,
                     {byte_range("values", a.values, a.k, t),
                      byte_range(symmetric ? "vectors" : "u", a.left, a.rows * a.k, t),
                      byte_range("vh", symmetric ? nullptr : a.right, a.k * a.cols, t),
                      byte_range("workspace", a.workspace,
                                 static_cast<int64_t>(a.workspace_bytes > INT64_MAX
                                                          ? INT64_MAX
                                                          : a.workspace_bytes),
                                 1)},
                     {byte_range(symmetric ? "a" : "m", a.input, a.rows * a.cols, t)});
  }
}

// Bump allocator over the caller's workspace, 256-byte aligned slices. With a null base it
// only measures, so sizing and carving run the same code.
class RsvdArena {
 public:
  explicit RsvdArena(void* base) : base_(static_cast<char*>(base)) {}
  template <class U>
  U* take(int64_t count) {
    used_ = (used_ + 255) & ~std::size_t{255};
    U* p = base_ ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += static_cast<std::size_t>(count > 0 ? count : 0) * sizeof(U);
    return p;
  }
  std::size_t used() const { return used_ + 255; }

 private:
  char* base_;
  std::size_t used_ = 0;
};

// ---- the algorithm, over a backend's column-major primitives -------------------------------
//
// Ops<T> provides (sizes in elements; matrices column-major with the given leading dims):
//   lu_work(m, n), qr_work(m, n), syevd_work(n), syevd_iwork(n), eig_top_work(d, k),
//   eig_top_iwork(d, k), eig_top_z(d, k), eig_top_w(d, k), svd_work(m, n), svd_iwork(m, n)
//   gaussian(x, count, key)                       x[0..count) <- test matrix entries
//   gemm(ta, tb, m, n, kk, A, lda, B, ldb, C, ldc)  C <- op(A) op(B)
//   lu_basis(y, m, n, ipiv, work)                 y <- P L of y = P L U (m >= n)
//   qr_q(y, m, n, tau, work, r)                   y <- Q of y = Q R; if r: r [n, n] <- R
//   syevd(b, n, w, work, iwork)                   b <- eigenvectors, w ascending
//   eig_top(a, d, k, w, z, work, iwork) -> {w, z, ldz}: top-k eigenpairs of a (destroyed),
//                                          eigenvalues ascending
//   svd(a, m, n, s, u, vt, work, iwork)           thin SVD of a [m, n] (m >= n, destroyed)
//   copy(rows, cols, src, src_rs, src_cs, dst, dst_rs, dst_cs)   strided 2-D copy
//   symmetrize_lower(b, n)                        lower triangle <- (B + Bᵀ) / 2
//   fix_signs(u, rows, k, vh, vh_cols)            sign rule on the columns of row-major
//                                                 u [rows, k], carried to rows of vh [k, c]
// The LAPACK scratch `work` holds max(...work) elements of T, `iwork` max(...iwork) ints;
// the backend learns both sizes through ops.set_scratch(lwork, liwork) before a run.

template <class T>
struct RsvdEigTop {
  const T* w;  // [k] ascending
  const T* z;  // [d, k] column-major
  int64_t ldz;
};

template <class T>
struct RsvdEighBuffers {
  RsvdPlan plan;
  // randomized
  T *x = nullptr, *y = nullptr, *b = nullptr, *w = nullptr, *vtop = nullptr, *tau = nullptr;
  int* ipiv = nullptr;
  // exact
  T *full = nullptr, *z = nullptr;
  // LAPACK scratch
  T* work = nullptr;
  int* iwork = nullptr;
  int64_t lwork = 0, liwork = 0;
  std::size_t bytes = 0;
};

template <class T, class Ops>
RsvdEighBuffers<T> rsvd_eigh_buffers(Ops& ops, const RsvdArgs& a, const RsvdPlan& plan,
                                     void* base) {
  RsvdEighBuffers<T> s;
  s.plan = plan;
  RsvdArena arena(base);
  const int64_t d = a.rows, k = a.k, l = plan.l;
  int64_t lwork = 1, liwork = 1;
  auto grow = [](int64_t& v, int64_t n) { v = n > v ? n : v; };
  if (plan.exact) {
    s.full = arena.take<T>(d * d);
    s.w = arena.take<T>(ops.eig_top_w(d, k));
    s.z = arena.take<T>(ops.eig_top_z(d, k));
    grow(lwork, ops.eig_top_work(d, k));
    grow(liwork, ops.eig_top_iwork(d, k));
  } else {
    s.x = arena.take<T>(d * l);
    s.y = arena.take<T>(d * l);
    s.b = arena.take<T>(l * l);
    s.w = arena.take<T>(l);
    s.vtop = arena.take<T>(l * k);
    s.tau = arena.take<T>(l);
    s.ipiv = arena.take<int>(l);
    grow(lwork, ops.lu_work(d, l));
    grow(lwork, ops.qr_work(d, l));
    grow(lwork, ops.syevd_work(l));
    grow(liwork, ops.syevd_iwork(l));
  }
  s.work = arena.take<T>(lwork);
  s.iwork = arena.take<int>(liwork);
  s.lwork = lwork;
  s.liwork = liwork;
  s.bytes = arena.used();
  return s;
}

template <class T, class Ops>
void rsvd_eigh_run(Ops& ops, const RsvdArgs& a, const RsvdEighBuffers<T>& s) {
  const int64_t d = a.rows, k = a.k, l = s.plan.l;
  const T* A = static_cast<const T*>(a.input);
  T* values = static_cast<T*>(a.values);
  T* vecs = static_cast<T*>(a.left);  // row-major [d, k] = column-major [k, d]

  if (s.plan.exact) {
    ops.copy(d, d, A, 1, d, s.full, 1, d);
    const RsvdEigTop<T> top = ops.eig_top(s.full, d, k, s.w, s.z, s.work, s.iwork);
    // descending: column k-1-j of z becomes column j of the output
    ops.copy(1, k, top.w + (k - 1), 0, -1, values, 0, 1);
    ops.copy(d, k, top.z + (k - 1) * top.ldz, 1, -top.ldz, vecs, k, 1);
  } else {
    T* x = s.x;
    T* y = s.y;
    ops.gaussian(x, d * l, rsvd_key(a.seed));
    ops.gemm(false, false, d, l, d, A, d, x, d, y, d);  // Y = A Ω
    for (int64_t it = 0; it < a.n_iter; ++it) {
      ops.lu_basis(y, d, l, s.ipiv, s.work);
      ops.gemm(false, false, d, l, d, A, d, y, d, x, d);
      std::swap(x, y);
    }
    ops.qr_q(y, d, l, s.tau, s.work, static_cast<T*>(nullptr));     // Q
    ops.gemm(false, false, d, l, d, A, d, y, d, x, d);               // W = A Q
    ops.gemm(true, false, l, l, d, y, d, x, d, s.b, l);              // B = Qᵀ W
    ops.symmetrize_lower(s.b, l);
    ops.syevd(s.b, l, s.w, s.work, s.iwork);
    ops.copy(1, k, s.w + (l - 1), 0, -1, values, 0, 1);
    ops.copy(l, k, s.b + (l - 1) * l, 1, -l, s.vtop, 1, l);          // top k, descending
    ops.gemm(true, true, k, d, l, s.vtop, l, y, d, vecs, k);         // (Q V)ᵀ
  }
  ops.fix_signs(vecs, d, k, static_cast<T*>(nullptr), 0);
}

template <class T>
struct RsvdSvdBuffers {
  RsvdPlan plan;
  // randomized
  T *y = nullptr, *z = nullptr, *r = nullptr, *ur = nullptr, *vtr = nullptr, *s = nullptr,
    *tau = nullptr;
  int* ipiv = nullptr;
  // exact: `full` is M in its tall orientation [p, q] (p >= q), u [p, q], vt [q, q]
  T* full = nullptr;
  // LAPACK scratch
  T* work = nullptr;
  int* iwork = nullptr;
  int64_t lwork = 0, liwork = 0;
  std::size_t bytes = 0;
};

template <class T, class Ops>
RsvdSvdBuffers<T> rsvd_svd_buffers(Ops& ops, const RsvdArgs& a, const RsvdPlan& plan,
                                   void* base) {
  RsvdSvdBuffers<T> s;
  s.plan = plan;
  RsvdArena arena(base);
  const int64_t m = a.rows, n = a.cols, l = plan.l;
  int64_t lwork = 1, liwork = 1;
  auto grow = [](int64_t& v, int64_t x) { v = x > v ? x : v; };
  if (plan.exact) {
    const int64_t p = m > n ? m : n, q = m < n ? m : n;
    s.full = arena.take<T>(p * q);
    s.s = arena.take<T>(q);
    s.ur = arena.take<T>(p * q);
    s.vtr = arena.take<T>(q * q);
    grow(lwork, ops.svd_work(p, q));
    grow(liwork, ops.svd_iwork(p, q));
  } else {
    s.y = arena.take<T>(m * l);
    s.z = arena.take<T>(n * l);
    s.r = arena.take<T>(l * l);
    s.ur = arena.take<T>(l * l);
    s.vtr = arena.take<T>(l * l);
    s.s = arena.take<T>(l);
    s.tau = arena.take<T>(l);
    s.ipiv = arena.take<int>(l);
    grow(lwork, ops.lu_work(m, l));
    grow(lwork, ops.lu_work(n, l));
    grow(lwork, ops.qr_work(m, l));
    grow(lwork, ops.qr_work(n, l));
    grow(lwork, ops.svd_work(l, l));
    grow(liwork, ops.svd_iwork(l, l));
  }
  s.work = arena.take<T>(lwork);
  s.iwork = arena.take<int>(liwork);
  s.lwork = lwork;
  s.liwork = liwork;
  s.bytes = arena.used();
  return s;
}

template <class T, class Ops>
void rsvd_svd_run(Ops& ops, const RsvdArgs& a, const RsvdSvdBuffers<T>& s) {
  const int64_t m = a.rows, n = a.cols, k = a.k, l = s.plan.l;
  const T* Mc = static_cast<const T*>(a.input);  // column-major [n, m] = Mᵀ
  T* values = static_cast<T*>(a.values);
  T* u_out = static_cast<T*>(a.left);    // row-major [m, k] = column-major [k, m]
  T* vh_out = static_cast<T*>(a.right);  // row-major [k, n] = column-major [n, k]

  if (s.plan.exact) {
    if (m >= n) {  // tall copy M [m, n]: M = U S Vt
      ops.copy(m, n, Mc, n, 1, s.full, 1, m);
      ops.svd(s.full, m, n, s.s, s.ur, s.vtr, s.work, s.iwork);
      ops.copy(m, k, s.ur, 1, m, u_out, k, 1);   // U[:, :k]
      ops.copy(k, n, s.vtr, 1, n, vh_out, n, 1);  // Vt[:k, :]
    } else {  // tall copy Mᵀ [n, m] = U' S Vt': U = Vt'ᵀ, Vh = U'ᵀ
      ops.copy(n, m, Mc, 1, n, s.full, 1, n);
      ops.svd(s.full, n, m, s.s, s.ur, s.vtr, s.work, s.iwork);
      ops.copy(m, k, s.vtr, m, 1, u_out, k, 1);
      ops.copy(k, n, s.ur, n, 1, vh_out, n, 1);
    }
    ops.copy(1, k, s.s, 0, 1, values, 0, 1);
  } else {
    T* y = s.y;  // [m, l]
    T* z = s.z;  // [n, l]
    ops.gaussian(z, n * l, rsvd_key(a.seed));
    ops.gemm(true, false, m, l, n, Mc, n, z, n, y, m);  // Y = M Ω
    for (int64_t it = 0; it < a.n_iter; ++it) {
      ops.lu_basis(y, m, l, s.ipiv, s.work);
      ops.gemm(false, false, n, l, m, Mc, n, y, m, z, n);  // Z = Mᵀ Y
      ops.lu_basis(z, n, l, s.ipiv, s.work);
      ops.gemm(true, false, m, l, n, Mc, n, z, n, y, m);  // Y = M Z
    }
    ops.qr_q(y, m, l, s.tau, s.work, static_cast<T*>(nullptr));  // Q
    ops.gemm(false, false, n, l, m, Mc, n, y, m, z, n);          // Z = Mᵀ Q = Bᵀ
    ops.qr_q(z, n, l, s.tau, s.work, s.r);                       // Z = Q_z R
    ops.svd(s.r, l, l, s.s, s.ur, s.vtr, s.work, s.iwork);        // R = U_r S V_rᵀ
    ops.copy(1, k, s.s, 0, 1, values, 0, 1);
    ops.gemm(false, true, k, m, l, s.vtr, l, y, m, u_out, k);    // Uᵀ = V_r[:, :k]ᵀ Qᵀ
    ops.gemm(false, false, n, k, l, z, n, s.ur, l, vh_out, n);   // Vhᵀ = Q_z U_r[:, :k]
  }
  ops.fix_signs(u_out, m, k, vh_out, n);
}

}  // namespace unlock
