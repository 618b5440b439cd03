// Host-side launchers of the CUDA kernels. Plain C++ types only: the .cu files include no torch header
// (nvcc compiles them alone) and the binding (ops_cuda.cpp) passes raw pointers and the stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace llamactl_cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF64 = 2 };

// rstd: float* (double* for kF64), one per row.
cudaError_t rms_fwd(int dt, const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t n, double eps,
                    cudaStream_t stream);

// Number of row-blocks of the backward = rows of the fp32 (fp64) partial-dw buffer (nblocks, n).
int64_t rms_bwd_blocks(int64_t rows);

// dx, and dw = sum over rows of dy*x*rstd via per-block partials (part) and a second, ordered reduction.
cudaError_t rms_bwd(int dt, const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* dw,
                    void* part, int64_t rows, int64_t n, cudaStream_t stream);

// q (B*T rows of Hq heads of D) and k (Hk heads) rotated in one launch; cos/sin fp32 element (b, t, i) at
// b*s_b + t*s_t + i; inverse rotates by -angle.
cudaError_t rope(int dt_q, const void* q, void* q_out, int64_t hq, int dt_k, const void* k, void* k_out, int64_t hk,
                 const float* cos, const float* sin, int64_t B, int64_t T, int64_t D, int64_t cs_b, int64_t cs_t,
                 int64_t ss_b, int64_t ss_t, bool inverse, cudaStream_t stream);

// SwiGLU silu(a) * b over n elements, and its backward (da, db from dout, a, b).
cudaError_t swiglu_fwd(int dt, const void* a, const void* b, void* out, int64_t n, cudaStream_t stream);
cudaError_t swiglu_bwd(int dt, const void* dout, const void* a, const void* b, void* da, void* db, int64_t n,
                       cudaStream_t stream);

}  // namespace llamactl_cuda
