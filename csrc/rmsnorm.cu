// RMSNorm forward and backward (input grad and two-stage weight grad).
//
// Layout: rows of `hidden` contiguous features. A row is handled by
// blockDim.x threads (a multiple of 32); a block holds blockDim.y rows so
// that small hidden sizes still fill a 256-thread block; blocks grid-stride
// over rows. Loads are 16-byte vectors when every row start is aligned
// (hidden % width == 0 and aligned base pointers), scalar otherwise. The
// weight is small and read through the cache with scalar loads. Rows are
// read twice (once for the sum of squares, once to scale): the second read
// is served from L1/L2 for any practical hidden size.
#include "common.cuh"

namespace megalite {
namespace {

constexpr int kFwdVecsPerThread = 4;  // forward/generic backward: aim for 4 vectors per thread per row
constexpr int kBwdVpt = 8;            // fused backward: vectors per thread whose dweight sums live in registers
constexpr int kBwdMaxTpr = 512;       // ... so a row fits when hidden / width <= 8 * 512
constexpr int kBlockThreads = 256;    // rows per block = kBlockThreads / threads per row (at least 1)
constexpr int kMaxPartials = 1024;    // cap on dweight partial rows (bounds the column reduce)
constexpr int kDwChunks = 256;        // partial rows of the large-hidden dweight kernel

// Sum of v over the blockDim.x threads sharing this row. Every thread of the
// block must call it (it synchronises when a row spans several warps).
// smem holds one float per warp of the block (at most 32).
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warps = static_cast<int>(blockDim.x >> 5);
  if (warps == 1) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* s = smem + threadIdx.y * warps;
  __syncthreads();  // readers of the previous call are done with smem
  if (lane == 0) s[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? s[lane] : 0.f);
}

template <typename T, typename Tw, int N>
__global__ void __launch_bounds__(1024)
rms_fwd_kernel(const T* __restrict__ x, const Tw* __restrict__ w, T* __restrict__ y,
               float* __restrict__ rstd, int64_t rows, int hidden, float eps) {
  __shared__ float smem[32];
  const int nvec = hidden / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // Every thread runs the same number of iterations: row_sum synchronises.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = (valid ? row : 0) * hidden;
    float ss = 0.f;
    if (valid) {
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Vec<T, N> a = load_vec<T, N>(x + off + static_cast<int64_t>(v) * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float f = to_float(a.v[j]);
          ss += f * f;
        }
      }
    }
    const float r = rsqrtf(row_sum(ss, smem) / static_cast<float>(hidden) + eps);
    if (!valid) continue;
    if (threadIdx.x == 0) rstd[row] = r;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t col = static_cast<int64_t>(v) * N;
      const Vec<T, N> a = load_vec<T, N>(x + off + col);
      Vec<T, N> o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float f = to_float(a.v[j]) * r;  // same order as the reference: (x * rstd) * w
        if (w != nullptr) f *= to_float(w[col + j]);
        o.v[j] = from_float<T>(f);
      }
      store_vec<T, N>(y + off + col, o);
    }
  }
}

// Loads one vector of x and dy as fp32, and g = dy * w (dy when there is no weight).
template <typename T, typename Tw, int N>
__device__ __forceinline__ void load_bwd(const T* x, const T* dy, const Tw* w, int64_t off, int64_t col,
                                         float (&xf)[N], float (&dyf)[N], float (&gf)[N]) {
  const Vec<T, N> a = load_vec<T, N>(x + off + col);
  const Vec<T, N> d = load_vec<T, N>(dy + off + col);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    xf[j] = to_float(a.v[j]);
    dyf[j] = to_float(d.v[j]);
    gf[j] = w != nullptr ? dyf[j] * to_float(w[col + j]) : dyf[j];
  }
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)), g = dy * w, for one vector.
template <typename T, int N>
__device__ __forceinline__ void store_dx(T* dx, int64_t off, int64_t col, const float (&xf)[N],
                                         const float (&gf)[N], float r, float c) {
  Vec<T, N> o;
#pragma unroll
  for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(r * (gf[j] - xf[j] * c));
  store_vec<T, N>(dx + off + col, o);
}

// Backward for rows whose vectors fit kBwdVpt per thread: dx, and this
// (block, row slot)'s dweight partial sums kept in registers across all its
// rows, written once at the end to partial[blockIdx.x * blockDim.y + threadIdx.y].
template <typename T, typename Tw, int N>
__global__ void __launch_bounds__(512)
rms_bwd_fused_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Tw* __restrict__ w,
                     const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ partial,
                     int64_t rows, int hidden) {
  __shared__ float smem[32];
  const int nvec = hidden / N;
  float acc[kBwdVpt][N];
#pragma unroll
  for (int k = 0; k < kBwdVpt; ++k)
#pragma unroll
    for (int j = 0; j < N; ++j) acc[k][j] = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = (valid ? row : 0) * hidden;
    const float r = valid ? rstd[row] : 0.f;
    float dot = 0.f;
    if (valid) {
#pragma unroll
      for (int k = 0; k < kBwdVpt; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v >= nvec) continue;
        float xf[N], dyf[N], gf[N];
        load_bwd<T, Tw, N>(x, dy, w, off, static_cast<int64_t>(v) * N, xf, dyf, gf);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          dot += gf[j] * xf[j];
          acc[k][j] += dyf[j] * (xf[j] * r);
        }
      }
    }
    dot = row_sum(dot, smem);
    if (!valid) continue;
    const float c = dot / static_cast<float>(hidden) * r * r;
#pragma unroll
    for (int k = 0; k < kBwdVpt; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v >= nvec) continue;
      float xf[N], dyf[N], gf[N];
      load_bwd<T, Tw, N>(x, dy, w, off, static_cast<int64_t>(v) * N, xf, dyf, gf);
      store_dx<T, N>(dx, off, static_cast<int64_t>(v) * N, xf, gf, r, c);
    }
  }
  if (partial == nullptr) return;
  float* out = partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * hidden;
#pragma unroll
  for (int k = 0; k < kBwdVpt; ++k) {
    const int v = threadIdx.x + k * blockDim.x;
    if (v >= nvec) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) out[static_cast<int64_t>(v) * N + j] = acc[k][j];
  }
}

// dx only, any hidden size (rows too wide for the fused kernel's registers).
template <typename T, typename Tw, int N>
__global__ void __launch_bounds__(1024)
rms_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Tw* __restrict__ w,
                  const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int hidden) {
  __shared__ float smem[32];
  const int nvec = hidden / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = (valid ? row : 0) * hidden;
    float dot = 0.f;
    if (valid) {
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float xf[N], dyf[N], gf[N];
        load_bwd<T, Tw, N>(x, dy, w, off, static_cast<int64_t>(v) * N, xf, dyf, gf);
#pragma unroll
        for (int j = 0; j < N; ++j) dot += gf[j] * xf[j];
      }
    }
    dot = row_sum(dot, smem);
    if (!valid) continue;
    const float r = rstd[row];
    const float c = dot / static_cast<float>(hidden) * r * r;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float xf[N], dyf[N], gf[N];
      load_bwd<T, Tw, N>(x, dy, w, off, static_cast<int64_t>(v) * N, xf, dyf, gf);
      store_dx<T, N>(dx, off, static_cast<int64_t>(v) * N, xf, gf, r, c);
    }
  }
}

// Stage one of dweight for wide rows: partial[c, col] = sum over rows
// c, c + gridDim.y, ... of dy * x * rstd. Threads run along columns (coalesced).
template <typename T>
__global__ void rms_dw_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                      const float* __restrict__ rstd, float* __restrict__ partial,
                                      int64_t rows, int hidden) {
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < hidden;
       col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
      const int64_t i = row * hidden + col;
      acc += to_float(dy[i]) * (to_float(x[i]) * rstd[row]);
    }
    partial[static_cast<int64_t>(blockIdx.y) * hidden + col] = acc;
  }
}

// Stage two: out[col] = sum over the partial rows. Block (32, 16): 32 columns
// read coalesced, 16 row lanes, summed through shared memory.
template <typename Tw>
__global__ void __launch_bounds__(512)
column_sum_kernel(const float* __restrict__ partial, Tw* __restrict__ out, int64_t parts, int hidden) {
  __shared__ float tile[16][33];
  for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * 32; col0 < hidden;
       col0 += static_cast<int64_t>(gridDim.x) * 32) {
    const int64_t col = col0 + threadIdx.x;
    float acc = 0.f;
    if (col < hidden)
      for (int64_t p = threadIdx.y; p < parts; p += blockDim.y) acc += partial[p * hidden + col];
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < hidden) {
      float s = 0.f;
      for (int i = 0; i < static_cast<int>(blockDim.y); ++i) s += tile[i][threadIdx.x];
      out[col] = from_float<Tw>(s);
    }
    __syncthreads();  // the tile is rewritten by the next column group
  }
}

// Launch geometry shared by the workspace query and the launch, so both agree.
struct BwdPlan {
  bool vec;             // 16-byte vectors
  bool fused;           // dx and dweight partials in one kernel
  dim3 block;
  unsigned grid;
  int64_t partial_rows; // rows of the fp32 workspace (0 without weight)
};

// Threads per row: a multiple of 32 covering nvec in about `per_thread` vectors each.
int threads_per_row(int64_t nvec, int per_thread, int max_tpr) {
  const int64_t want = round_up(ceil_div(nvec, per_thread), 32);
  return static_cast<int>(want < 32 ? 32 : (want > max_tpr ? max_tpr : want));
}

unsigned grid_for(int64_t rows, int rows_per_block, int threads, int sms, int threads_per_sm) {
  const int64_t needed = ceil_div(rows, rows_per_block);
  const int64_t per_sm = threads_per_sm / threads > 0 ? threads_per_sm / threads : 1;
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  return static_cast<unsigned>(needed < cap ? needed : cap);
}

cudaError_t plan_bwd(const void* dy, const void* x, const void* dx, int64_t rows, int64_t hidden,
                     bool has_weight, megalite_dtype xd, BwdPlan* p) {
  const int width = 16 / static_cast<int>(dtype_size(xd));
  p->vec = hidden % width == 0 && is_aligned(dy, 16) && is_aligned(x, 16) && is_aligned(dx, 16);
  const int64_t nvec = hidden / (p->vec ? width : 1);
  p->fused = ceil_div(nvec, kBwdVpt) <= kBwdMaxTpr;
  const int tpr = p->fused ? threads_per_row(nvec, kBwdVpt, kBwdMaxTpr)
                           : threads_per_row(nvec, kFwdVecsPerThread, 1024);
  const int rpb = tpr >= kBlockThreads ? 1 : kBlockThreads / tpr;
  p->block = dim3(tpr, rpb);
  int sms = 0;
  const cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  // The fused kernel holds up to 64 fp32 sums per thread: fewer, fuller
  // blocks also keep the partial buffer (and the column reduce) small.
  p->grid = grid_for(rows, rpb, tpr * rpb, sms, p->fused ? 512 : 2048);
  p->partial_rows = 0;
  if (has_weight && p->fused) {
    const unsigned cap = static_cast<unsigned>(kMaxPartials / rpb > 0 ? kMaxPartials / rpb : 1);
    if (p->grid > cap) p->grid = cap;
    p->partial_rows = static_cast<int64_t>(p->grid) * rpb;
  } else if (has_weight) {
    p->partial_rows = rows < kDwChunks ? rows : kDwChunks;
  }
  return cudaSuccess;
}

template <typename T, typename Tw>
cudaError_t fwd_launch(const void* x, const void* w, void* y, float* rstd, int64_t rows, int hidden,
                       float eps, cudaStream_t stream) {
  constexpr int W = vec_width<T>();
  const bool vec = hidden % W == 0 && is_aligned(x, 16) && is_aligned(y, 16);
  const int tpr = threads_per_row(hidden / (vec ? W : 1), kFwdVecsPerThread, 1024);
  const int rpb = tpr >= kBlockThreads ? 1 : kBlockThreads / tpr;
  int sms = 0;
  const cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  const unsigned grid = grid_for(rows, rpb, tpr * rpb, sms, 2048);
  const dim3 block(tpr, rpb);
  const T* xp = static_cast<const T*>(x);
  const Tw* wp = static_cast<const Tw*>(w);
  if (vec)
    rms_fwd_kernel<T, Tw, W><<<grid, block, 0, stream>>>(xp, wp, static_cast<T*>(y), rstd, rows, hidden, eps);
  else
    rms_fwd_kernel<T, Tw, 1><<<grid, block, 0, stream>>>(xp, wp, static_cast<T*>(y), rstd, rows, hidden, eps);
  return cudaGetLastError();
}

template <typename T, typename Tw, int N>
void bwd_dx_launch(const BwdPlan& p, const T* dy, const T* x, const Tw* w, const float* rstd, T* dx,
                   float* partial, int64_t rows, int hidden, cudaStream_t stream) {
  if (p.fused)
    rms_bwd_fused_kernel<T, Tw, N><<<p.grid, p.block, 0, stream>>>(dy, x, w, rstd, dx, partial, rows, hidden);
  else
    rms_bwd_dx_kernel<T, Tw, N><<<p.grid, p.block, 0, stream>>>(dy, x, w, rstd, dx, rows, hidden);
}

template <typename T, typename Tw>
cudaError_t bwd_launch(const BwdPlan& p, const void* dy_, const void* x_, const void* w_, const float* rstd,
                       void* dx_, void* dw, float* ws, int64_t rows, int hidden, cudaStream_t stream) {
  const T* dy = static_cast<const T*>(dy_);
  const T* x = static_cast<const T*>(x_);
  const Tw* w = static_cast<const Tw*>(w_);
  T* dx = static_cast<T*>(dx_);
  float* partial = (w != nullptr && p.fused) ? ws : nullptr;
  if (p.vec)
    bwd_dx_launch<T, Tw, vec_width<T>()>(p, dy, x, w, rstd, dx, partial, rows, hidden, stream);
  else
    bwd_dx_launch<T, Tw, 1>(p, dy, x, w, rstd, dx, partial, rows, hidden, stream);
  if (w == nullptr) return cudaGetLastError();
  if (!p.fused) {
    const int64_t tiles = ceil_div(hidden, 256);
    const dim3 grid(static_cast<unsigned>(tiles < 65535 ? tiles : 65535), static_cast<unsigned>(p.partial_rows));
    rms_dw_partial_kernel<T><<<grid, 256, 0, stream>>>(dy, x, rstd, ws, rows, hidden);
  }
  const int64_t col_tiles = ceil_div(hidden, 32);
  const unsigned cgrid = static_cast<unsigned>(col_tiles < 65535 ? col_tiles : 65535);
  column_sum_kernel<Tw><<<cgrid, dim3(32, 16), 0, stream>>>(ws, static_cast<Tw*>(dw), p.partial_rows, hidden);
  return cudaGetLastError();
}

bool valid_sizes(int64_t rows, int64_t hidden) {
  return rows >= 0 && hidden > 0 && hidden <= INT32_MAX;
}

}  // namespace
}  // namespace megalite

using megalite::bwd_launch;
using megalite::fwd_launch;

// The supported (x, weight) storage pairs: the weight in x's dtype or in fp32.
#define MEGALITE_DISPATCH_XW(xd, wd, LAUNCH, ...)                                          \
  do {                                                                                    \
    if ((xd) == MEGALITE_F32 && (wd) == MEGALITE_F32) return LAUNCH<float, float>(__VA_ARGS__); \
    if ((xd) == MEGALITE_F16 && (wd) == MEGALITE_F16) return LAUNCH<__half, __half>(__VA_ARGS__); \
    if ((xd) == MEGALITE_F16 && (wd) == MEGALITE_F32) return LAUNCH<__half, float>(__VA_ARGS__); \
    if ((xd) == MEGALITE_BF16 && (wd) == MEGALITE_BF16)                                   \
      return LAUNCH<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__);                           \
    if ((xd) == MEGALITE_BF16 && (wd) == MEGALITE_F32)                                    \
      return LAUNCH<__nv_bfloat16, float>(__VA_ARGS__);                                   \
    return cudaErrorInvalidValue;                                                         \
  } while (0)

extern "C" cudaError_t megalite_rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd,
                                             int64_t rows, int64_t hidden, float eps,
                                             megalite_dtype x_dtype, megalite_dtype w_dtype,
                                             cudaStream_t stream) {
  if (!megalite::valid_sizes(rows, hidden) || !megalite::valid_dtype(x_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || rstd == nullptr) return cudaErrorInvalidValue;
  const megalite_dtype wd = weight == nullptr ? x_dtype : w_dtype;
  MEGALITE_DISPATCH_XW(x_dtype, wd, fwd_launch, x, weight, y, rstd, rows, static_cast<int>(hidden), eps, stream);
}

extern "C" cudaError_t megalite_rms_norm_bwd_workspace(const void* dy, const void* x, const void* dx,
                                                       int64_t rows, int64_t hidden, int has_weight,
                                                       megalite_dtype x_dtype, size_t* bytes) {
  if (bytes == nullptr || !megalite::valid_dtype(x_dtype) || !megalite::valid_sizes(rows, hidden))
    return cudaErrorInvalidValue;
  *bytes = 0;
  if (rows == 0 || !has_weight) return cudaSuccess;
  megalite::BwdPlan plan;
  const cudaError_t err = megalite::plan_bwd(dy, x, dx, rows, hidden, true, x_dtype, &plan);
  if (err == cudaSuccess) *bytes = static_cast<size_t>(plan.partial_rows) * static_cast<size_t>(hidden) * sizeof(float);
  return err;
}

extern "C" cudaError_t megalite_rms_norm_bwd(const void* dy, const void* x, const void* weight,
                                             const float* rstd, void* dx, void* dweight, float* workspace,
                                             size_t workspace_bytes, int64_t rows, int64_t hidden,
                                             megalite_dtype x_dtype, megalite_dtype w_dtype,
                                             cudaStream_t stream) {
  if (!megalite::valid_sizes(rows, hidden) || !megalite::valid_dtype(x_dtype)) return cudaErrorInvalidValue;
  if (weight != nullptr && (dweight == nullptr || !megalite::valid_dtype(w_dtype))) return cudaErrorInvalidValue;
  if (rows == 0)  // no rows: the weight gradient is an empty sum
    return weight == nullptr ? cudaSuccess
                             : cudaMemsetAsync(dweight, 0, static_cast<size_t>(hidden) * megalite::dtype_size(w_dtype), stream);
  megalite::BwdPlan plan;
  cudaError_t err = megalite::plan_bwd(dy, x, dx, rows, hidden, weight != nullptr, x_dtype, &plan);
  if (err != cudaSuccess) return err;
  const size_t need = static_cast<size_t>(plan.partial_rows) * static_cast<size_t>(hidden) * sizeof(float);
  if (weight != nullptr && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  const megalite_dtype wd = weight == nullptr ? x_dtype : w_dtype;
  MEGALITE_DISPATCH_XW(x_dtype, wd, bwd_launch, plan, dy, x, weight, rstd, dx, dweight, workspace, rows,
                       static_cast<int>(hidden), stream);
}
