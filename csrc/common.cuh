// Device helpers shared by the megalite kernels: dtype conversion, vector
// loads, warp sums and the launch-size queries. No PyTorch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "megalite_kernels.h"

namespace megalite {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements loaded or stored as one (or, past 16 bytes, a few) wide accesses.
// Only used on pointers whose alignment the host checked.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Elements per 16-byte access for a storage type.
template <typename T> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

inline bool is_aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline size_t dtype_size(megalite_dtype d) { return d == MEGALITE_F32 ? 4 : 2; }

inline bool valid_dtype(megalite_dtype d) {
  return d == MEGALITE_F32 || d == MEGALITE_F16 || d == MEGALITE_BF16;
}

// Streaming multiprocessors of the current device: sizes grid-stride grids.
inline cudaError_t current_sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

inline int round_up(int64_t v, int multiple) {
  return static_cast<int>((v + multiple - 1) / multiple * multiple);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace megalite
