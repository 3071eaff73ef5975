/* megalite fused kernels: the small C launcher API.
 *
 * Everything here takes raw device pointers, element counts and a stream,
 * so the kernels compile with plain nvcc (no PyTorch headers). The PyTorch
 * op registration lives in bindings.cpp. Every tensor is dense row-major
 * (contiguous); the launchers check pointer alignment themselves and use
 * 16-byte vector loads only where it holds, scalar loads otherwise.
 * Storage may be fp32, fp16 or bf16; all arithmetic is fp32.
 *
 * Every launcher returns cudaSuccess, cudaErrorInvalidValue for arguments it
 * cannot handle (the bindings check first, so this is a backstop), or the
 * error of the launch itself (cudaGetLastError after the launch).
 */
#ifndef MEGALITE_KERNELS_H_
#define MEGALITE_KERNELS_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  MEGALITE_F32 = 0,
  MEGALITE_F16 = 1,
  MEGALITE_BF16 = 2
} megalite_dtype;

/* RMSNorm forward over rows of `hidden` features:
 *   rstd[r] = 1 / sqrt(mean(x[r]^2) + eps),  y[r] = (x[r] * rstd[r]) * weight.
 * x, y: [rows, hidden] of x_dtype. weight: [hidden] of w_dtype or NULL (no
 * scale). w_dtype must equal x_dtype or be MEGALITE_F32. rstd: [rows] fp32,
 * saved for the backward. */
cudaError_t megalite_rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd,
                                  int64_t rows, int64_t hidden, float eps,
                                  megalite_dtype x_dtype, megalite_dtype w_dtype,
                                  cudaStream_t stream);

/* Bytes of fp32 scratch megalite_rms_norm_bwd needs for the two-stage weight
 * gradient with these pointers and sizes on the current device (0 when there
 * is no weight). Query it with the same arguments you will launch with. */
cudaError_t megalite_rms_norm_bwd_workspace(const void* dy, const void* x, const void* dx,
                                            int64_t rows, int64_t hidden, int has_weight,
                                            megalite_dtype x_dtype, size_t* bytes);

/* RMSNorm backward. dy, x, dx: [rows, hidden] of x_dtype; rstd from the
 * forward. With weight (w_dtype as in the forward), dweight [hidden] of
 * w_dtype receives sum over rows of dy * x * rstd: each block writes fp32
 * partial sums into `workspace` ([partials, hidden]), then a column reduce
 * writes dweight. weight == NULL: no scale, dweight and workspace unused. */
cudaError_t megalite_rms_norm_bwd(const void* dy, const void* x, const void* weight,
                                  const float* rstd, void* dx, void* dweight, float* workspace,
                                  size_t workspace_bytes, int64_t rows, int64_t hidden,
                                  megalite_dtype x_dtype, megalite_dtype w_dtype,
                                  cudaStream_t stream);

/* Rotary embedding of x [seq, batch_heads, head_dim] (any [s, b, heads, d]
 * tensor flattened: batch_heads = b * heads) into out (same shape, not in
 * place). cos, sin: fp32 [seq, rot_dim / 2] (row stride rot_dim / 2); the
 * pair of feature i is i + rot_dim/2 (rotate-half, Llama) or, when
 * `interleaved`, features (2i, 2i+1) (GPT-J). Features past rot_dim are
 * copied. conjugate != 0 rotates by -angle: that is the backward. */
cudaError_t megalite_rotary(const void* x, const float* cos, const float* sin, void* out,
                            int64_t seq, int64_t batch_heads, int64_t head_dim, int64_t rot_dim,
                            int interleaved, int conjugate, megalite_dtype dtype,
                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MEGALITE_KERNELS_H_ */
