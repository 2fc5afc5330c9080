// CUDA helpers shared by the .cu sources: error checks and per-device library handles.
// Only CUDA sources include this header.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <string>

#include "unlock/common.h"

#define UNLOCK_CUDA_CHECK(expr)                                                       \
  do {                                                                                \
    const cudaError_t unlock_err_ = (expr);                                           \
    UNLOCK_CHECK(unlock_err_ == cudaSuccess,                                          \
                 std::string(#expr) + " failed: " + cudaGetErrorString(unlock_err_)); \
  } while (0)

#define UNLOCK_CUBLAS_CHECK(expr)                                                  \
  do {                                                                             \
    const cublasStatus_t unlock_st_ = (expr);                                      \
    UNLOCK_CHECK(unlock_st_ == CUBLAS_STATUS_SUCCESS,                              \
                 std::string(#expr) + " failed: " + cublasGetStatusString(unlock_st_)); \
  } while (0)

#define UNLOCK_CUSOLVER_CHECK(expr)                                             \
  do {                                                                          \
    const cusolverStatus_t unlock_st_ = (expr);                                 \
    UNLOCK_CHECK(unlock_st_ == CUSOLVER_STATUS_SUCCESS,                         \
                 std::string(#expr) + " failed with status " +                  \
                     std::to_string(static_cast<int>(unlock_st_)));             \
  } while (0)

namespace unlock::cuda {

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

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

// Handles are created once per (host thread, device), bound to `stream` on every call, and
// kept for the life of the process. cuBLAS runs in its default math mode (plain FP32, no
// TF32) with host-side scalars.
cublasHandle_t cublas_handle(cudaStream_t stream);
cusolverDnHandle_t cusolver_handle(cudaStream_t stream);

}  // namespace unlock::cuda
