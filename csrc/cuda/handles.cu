// cuBLAS and cuSOLVER handles, one per (thread, device, stream): a handle owns its workspace,
// so two streams never share one (rebinding a single handle to each caller's stream would let
// work on two streams race on it).
#include <map>
#include <utility>

#include "unlock/cuda_utils.h"

namespace unlock::cuda {
namespace {

using Key = std::pair<int, cudaStream_t>;

Key key_of(cudaStream_t stream) {
  int device = 0;
  UNLOCK_CUDA_CHECK(cudaGetDevice(&device));
  return {device, stream};
}

}  // namespace

cublasHandle_t cublas_handle(cudaStream_t stream) {
  thread_local std::map<Key, cublasHandle_t> handles;
  const Key key = key_of(stream);
  auto it = handles.find(key);
  if (it == handles.end()) {
    cublasHandle_t h = nullptr;
    UNLOCK_CUBLAS(cublasCreate, &h);
    UNLOCK_CUBLAS(cublasSetMathMode, h, CUBLAS_DEFAULT_MATH);
    UNLOCK_CUBLAS(cublasSetPointerMode, h, CUBLAS_POINTER_MODE_HOST);
    UNLOCK_CUBLAS(cublasSetStream, h, stream);
    it = handles.emplace(key, h).first;
  }
  return it->second;
}

cusolverDnHandle_t cusolver_handle(cudaStream_t stream) {
  thread_local std::map<Key, cusolverDnHandle_t> handles;
  const Key key = key_of(stream);
  auto it = handles.find(key);
  if (it == handles.end()) {
    cusolverDnHandle_t h = nullptr;
    UNLOCK_CUSOLVER(cusolverDnCreate, &h);
    UNLOCK_CUSOLVER(cusolverDnSetStream, h, stream);
    it = handles.emplace(key, h).first;
  }
  return it->second;
}

}  // namespace unlock::cuda
