// The only pybind11 file: exposes the CPU and CUDA entry points of the kernel core as
// `unlock_fast._core`. Arguments are raw addresses (int), shapes, strides in elements, dtype
// codes and, for CUDA, a device index and a stream handle. Validation of user input lives in
// unlock_fast/ops/; every entry point here still refuses, before it reads or writes anything,
// sizes and strides that are inconsistent on their own: negative or zero sizes where they are
// not allowed, negative strides, index arithmetic that overflows, written rows that alias each
// other and written buffers that overlap another buffer of the call (the *_check_args
// functions of the kernel headers, run by both backends). What they cannot know is the size
// of the caller's allocations.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "unlock/blas.h"
#include "unlock/common.h"
#include "unlock/moments.h"
#include "unlock/steer.h"
#if __has_include("unlock/rsvd.h")
#include "unlock/rsvd.h"
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;
using unlock::DType;

namespace {

template <class T>
T* as_ptr(std::uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

#if !UNLOCK_WITH_CUDA
[[noreturn]] void throw_no_cuda(const char* name) {
  throw std::runtime_error(std::string("unlock_fast: ") + name +
                           " needs the CUDA backend, but unlock_fast._core was built without it "
                           "(cuda_compiled is False); rebuild with UNLOCK_CUDA=ON on a machine "
                           "with nvcc");
}
#endif

// Bind a CUDA entry point; in a CPU-only build the name exists and raises an error that names
// the missing backend.
#if UNLOCK_WITH_CUDA
#define UNLOCK_DEF_CUDA(m, name, fn, ...) m.def(name, fn, __VA_ARGS__)
#else
#define UNLOCK_DEF_CUDA(m, name, fn, ...) \
  m.def(name, [](py::args, py::kwargs) { throw_no_cuda(name); })
#endif

unlock::MomentsArgs moments_args(int64_t n, int64_t dx, int64_t dy, std::uintptr_t x,
                                 int x_dtype, int64_t x_s0, int64_t x_s1, std::uintptr_t y,
                                 int y_dtype, int64_t y_s0, int64_t y_s1, std::uintptr_t weight,
                                 int64_t weight_stride, std::uintptr_t shift_x,
                                 std::uintptr_t shift_y, std::uintptr_t sum_x,
                                 std::uintptr_t sum_y, std::uintptr_t gram_xx,
                                 std::uintptr_t gram_yy, std::uintptr_t gram_xy, bool upper_only,
                                 int gemm) {
  unlock::MomentsArgs a;
  a.n = n;
  a.dx = dx;
  a.dy = dy;
  a.x = {as_ptr<const void>(x), unlock::dtype_from_code(x_dtype), x_s0, x_s1};
  if (dy > 0) a.y = {as_ptr<const void>(y), unlock::dtype_from_code(y_dtype), y_s0, y_s1};
  a.weight = as_ptr<const float>(weight);
  a.weight_stride = weight_stride;
  a.shift_x = as_ptr<const float>(shift_x);
  a.shift_y = as_ptr<const float>(shift_y);
  a.sum_x = as_ptr<float>(sum_x);
  a.sum_y = as_ptr<float>(sum_y);
  a.gram_xx = as_ptr<float>(gram_xx);
  a.gram_yy = as_ptr<float>(gram_yy);
  a.gram_xy = as_ptr<float>(gram_xy);
  a.upper_only = upper_only;
  UNLOCK_CHECK_ARG(gemm >= 0 && gemm <= 2,
                   "moments: precision code must be 0 (fp32), 1 (tf32) or 2 (half), got " +
                       std::to_string(gemm));
  a.gemm = static_cast<unlock::MomentsGemm>(gemm);
  return a;
}

unlock::SteerArgs steer_args(std::uintptr_t hidden, int dtype, int64_t batch, int64_t seq,
                             int64_t dim, int64_t stride_b, int64_t stride_s,
                             std::uintptr_t positions, std::uintptr_t mask, int64_t mask_stride_b,
                             int64_t mask_stride_s, std::uintptr_t vector,
                             int64_t vector_stride_b, float alpha, int mode) {
  UNLOCK_CHECK_ARG(mode == 0 || mode == 1, "steer: mode code must be 0 (rotate) or 1 (add)");
  unlock::SteerArgs a;
  a.hidden = as_ptr<void>(hidden);
  a.dtype = unlock::dtype_from_code(dtype);
  a.batch = batch;
  a.seq = seq;
  a.dim = dim;
  a.stride_b = stride_b;
  a.stride_s = stride_s;
  a.positions = as_ptr<const int64_t>(positions);
  a.mask = as_ptr<const bool>(mask);
  a.mask_stride_b = mask_stride_b;
  a.mask_stride_s = mask_stride_s;
  a.vector = as_ptr<const float>(vector);
  a.vector_stride_b = vector_stride_b;
  a.alpha = alpha;
  a.mode = static_cast<unlock::SteerMode>(mode);
  return a;
}

unlock::SteerTokensArgs steer_tokens_args(std::uintptr_t hidden, std::uintptr_t residual,
                                           int dtype, int64_t rows, int64_t dim,
                                           int64_t hidden_stride, int64_t residual_stride,
                                           std::uintptr_t table, int64_t num_slots,
                                           int64_t layers, int64_t layer, std::uintptr_t slots,
                                           std::uintptr_t alphas, std::uintptr_t modes) {
  unlock::SteerTokensArgs a;
  a.hidden = as_ptr<void>(hidden);
  a.residual = as_ptr<void>(residual);
  a.dtype = unlock::dtype_from_code(dtype);
  a.rows = rows;
  a.dim = dim;
  a.hidden_stride = hidden_stride;
  a.residual_stride = residual_stride;
  a.table = as_ptr<const float>(table);
  a.num_slots = num_slots;
  a.layers = layers;
  a.layer = layer;
  a.slots = as_ptr<const int32_t>(slots);
  a.alphas = as_ptr<const float>(alphas);
  a.modes = as_ptr<const uint8_t>(modes);
  return a;
}

#define UNLOCK_MOMENTS_ARGS                                                                  \
  int64_t n, int64_t dx, int64_t dy, std::uintptr_t x, int x_dtype, int64_t x_s0,            \
      int64_t x_s1, std::uintptr_t y, int y_dtype, int64_t y_s0, int64_t y_s1,               \
      std::uintptr_t weight, int64_t weight_stride, std::uintptr_t shift_x,                  \
      std::uintptr_t shift_y, std::uintptr_t sum_x, std::uintptr_t sum_y,                    \
      std::uintptr_t gram_xx, std::uintptr_t gram_yy, std::uintptr_t gram_xy, bool upper_only, \
      int gemm
#define UNLOCK_MOMENTS_CALL                                                                  \
  moments_args(n, dx, dy, x, x_dtype, x_s0, x_s1, y, y_dtype, y_s0, y_s1, weight,            \
               weight_stride, shift_x, shift_y, sum_x, sum_y, gram_xx, gram_yy, gram_xy,     \
               upper_only, gemm)
#define UNLOCK_MOMENTS_PYARGS                                                                \
  py::arg("n"), py::arg("dx"), py::arg("dy"), py::arg("x"), py::arg("x_dtype"),              \
      py::arg("x_s0"), py::arg("x_s1"), py::arg("y"), py::arg("y_dtype"), py::arg("y_s0"),   \
      py::arg("y_s1"), py::arg("weight"), py::arg("weight_stride"), py::arg("shift_x"),      \
      py::arg("shift_y"), py::arg("sum_x"), py::arg("sum_y"), py::arg("gram_xx"),            \
      py::arg("gram_yy"), py::arg("gram_xy"), py::arg("upper_only"), py::arg("gemm") = 0

#define UNLOCK_STEER_ARGS                                                                    \
  std::uintptr_t hidden, int dtype, int64_t batch, int64_t seq, int64_t dim,                 \
      int64_t stride_b, int64_t stride_s, std::uintptr_t positions, std::uintptr_t mask,     \
      int64_t mask_stride_b, int64_t mask_stride_s, std::uintptr_t vector,                   \
      int64_t vector_stride_b, float alpha, int mode
#define UNLOCK_STEER_CALL                                                                    \
  steer_args(hidden, dtype, batch, seq, dim, stride_b, stride_s, positions, mask,            \
             mask_stride_b, mask_stride_s, vector, vector_stride_b, alpha, mode)

#define UNLOCK_STEER_TOKENS_ARGS                                                             \
  std::uintptr_t hidden, std::uintptr_t residual, int dtype, int64_t rows, int64_t dim,      \
      int64_t hidden_stride, int64_t residual_stride, std::uintptr_t table,                  \
      int64_t num_slots, int64_t layers, int64_t layer, std::uintptr_t slots,                \
      std::uintptr_t alphas, std::uintptr_t modes
#define UNLOCK_STEER_TOKENS_CALL                                                             \
  steer_tokens_args(hidden, residual, dtype, rows, dim, hidden_stride, residual_stride,      \
                    table, num_slots, layers, layer, slots, alphas, modes)

void moments_cpu(UNLOCK_MOMENTS_ARGS) { unlock::moments_accumulate_cpu(UNLOCK_MOMENTS_CALL); }

void steer_cpu(UNLOCK_STEER_ARGS) { unlock::steer_cpu(UNLOCK_STEER_CALL); }

void steer_tokens_cpu(UNLOCK_STEER_TOKENS_ARGS) {
  unlock::steer_tokens_cpu(UNLOCK_STEER_TOKENS_CALL);
}

#if UNLOCK_WITH_CUDA
void steer_tokens_cuda(UNLOCK_STEER_TOKENS_ARGS, int device, std::uintptr_t stream) {
  unlock::steer_tokens_cuda(UNLOCK_STEER_TOKENS_CALL, device, stream);
}

void moments_cuda(UNLOCK_MOMENTS_ARGS, int device, std::uintptr_t workspace,
                  int64_t workspace_floats, std::uintptr_t stream) {
  unlock::moments_accumulate_cuda(UNLOCK_MOMENTS_CALL, device, as_ptr<float>(workspace),
                                  workspace_floats, stream);
}

void steer_cuda(UNLOCK_STEER_ARGS, int device, std::uintptr_t stream) {
  unlock::steer_cuda(UNLOCK_STEER_CALL, device, stream);
}
#endif

int num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
  UNLOCK_CHECK_ARG(n >= 1, "set_num_threads: n must be >= 1, got " + std::to_string(n));
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
  openblas_set_num_threads(n);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "unlock_fast kernel core (CPU backend always; CUDA backend when compiled)";

  // ---- build information ----------------------------------------------------------------
  m.attr("cuda_compiled") = py::bool_(UNLOCK_WITH_CUDA != 0);
  m.attr("cuda_architectures") = py::str(UNLOCK_CUDA_ARCHITECTURES);
#if defined(_OPENMP)
  m.attr("openmp") = py::bool_(true);
#else
  m.attr("openmp") = py::bool_(false);
#endif
  m.attr("blas") = py::str(std::string("scipy-openblas32: ") + openblas_get_config());
  m.def("num_threads", &num_threads, "Threads of the CPU backend's OpenMP loops.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the threads of the CPU backend (OpenMP loops and OpenBLAS).");

  // ---- streaming moments ------------------------------------------------------------------
  m.def("moments_accumulate_cpu", &moments_cpu, UNLOCK_MOMENTS_PYARGS,
        py::call_guard<py::gil_scoped_release>());
  UNLOCK_DEF_CUDA(m, "moments_accumulate_cuda", &moments_cuda, UNLOCK_MOMENTS_PYARGS,
                  py::arg("device"), py::arg("workspace"), py::arg("workspace_floats"),
                  py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  // ---- residual steering ------------------------------------------------------------------
  m.def("steer_cpu", &steer_cpu, py::call_guard<py::gil_scoped_release>());
  UNLOCK_DEF_CUDA(m, "steer_cuda", &steer_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("steer_tokens_cpu", &steer_tokens_cpu, py::call_guard<py::gil_scoped_release>());
  UNLOCK_DEF_CUDA(m, "steer_tokens_cuda", &steer_tokens_cuda,
                  py::call_guard<py::gil_scoped_release>());

  // ---- randomized eigensolver / SVD (rsvd) ------------------------------------------------
  // BEGIN rsvd bindings: bind the functions declared in csrc/include/unlock/rsvd.h here,
  // CPU entry points with m.def and CUDA ones with UNLOCK_DEF_CUDA.
  {
    struct Rsvd {
      static unlock::RsvdArgs args(std::uintptr_t input, int64_t rows, int64_t cols, int64_t k,
                                   int64_t oversample, int64_t n_iter, uint64_t seed,
                                   int dtype, int method) {
        UNLOCK_CHECK_ARG(method >= 0 && method <= 2,
                         "rsvd: method code must be 0 (auto), 1 (randomized) or 2 (exact)");
        unlock::RsvdArgs a;
        a.input = as_ptr<const void>(input);
        a.rows = rows;
        a.cols = cols;
        a.k = k;
        a.oversample = oversample;
        a.n_iter = n_iter;
        a.seed = seed;
        a.dtype = unlock::dtype_from_code(dtype);
        a.method = static_cast<unlock::RsvdMethod>(method);
        return a;
      }
      static unlock::RsvdArgs with_buffers(unlock::RsvdArgs a, std::uintptr_t values,
                                           std::uintptr_t left, std::uintptr_t right,
                                           std::uintptr_t workspace,
                                           std::size_t workspace_bytes) {
        a.values = as_ptr<void>(values);
        a.left = as_ptr<void>(left);
        a.right = as_ptr<void>(right);
        a.workspace = as_ptr<void>(workspace);
        a.workspace_bytes = workspace_bytes;
        return a;
      }
    };

    m.def(
        "rsvd_plan",
        [](bool symmetric, int64_t rows, int64_t cols, int64_t k, int64_t oversample,
           int64_t n_iter, int method, bool cuda) {
          const auto a = Rsvd::args(0, rows, cols, k, oversample, n_iter, 0, 0, method);
          unlock::rsvd_check_args(a, symmetric, false);
          const auto p = unlock::rsvd_plan(
              symmetric, rows, cols, k, oversample, n_iter, a.method,
              cuda ? unlock::kRsvdCudaDenseFactor : unlock::kRsvdCpuDenseFactor);
          return py::make_tuple(p.l, p.exact);
        },
        py::arg("symmetric"), py::arg("rows"), py::arg("cols"), py::arg("k"),
        py::arg("oversample"), py::arg("n_iter"), py::arg("method"), py::arg("cuda"),
        "(sketch width l, dense path?) that eigh/svd would use on the given backend.");

    m.def(
        "rsvd_eigh_workspace_cpu",
        [](int64_t d, int64_t k, int64_t oversample, int64_t n_iter, int dtype, int method) {
          return unlock::rsvd_eigh_workspace_cpu(
              Rsvd::args(0, d, d, k, oversample, n_iter, 0, dtype, method));
        },
        py::arg("d"), py::arg("k"), py::arg("oversample"), py::arg("n_iter"), py::arg("dtype"),
        py::arg("method"));
    m.def(
        "rsvd_eigh_cpu",
        [](std::uintptr_t a, int64_t d, int64_t k, int64_t oversample, int64_t n_iter,
           uint64_t seed, int dtype, int method, std::uintptr_t values, std::uintptr_t vectors,
           std::uintptr_t workspace, std::size_t workspace_bytes) {
          unlock::rsvd_eigh_cpu(
              Rsvd::with_buffers(Rsvd::args(a, d, d, k, oversample, n_iter, seed, dtype, method),
                                 values, vectors, 0, workspace, workspace_bytes));
        },
        py::arg("a"), py::arg("d"), py::arg("k"), py::arg("oversample"), py::arg("n_iter"),
        py::arg("seed"), py::arg("dtype"), py::arg("method"), py::arg("values"),
        py::arg("vectors"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "rsvd_svd_workspace_cpu",
        [](int64_t rows, int64_t cols, int64_t k, int64_t oversample, int64_t n_iter, int dtype,
           int method) {
          return unlock::rsvd_svd_workspace_cpu(
              Rsvd::args(0, rows, cols, k, oversample, n_iter, 0, dtype, method));
        },
        py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("oversample"),
        py::arg("n_iter"), py::arg("dtype"), py::arg("method"));
    m.def(
        "rsvd_svd_cpu",
        [](std::uintptr_t mat, int64_t rows, int64_t cols, int64_t k, int64_t oversample,
           int64_t n_iter, uint64_t seed, int dtype, int method, std::uintptr_t u,
           std::uintptr_t s, std::uintptr_t vh, std::uintptr_t workspace,
           std::size_t workspace_bytes) {
          unlock::rsvd_svd_cpu(Rsvd::with_buffers(
              Rsvd::args(mat, rows, cols, k, oversample, n_iter, seed, dtype, method), s, u, vh,
              workspace, workspace_bytes));
        },
        py::arg("m"), py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("oversample"),
        py::arg("n_iter"), py::arg("seed"), py::arg("dtype"), py::arg("method"), py::arg("u"),
        py::arg("s"), py::arg("vh"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::call_guard<py::gil_scoped_release>());

#if UNLOCK_WITH_CUDA
    m.def(
        "rsvd_eigh_workspace_cuda",
        [](int64_t d, int64_t k, int64_t oversample, int64_t n_iter, int dtype, int method,
           int device) {
          return unlock::rsvd_eigh_workspace_cuda(
              Rsvd::args(0, d, d, k, oversample, n_iter, 0, dtype, method), device);
        },
        py::arg("d"), py::arg("k"), py::arg("oversample"), py::arg("n_iter"), py::arg("dtype"),
        py::arg("method"), py::arg("device"));
    m.def(
        "rsvd_eigh_cuda",
        [](std::uintptr_t a, int64_t d, int64_t k, int64_t oversample, int64_t n_iter,
           uint64_t seed, int dtype, int method, std::uintptr_t values, std::uintptr_t vectors,
           std::uintptr_t workspace, std::size_t workspace_bytes, int device,
           std::uintptr_t stream) {
          unlock::rsvd_eigh_cuda(
              Rsvd::with_buffers(Rsvd::args(a, d, d, k, oversample, n_iter, seed, dtype, method),
                                 values, vectors, 0, workspace, workspace_bytes),
              device, stream);
        },
        py::arg("a"), py::arg("d"), py::arg("k"), py::arg("oversample"), py::arg("n_iter"),
        py::arg("seed"), py::arg("dtype"), py::arg("method"), py::arg("values"),
        py::arg("vectors"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
    m.def(
        "rsvd_svd_workspace_cuda",
        [](int64_t rows, int64_t cols, int64_t k, int64_t oversample, int64_t n_iter, int dtype,
           int method, int device) {
          return unlock::rsvd_svd_workspace_cuda(
              Rsvd::args(0, rows, cols, k, oversample, n_iter, 0, dtype, method), device);
        },
        py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("oversample"),
        py::arg("n_iter"), py::arg("dtype"), py::arg("method"), py::arg("device"));
    m.def(
        "rsvd_svd_cuda",
        [](std::uintptr_t mat, int64_t rows, int64_t cols, int64_t k, int64_t oversample,
           int64_t n_iter, uint64_t seed, int dtype, int method, std::uintptr_t u,
           std::uintptr_t s, std::uintptr_t vh, std::uintptr_t workspace,
           std::size_t workspace_bytes, int device, std::uintptr_t stream) {
          unlock::rsvd_svd_cuda(
              Rsvd::with_buffers(
                  Rsvd::args(mat, rows, cols, k, oversample, n_iter, seed, dtype, method), s, u,
                  vh, workspace, workspace_bytes),
              device, stream);
        },
        py::arg("m"), py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("oversample"),
        py::arg("n_iter"), py::arg("seed"), py::arg("dtype"), py::arg("method"), py::arg("u"),
        py::arg("s"), py::arg("vh"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
#else
    for (const char* name : {"rsvd_eigh_workspace_cuda", "rsvd_eigh_cuda",
                             "rsvd_svd_workspace_cuda", "rsvd_svd_cuda"}) {
      m.def(name, [name](py::args, py::kwargs) { throw_no_cuda(name); });
    }
#endif
  }
  // END rsvd bindings
}
