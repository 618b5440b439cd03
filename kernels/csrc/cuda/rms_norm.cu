// RMSNorm forward and backward on CUDA. One block per row; 16-byte vector loads where the row allows
// it; fp32 (fp64 for fp64) math with warp-shuffle block reductions. dw: each backward block keeps a
// partial sum for its rows in shared memory (every column owned by one thread: no atomics), written to
// a (blocks, n) buffer and summed in block order by a second kernel: deterministic.
#include "common.cuh"
#include "launch.h"

namespace llamactl_cuda {
namespace {

template <typename T> using acc_t = typename Acc<T>::type;

// Visit the row's elements owned by this thread: f(col, value as acc_t) (VEC: 16-byte packs).
template <typename T, bool VEC, typename F>
__device__ __forceinline__ void for_each(const T* row, int64_t n, F&& f) {
  if constexpr (VEC) {
    constexpr int N = Pack<T>::N;
    for (int64_t j = threadIdx.x; j < n / N; j += blockDim.x) {
      const Pack<T> p = load16(row + j * N);
#pragma unroll
      for (int e = 0; e < N; ++e) f(j * N + e, to_acc(p.v[e]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j, to_acc(row[j]));
  }
}

template <typename T, bool VEC>
__global__ void rms_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                               acc_t<T>* __restrict__ rstd, int64_t n, double eps) {
  using A = acc_t<T>;
  const T* xr = x + blockIdx.x * n;
  T* yr = y + blockIdx.x * n;
  A ss = 0;
  for_each<T, VEC>(xr, n, [&](int64_t, A v) { ss += v * v; });
  ss = block_sum(ss);
  const A r = A(1) / sqrt(ss / A(n) + A(eps));
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  if constexpr (VEC) {
    constexpr int N = Pack<T>::N;
    for (int64_t j = threadIdx.x; j < n / N; j += blockDim.x) {
      const Pack<T> xp = load16(xr + j * N), wp = load16(w + j * N);
      Pack<T> out;
#pragma unroll
      for (int e = 0; e < N; ++e)  // cast x*r to T before the weight multiply, like the reference
        out.v[e] = from_acc<T>(to_acc(from_acc<T>(to_acc(xp.v[e]) * r)) * to_acc(wp.v[e]));
      store16(yr + j * N, out);
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      yr[j] = from_acc<T>(to_acc(from_acc<T>(to_acc(xr[j]) * r)) * to_acc(w[j]));
  }
}

template <typename T, bool VEC>
__global__ void rms_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                               const acc_t<T>* __restrict__ rstd, T* __restrict__ dx, acc_t<T>* __restrict__ part,
                               int64_t rows, int64_t n) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);  // this block's dw partial; column c owned by one thread
  for_each<T, VEC>(w, n, [&](int64_t c, A) { acc[c] = A(0); });
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const A r = rstd[row];
    A dot = 0;
    if constexpr (VEC) {
      constexpr int N = Pack<T>::N;
      for (int64_t j = threadIdx.x; j < n / N; j += blockDim.x) {
        const Pack<T> gp = load16(dyr + j * N), wp = load16(w + j * N), xp = load16(xr + j * N);
#pragma unroll
        for (int e = 0; e < N; ++e) dot += to_acc(gp.v[e]) * to_acc(wp.v[e]) * to_acc(xp.v[e]);
      }
    } else {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += to_acc(dyr[j]) * to_acc(w[j]) * to_acc(xr[j]);
    }
    dot = block_sum(dot);
    const A c = r * r * r * dot / A(n);
    if constexpr (VEC) {
      constexpr int N = Pack<T>::N;
      for (int64_t j = threadIdx.x; j < n / N; j += blockDim.x) {
        const Pack<T> gp = load16(dyr + j * N), wp = load16(w + j * N), xp = load16(xr + j * N);
        Pack<T> out;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const A g = to_acc(gp.v[e]), xv = to_acc(xp.v[e]);
          out.v[e] = from_acc<T>(g * to_acc(wp.v[e]) * r - xv * c);
          acc[j * N + e] += g * xv * r;
        }
        store16(dxr + j * N, out);
      }
    } else {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const A g = to_acc(dyr[j]), xv = to_acc(xr[j]);
        dxr[j] = from_acc<T>(g * to_acc(w[j]) * r - xv * c);
        acc[j] += g * xv * r;
      }
    }
  }
  A* out = part + blockIdx.x * n;
  for_each<T, VEC>(w, n, [&](int64_t col, A) { out[col] = acc[col]; });
}

// dw[c] = sum_b part[b][c], b in order: the same bits every run.
template <typename T>
__global__ void reduce_parts_kernel(const acc_t<T>* __restrict__ part, int64_t nparts, int64_t n, T* __restrict__ dw) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= n) return;
  acc_t<T> s = 0;
  for (int64_t b = 0; b < nparts; ++b) s += part[b * n + c];
  dw[c] = from_acc<T>(s);
}

int threads_for(int64_t work) {  // a multiple of 32 in [32, 512]
  int64_t t = ((work + 31) / 32) * 32;
  return (int)(t < 32 ? 32 : t > 512 ? 512 : t);
}

template <typename T>
cudaError_t fwd_t(const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t n, double eps,
                  cudaStream_t s) {
  if (rows == 0 || n == 0) return cudaSuccess;
  constexpr int N = Pack<T>::N;
  const bool vec = n % N == 0 && aligned16(x) && aligned16(w) && aligned16(y);
  const int th = threads_for(vec ? n / N : n);
  if (vec)
    rms_fwd_kernel<T, true><<<rows, th, 0, s>>>((const T*)x, (const T*)w, (T*)y, (acc_t<T>*)rstd, n, eps);
  else
    rms_fwd_kernel<T, false><<<rows, th, 0, s>>>((const T*)x, (const T*)w, (T*)y, (acc_t<T>*)rstd, n, eps);
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t bwd_launch(const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* part,
                       int64_t rows, int64_t n, int th, cudaStream_t s) {
  const size_t smem = (size_t)n * sizeof(acc_t<T>);
  auto kern = rms_bwd_kernel<T, VEC>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kern<<<rms_bwd_blocks(rows), th, smem, s>>>((const T*)dy, (const T*)x, (const T*)w, (const acc_t<T>*)rstd, (T*)dx,
                                              (acc_t<T>*)part, rows, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_t(const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* dw, void* part,
                  int64_t rows, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (rows == 0) return cudaMemsetAsync(dw, 0, n * sizeof(T), s);
  constexpr int N = Pack<T>::N;
  const bool vec = n % N == 0 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx);
  const int th = threads_for(vec ? n / N : n);
  cudaError_t e = vec ? bwd_launch<T, true>(dy, x, w, rstd, dx, part, rows, n, th, s)
                      : bwd_launch<T, false>(dy, x, w, rstd, dx, part, rows, n, th, s);
  if (e != cudaSuccess) return e;
  reduce_parts_kernel<T><<<(n + 255) / 256, 256, 0, s>>>((const acc_t<T>*)part, rms_bwd_blocks(rows), n, (T*)dw);
  return cudaGetLastError();
}

}  // namespace

int64_t rms_bwd_blocks(int64_t rows) { return rows < 1024 ? (rows < 1 ? 1 : rows) : 1024; }

cudaError_t rms_fwd(int dt, const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t n, double eps,
                    cudaStream_t s) {
  switch (dt) {
    case kF32: return fwd_t<float>(x, w, y, rstd, rows, n, eps, s);
    case kBF16: return fwd_t<__nv_bfloat16>(x, w, y, rstd, rows, n, eps, s);
    default: return fwd_t<double>(x, w, y, rstd, rows, n, eps, s);
  }
}

cudaError_t rms_bwd(int dt, const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* dw,
                    void* part, int64_t rows, int64_t n, cudaStream_t s) {
  switch (dt) {
    case kF32: return bwd_t<float>(dy, x, w, rstd, dx, dw, part, rows, n, s);
    case kBF16: return bwd_t<__nv_bfloat16>(dy, x, w, rstd, dx, dw, part, rows, n, s);
    default: return bwd_t<double>(dy, x, w, rstd, dx, dw, part, rows, n, s);
  }
}

}  // namespace llamactl_cuda
