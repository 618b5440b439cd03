// RoPE (rotate-half layout) on CUDA: one block per token, threads over (head, pair) of q and k in one
// launch; fp32 math (fp64 for fp64) with explicit round-to-nearest ops (no FMA contraction), so results
// match the reference's separate multiplies and adds. inverse = rotation by -angle (the backward).
#include "common.cuh"
#include "launch.h"

namespace llamactl_cuda {
namespace {

template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

template <typename T>
__device__ __forceinline__ void rotate_pair(const T* src, T* dst, int64_t half, int64_t i, float cf, float sf) {
  using A = acc_t<T>;
  const A c = A(cf), s = A(sf);
  const A x1 = to_acc(src[i]), x2 = to_acc(src[half + i]);
  dst[i] = from_acc<T>(sub(mul(x1, c), mul(x2, s)));
  dst[half + i] = from_acc<T>(add(mul(x2, c), mul(x1, s)));
}

template <typename TQ, typename TK>
__global__ void rope_kernel(const TQ* __restrict__ q, TQ* __restrict__ qo, int64_t hq, const TK* __restrict__ k,
                            TK* __restrict__ ko, int64_t hk, const float* __restrict__ cos,
                            const float* __restrict__ sin, int64_t T, int64_t D, int64_t cs_b, int64_t cs_t,
                            int64_t ss_b, int64_t ss_t, bool inverse) {
  const int64_t row = blockIdx.x, b = row / T, t = row % T, half = D / 2;
  const float* cr = cos + b * cs_b + t * cs_t;
  const float* sr = sin + b * ss_b + t * ss_t;
  const int64_t total = (hq + hk) * half;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx - h * half;
    const float c = cr[i], s = inverse ? -sr[i] : sr[i];
    if (h < hq) {
      const int64_t off = (row * hq + h) * D;
      rotate_pair<TQ>(q + off, qo + off, half, i, c, s);
    } else {
      const int64_t off = (row * hk + (h - hq)) * D;
      rotate_pair<TK>(k + off, ko + off, half, i, c, s);
    }
  }
}

template <typename TQ, typename TK>
cudaError_t launch(const void* q, void* qo, int64_t hq, const void* k, void* ko, int64_t hk, const float* cos,
                   const float* sin, int64_t B, int64_t T, int64_t D, int64_t cs_b, int64_t cs_t, int64_t ss_b,
                   int64_t ss_t, bool inverse, cudaStream_t s) {
  const int64_t rows = B * T, work = (hq + hk) * (D / 2);
  if (rows == 0 || work == 0) return cudaSuccess;
  int th = (int)(((work + 31) / 32) * 32);
  th = th > 256 ? 256 : th;
  rope_kernel<TQ, TK><<<rows, th, 0, s>>>((const TQ*)q, (TQ*)qo, hq, (const TK*)k, (TK*)ko, hk, cos, sin, T, D, cs_b,
                                          cs_t, ss_b, ss_t, inverse);
  return cudaGetLastError();
}

template <typename TQ>
cudaError_t by_k(int dt_k, const void* q, void* qo, int64_t hq, const void* k, void* ko, int64_t hk, const float* c,
                 const float* s, int64_t B, int64_t T, int64_t D, int64_t cs_b, int64_t cs_t, int64_t ss_b, int64_t ss_t,
                 bool inv, cudaStream_t st) {
  switch (dt_k) {
    case kF32: return launch<TQ, float>(q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
    case kBF16: return launch<TQ, __nv_bfloat16>(q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
    default: return launch<TQ, double>(q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
  }
}

}  // namespace

cudaError_t rope(int dt_q, const void* q, void* qo, int64_t hq, int dt_k, const void* k, void* ko, int64_t hk,
                 const float* c, const float* s, int64_t B, int64_t T, int64_t D, int64_t cs_b, int64_t cs_t,
                 int64_t ss_b, int64_t ss_t, bool inv, cudaStream_t st) {
  switch (dt_q) {
    case kF32: return by_k<float>(dt_k, q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
    case kBF16: return by_k<__nv_bfloat16>(dt_k, q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
    default: return by_k<double>(dt_k, q, qo, hq, k, ko, hk, c, s, B, T, D, cs_b, cs_t, ss_b, ss_t, inv, st);
  }
}

}  // namespace llamactl_cuda
