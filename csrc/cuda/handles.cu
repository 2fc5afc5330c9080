// Per-thread, per-device cuBLAS and cuSOLVER handles.
#include <unordered_map>

#include "unlock/cuda_utils.h"

namespace unlock::cuda {

cublasHandle_t cublas_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  int device = 0;
  UNLOCK_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasHandle_t h = nullptr;
    UNLOCK_CUBLAS(cublasCreate, &h);
    UNLOCK_CUBLAS(cublasSetMathMode, h, CUBLAS_DEFAULT_MATH);
    UNLOCK_CUBLAS(cublasSetPointerMode, h, CUBLAS_POINTER_MODE_HOST);
    it = handles.emplace(device, h).first;
  }
  UNLOCK_CUBLAS(cublasSetStream, it->second, stream);
  return it->second;
}

cusolverDnHandle_t cusolver_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  int device = 0;
  UNLOCK_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cusolverDnHandle_t h = nullptr;
    UNLOCK_CUSOLVER(cusolverDnCreate, &h);
    it = handles.emplace(device, h).first;
  }
  UNLOCK_CUSOLVER(cusolverDnSetStream, it->second, stream);
  return it->second;
}

}  // namespace unlock::cuda
