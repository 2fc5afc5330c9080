// CPU backend of the randomized eigensolver / SVD: OpenBLAS GEMM, LAPACK getrf, geqrf/orgqr,
// syevd (small), syevr (dense top-k) and gesdd, plus a few OpenMP loops.
#include "unlock/rsvd.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "unlock/blas.h"

// LAPACKE names that unlock/blas.h does not map.
#ifndef LAPACKE_sgetrf_work
#define LAPACKE_sgetrf_work scipy_LAPACKE_sgetrf_work
#define LAPACKE_dgetrf_work scipy_LAPACKE_dgetrf_work
#endif
#ifndef LAPACKE_ssyevr_work
#define LAPACKE_ssyevr_work scipy_LAPACKE_ssyevr_work
#define LAPACKE_dsyevr_work scipy_LAPACKE_dsyevr_work
#endif

namespace unlock {
namespace {

// Memory-bound loops below this many elements stay on one thread.
constexpr int64_t kParallelMin = int64_t{1} << 20;
// The test matrix costs ~100 ns per pair of entries: threads pay off much earlier.
constexpr int64_t kParallelPairs = int64_t{1} << 14;
// GEMMs below this many multiply-adds run on one OpenBLAS thread.
constexpr double kParallelGemm = double(int64_t{1} << 27);
// Dense decompositions of fewer elements than this (2048²) run on one OpenBLAS thread.
constexpr int64_t kParallelDense = int64_t{1} << 22;

// OpenBLAS thread count for one call. The O(d l²) LAPACK steps on tall-skinny panels
// (getrf, geqrf/orgqr, the small syevd) and dense decompositions of small matrices are
// made of many short parallel regions: on a few cores they gain little from threads and
// lose badly when the cores are shared (tens to hundreds of times slower on a loaded
// 2-core machine). They run on one thread; the O(d² l) products with the full matrix and
// large dense decompositions use the caller's setting. The count is process-wide, so calls
// hold a lock and restore the setting at the end.
class BlasThreads {
 public:
  BlasThreads() : lock_(mutex()), threads_(openblas_get_num_threads()), current_(threads_) {}
  ~BlasThreads() { set(threads_); }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

  void serial() { set(1); }
  void parallel() { set(threads_); }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  void set(int n) {
    if (n != current_) {
      openblas_set_num_threads(n);
      current_ = n;
    }
  }
  std::lock_guard<std::mutex> lock_;
  int threads_, current_;
};

using lint = lapack_int;

lint to_lint(int64_t v) { return static_cast<lint>(v); }

void check_info(lint info, const char* routine) {
  UNLOCK_CHECK(info >= 0, std::string(routine) + ": invalid argument " + std::to_string(-info));
  UNLOCK_CHECK(info == 0, std::string(routine) + " did not converge (info " +
                              std::to_string(info) + "); does the input hold NaN or Inf?");
}

// Workspace size from a LAPACK query (a float for the s-routines: round up generously).
int64_t query_size(double v) { return static_cast<int64_t>(std::ceil(v * (1.0 + 1e-6))) + 1; }

// ---- typed LAPACK / BLAS entry points ----------------------------------------------------------

void gemm_t(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, lint m, lint n, lint k, const float* a,
            lint lda, const float* b, lint ldb, float* c, lint ldc) {
  cblas_sgemm(CblasColMajor, ta, tb, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
}
void gemm_t(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, lint m, lint n, lint k, const double* a,
            lint lda, const double* b, lint ldb, double* c, lint ldc) {
  cblas_dgemm(CblasColMajor, ta, tb, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc);
}
lint getrf_t(lint m, lint n, float* a, lint lda, lint* ipiv) {
  return LAPACKE_sgetrf_work(LAPACK_COL_MAJOR, m, n, a, lda, ipiv);
}
lint getrf_t(lint m, lint n, double* a, lint lda, lint* ipiv) {
  return LAPACKE_dgetrf_work(LAPACK_COL_MAJOR, m, n, a, lda, ipiv);
}
lint geqrf_t(lint m, lint n, float* a, lint lda, float* tau, float* w, lint lw) {
  return LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, m, n, a, lda, tau, w, lw);
}
lint geqrf_t(lint m, lint n, double* a, lint lda, double* tau, double* w, lint lw) {
  return LAPACKE_dgeqrf_work(LAPACK_COL_MAJOR, m, n, a, lda, tau, w, lw);
}
lint orgqr_t(lint m, lint n, float* a, lint lda, const float* tau, float* w, lint lw) {
  return LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, m, n, n, a, lda, tau, w, lw);
}
lint orgqr_t(lint m, lint n, double* a, lint lda, const double* tau, double* w, lint lw) {
  return LAPACKE_dorgqr_work(LAPACK_COL_MAJOR, m, n, n, a, lda, tau, w, lw);
}
lint syevd_t(lint n, float* a, float* w, float* work, lint lw, lint* iw, lint liw) {
  return LAPACKE_ssyevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a, n, w, work, lw, iw, liw);
}
lint syevd_t(lint n, double* a, double* w, double* work, lint lw, lint* iw, lint liw) {
  return LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a, n, w, work, lw, iw, liw);
}
// Eigenpairs il..iu (1-based, ascending) of the lower triangle of a [n, n].
lint syevr_t(lint n, float* a, lint il, lint iu, lint* found, float* w, float* z, lint* isuppz,
             float* work, lint lw, lint* iw, lint liw) {
  return LAPACKE_ssyevr_work(LAPACK_COL_MAJOR, 'V', 'I', 'L', n, a, n, 0.f, 0.f, il, iu, 0.f,
                             found, w, z, n, isuppz, work, lw, iw, liw);
}
lint syevr_t(lint n, double* a, lint il, lint iu, lint* found, double* w, double* z,
             lint* isuppz, double* work, lint lw, lint* iw, lint liw) {
  return LAPACKE_dsyevr_work(LAPACK_COL_MAJOR, 'V', 'I', 'L', n, a, n, 0.0, 0.0, il, iu, 0.0,
                             found, w, z, n, isuppz, work, lw, iw, liw);
}
lint gesdd_t(lint m, lint n, float* a, float* s, float* u, float* vt, float* w, lint lw,
             lint* iw) {
  return LAPACKE_sgesdd_work(LAPACK_COL_MAJOR, 'S', m, n, a, m, s, u, m, vt, n, w, lw, iw);
}
lint gesdd_t(lint m, lint n, double* a, double* s, double* u, double* vt, double* w, lint lw,
             lint* iw) {
  return LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'S', m, n, a, m, s, u, m, vt, n, w, lw, iw);
}

// ---- the primitives of rsvd.h ------------------------------------------------------------------

template <class T>
class CpuOps {
 public:
  explicit CpuOps(BlasThreads* threads = nullptr) : threads_(threads) {}

  void set_scratch(int64_t lwork, int64_t liwork) {
    lwork_ = lwork;
    liwork_ = liwork;
  }

  // -- scratch sizes (LAPACK workspace queries) --
  int64_t lu_work(int64_t, int64_t) { return 0; }
  int64_t qr_work(int64_t m, int64_t n) {
    T a[1] = {}, tau[1] = {}, q1 = 0, q2 = 0;
    check_info(geqrf_t(to_lint(m), to_lint(n), a, to_lint(m), tau, &q1, -1), "geqrf");
    check_info(orgqr_t(to_lint(m), to_lint(n), a, to_lint(m), tau, &q2, -1), "orgqr");
    return query_size(std::max<double>(q1, q2));
  }
  int64_t syevd_work(int64_t n) {
    query_syevd(n);
    return work_q_;
  }
  int64_t syevd_iwork(int64_t n) {
    query_syevd(n);
    return iwork_q_;
  }
  int64_t eig_top_w(int64_t d, int64_t) { return d; }
  int64_t eig_top_z(int64_t d, int64_t k) { return d * k; }
  int64_t eig_top_work(int64_t d, int64_t k) {
    query_syevr(d, k);
    return work_q_;
  }
  // syevr's integer workspace, then isuppz [2 k]
  int64_t eig_top_iwork(int64_t d, int64_t k) {
    query_syevr(d, k);
    return iwork_q_ + 2 * k;
  }
  int64_t svd_work(int64_t m, int64_t n) {
    T a[1] = {}, s[1] = {}, u[1] = {}, vt[1] = {}, q = 0;
    lint iw[1] = {};
    check_info(gesdd_t(to_lint(m), to_lint(n), a, s, u, vt, &q, -1, iw), "gesdd");
    return query_size(q);
  }
  int64_t svd_iwork(int64_t m, int64_t n) { return 8 * std::min(m, n); }

  // -- operations --
  void gaussian(T* x, int64_t count, uint64_t key) {
    const int64_t pairs = (count + 1) / 2;
#pragma omp parallel for schedule(static) if (pairs >= kParallelPairs)
    for (int64_t p = 0; p < pairs; ++p) rsvd_fill_gaussian_pair(x, count, key, p);
  }

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
            const T* b, int64_t ldb, T* c, int64_t ldc) {
    if (double(m) * double(n) * double(k) >= kParallelGemm) {
      parallel();
    } else {
      serial();
    }
    gemm_t(ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, to_lint(m),
           to_lint(n), to_lint(k), a, to_lint(lda), b, to_lint(ldb), c, to_lint(ldc));
  }

  void lu_basis(T* y, int64_t m, int64_t n, int* ipiv, T*) {
    serial();
    const lint info = getrf_t(to_lint(m), to_lint(n), y, to_lint(m), ipiv);
    UNLOCK_CHECK(info >= 0, "getrf: invalid argument " + std::to_string(-info));
    // info > 0 (an exactly zero pivot) is fine: that column of L is then a unit vector.
    for (int64_t j = 0; j < n; ++j) rsvd_lu_basis_column(y + j * m, j, ipiv, n);
  }

  void qr_q(T* y, int64_t m, int64_t n, T* tau, T* work, T* r) {
    serial();
    check_info(geqrf_t(to_lint(m), to_lint(n), y, to_lint(m), tau, work, to_lint(lwork_)),
               "geqrf");
    if (r) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < n; ++i) r[i + j * n] = i <= j ? y[i + j * m] : T(0);
      }
    }
    check_info(orgqr_t(to_lint(m), to_lint(n), y, to_lint(m), tau, work, to_lint(lwork_)),
               "orgqr");
  }

  void syevd(T* b, int64_t n, T* w, T* work, int* iwork) {
    serial();
    check_info(syevd_t(to_lint(n), b, w, work, to_lint(lwork_), iwork, to_lint(liwork_)),
               "syevd");
  }

  RsvdEigTop<T> eig_top(T* a, int64_t d, int64_t k, T* w, T* z, T* work, int* iwork) {
    if (d * d >= kParallelDense) {
      parallel();
    } else {
      serial();
    }
    lint found = 0;
    int* isuppz = iwork + (liwork_ - 2 * k);
    check_info(syevr_t(to_lint(d), a, to_lint(d - k + 1), to_lint(d), &found, w, z, isuppz, work,
                       to_lint(lwork_), iwork, to_lint(liwork_ - 2 * k)),
               "syevr");
    UNLOCK_CHECK(found == k, "syevr returned " + std::to_string(found) + " eigenpairs, expected " +
                                 std::to_string(k));
    return {w, z, d};
  }

  void svd(T* a, int64_t m, int64_t n, T* s, T* u, T* vt, T* work, int* iwork) {
    if (m * n >= kParallelDense) {
      parallel();
    } else {
      serial();
    }
    check_info(gesdd_t(to_lint(m), to_lint(n), a, s, u, vt, work, to_lint(lwork_), iwork),
               "gesdd");
  }

  void copy(int64_t rows, int64_t cols, const T* src, int64_t src_rs, int64_t src_cs, T* dst,
            int64_t dst_rs, int64_t dst_cs) {
    const bool par = rows * cols >= kParallelMin;
    if (dst_rs == 1 && rows > 1) {  // column-major destination: columns outside
#pragma omp parallel for schedule(static) if (par)
      for (int64_t j = 0; j < cols; ++j) {
        const T* s = src + j * src_cs;
        T* t = dst + j * dst_cs;
        for (int64_t i = 0; i < rows; ++i) t[i] = s[i * src_rs];
      }
    } else {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < rows; ++i) {
        const T* s = src + i * src_rs;
        T* t = dst + i * dst_rs;
        for (int64_t j = 0; j < cols; ++j) t[j * dst_cs] = s[j * src_cs];
      }
    }
  }

  void symmetrize_lower(T* b, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = j + 1; i < n; ++i) b[i + j * n] = (b[i + j * n] + b[j + i * n]) / T(2);
    }
  }

  void fix_signs(T* u, int64_t rows, int64_t k, T* vh, int64_t vh_cols) {
    std::vector<T> best(static_cast<std::size_t>(k), T(-1));
    std::vector<int64_t> at(static_cast<std::size_t>(k), 0);
    std::vector<char> flip(static_cast<std::size_t>(k), 0);
    for (int64_t i = 0; i < rows; ++i) {  // row by row: u is row-major [rows, k]
      const T* row = u + i * k;
      for (int64_t j = 0; j < k; ++j) {
        const T a = std::abs(row[j]);
        if (rsvd_sign_better(a, i, best[j], at[j])) {
          best[j] = a;
          at[j] = i;
          flip[j] = row[j] < T(0);
        }
      }
    }
    bool any = false;
    for (int64_t j = 0; j < k; ++j) any = any || flip[j];
    if (!any) return;
#pragma omp parallel for schedule(static) if (rows * k >= kParallelMin)
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        if (flip[j]) u[i * k + j] = -u[i * k + j];
      }
    }
    if (vh) {
      for (int64_t j = 0; j < k; ++j) {
        if (!flip[j]) continue;
        for (int64_t c = 0; c < vh_cols; ++c) vh[j * vh_cols + c] = -vh[j * vh_cols + c];
      }
    }
  }

 private:
  void query_syevd(int64_t n) {
    T a[1] = {}, w[1] = {}, q = 0;
    lint iq = 0;
    check_info(syevd_t(to_lint(n), a, w, &q, -1, &iq, -1), "syevd");
    work_q_ = query_size(q);
    iwork_q_ = iq;
  }
  void query_syevr(int64_t d, int64_t k) {
    T a[1] = {}, w[1] = {}, z[1] = {}, q = 0;
    lint iq = 0, found = 0, isuppz[2] = {};
    check_info(syevr_t(to_lint(d), a, to_lint(d - k + 1), to_lint(d), &found, w, z, isuppz, &q,
                       -1, &iq, -1),
               "syevr");
    work_q_ = query_size(q);
    iwork_q_ = iq;
  }

  void serial() {
    if (threads_) threads_->serial();
  }
  void parallel() {
    if (threads_) threads_->parallel();
  }

  BlasThreads* threads_;
  int64_t lwork_ = 0, liwork_ = 0;
  int64_t work_q_ = 0, iwork_q_ = 0;
};

RsvdPlan cpu_plan(const RsvdArgs& a, bool symmetric) {
  return rsvd_plan(symmetric, a.rows, a.cols, a.k, a.oversample, a.n_iter, a.method,
                   kRsvdCpuDenseFactor);
}

template <class T>
std::size_t eigh_workspace(const RsvdArgs& a) {
  CpuOps<T> ops;
  return rsvd_eigh_buffers<T>(ops, a, cpu_plan(a, true), nullptr).bytes;
}

template <class T>
void eigh(const RsvdArgs& a) {
  BlasThreads threads;
  CpuOps<T> ops(&threads);
  const auto s = rsvd_eigh_buffers<T>(ops, a, cpu_plan(a, true), a.workspace);
  UNLOCK_CHECK_ARG(a.workspace && s.bytes <= a.workspace_bytes,
                   "eigh_topk: workspace too small, need " + std::to_string(s.bytes) + " bytes");
  ops.set_scratch(s.lwork, s.liwork);
  rsvd_eigh_run<T>(ops, a, s);
}

template <class T>
std::size_t svd_workspace(const RsvdArgs& a) {
  CpuOps<T> ops;
  return rsvd_svd_buffers<T>(ops, a, cpu_plan(a, false), nullptr).bytes;
}

template <class T>
void svd(const RsvdArgs& a) {
  BlasThreads threads;
  CpuOps<T> ops(&threads);
  const auto s = rsvd_svd_buffers<T>(ops, a, cpu_plan(a, false), a.workspace);
  UNLOCK_CHECK_ARG(a.workspace && s.bytes <= a.workspace_bytes,
                   "svd_topk: workspace too small, need " + std::to_string(s.bytes) + " bytes");
  ops.set_scratch(s.lwork, s.liwork);
  rsvd_svd_run<T>(ops, a, s);
}

}  // namespace

std::size_t rsvd_eigh_workspace_cpu(const RsvdArgs& a) {
  rsvd_check_args(a, true, false);
  return a.dtype == DType::kFloat64 ? eigh_workspace<double>(a) : eigh_workspace<float>(a);
}

void rsvd_eigh_cpu(const RsvdArgs& a) {
  rsvd_check_args(a, true, true);
  if (a.dtype == DType::kFloat64) {
    eigh<double>(a);
  } else {
    eigh<float>(a);
  }
}

std::size_t rsvd_svd_workspace_cpu(const RsvdArgs& a) {
  rsvd_check_args(a, false, false);
  return a.dtype == DType::kFloat64 ? svd_workspace<double>(a) : svd_workspace<float>(a);
}

void rsvd_svd_cpu(const RsvdArgs& a) {
  rsvd_check_args(a, false, true);
  if (a.dtype == DType::kFloat64) {
    svd<double>(a);
  } else {
    svd<float>(a);
  }
}

}  // namespace unlock
