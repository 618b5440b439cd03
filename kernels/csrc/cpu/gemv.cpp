// CPU binding of llamactl::gemv(x, w) = x @ w^T for decoding: fp32 x of 1..8 rows (more run in groups of 8),
// w (N, K) row-major or column-major (decode_layout), any leading stride. Outputs are split over threads
// with at::parallel_for in chunks of whole vectors; the math is in gemv_isa.cpp (one copy per ISA, picked
// once at run time like kernels.h's table).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gemv.h"
#include "kernels.h"

namespace llamactl_cpu {
namespace {

const GemvTable* gemv_tab() {
  static const GemvTable* t = [] {
    switch (chosen_isa()) {
      case 2: return AVX512::gemv_table();
      case 1: return AVX2::gemv_table();
      default: return DEFAULT::gemv_table();
    }
  }();
  return t;
}

constexpr int64_t kMaxRows = 8;
constexpr int64_t kMinChunkBytes = 32 << 10;  // weight bytes below which a chunk is not worth a thread

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w_in) {
  TORCH_CHECK(x.is_cpu() && w_in.is_cpu() && x.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
              "gemv: float32 CPU tensors");
  TORCH_CHECK(w_in.dim() == 2 && x.dim() >= 1 && x.size(-1) == w_in.size(1), "gemv: x (..., K) and w (N, K), got ",
              x.sizes(), " and ", w_in.sizes());
  const int64_t N = w_in.size(0), K = w_in.size(1);
  at::Tensor w = w_in;
  bool col = false;
  int64_t ldw = 0;
  if (w.stride(1) == 1 && (w.stride(0) >= K || N == 1)) {
    ldw = std::max<int64_t>(w.stride(0), K);
  } else if (w.stride(0) == 1 && w.stride(1) >= N) {
    col = true;
    ldw = w.stride(1);
  } else {
    w = w.contiguous();
    ldw = K;
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  const at::Tensor x2 = x.reshape({rows, K}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return y.view(shape);
  if (K == 0) return y.zero_().view(shape);
  const GemvTable* t = gemv_tab();
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Column-major chunks are whole vectors of outputs; row-major chunks any outputs (each a separate dot).
  const int64_t unit = col ? t->lanes : 1;
  const int64_t units = (N + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, kMinChunkBytes / (unit * K * int64_t(sizeof(float))));
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t R = std::min(kMaxRows, rows - r0);
    at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) {
      t->gemv(xp + r0 * K, K, R, wp, ldw, col, yp + r0 * N, N, K, b * unit, std::min(N, e * unit));
    });
  }
  return y.view(shape);
}

}  // namespace
}  // namespace llamactl_cpu

TORCH_LIBRARY_IMPL(llamactl, CPU, m) {
  m.impl("gemv", &llamactl_cpu::gemv);
}
