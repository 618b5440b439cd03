// The interface between the ISA-specific kernel objects and the binding (ops.cpp).
//
// kernels_isa.cpp is compiled three times (DEFAULT, AVX2, AVX512), each copy in its own namespace
// `llamactl_cpu::<ISA>`. Only plain types cross this boundary (raw pointers, int64_t), so the binding,
// compiled without ISA flags, never runs an instruction the host lacks: it picks a table at run time.
#pragma once
#include <cstdint>

namespace llamactl_cpu {

// dtype codes for the storage type of x / w / dy (accumulation is fp32, fp64 for fp64).
enum DType : int { kF32 = 0, kBF16 = 1, kF64 = 2 };

// stream: write the output with non-temporal stores (rows whose start is vector-aligned), for outputs
// too large to stay in cache: it skips reading each destination line before overwriting it.
struct KernelTable {
  const char* isa;
  // RMSNorm forward over rows [r0, r1) of a (rows, n) matrix; rstd gets 1/sqrt(mean(x^2)+eps) per row
  // (float*, double* for kF64).
  void (*rms_fwd)(int dt, const void* x, const void* w, void* y, void* rstd, int64_t r0, int64_t r1,
                  int64_t n, double eps, bool stream);
  // RMSNorm backward over rows [r0, r1): dx, and this chunk's partial dw (acc type, n entries) is
  // overwritten with sum over the chunk's rows of dy * x * rstd.
  void (*rms_bwd)(int dt, const void* dy, const void* x, const void* w, const void* rstd, void* dx,
                  void* dw_part, int64_t r0, int64_t r1, int64_t n, bool stream);
  // dw[c] = sum_k part[k][c] for c in [c0, c1), k in chunk order (deterministic), cast to dt.
  void (*reduce_parts)(int dt, const void* part, int64_t nparts, int64_t n, int64_t c0, int64_t c1,
                       void* dw);
  // RoPE (rotate-half layout) of rows [r0, r1) of x (B*T rows of H heads of D), cos/sin fp32 with
  // element (b, t, i) at b*s_b + t*s_t + i; inverse rotates by -angle (the backward).
  void (*rope)(int dt, const void* x, void* out, const float* cos, const float* sin, int64_t r0,
               int64_t r1, int64_t T, int64_t H, int64_t D, int64_t cs_b, int64_t cs_t,
               int64_t ss_b, int64_t ss_t, bool inverse, bool stream);
  // SwiGLU silu(a) * b over flat elements [i0, i1); the backward gives da and db from dout, a and b.
  void (*swiglu_fwd)(int dt, const void* a, const void* b, void* out, int64_t i0, int64_t i1, bool stream);
  void (*swiglu_bwd)(int dt, const void* dout, const void* a, const void* b, void* da, void* db, int64_t i0,
                     int64_t i1, bool stream);
  // Cross-entropy of fp32 rows [r0, r1) of (rows, V) logits: dst (may be src) = softmax - onehot(target)
  // where in_range[row], loss[row] = logsumexp(src row) - src[target] (logsumexp alone where not in range).
  void (*softmax_xent)(const float* src, float* dst, const int64_t* target, const bool* in_range, float* loss,
                       int64_t r0, int64_t r1, int64_t V);
};

// The ISA the bindings run (0 DEFAULT, 1 AVX2, 2 AVX-512): the host's best, capped by LLAMACTL_CPU_ISA.
int chosen_isa();

namespace DEFAULT { const KernelTable* kernel_table(); }
namespace AVX2 { const KernelTable* kernel_table(); }
namespace AVX512 { const KernelTable* kernel_table(); }

}  // namespace llamactl_cpu
