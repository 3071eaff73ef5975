// Rotary position embedding, forward and backward, on contiguous
// [seq, batch * heads, head_dim] rows (any q or kv head count: one call per
// tensor). The backward of a rotation is the rotation by -angle, so both
// directions are one kernel with a sign on sin.
//
// Arithmetic uses __fmul_rn/__fadd_rn/__fsub_rn (no fused multiply-add) so
// each output is rounded exactly like the PyTorch twin's separate
// multiplies and subtraction; fp16/bf16 results are then rounded once.
//
// Thread mapping: blockDim.x threads walk the work items of one row,
// blockDim.y rows per block, blocks grid-stride over rows. A work item is
// N = 16 / sizeof(T) features when every item is aligned: for rotate-half
// the item holds features [e, e+N) and its partners [e+half, e+half+N), for
// interleaved N/2 adjacent (2i, 2i+1) pairs; past rot_dim an item is a copy.
// Otherwise (N = 1) each thread computes one feature from it and its partner.
#include "common.cuh"

namespace megalite {
namespace {

constexpr int kBlockThreads = 256;

__device__ __forceinline__ float rot_minus(float a, float c, float b, float s) {  // a*c - b*s
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}

__device__ __forceinline__ float rot_plus(float a, float c, float b, float s) {  // a*c + b*s
  return __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}

template <typename T, int N>
__global__ void __launch_bounds__(kBlockThreads)
rotary_vec_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                  T* __restrict__ out, int64_t rows, int64_t batch_heads, int head_dim, int rot_dim,
                  bool interleaved, float sign) {
  const int half = rot_dim / 2;
  const int rot_items = (interleaved ? rot_dim : half) / N;
  const int items = rot_items + (head_dim - rot_dim) / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const int64_t off = row * head_dim;
    const float* c = cos + (row / batch_heads) * half;  // the row's position in the sequence
    const float* s = sin + (row / batch_heads) * half;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      if (it >= rot_items) {  // pass-through features of partial rotary
        const int64_t e = rot_dim + static_cast<int64_t>(it - rot_items) * N;
        store_vec<T, N>(out + off + e, load_vec<T, N>(x + off + e));
      } else if (interleaved) {
        const int e = it * N;
        const Vec<T, N> a = load_vec<T, N>(x + off + e);
        Vec<T, N> o;
#pragma unroll
        for (int j = 0; j < N; j += 2) {
          const int i = (e + j) / 2;
          const float ci = c[i], si = sign * s[i];
          const float x1 = to_float(a.v[j]), x2 = to_float(a.v[j + 1]);
          o.v[j] = from_float<T>(rot_minus(x1, ci, x2, si));
          o.v[j + 1] = from_float<T>(rot_plus(x2, ci, x1, si));
        }
        store_vec<T, N>(out + off + e, o);
      } else {
        const int e = it * N;
        const Vec<T, N> a = load_vec<T, N>(x + off + e);
        const Vec<T, N> b = load_vec<T, N>(x + off + e + half);
        Vec<T, N> o1, o2;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float ci = c[e + j], si = sign * s[e + j];
          const float x1 = to_float(a.v[j]), x2 = to_float(b.v[j]);
          o1.v[j] = from_float<T>(rot_minus(x1, ci, x2, si));
          o2.v[j] = from_float<T>(rot_plus(x2, ci, x1, si));
        }
        store_vec<T, N>(out + off + e, o1);
        store_vec<T, N>(out + off + e + half, o2);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
rotary_scalar_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                     T* __restrict__ out, int64_t rows, int64_t batch_heads, int head_dim, int rot_dim,
                     bool interleaved, float sign) {
  const int half = rot_dim / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const int64_t off = row * head_dim;
    const float* c = cos + (row / batch_heads) * half;
    const float* s = sin + (row / batch_heads) * half;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
      if (e >= rot_dim) {
        out[off + e] = x[off + e];
        continue;
      }
      // Pair (first, second) of this feature and which of the two it is.
      const bool second = interleaved ? (e & 1) != 0 : e >= half;
      const int i = interleaved ? e / 2 : (second ? e - half : e);
      const int partner = interleaved ? (e ^ 1) : (second ? e - half : e + half);
      const float ci = c[i], si = sign * s[i];
      const float xe = to_float(x[off + e]), xp = to_float(x[off + partner]);
      out[off + e] = from_float<T>(second ? rot_plus(xe, ci, xp, si) : rot_minus(xe, ci, xp, si));
    }
  }
}

template <typename T>
cudaError_t rotary_launch(const void* x_, const float* cos, const float* sin, void* out_, int64_t seq,
                          int64_t batch_heads, int head_dim, int rot_dim, bool interleaved, float sign,
                          cudaStream_t stream) {
  constexpr int W = vec_width<T>();
  const T* x = static_cast<const T*>(x_);
  T* out = static_cast<T*>(out_);
  const int rot_unit = interleaved ? rot_dim : rot_dim / 2;  // what an item must tile exactly
  const bool vec = head_dim % W == 0 && rot_unit % W == 0 && is_aligned(x, 16) && is_aligned(out, 16);
  const int items = vec ? (rot_unit + head_dim - rot_dim) / W : head_dim;
  int tx = 1;
  while (tx < items && tx < kBlockThreads) tx *= 2;  // threads along a row; rows fill the rest
  const dim3 block(tx, kBlockThreads / tx);
  const int64_t rows = seq * batch_heads;
  int sms = 0;
  const cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t needed = ceil_div(rows, block.y);
  const int64_t cap = static_cast<int64_t>(sms) * (2048 / kBlockThreads);
  const unsigned grid = static_cast<unsigned>(needed < cap ? needed : cap);
  if (vec)
    rotary_vec_kernel<T, W><<<grid, block, 0, stream>>>(x, cos, sin, out, rows, batch_heads, head_dim, rot_dim,
                                                       interleaved, sign);
  else
    rotary_scalar_kernel<T><<<grid, block, 0, stream>>>(x, cos, sin, out, rows, batch_heads, head_dim, rot_dim,
                                                       interleaved, sign);
  return cudaGetLastError();
}

}  // namespace
}  // namespace megalite

extern "C" cudaError_t megalite_rotary(const void* x, const float* cos, const float* sin, void* out,
                                       int64_t seq, int64_t batch_heads, int64_t head_dim, int64_t rot_dim,
                                       int interleaved, int conjugate, megalite_dtype dtype,
                                       cudaStream_t stream) {
  if (seq < 0 || batch_heads < 0 || head_dim <= 0 || head_dim > INT32_MAX || rot_dim <= 0 ||
      rot_dim % 2 != 0 || rot_dim > head_dim || !megalite::valid_dtype(dtype))
    return cudaErrorInvalidValue;
  if (seq == 0 || batch_heads == 0) return cudaSuccess;
  if (x == nullptr || out == nullptr || cos == nullptr || sin == nullptr) return cudaErrorInvalidValue;
  const float sign = conjugate ? -1.f : 1.f;
  const int hd = static_cast<int>(head_dim), rd = static_cast<int>(rot_dim);
  const bool il = interleaved != 0;
  switch (dtype) {
    case MEGALITE_F32:
      return megalite::rotary_launch<float>(x, cos, sin, out, seq, batch_heads, hd, rd, il, sign, stream);
    case MEGALITE_F16:
      return megalite::rotary_launch<__half>(x, cos, sin, out, seq, batch_heads, hd, rd, il, sign, stream);
    case MEGALITE_BF16:
      return megalite::rotary_launch<__nv_bfloat16>(x, cos, sin, out, seq, batch_heads, hd, rd, il, sign, stream);
  }
  return cudaErrorInvalidValue;
}
