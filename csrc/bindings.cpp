// PyTorch op registration for the megalite kernels (namespace `megalite`).
//
// The ops are declared with TORCH_LIBRARY so torch.compile treats them as
// opaque calls; their fake (meta) implementations and autograd formulas are
// registered from Python in megalite/kernels/fused.py, next to the schemas
// it checks against this file. Each op runs on the current CUDA stream of
// its input's device (so it composes with streams and CUDA graphs), makes
// non-contiguous inputs contiguous, and returns new contiguous tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "megalite_kernels.h"

namespace {

megalite_dtype dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return MEGALITE_F32;
    case at::kHalf: return MEGALITE_F16;
    case at::kBFloat16: return MEGALITE_BF16;
    default:
      TORCH_CHECK(false, "megalite kernels: ", what, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type(), "; use megalite.kernels.reference for other dtypes");
  }
  return MEGALITE_F32;  // unreachable: TORCH_CHECK(false) throws
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "megalite::", op, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_for(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

void check_cuda_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(b.device() == a.device(), "megalite kernels: ", what, " is on ", b.device(), " but the input is on ",
              a.device(), "; move it to the input's device");
}

// The weight as the kernels take it: x's dtype or fp32 (other pairs are cast to fp32).
at::Tensor kernel_weight(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "megalite::rms_norm: weight of shape ", w.sizes(),
              " does not match the last dim ", x.size(-1), " of the input");
  check_cuda_pair(x, w, "the weight");
  dtype_of(w, "the weight");
  const bool direct = w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat;
  return (direct ? w : w.to(at::kFloat)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                double eps) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 1 && x_in.size(-1) > 0,
              "megalite::rms_norm_fwd needs a CUDA tensor with a non-empty last dim, got ", x_in.sizes(), " on ",
              x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  at::Tensor w;
  if (weight.has_value()) w = kernel_weight(x, *weight);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const megalite_dtype xd = dtype_of(x, "the input");
  const megalite_dtype wd = w.defined() ? dtype_of(w, "the weight") : xd;
  check_launch(megalite_rms_norm_fwd(x.data_ptr(), w.defined() ? w.data_ptr() : nullptr, y.data_ptr(),
                                     rstd.data_ptr<float>(), rows, hidden, static_cast<float>(eps), xd, wd,
                                     stream_for(x)),
               "rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd_in) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 1 && x_in.size(-1) > 0,
              "megalite::rms_norm_bwd needs a CUDA input with a non-empty last dim, got ", x_in.sizes());
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "megalite::rms_norm_bwd: grad ", dy_in.sizes(), " ", dy_in.scalar_type(), " does not match input ",
              x_in.sizes(), " ", x_in.scalar_type());
  check_cuda_pair(x_in, dy_in, "the grad");
  check_cuda_pair(x_in, rstd_in, "rstd");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  TORCH_CHECK(rstd.numel() == rows, "megalite::rms_norm_bwd: rstd has ", rstd.numel(), " values for ", rows, " rows");
  at::Tensor w, dw_kernel, dw;
  if (weight.has_value()) {
    w = kernel_weight(x, *weight);
    dw_kernel = at::empty({hidden}, w.options());
  }
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const megalite_dtype xd = dtype_of(x, "the input");
  const megalite_dtype wd = w.defined() ? dtype_of(w, "the weight") : xd;
  size_t ws_bytes = 0;
  check_launch(megalite_rms_norm_bwd_workspace(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), rows, hidden,
                                               w.defined() ? 1 : 0, xd, &ws_bytes),
               "rms_norm_bwd (workspace)");
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, x.options().dtype(at::kFloat));
  check_launch(megalite_rms_norm_bwd(dy.data_ptr(), x.data_ptr(), w.defined() ? w.data_ptr() : nullptr,
                                     rstd.data_ptr<float>(), dx.data_ptr(),
                                     w.defined() ? dw_kernel.data_ptr() : nullptr,
                                     ws_bytes ? ws.data_ptr<float>() : nullptr, ws_bytes, rows, hidden, xd, wd,
                                     stream_for(x)),
               "rms_norm_bwd");
  if (!weight.has_value()) {
    dw = at::empty({0}, x.options().dtype(at::kFloat));  // no weight: an empty placeholder
  } else {
    dw = dw_kernel.scalar_type() == weight->scalar_type() ? dw_kernel : dw_kernel.to(weight->scalar_type());
  }
  return {dx, dw};
}

at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool interleaved,
                  int64_t rot_dim, bool conjugate) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4, "megalite::rotary needs a CUDA tensor [s, b, heads, head_dim], got ",
              x_in.sizes(), " on ", x_in.device());
  const int64_t s = x_in.size(0), head_dim = x_in.size(3);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_dim, "megalite::rotary: rot_dim=", rot_dim,
              " must be a positive even number at most head_dim=", head_dim);
  TORCH_CHECK(cos_in.dim() == 2 && sin_in.sizes() == cos_in.sizes() && cos_in.size(1) == rot_dim / 2 &&
                  cos_in.size(0) >= s,
              "megalite::rotary: cos/sin of shape ", cos_in.sizes(), " and ", sin_in.sizes(), " must be [>= ", s,
              ", ", rot_dim / 2, "]");
  check_cuda_pair(x_in, cos_in, "cos");
  check_cuda_pair(x_in, sin_in, "sin");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // The first s positions as dense fp32 rows: a view (no copy) for rope_cos_sin's tables.
  const at::Tensor cos = cos_in.narrow(0, 0, s).to(at::kFloat).contiguous();
  const at::Tensor sin = sin_in.narrow(0, 0, s).to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  check_launch(megalite_rotary(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr(), s,
                               x.size(1) * x.size(2), head_dim, rot_dim, interleaved ? 1 : 0, conjugate ? 1 : 0,
                               dtype_of(x, "the input"), stream_for(x)),
               "rotary");
  return out;
}

}  // namespace

// Keep these schema strings identical to SCHEMAS in megalite/kernels/fused.py
// (tests/kernels/test_csrc_build.py compares them).
TORCH_LIBRARY(megalite, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved, int rot_dim, bool conjugate) -> Tensor");
}

TORCH_LIBRARY_IMPL(megalite, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("rotary", &rotary);
}
