// Matrix-vector / skinny-matrix products for decoding (1..8 rows), fp32, with at::vec::Vectorized. Compiled
// once per ISA by kernels/build.py (like kernels_isa.cpp); everything lives in llamactl_cpu::<ISA>.
//
// A decode step streams every weight once, so these kernels are written for memory traffic, not FLOPs:
// each weight element is loaded once into a register and used by all R rows of x (x and the partial sums
// stay in L1/L2). Column-major W (decode_layout): a thread owns a range of outputs and walks k in order,
// KB rows of W at a time, each a long contiguous run (what the hardware prefetchers stream best); the
// partial sums of the range live in a small on-stack buffer. Row-major W (w2): NB outputs at a time, i.e.
// NB sequential streams, with R x NB vector accumulators reduced once at the end.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>

#include "gemv.h"
#include "isa_common.h"

namespace llamactl_cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using V = Vectorized<float>;
constexpr int64_t L = V::size();
constexpr int64_t KB = 8;                 // rows of a column-major W consumed per pass over the outputs
constexpr int64_t kAccFloats = 8192;      // partial sums per panel (32 KiB: R rows x panel width)
// Software prefetch (measured on the dev VM, 1 thread): at one row the hardware prefetchers alone stream
// long runs fastest (a 32000 x 512 column-major head at 21 vs 16 GB/s, a row-major 512 x 1536 at 16 vs 14);
// with short runs per row (a 512 x 512 column-major) or several rows of x (more work per byte), prefetching
// ahead is faster (512 x 512: 15 vs 13 GB/s; 8 rows: 9-11 vs 6-10 GB/s).
constexpr int64_t kColAhead = 16;          // rows of a column-major W ahead
constexpr int64_t kShortRunFloats = 2048;  // column-major runs shorter than this are prefetched at one row too
constexpr int64_t kRowAhead = 2048 / 4;    // floats ahead in each row-major stream

// acc += sum over c < KBN of a[c] * x[c], as two interleaved FMA chains (even and odd c) added at the end:
// half the dependency depth of one chain, which is what limits 4-8 rows (8 FMAs per weight vector). The
// order is fixed and does not depend on R, so a row gives the same bits alone or in any batch.
template <int KBN>
inline V dot_pass(const V* a, const float* x, V acc) {
  if constexpr (KBN == 1) {
    return at::vec::fmadd(a[0], V(x[0]), acc);
  } else {
    V u = a[1] * V(x[1]);
    acc = at::vec::fmadd(a[0], V(x[0]), acc);
    for (int c = 2; c + 1 < KBN; c += 2) {
      acc = at::vec::fmadd(a[c], V(x[c]), acc);
      u = at::vec::fmadd(a[c + 1], V(x[c + 1]), u);
    }
    return acc + u;
  }
}

// One pass of KBN rows of W (k .. k+KBN-1) over a panel of nv full vectors + a tail of `tail` outputs:
// each weight vector is loaded once and used by all R rows (x broadcast from memory).
template <int R, int KBN, bool PF>
inline void col_pass(const float* x, int64_t ldx, const float* wk, int64_t ldw, float* acc, int64_t stride,
                     int64_t nv, int64_t tail) {
  for (int64_t j = 0; j < nv; ++j) {
    if constexpr (PF)
      for (int c = 0; c < KBN; ++c) __builtin_prefetch(wk + (kColAhead + c) * ldw + j * L);
    V a[KBN];
    for (int c = 0; c < KBN; ++c) a[c] = V::loadu(wk + c * ldw + j * L);
    for (int r = 0; r < R; ++r) {
      float* s = acc + r * stride + j * L;
      dot_pass<KBN>(a, x + r * ldx, V::loadu(s)).store(s);
    }
  }
  if (tail) {
    V a[KBN];
    for (int c = 0; c < KBN; ++c) a[c] = V::loadu(wk + c * ldw + nv * L, tail);
    for (int r = 0; r < R; ++r) {
      float* s = acc + r * stride + nv * L;
      dot_pass<KBN>(a, x + r * ldx, V::loadu(s)).store(s);
    }
  }
}

template <int R>
void gemv_col(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t K,
              int64_t n0, int64_t n1) {
  alignas(64) float acc[kAccFloats];
  constexpr int64_t max_pw = (kAccFloats / R) / L * L;
  for (int64_t p0 = n0; p0 < n1; p0 += max_pw) {
    const int64_t pw = std::min(max_pw, n1 - p0);
    const int64_t nv = pw / L, tail = pw - nv * L;
    const int64_t stride = (nv + (tail ? 1 : 0)) * L;
    std::fill(acc, acc + R * stride, 0.f);
    int64_t k = 0;
    if (R > 1 || pw < kShortRunFloats)
      for (; k + KB <= K; k += KB) col_pass<R, KB, true>(x + k, ldx, w + k * ldw + p0, ldw, acc, stride, nv, tail);
    else
      for (; k + KB <= K; k += KB) col_pass<R, KB, false>(x + k, ldx, w + k * ldw + p0, ldw, acc, stride, nv, tail);
    for (; k < K; ++k) col_pass<R, 1, false>(x + k, ldx, w + k * ldw + p0, ldw, acc, stride, nv, tail);
    for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy + p0, acc + r * stride, size_t(pw) * sizeof(float));
  }
}

// NB outputs of a row-major W: NB dot products of length K against each of the R rows.
template <int R, int NB, bool PF = (R > 1)>
inline void row_block(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t K,
                      int64_t n) {
  V acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NB; ++i) acc[r][i] = V(0.f);
  const float* wn = w + n * ldw;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V a[NB];
    for (int i = 0; i < NB; ++i) {
      if constexpr (PF) __builtin_prefetch(wn + i * ldw + k + kRowAhead);
      a[i] = V::loadu(wn + i * ldw + k);
    }
    for (int r = 0; r < R; ++r) {
      const V xv = V::loadu(x + r * ldx + k);
      for (int i = 0; i < NB; ++i) acc[r][i] = at::vec::fmadd(a[i], xv, acc[r][i]);
    }
  }
  if (k < K) {
    const int64_t c = K - k;
    V a[NB];
    for (int i = 0; i < NB; ++i) a[i] = V::loadu(wn + i * ldw + k, c);
    for (int r = 0; r < R; ++r) {
      const V xv = V::loadu(x + r * ldx + k, c);
      for (int i = 0; i < NB; ++i) acc[r][i] = at::vec::fmadd(a[i], xv, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NB; ++i) y[r * ldy + n + i] = hsum(acc[r][i]);
}

template <int R>
void gemv_row(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t K,
              int64_t n0, int64_t n1) {
  constexpr int NB = R <= 2 ? 4 : R <= 4 ? 3 : 2;  // R x NB accumulators + NB weights fit the registers
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) row_block<R, NB>(x, ldx, w, ldw, y, ldy, K, n);
  for (; n < n1; ++n) row_block<R, 1>(x, ldx, w, ldw, y, ldy, K, n);
}

template <int R>
void gemv_r(const float* x, int64_t ldx, const float* w, int64_t ldw, bool colmajor, float* y, int64_t ldy,
            int64_t K, int64_t n0, int64_t n1) {
  if (colmajor)
    gemv_col<R>(x, ldx, w, ldw, y, ldy, K, n0, n1);
  else
    gemv_row<R>(x, ldx, w, ldw, y, ldy, K, n0, n1);
}

void gemv(const float* x, int64_t ldx, int64_t R, const float* w, int64_t ldw, bool colmajor, float* y,
          int64_t ldy, int64_t K, int64_t n0, int64_t n1) {
  switch (R) {
    case 1: return gemv_r<1>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 2: return gemv_r<2>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 3: return gemv_r<3>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 4: return gemv_r<4>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 5: return gemv_r<5>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 6: return gemv_r<6>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    case 7: return gemv_r<7>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
    default: return gemv_r<8>(x, ldx, w, ldw, colmajor, y, ldy, K, n0, n1);
  }
}

constexpr GemvTable kTable{&gemv, L};

}  // namespace

const GemvTable* gemv_table() { return &kTable; }

}  // namespace CPU_CAPABILITY
}  // namespace llamactl_cpu
