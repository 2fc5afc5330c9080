// CUDA helpers shared by the .cu sources: error checks and per-device library handles.
// Only CUDA sources include this header.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "unlock/common.h"

#define UNLOCK_CUDA_CHECK(expr)                                                       \
  do {                                                                                \
    const cudaError_t unlock_err_ = (expr);                                           \
    UNLOCK_CHECK(unlock_err_ == cudaSuccess,                                          \
                 std::string(#expr) + " failed: " + cudaGetErrorString(unlock_err_)); \
  } while (0)

// Call a cuBLAS / cuSOLVER function and raise std::runtime_error (RuntimeError in Python),
// naming the function and its status, unless it succeeds:
//   UNLOCK_CUBLAS(cublasSgemm, handle, ...);   UNLOCK_CUSOLVER(cusolverDnSsyevd, handle, ...);
#define UNLOCK_CUBLAS(fn, ...) ::unlock::cuda::check_cublas(fn(__VA_ARGS__), #fn)
#define UNLOCK_CUSOLVER(fn, ...) ::unlock::cuda::check_cusolver(fn(__VA_ARGS__), #fn)

// After a kernel launch: raise, naming the kernel, if the launch failed.
#define UNLOCK_CUDA_LAUNCHED(kernel) ::unlock::cuda::check_launch(kernel)

namespace unlock::cuda {

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline void check_cublas(cublasStatus_t status, const char* fn) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string("unlock_fast: ") + fn + " failed with " +
                           cublasGetStatusName(status) + " (" + cublasGetStatusString(status) +
                           ")");
}

inline const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_ZERO_PIVOT: return "CUSOLVER_STATUS_ZERO_PIVOT";
    case CUSOLVER_STATUS_INVALID_LICENSE: return "CUSOLVER_STATUS_INVALID_LICENSE";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default: return nullptr;
  }
}

inline void check_cusolver(cusolverStatus_t status, const char* fn) {
  if (status == CUSOLVER_STATUS_SUCCESS) return;
  const char* name = cusolver_status_name(status);
  throw std::runtime_error(std::string("unlock_fast: ") + fn + " failed with " +
                           (name ? std::string(name)
                                 : "cuSOLVER status " + std::to_string(static_cast<int>(status))));
}

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("unlock_fast: launching ") + kernel + " failed: " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// Makes `device` current for the scope and restores the caller's device after, so that a
// call on cuda:1 leaves torch's current device as it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    UNLOCK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) UNLOCK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Handles are created once per (host thread, device, stream), bound to that stream, and kept
// for the life of the process: a handle's workspace is never shared between streams. cuBLAS runs in its default math mode (plain FP32, no
// TF32) with host-side scalars.
cublasHandle_t cublas_handle(cudaStream_t stream);
cusolverDnHandle_t cusolver_handle(cudaStream_t stream);

}  // namespace unlock::cuda
