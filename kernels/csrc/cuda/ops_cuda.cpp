// CUDA binding: the llamactl:: ops (schemas in kernels/ops.py) for CUDA tensors. Built only when torch
// has CUDA; the kernels themselves (rms_norm.cu, rope.cu, swiglu.cu) include no torch header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "launch.h"

namespace llamactl_cuda {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "llamactl kernels: unsupported dtype ", t.scalar_type(), " (float32, bfloat16, float64)");
  }
  return -1;
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "llamactl ", what, ": ", cudaGetErrorString(e));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "rms_norm: weight must be (", n, ",)");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type(x)));
  const int64_t rows = n ? x.numel() / n : 0;
  check(rms_fwd(dtype_code(x), xc.data_ptr(), wc.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, n, eps,
                c10::cuda::getCurrentCUDAStream()),
        "rms_norm forward");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && x.scalar_type() == w.scalar_type(),
              "rms_norm backward: dy/x/weight disagree");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  const int64_t rows = n ? x.numel() / n : 0;
  auto dyc = dy.contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto rc = rstd.contiguous();
  auto dx = at::empty(x.sizes(), x.options());
  auto dw = at::empty({n}, w.options());
  auto part = at::empty({rms_bwd_blocks(rows), n}, x.options().dtype(acc_type(x)));
  check(rms_bwd(dtype_code(x), dyc.data_ptr(), xc.data_ptr(), wc.data_ptr(), rc.data_ptr(), dx.data_ptr(),
                dw.data_ptr(), part.data_ptr(), rows, n, c10::cuda::getCurrentCUDAStream()),
        "rms_norm backward");
  return {dx, dw};
}

at::Tensor table_view(const at::Tensor& t, int64_t B, int64_t T, int64_t half, int64_t& s_b, int64_t& s_t,
                      const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "rope: ", name, " must be (T, D/2) or (B, T, D/2)");
  TORCH_CHECK(t.size(-1) == half && t.size(-2) == T, "rope: ", name, " has shape ", t.sizes());
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.stride(-1) != 1) f = f.contiguous();
  s_t = f.stride(-2);
  s_b = 0;
  if (f.dim() == 3) {
    TORCH_CHECK(f.size(0) == B || f.size(0) == 1, "rope: ", name, " batch dim ", f.size(0), " != ", B);
    s_b = f.size(0) == 1 ? 0 : f.stride(0);
  }
  return f;
}

std::tuple<at::Tensor, at::Tensor> rope_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope: q and k must be (B, T, H, D)");
  const int64_t B = q.size(0), T = q.size(1), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == T && k.size(3) == D && D % 2 == 0, "rope: q ", q.sizes(), " k ",
              k.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  int64_t cs_b, cs_t, ss_b, ss_t;
  auto c = table_view(cos, B, T, D / 2, cs_b, cs_t, "cos");
  auto s = table_view(sin, B, T, D / 2, ss_b, ss_t, "sin");
  auto qc = q.contiguous();
  auto kc = k.contiguous();
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  check(llamactl_cuda::rope(dtype_code(q), qc.data_ptr(), qo.data_ptr(), q.size(2), dtype_code(k), kc.data_ptr(),
                            ko.data_ptr(), k.size(2), c.data_ptr<float>(), s.data_ptr<float>(), B, T, D, cs_b, cs_t,
                            ss_b, ss_t, inverse, c10::cuda::getCurrentCUDAStream()),
        "rope");
  return {qo, ko};
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), what, ": shapes/dtypes ", a.sizes(), " ",
              a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type(), " differ");
  dtype_code(a);
}

at::Tensor swiglu_op(const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, "swiglu");
  c10::cuda::CUDAGuard guard(a.device());
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  auto out = at::empty(a.sizes(), a.options());
  check(swiglu_fwd(dtype_code(a), ac.data_ptr(), bc.data_ptr(), out.data_ptr(), a.numel(),
                   c10::cuda::getCurrentCUDAStream()),
        "swiglu");
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_op(const at::Tensor& dout, const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, "swiglu backward");
  check_pair(dout, a, "swiglu backward");
  c10::cuda::CUDAGuard guard(a.device());
  auto dc = dout.contiguous();
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  auto da = at::empty(a.sizes(), a.options());
  auto db = at::empty(b.sizes(), b.options());
  check(swiglu_bwd(dtype_code(a), dc.data_ptr(), ac.data_ptr(), bc.data_ptr(), da.data_ptr(), db.data_ptr(), a.numel(),
                   c10::cuda::getCurrentCUDAStream()),
        "swiglu backward");
  return {da, db};
}

}  // namespace
}  // namespace llamactl_cuda

TORCH_LIBRARY_IMPL(llamactl, CUDA, m) {
  m.impl("rms_norm_fwd", &llamactl_cuda::rms_norm_fwd_op);
  m.impl("rms_norm_bwd", &llamactl_cuda::rms_norm_bwd_op);
  m.impl("rope", &llamactl_cuda::rope_op);
  m.impl("swiglu", &llamactl_cuda::swiglu_op);
  m.impl("swiglu_bwd", &llamactl_cuda::swiglu_bwd_op);
}
