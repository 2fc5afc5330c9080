// CUDA backend of the randomized eigensolver / SVD: cuBLAS GEMM, cuSOLVER getrf, geqrf/orgqr,
// syevd and gesvd, plus a few small kernels, all on the caller's stream with no host sync.
#include <algorithm>
#include <string>

#include "unlock/cuda_utils.h"
#include "unlock/rsvd.h"

namespace unlock {
namespace {

constexpr int kThreads = 256;
constexpr int kSignThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

// ---- kernels (grid-stride) ---------------------------------------------------------------------

template <class T>
__global__ void gaussian_kernel(T* x, int64_t count, uint64_t key) {
  const int64_t pairs = (count + 1) / 2;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pairs;
       p += int64_t(gridDim.x) * blockDim.x) {
    rsvd_fill_gaussian_pair(x, count, key, p);
  }
}

// One thread per column of the packed LU factor.
template <class T>
__global__ void lu_basis_kernel(T* y, int64_t m, int64_t n, const int* ipiv) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    rsvd_lu_basis_column(y + j * m, j, ipiv, n);
  }
}

template <class T>
__global__ void copy_kernel(int64_t rows, int64_t cols, const T* src, int64_t src_rs,
                            int64_t src_cs, T* dst, int64_t dst_rs, int64_t dst_cs) {
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % rows, j = e / rows;
    dst[i * dst_rs + j * dst_cs] = src[i * src_rs + j * src_cs];
  }
}

// r [n, n] <- the upper triangle of the packed QR factor y [m, n], zeros below.
template <class T>
__global__ void upper_kernel(const T* y, int64_t m, int64_t n, T* r) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n * n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % n, j = e / n;
    r[e] = i <= j ? y[i + j * m] : T(0);
  }
}

template <class T>
__global__ void symmetrize_lower_kernel(T* b, int64_t n) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n * n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % n, j = e / n;
    if (i > j) b[e] = (b[e] + b[j + i * n]) / T(2);
  }
}

// One block per column j of row-major u [rows, k]: find the entry of largest magnitude
// (lowest index on ties), and if it is negative flip the column and row j of vh [k, c].
template <class T>
__global__ void fix_signs_kernel(T* u, int64_t rows, int64_t k, T* vh, int64_t vh_cols) {
  __shared__ T best[kSignThreads];
  __shared__ int64_t at[kSignThreads];
  __shared__ bool flip;
  const int64_t j = blockIdx.x;
  T b = T(-1);
  int64_t bi = rows;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    const T v = u[i * k + j];
    const T a = v < T(0) ? -v : v;
    if (rsvd_sign_better(a, i, b, bi)) {
      b = a;
      bi = i;
    }
  }
  best[threadIdx.x] = b;
  at[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s &&
        rsvd_sign_better(best[threadIdx.x + s], at[threadIdx.x + s], best[threadIdx.x],
                         at[threadIdx.x])) {
      best[threadIdx.x] = best[threadIdx.x + s];
      at[threadIdx.x] = at[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) flip = at[0] < rows && u[at[0] * k + j] < T(0);
  __syncthreads();
  if (!flip) return;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) u[i * k + j] = -u[i * k + j];
  if (vh) {
    for (int64_t c = threadIdx.x; c < vh_cols; c += blockDim.x) {
      vh[j * vh_cols + c] = -vh[j * vh_cols + c];
    }
  }
}

// cuSOLVER's status words: info[0] is written by each call; info[1] keeps the first non-zero
// one and info[2] the routine that wrote it (an index into kRoutines). getrf's positive info
// (an exactly zero pivot) is not an error here, as in the CPU backend.
constexpr int kInfoInts = 3;
constexpr const char* kRoutines[] = {"getrf", "geqrf", "orgqr", "syevd", "gesvd"};
enum Routine { kGetrf, kGeqrf, kOrgqr, kSyevd, kGesvd };

__global__ void keep_info_kernel(int* info, int routine) {
  const int v = info[0];
  const bool bad = routine == kGetrf ? v < 0 : v != 0;
  if (bad && info[1] == 0) {
    info[1] = v;
    info[2] = routine;
  }
}

// ---- typed cuBLAS / cuSOLVER entry points -------------------------------------------------
// Each checks the status of the library call and raises naming it (e.g. "cusolverDnSsyevd
// failed with CUSOLVER_STATUS_INVALID_VALUE").

void gemm_t(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
            const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  UNLOCK_CUBLAS(cublasSgemm, h, ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc);
}
void gemm_t(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
            const double* a, int lda, const double* b, int ldb, double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  UNLOCK_CUBLAS(cublasDgemm, h, ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc);
}

int getrf_size(cusolverDnHandle_t h, int m, int n, float*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnSgetrf_bufferSize, h, m, n, nullptr, m, &lw);
  return lw;
}
int getrf_size(cusolverDnHandle_t h, int m, int n, double*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnDgetrf_bufferSize, h, m, n, nullptr, m, &lw);
  return lw;
}
void getrf_t(cusolverDnHandle_t h, int m, int n, float* a, float* w, int* ipiv, int* info) {
  UNLOCK_CUSOLVER(cusolverDnSgetrf, h, m, n, a, m, w, ipiv, info);
}
void getrf_t(cusolverDnHandle_t h, int m, int n, double* a, double* w, int* ipiv, int* info) {
  UNLOCK_CUSOLVER(cusolverDnDgetrf, h, m, n, a, m, w, ipiv, info);
}

int geqrf_size(cusolverDnHandle_t h, int m, int n, float*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnSgeqrf_bufferSize, h, m, n, nullptr, m, &lw);
  return lw;
}
int geqrf_size(cusolverDnHandle_t h, int m, int n, double*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnDgeqrf_bufferSize, h, m, n, nullptr, m, &lw);
  return lw;
}
int orgqr_size(cusolverDnHandle_t h, int m, int n, float*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnSorgqr_bufferSize, h, m, n, n, nullptr, m, nullptr, &lw);
  return lw;
}
int orgqr_size(cusolverDnHandle_t h, int m, int n, double*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnDorgqr_bufferSize, h, m, n, n, nullptr, m, nullptr, &lw);
  return lw;
}
void geqrf_t(cusolverDnHandle_t h, int m, int n, float* a, float* tau, float* w, int lw,
             int* info) {
  UNLOCK_CUSOLVER(cusolverDnSgeqrf, h, m, n, a, m, tau, w, lw, info);
}
void geqrf_t(cusolverDnHandle_t h, int m, int n, double* a, double* tau, double* w, int lw,
             int* info) {
  UNLOCK_CUSOLVER(cusolverDnDgeqrf, h, m, n, a, m, tau, w, lw, info);
}
void orgqr_t(cusolverDnHandle_t h, int m, int n, float* a, const float* tau, float* w, int lw,
             int* info) {
  UNLOCK_CUSOLVER(cusolverDnSorgqr, h, m, n, n, a, m, tau, w, lw, info);
}
void orgqr_t(cusolverDnHandle_t h, int m, int n, double* a, const double* tau, double* w, int lw,
             int* info) {
  UNLOCK_CUSOLVER(cusolverDnDorgqr, h, m, n, n, a, m, tau, w, lw, info);
}

constexpr cusolverEigMode_t kVectors = CUSOLVER_EIG_MODE_VECTOR;
constexpr cublasFillMode_t kLower = CUBLAS_FILL_MODE_LOWER;

int syevd_size(cusolverDnHandle_t h, int n, float*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnSsyevd_bufferSize, h, kVectors, kLower, n, nullptr, n, nullptr, &lw);
  return lw;
}
int syevd_size(cusolverDnHandle_t h, int n, double*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnDsyevd_bufferSize, h, kVectors, kLower, n, nullptr, n, nullptr, &lw);
  return lw;
}
void syevd_t(cusolverDnHandle_t h, int n, float* a, float* w, float* work, int lw, int* info) {
  UNLOCK_CUSOLVER(cusolverDnSsyevd, h, kVectors, kLower, n, a, n, w, work, lw, info);
}
void syevd_t(cusolverDnHandle_t h, int n, double* a, double* w, double* work, int lw, int* info) {
  UNLOCK_CUSOLVER(cusolverDnDsyevd, h, kVectors, kLower, n, a, n, w, work, lw, info);
}

int gesvd_size(cusolverDnHandle_t h, int m, int n, float*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnSgesvd_bufferSize, h, m, n, &lw);
  return lw;
}
int gesvd_size(cusolverDnHandle_t h, int m, int n, double*) {
  int lw = 0;
  UNLOCK_CUSOLVER(cusolverDnDgesvd_bufferSize, h, m, n, &lw);
  return lw;
}
// Thin SVD of a [m, n], m >= n: u [m, n], vt [n, n].
void gesvd_t(cusolverDnHandle_t h, int m, int n, float* a, float* s, float* u, float* vt,
             float* w, int lw, int* info) {
  UNLOCK_CUSOLVER(cusolverDnSgesvd, h, 'S', 'S', m, n, a, m, s, u, m, vt, n, w, lw, nullptr,
                  info);
}
void gesvd_t(cusolverDnHandle_t h, int m, int n, double* a, double* s, double* u, double* vt,
             double* w, int lw, int* info) {
  UNLOCK_CUSOLVER(cusolverDnDgesvd, h, 'S', 'S', m, n, a, m, s, u, m, vt, n, w, lw, nullptr,
                  info);
}

int to_int(int64_t v) { return static_cast<int>(v); }

// ---- the primitives of rsvd.h ------------------------------------------------------------------

template <class T>
class CudaOps {
 public:
  explicit CudaOps(cudaStream_t stream)
      : stream_(stream),
        blas_(cuda::cublas_handle(stream)),
        solver_(cuda::cusolver_handle(stream)) {}

  void set_scratch(int64_t lwork, int64_t) { lwork_ = to_int(lwork); }
  // cuSOLVER's status words (kInfoInts ints, see keep_info_kernel), cleared here.
  void set_info(int* info) {
    info_ = info;
    UNLOCK_CUDA_CHECK(cudaMemsetAsync(info, 0, kInfoInts * sizeof(int), stream_));
  }
  // Raise, as the CPU backend does, when any cuSOLVER call failed or did not converge. Reads
  // the status on the host: one synchronisation of the stream per decomposition.
  void check_info() {
    int host[kInfoInts] = {0, 0, 0};
    UNLOCK_CUDA_CHECK(cudaMemcpyAsync(host, info_, sizeof(host), cudaMemcpyDeviceToHost, stream_));
    UNLOCK_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int v = host[1];
    const std::string routine = kRoutines[host[2]];
    UNLOCK_CHECK(v >= 0, routine + ": invalid argument " + std::to_string(-v));
    UNLOCK_CHECK(v == 0, routine + " did not converge (info " + std::to_string(v) +
                             "); does the input hold NaN or Inf?");
  }

  // -- scratch sizes (cuSOLVER buffer queries) --
  int64_t lu_work(int64_t m, int64_t n) {
    return getrf_size(solver_, to_int(m), to_int(n), static_cast<T*>(nullptr));
  }
  int64_t qr_work(int64_t m, int64_t n) {
    return std::max(geqrf_size(solver_, to_int(m), to_int(n), static_cast<T*>(nullptr)),
                    orgqr_size(solver_, to_int(m), to_int(n), static_cast<T*>(nullptr)));
  }
  int64_t syevd_work(int64_t n) {
    return syevd_size(solver_, to_int(n), static_cast<T*>(nullptr));
  }
  int64_t syevd_iwork(int64_t) { return kInfoInts; }
  int64_t eig_top_w(int64_t d, int64_t) { return d; }
  int64_t eig_top_z(int64_t, int64_t) { return 0; }  // eigenvectors stay in the input copy
  int64_t eig_top_work(int64_t d, int64_t) { return syevd_work(d); }
  int64_t eig_top_iwork(int64_t, int64_t) { return kInfoInts; }
  int64_t svd_work(int64_t m, int64_t n) {
    return gesvd_size(solver_, to_int(m), to_int(n), static_cast<T*>(nullptr));
  }
  int64_t svd_iwork(int64_t, int64_t) { return kInfoInts; }

  // -- operations --
  void gaussian(T* x, int64_t count, uint64_t key) {
    gaussian_kernel<T><<<grid_for((count + 1) / 2), kThreads, 0, stream_>>>(x, count, key);
    UNLOCK_CUDA_LAUNCHED("gaussian_kernel");
  }

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
            const T* b, int64_t ldb, T* c, int64_t ldc) {
    const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    gemm_t(blas_, opa, opb, to_int(m), to_int(n), to_int(k), a, to_int(lda), b, to_int(ldb), c,
           to_int(ldc));
  }

  void lu_basis(T* y, int64_t m, int64_t n, int* ipiv, T* work) {
    getrf_t(solver_, to_int(m), to_int(n), y, work, ipiv, info_);
    keep_info(kGetrf);
    lu_basis_kernel<T><<<grid_for(n), kThreads, 0, stream_>>>(y, m, n, ipiv);
    UNLOCK_CUDA_LAUNCHED("lu_basis_kernel");
  }

  void qr_q(T* y, int64_t m, int64_t n, T* tau, T* work, T* r) {
    geqrf_t(solver_, to_int(m), to_int(n), y, tau, work, lwork_, info_);
    keep_info(kGeqrf);
    if (r) {
      upper_kernel<T><<<grid_for(n * n), kThreads, 0, stream_>>>(y, m, n, r);
      UNLOCK_CUDA_LAUNCHED("upper_kernel");
    }
    orgqr_t(solver_, to_int(m), to_int(n), y, tau, work, lwork_, info_);
    keep_info(kOrgqr);
  }

  void syevd(T* b, int64_t n, T* w, T* work, int*) {
    syevd_t(solver_, to_int(n), b, w, work, lwork_, info_);
    keep_info(kSyevd);
  }

  RsvdEigTop<T> eig_top(T* a, int64_t d, int64_t k, T* w, T*, T* work, int* iwork) {
    syevd(a, d, w, work, iwork);
    return {w + (d - k), a + (d - k) * d, d};
  }

  void svd(T* a, int64_t m, int64_t n, T* s, T* u, T* vt, T* work, int*) {
    gesvd_t(solver_, to_int(m), to_int(n), a, s, u, vt, work, lwork_, info_);
    keep_info(kGesvd);
  }

  void copy(int64_t rows, int64_t cols, const T* src, int64_t src_rs, int64_t src_cs, T* dst,
            int64_t dst_rs, int64_t dst_cs) {
    copy_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream_>>>(rows, cols, src, src_rs, src_cs,
                                                                    dst, dst_rs, dst_cs);
    UNLOCK_CUDA_LAUNCHED("copy_kernel");
  }

  void symmetrize_lower(T* b, int64_t n) {
    symmetrize_lower_kernel<T><<<grid_for(n * n), kThreads, 0, stream_>>>(b, n);
    UNLOCK_CUDA_LAUNCHED("symmetrize_lower_kernel");
  }

  void fix_signs(T* u, int64_t rows, int64_t k, T* vh, int64_t vh_cols) {
    fix_signs_kernel<T><<<static_cast<unsigned>(k), kSignThreads, 0, stream_>>>(u, rows, k, vh,
                                                                               vh_cols);
    UNLOCK_CUDA_LAUNCHED("fix_signs_kernel");
  }

 private:
  void keep_info(Routine routine) {
    keep_info_kernel<<<1, 1, 0, stream_>>>(info_, routine);
    UNLOCK_CUDA_LAUNCHED("keep_info_kernel");
  }

  cudaStream_t stream_;
  cublasHandle_t blas_;
  cusolverDnHandle_t solver_;
  int lwork_ = 0;
  int* info_ = nullptr;
};

RsvdPlan cuda_plan(const RsvdArgs& a, bool symmetric) {
  return rsvd_plan(symmetric, a.rows, a.cols, a.k, a.oversample, a.n_iter, a.method,
                   kRsvdCudaDenseFactor);
}

template <class T>
std::size_t eigh_workspace(const RsvdArgs& a) {
  CudaOps<T> ops(nullptr);
  return rsvd_eigh_buffers<T>(ops, a, cuda_plan(a, true), nullptr).bytes;
}

template <class T>
void eigh(const RsvdArgs& a, cudaStream_t stream) {
  CudaOps<T> ops(stream);
  const auto s = rsvd_eigh_buffers<T>(ops, a, cuda_plan(a, true), a.workspace);
  UNLOCK_CHECK_ARG(a.workspace && s.bytes <= a.workspace_bytes,
                   "eigh_topk: workspace too small, need " + std::to_string(s.bytes) + " bytes");
  ops.set_scratch(s.lwork, s.liwork);
  ops.set_info(s.iwork);  // no LAPACK step of the CUDA backend uses an integer workspace
  rsvd_eigh_run<T>(ops, a, s);
  ops.check_info();
}

template <class T>
std::size_t svd_workspace(const RsvdArgs& a) {
  CudaOps<T> ops(nullptr);
  return rsvd_svd_buffers<T>(ops, a, cuda_plan(a, false), nullptr).bytes;
}

template <class T>
void svd(const RsvdArgs& a, cudaStream_t stream) {
  CudaOps<T> ops(stream);
  const auto s = rsvd_svd_buffers<T>(ops, a, cuda_plan(a, false), a.workspace);
  UNLOCK_CHECK_ARG(a.workspace && s.bytes <= a.workspace_bytes,
                   "svd_topk: workspace too small, need " + std::to_string(s.bytes) + " bytes");
  ops.set_scratch(s.lwork, s.liwork);
  ops.set_info(s.iwork);
  rsvd_svd_run<T>(ops, a, s);
  ops.check_info();
}

}  // namespace

std::size_t rsvd_eigh_workspace_cuda(const RsvdArgs& a, int device) {
  rsvd_check_args(a, true, false);
  cuda::DeviceGuard guard(device);
  return a.dtype == DType::kFloat64 ? eigh_workspace<double>(a) : eigh_workspace<float>(a);
}

void rsvd_eigh_cuda(const RsvdArgs& a, int device, std::uintptr_t stream) {
  rsvd_check_args(a, true, true);
  cuda::DeviceGuard guard(device);
  if (a.dtype == DType::kFloat64) {
    eigh<double>(a, cuda::as_stream(stream));
  } else {
    eigh<float>(a, cuda::as_stream(stream));
  }
}

std::size_t rsvd_svd_workspace_cuda(const RsvdArgs& a, int device) {
  rsvd_check_args(a, false, false);
  cuda::DeviceGuard guard(device);
  return a.dtype == DType::kFloat64 ? svd_workspace<double>(a) : svd_workspace<float>(a);
}

void rsvd_svd_cuda(const RsvdArgs& a, int device, std::uintptr_t stream) {
  rsvd_check_args(a, false, true);
  cuda::DeviceGuard guard(device);
  if (a.dtype == DType::kFloat64) {
    svd<double>(a, cuda::as_stream(stream));
  } else {
    svd<float>(a, cuda::as_stream(stream));
  }
}

}  // namespace unlock
