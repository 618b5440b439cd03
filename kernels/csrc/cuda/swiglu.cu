// SwiGLU gate silu(a) * b on CUDA, forward and backward, over flat elements with a grid-stride loop.
// fp32 math (fp64 for fp64) with torch's formulas: silu = a / (1 + exp(-a)), d silu = sig * (1 + a * (1 -
// sig)); in bf16 the intermediate values are rounded where the reference's separate ops round them. The
// backward recomputes silu(a) instead of reading a stored copy.
#include "common.cuh"
#include "launch.h"

namespace llamactl_cuda {
namespace {

template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float exp_neg(float a) { return expf(-a); }
__device__ __forceinline__ double exp_neg(double a) { return exp(-a); }

// What a bf16 tensor op would store (round to bf16), read back as the accumulation type.
template <typename T>
__device__ __forceinline__ acc_t<T> rounded(acc_t<T> v) { return to_acc(from_acc<T>(v)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const A x = to_acc(a[i]);
    const A s = rounded<T>(x / (A(1) + exp_neg(x)));
    out[i] = from_acc<T>(s * to_acc(b[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ da, T* __restrict__ db, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const A x = to_acc(a[i]), d = to_acc(dout[i]);
    const A e = A(1) + exp_neg(x);
    const A sig = A(1) / e;
    const A s = rounded<T>(x * sig);
    const A g = rounded<T>(d * to_acc(b[i]));
    da[i] = from_acc<T>(g * sig * (A(1) + x * (A(1) - sig)));
    db[i] = from_acc<T>(d * s);
  }
}

int blocks_for(int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads;
  return (int)(want < 65535 * 8 ? want : 65535 * 8);  // grid-stride beyond this
}

template <typename T>
cudaError_t fwd(const void* a, const void* b, void* out, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  swiglu_fwd_kernel<T><<<blocks_for(n, 256), 256, 0, s>>>((const T*)a, (const T*)b, (T*)out, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* dout, const void* a, const void* b, void* da, void* db, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  swiglu_bwd_kernel<T><<<blocks_for(n, 256), 256, 0, s>>>((const T*)dout, (const T*)a, (const T*)b, (T*)da,
                                                          (T*)db, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_fwd(int dt, const void* a, const void* b, void* out, int64_t n, cudaStream_t s) {
  switch (dt) {
    case kF32: return fwd<float>(a, b, out, n, s);
    case kBF16: return fwd<__nv_bfloat16>(a, b, out, n, s);
    default: return fwd<double>(a, b, out, n, s);
  }
}

cudaError_t swiglu_bwd(int dt, const void* dout, const void* a, const void* b, void* da, void* db, int64_t n,
                       cudaStream_t s) {
  switch (dt) {
    case kF32: return bwd<float>(dout, a, b, da, db, n, s);
    case kBF16: return bwd<__nv_bfloat16>(dout, a, b, da, db, n, s);
    default: return bwd<double>(dout, a, b, da, db, n, s);
  }
}

}  // namespace llamactl_cuda
