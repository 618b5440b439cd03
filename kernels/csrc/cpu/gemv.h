// The interface between the per-ISA decode matrix-vector kernel (gemv_isa.cpp) and its binding (gemv.cpp):
// plain pointers only, like kernels.h, so the binding (no ISA flags) never runs an instruction the host lacks.
#pragma once
#include <cstdint>

namespace llamactl_cpu {

// y[r, n] = sum_k x[r, k] * W(n, k) for rows r < R (1..8) and outputs n in [n0, n1), fp32, summed over k in
// increasing order per output (deterministic: independent of n0/n1 and of threads). x row r at x + r*ldx,
// y row r at y + r*ldy. colmajor: W(n, k) = w[k*ldw + n] (decode_layout's layout: each k is a contiguous
// row of outputs); else W(n, k) = w[n*ldw + k] (row-major, nn.Linear's own).
struct GemvTable {
  void (*gemv)(const float* x, int64_t ldx, int64_t R, const float* w, int64_t ldw, bool colmajor, float* y,
               int64_t ldy, int64_t K, int64_t n0, int64_t n1);
  int64_t lanes;  // floats per vector: thread chunks of column-major outputs start at multiples of it
};

namespace DEFAULT { const GemvTable* gemv_table(); }
namespace AVX2 { const GemvTable* gemv_table(); }
namespace AVX512 { const GemvTable* gemv_table(); }

}  // namespace llamactl_cpu
