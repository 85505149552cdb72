// Small helpers shared by the .cu files of the standalone library (internal header).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Return the error of a CUDA runtime call from the enclosing launcher.
#define SEPICO_RETURN_IF_ERROR(expr)              \
  do {                                            \
    const cudaError_t sepico_status_ = (expr);    \
    if (sepico_status_ != cudaSuccess) {          \
      return sepico_status_;                      \
    }                                             \
  } while (0)

// After a <<<...>>> launch: report a bad configuration (or an earlier sticky error).
#define SEPICO_RETURN_IF_LAUNCH_FAILED() SEPICO_RETURN_IF_ERROR(cudaGetLastError())

namespace sepico_ops {
namespace detail {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__host__ __device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Keep a grid within what one launch accepts and within a few waves of the device.
constexpr int64_t kMaxGridX = 65535LL * 64;

}  // namespace detail
}  // namespace sepico_ops
