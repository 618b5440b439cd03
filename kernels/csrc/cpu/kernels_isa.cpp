// RMSNorm, RoPE, SwiGLU and the softmax cross-entropy on CPU with at::vec::Vectorized. Compiled once per ISA
// by kernels/build.py with -DCPU_CAPABILITY=<ISA> -DCPU_CAPABILITY_<ISA> and that ISA's -m flags;
// everything lives in the namespace llamactl_cpu::<ISA>. No torch Tensor, no static initialisers: the binding decides at run
// time which copy to call, so an AVX-512 instruction never runs on a host without AVX-512.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "isa_common.h"
#include "kernels.h"

namespace llamactl_cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;

// A block is two accumulator vectors' worth of elements: 2*W floats (doubles for fp64). Tails are
// loaded zero-filled and stored partially, so any row length works.
template <typename A>
struct Plain {
  using V = Vectorized<A>;
  static constexpr int64_t W = V::size();
  static constexpr int64_t N = 2 * W;
  static inline void load(const A* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + W);
  }
  static inline void load(const A* p, int64_t c, V& a, V& b) {
    if (c > W) {
      a = V::loadu(p);
      b = V::loadu(p + W, c - W);
    } else {
      a = V::loadu(p, c);
      b = V(A(0));
    }
  }
  static inline void store(A* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + W);
  }
  static inline void stream(A* p, const V& a, const V& b) {  // p aligned to the vector width
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<A, float>) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + W, b);
    } else {
      _mm512_stream_pd(p, a);
      _mm512_stream_pd(p + W, b);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<A, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + W, b);
    } else {
      _mm256_stream_pd(p, a);
      _mm256_stream_pd(p + W, b);
    }
#else
    store(p, a, b);
#endif
  }
  static inline void store(A* p, int64_t c, const V& a, const V& b) {
    if (c > W) {
      a.store(p);
      b.store(p + W, c - W);
    } else {
      a.store(p, c);
    }
  }
};

template <typename T>
struct Io : Plain<T> {};

template <>
struct Io<BFloat16> {
  using V = Vectorized<float>;
  using VB = Vectorized<BFloat16>;
  static constexpr int64_t W = V::size();
  static constexpr int64_t N = VB::size();
  static_assert(N == 2 * W, "one bf16 vector holds two float vectors");
  static inline void load(const BFloat16* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<BFloat16>(VB::loadu(p));
  }
  static inline void load(const BFloat16* p, int64_t c, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<BFloat16>(VB::loadu(p, c));
  }
  static inline void store(BFloat16* p, const V& a, const V& b) {
    at::vec::convert_from_float<BFloat16>(a, b).store(p);
  }
  static inline void store(BFloat16* p, int64_t c, const V& a, const V& b) {
    at::vec::convert_from_float<BFloat16>(a, b).store(p, c);
  }
  static inline void stream(BFloat16* p, const V& a, const V& b) {  // p aligned to the vector width
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<BFloat16>(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<BFloat16>(a, b));
#else
    store(p, a, b);
#endif
  }
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Round fp32 lanes to the nearest bf16 (ties to even) and back, in registers: the reference casts
// x*rstd to bf16 before the weight multiply. Same bits as c10::BFloat16 for non-NaN values.
inline Vectorized<float> round_bf16(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(int32_t(0xffff0000u))));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(int32_t(0xffff0000u))));
#else
  using VI = Vectorized<int32_t>;
  const VI bits = at::vec::cast<int32_t>(v);
  const VI lsb = (bits >> VI(16)) & VI(1);
  return at::vec::cast<float>((bits + lsb + VI(0x7fff)) & VI(int32_t(0xffff0000u)));
#endif
}

// bf16 rows are converted once: pass 1 writes the fp32 values to a row-sized scratch (L1/L2), pass 2
// reads them back instead of converting again; w is converted once per call.
template <typename T>
constexpr bool kStaged = !std::is_same_v<T, acc_t<T>>;

template <typename T>
struct Scratch {  // plain new[]/delete[]: no std containers (their inline code would be ISA-specific)
  acc_t<T>* p = nullptr;
  explicit Scratch(int64_t count) {
    if constexpr (kStaged<T>) p = new acc_t<T>[count];
  }
  ~Scratch() { delete[] p; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

template <typename T>
inline void load_any(const T* p, int64_t c, Vectorized<acc_t<T>>& a, Vectorized<acc_t<T>>& b) {
  if (c == Io<T>::N) Io<T>::load(p, a, b); else Io<T>::load(p, c, a, b);
}

template <typename T>
inline void store_any(T* p, int64_t c, const Vectorized<acc_t<T>>& a, const Vectorized<acc_t<T>>& b) {
  if (c == Io<T>::N) Io<T>::store(p, a, b); else Io<T>::store(p, c, a, b);
}

// A row is streamed only when its start is aligned to the vector width (then every full block is);
// the tail block of a row is always a normal store.
template <typename T>
inline bool can_stream(const T* row) {
  return reinterpret_cast<uintptr_t>(row) % sizeof(Vectorized<acc_t<T>>) == 0;
}

template <typename T>
inline void store_out(T* p, int64_t c, bool nt, const Vectorized<acc_t<T>>& a, const Vectorized<acc_t<T>>& b) {
  if (nt && c == Io<T>::N) Io<T>::stream(p, a, b); else store_any<T>(p, c, a, b);
}

inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // streamed lines become visible before the op returns
#endif
}

template <typename T>
const acc_t<T>* stage_weight(const T* w, acc_t<T>* buf, int64_t n) {
  if constexpr (kStaged<T>) {
    using V = Vectorized<acc_t<T>>;
    V a, b;
    for (int64_t i = 0; i < n; i += Io<T>::N) {
      const int64_t c = std::min<int64_t>(Io<T>::N, n - i);
      load_any<T>(w + i, c, a, b);
      store_any<acc_t<T>>(buf + i, c, a, b);
    }
    return buf;
  } else {
    return w;
  }
}

template <typename T>
void rms_fwd_t(const T* x, const T* w, T* y, acc_t<T>* rstd, int64_t r0, int64_t r1, int64_t n,
               double eps, bool stream) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t N = Io<T>::N;
  Scratch<T> scratch(2 * n);
  const A* wa_ = stage_weight<T>(w, scratch.p, n);
  A* xs = kStaged<T> ? scratch.p + n : nullptr;
  V a, b, a2, b2, wa, wb;
  for (int64_t row = r0; row < r1; ++row) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));  // four chains: the loop is not FMA-latency bound
    int64_t i = 0;
    for (; i + 2 * N <= n; i += 2 * N) {
      Io<T>::load(xr + i, a, b);
      Io<T>::load(xr + i + N, a2, b2);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      s2 = at::vec::fmadd(a2, a2, s2);
      s3 = at::vec::fmadd(b2, b2, s3);
      if constexpr (kStaged<T>) {
        Plain<A>::store(xs + i, a, b);
        Plain<A>::store(xs + i + N, a2, b2);
      }
    }
    for (; i < n; i += N) {
      const int64_t c = std::min<int64_t>(N, n - i);
      load_any<T>(xr + i, c, a, b);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      if constexpr (kStaged<T>) store_any<A>(xs + i, c, a, b);
    }
    const A ms = hsum<A>((s0 + s1) + (s2 + s3)) / A(n);
    const A r = A(1) / std::sqrt(ms + A(eps));
    rstd[row] = r;
    const V vr(r);
    // While this row's output is written from cache, pull the next row in from memory: keeps the
    // read stream busy (prefetching past the last row of the chunk is harmless).
    const char* next = reinterpret_cast<const char*>(xr + n);
    const bool nt = stream && can_stream(yr);
    // y = x*r (rounded to bf16 for bf16, as the reference casts before the weight) times w
    auto block = [&](int64_t at, int64_t c) {
      if constexpr (kStaged<T>) load_any<A>(xs + at, c, a, b); else load_any<T>(xr + at, c, a, b);
      load_any<A>(wa_ + at, c, wa, wb);
      a = a * vr;
      b = b * vr;
      if constexpr (kStaged<T>) {
        a = round_bf16(a);
        b = round_bf16(b);
      }
      store_out<T>(yr + at, c, nt, a * wa, b * wb);
    };
    constexpr int64_t kPair = 2 * N * int64_t(sizeof(T));  // bytes of x per two blocks
    for (i = 0; i + 2 * N <= n; i += 2 * N) {
      for (int64_t off = 0; off < kPair; off += 64) __builtin_prefetch(next + i * sizeof(T) + off, 0, 3);
      block(i, N);
      block(i + N, N);
    }
    for (; i < n; i += N) {
      __builtin_prefetch(next + i * sizeof(T), 0, 3);
      block(i, std::min<int64_t>(N, n - i));
    }
  }
  stream_fence(stream);
}

// dx = r*g - x * r^3 * sum(g*x)/n with g = dy*w;  dw_part += dy * x * r.
template <typename T>
void rms_bwd_t(const T* dy, const T* x, const T* w, const acc_t<T>* rstd, T* dx, acc_t<T>* part,
               int64_t r0, int64_t r1, int64_t n, bool stream) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t N = Io<T>::N;
  static_assert(N == Plain<A>::N, "partials use the same block as the data");
  Scratch<T> scratch(3 * n);
  const A* wsrc = stage_weight<T>(w, scratch.p, n);
  A* xs = kStaged<T> ? scratch.p + n : nullptr;
  A* gs = kStaged<T> ? scratch.p + 2 * n : nullptr;
  for (int64_t i = 0; i < n; ++i) part[i] = A(0);
  V a, b, ga, gb, wa, wb, pa, pb;
  for (int64_t row = r0; row < r1; ++row) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const A r = rstd[row];
    V s0(A(0)), s1(A(0));
    for (int64_t i = 0; i < n; i += N) {
      const int64_t c = std::min<int64_t>(N, n - i);
      load_any<T>(dyr + i, c, ga, gb);
      load_any<T>(xr + i, c, a, b);
      load_any<A>(wsrc + i, c, wa, wb);
      s0 = at::vec::fmadd(ga * wa, a, s0);
      s1 = at::vec::fmadd(gb * wb, b, s1);
      if constexpr (kStaged<T>) {
        store_any<A>(gs + i, c, ga, gb);
        store_any<A>(xs + i, c, a, b);
      }
    }
    const A dot = hsum<A>(s0 + s1);
    const V vr(r), vc(r * r * r * dot / A(n));
    const A* xsrc;
    const A* gsrc;
    if constexpr (kStaged<T>) {
      xsrc = xs;
      gsrc = gs;
    } else {
      xsrc = xr;
      gsrc = dyr;
    }
    const char* next_x = reinterpret_cast<const char*>(xr + n);
    const char* next_dy = reinterpret_cast<const char*>(dyr + n);
    const bool nt = stream && can_stream(dxr);
    for (int64_t i = 0; i < n; i += N) {
      const int64_t c = std::min<int64_t>(N, n - i);
      __builtin_prefetch(next_x + i * sizeof(T), 0, 3);
      __builtin_prefetch(next_dy + i * sizeof(T), 0, 3);
      load_any<A>(gsrc + i, c, ga, gb);
      load_any<A>(xsrc + i, c, a, b);
      load_any<A>(wsrc + i, c, wa, wb);
      store_out<T>(dxr + i, c, nt, ga * wa * vr - a * vc, gb * wb * vr - b * vc);
      load_any<A>(part + i, c, pa, pb);
      store_any<A>(part + i, c, at::vec::fmadd(ga, a * vr, pa), at::vec::fmadd(gb, b * vr, pb));
    }
  }
  stream_fence(stream);
}

template <typename T>
void reduce_parts_t(const acc_t<T>* part, int64_t nparts, int64_t n, int64_t c0, int64_t c1, T* dw) {
  using A = acc_t<T>;
  using PIO = Plain<A>;
  using V = Vectorized<A>;
  constexpr int64_t N = PIO::N;
  V a, b, pa, pb;
  int64_t i = c0;
  for (; i + N <= c1; i += N) {
    PIO::load(part + i, a, b);
    for (int64_t k = 1; k < nparts; ++k) {
      PIO::load(part + k * n + i, pa, pb);
      a = a + pa;
      b = b + pb;
    }
    Io<T>::store(dw + i, a, b);
  }
  if (i < c1) {
    const int64_t c = c1 - i;
    PIO::load(part + i, c, a, b);
    for (int64_t k = 1; k < nparts; ++k) {
      PIO::load(part + k * n + i, c, pa, pb);
      a = a + pa;
      b = b + pb;
    }
    Io<T>::store(dw + i, c, a, b);
  }
}

// out1 = x1*c - x2*s, out2 = x2*c + x1*s (s negated for the inverse), in fp32 (fp64 for fp64).
template <typename T>
void rope_t(const T* x, T* out, const float* cos, const float* sin, int64_t r0, int64_t r1, int64_t T_,
            int64_t H, int64_t D, int64_t cs_b, int64_t cs_t, int64_t ss_b, int64_t ss_t, bool inverse, bool stream) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using PIO = Plain<A>;
  using V = Vectorized<A>;
  constexpr int64_t N = IO::N;
  const int64_t half = D / 2;
  alignas(64) A cbuf[N], sbuf[N];  // fp64 path only: one block of the fp32 tables, widened
  V c0, c1, s0, s1, a1, b1, a2, b2;
  const V zero(A(0));
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t bi = row / T_, ti = row % T_;
    const float* cr = cos + bi * cs_b + ti * cs_t;
    const float* sr = sin + bi * ss_b + ti * ss_t;
    // load_cs: cos/sin of pairs [i, i+c) as accumulator vectors (widened for fp64)
    auto load_cs = [&](int64_t i, int64_t c) {
      if constexpr (std::is_same_v<A, float>) {
        if (c == N) {
          PIO::load(cr + i, c0, c1);
          PIO::load(sr + i, s0, s1);
        } else {
          PIO::load(cr + i, c, c0, c1);
          PIO::load(sr + i, c, s0, s1);
        }
      } else {
        for (int64_t j = 0; j < N; ++j) {
          cbuf[j] = j < c ? A(cr[i + j]) : A(0);
          sbuf[j] = j < c ? A(sr[i + j]) : A(0);
        }
        PIO::load(cbuf, c0, c1);
        PIO::load(sbuf, s0, s1);
      }
    };
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + (row * H + h) * D;
      T* orow = out + (row * H + h) * D;
      const bool nt = stream && can_stream(orow) && can_stream(orow + half);
      int64_t i = 0;
      for (; i + N <= half; i += N) {
        load_cs(i, N);
        if (inverse) {
          s0 = zero - s0;
          s1 = zero - s1;
        }
        IO::load(xr + i, a1, b1);         // first half
        IO::load(xr + half + i, a2, b2);  // second half
        store_out<T>(orow + i, N, nt, a1 * c0 - a2 * s0, b1 * c1 - b2 * s1);
        store_out<T>(orow + half + i, N, nt, a2 * c0 + a1 * s0, b2 * c1 + b1 * s1);
      }
      if (i < half) {
        const int64_t c = half - i;
        load_cs(i, c);
        if (inverse) {
          s0 = zero - s0;
          s1 = zero - s1;
        }
        IO::load(xr + i, c, a1, b1);
        IO::load(xr + half + i, c, a2, b2);
        IO::store(orow + i, c, a1 * c0 - a2 * s0, b1 * c1 - b2 * s1);
        IO::store(orow + half + i, c, a2 * c0 + a1 * s0, b2 * c1 + b1 * s1);
      }
    }
  }
  stream_fence(stream);
}

// SwiGLU gate silu(a) * b over elements [i0, i1) (a multiple of the block size, except at the end),
// with torch's formulas (silu = a / (1 + exp(-a)), its derivative sig * (1 + a * (1 - sig))). In bf16
// the intermediate values are rounded where the reference's separate ops round them. The silu output is
// recomputed in the backward (as a * sig: divisions are this op's second cost after exp) instead of
// being kept in memory.
// exp(-a). For bf16 data the fast exp (max 20 ulp of fp32, ~1e-6 relative; Sleef's is 1 ulp) is far below
// the 2^-9 relative step of the bf16 result, and the exp is most of this op's time.
template <typename T>
inline Vectorized<acc_t<T>> exp_neg(const Vectorized<acc_t<T>>& a) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStaged<T>) return a.neg().exp_u20();
#endif
  return a.neg().exp();
}

template <typename T>
void swiglu_fwd_t(const T* a, const T* b, T* out, int64_t i0, int64_t i1, bool stream) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t N = Io<T>::N;
  const V one(A(1));
  const bool nt = stream && can_stream(out + i0);
  V a0, a1, b0, b1;
  for (int64_t i = i0; i < i1; i += N) {
    const int64_t c = std::min<int64_t>(N, i1 - i);
    load_any<T>(a + i, c, a0, a1);
    load_any<T>(b + i, c, b0, b1);
    V s0 = a0 / (one + exp_neg<T>(a0));
    V s1 = a1 / (one + exp_neg<T>(a1));
    if constexpr (kStaged<T>) {
      s0 = round_bf16(s0);
      s1 = round_bf16(s1);
    }
    store_out<T>(out + i, c, nt, s0 * b0, s1 * b1);
  }
  stream_fence(nt);
}

template <typename T>
void swiglu_bwd_t(const T* dout, const T* a, const T* b, T* da, T* db, int64_t i0, int64_t i1, bool stream) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t N = Io<T>::N;
  const V one(A(1));
  const bool nt = stream && can_stream(da + i0) && can_stream(db + i0);
  V d0, d1, a0, a1, b0, b1;
  for (int64_t i = i0; i < i1; i += N) {
    const int64_t c = std::min<int64_t>(N, i1 - i);
    load_any<T>(dout + i, c, d0, d1);
    load_any<T>(a + i, c, a0, a1);
    load_any<T>(b + i, c, b0, b1);
    const V e0 = one + exp_neg<T>(a0), e1 = one + exp_neg<T>(a1);
    const V sig0 = one / e0, sig1 = one / e1;
    V s0 = a0 * sig0, s1 = a1 * sig1;  // silu again: within an ulp of the forward's a / e, one division less
    V g0 = d0 * b0, g1 = d1 * b1;  // d silu
    if constexpr (kStaged<T>) {
      s0 = round_bf16(s0);
      s1 = round_bf16(s1);
      g0 = round_bf16(g0);
      g1 = round_bf16(g1);
    }
    store_out<T>(da + i, c, nt, g0 * sig0 * (one + a0 * (one - sig0)), g1 * sig1 * (one + a1 * (one - sig1)));
    store_out<T>(db + i, c, nt, d0 * s0, d1 * s1);
  }
  stream_fence(nt);
}

// NaN-propagating max, as torch's amax: a NaN logit makes the row's loss NaN (the trainer stops on it).
inline float max_nan(float a, float b) { return (b > a || std::isnan(b)) ? b : a; }

// Softmax cross-entropy of fp32 rows [r0, r1) of a (rows, V) matrix: dst = softmax(src) - onehot(target)
// (the one-hot only where in_range), loss[row] = log(sum exp(src - max)) - (src[target] - max), the picked
// term 0 where not in range. dst may be src. A row (V = 32000: 125 KiB) stays in L2 between the max
// pass, which reads it from memory, and the exp and scale passes.
void softmax_xent(const float* src, float* dst, const int64_t* target, const bool* in_range, float* loss,
                  int64_t r0, int64_t r1, int64_t V) {
  using Vf = Vectorized<float>;
  constexpr int64_t W = Vf::size();
  alignas(64) float lanes[W];
  for (int64_t row = r0; row < r1; ++row) {
    const float* x = src + row * V;
    float* y = dst + row * V;
    Vf m0(-INFINITY), m1(-INFINITY);
    int64_t i = 0;
    for (; i + 2 * W <= V; i += 2 * W) {
      m0 = at::vec::maximum(m0, Vf::loadu(x + i));
      m1 = at::vec::maximum(m1, Vf::loadu(x + i + W));
    }
    at::vec::maximum(m0, m1).store(lanes);
    float m = -INFINITY;
    for (int64_t j = 0; j < W; ++j) m = max_nan(m, lanes[j]);
    for (int64_t j = i; j < V; ++j) m = max_nan(m, x[j]);
    const bool hit = in_range[row];
    const float picked = hit ? x[target[row]] - m : 0.0f;  // read before dst (maybe x) is overwritten
    const Vf vm(m);
    // Two-level (cascade) sum: a naive running sum over 2000 terms per lane loses ~1e-6 relative,
    // which the gradient e/s would inherit; partial sums of 512 elements keep it near torch.sum's.
    constexpr int64_t kInner = 512;
    Vf t0(0.0f), t1(0.0f);
    for (i = 0; i + 2 * W <= V;) {
      const int64_t stop = std::min(V - 2 * W, i + kInner - 2 * W);
      Vf s0(0.0f), s1(0.0f);
      for (; i <= stop; i += 2 * W) {
        const Vf e0 = (Vf::loadu(x + i) - vm).exp();
        const Vf e1 = (Vf::loadu(x + i + W) - vm).exp();
        e0.store(y + i);
        e1.store(y + i + W);
        s0 = s0 + e0;
        s1 = s1 + e1;
      }
      t0 = t0 + s0;
      t1 = t1 + s1;
    }
    float s = hsum<float>(t0 + t1);
    for (int64_t j = i; j < V; ++j) {
      y[j] = std::exp(x[j] - m);
      s += y[j];
    }
    const float inv = 1.0f / s;
    const Vf vinv(inv);
    for (i = 0; i + W <= V; i += W) (Vf::loadu(y + i) * vinv).store(y + i);
    for (int64_t j = i; j < V; ++j) y[j] *= inv;
    if (hit) y[target[row]] -= 1.0f;
    loss[row] = std::log(s) - picked;
  }
}

void rms_fwd(int dt, const void* x, const void* w, void* y, void* rstd, int64_t r0, int64_t r1, int64_t n,
             double eps, bool stream) {
  switch (dt) {
    case kF32:
      return rms_fwd_t<float>((const float*)x, (const float*)w, (float*)y, (float*)rstd, r0, r1, n, eps, stream);
    case kBF16:
      return rms_fwd_t<BFloat16>((const BFloat16*)x, (const BFloat16*)w, (BFloat16*)y, (float*)rstd, r0, r1,
                                 n, eps, stream);
    default:
      return rms_fwd_t<double>((const double*)x, (const double*)w, (double*)y, (double*)rstd, r0, r1, n, eps, stream);
  }
}

void rms_bwd(int dt, const void* dy, const void* x, const void* w, const void* rstd, void* dx, void* part,
             int64_t r0, int64_t r1, int64_t n, bool stream) {
  switch (dt) {
    case kF32:
      return rms_bwd_t<float>((const float*)dy, (const float*)x, (const float*)w, (const float*)rstd,
                              (float*)dx, (float*)part, r0, r1, n, stream);
    case kBF16:
      return rms_bwd_t<BFloat16>((const BFloat16*)dy, (const BFloat16*)x, (const BFloat16*)w,
                                 (const float*)rstd, (BFloat16*)dx, (float*)part, r0, r1, n, stream);
    default:
      return rms_bwd_t<double>((const double*)dy, (const double*)x, (const double*)w, (const double*)rstd,
                               (double*)dx, (double*)part, r0, r1, n, stream);
  }
}

void reduce_parts(int dt, const void* part, int64_t nparts, int64_t n, int64_t c0, int64_t c1, void* dw) {
  switch (dt) {
    case kF32:
      return reduce_parts_t<float>((const float*)part, nparts, n, c0, c1, (float*)dw);
    case kBF16:
      return reduce_parts_t<BFloat16>((const float*)part, nparts, n, c0, c1, (BFloat16*)dw);
    default:
      return reduce_parts_t<double>((const double*)part, nparts, n, c0, c1, (double*)dw);
  }
}

void rope(int dt, const void* x, void* out, const float* cos, const float* sin, int64_t r0, int64_t r1,
          int64_t T_, int64_t H, int64_t D, int64_t cs_b, int64_t cs_t, int64_t ss_b, int64_t ss_t,
          bool inverse, bool stream) {
  switch (dt) {
    case kF32:
      return rope_t<float>((const float*)x, (float*)out, cos, sin, r0, r1, T_, H, D, cs_b, cs_t, ss_b, ss_t,
                           inverse, stream);
    case kBF16:
      return rope_t<BFloat16>((const BFloat16*)x, (BFloat16*)out, cos, sin, r0, r1, T_, H, D, cs_b, cs_t,
                              ss_b, ss_t, inverse, stream);
    default:
      return rope_t<double>((const double*)x, (double*)out, cos, sin, r0, r1, T_, H, D, cs_b, cs_t, ss_b,
                            ss_t, inverse, stream);
  }
}

void swiglu_fwd(int dt, const void* a, const void* b, void* out, int64_t i0, int64_t i1, bool stream) {
  switch (dt) {
    case kF32:
      return swiglu_fwd_t<float>((const float*)a, (const float*)b, (float*)out, i0, i1, stream);
    case kBF16:
      return swiglu_fwd_t<BFloat16>((const BFloat16*)a, (const BFloat16*)b, (BFloat16*)out, i0, i1, stream);
    default:
      return swiglu_fwd_t<double>((const double*)a, (const double*)b, (double*)out, i0, i1, stream);
  }
}

void swiglu_bwd(int dt, const void* dout, const void* a, const void* b, void* da, void* db, int64_t i0, int64_t i1,
                bool stream) {
  switch (dt) {
    case kF32:
      return swiglu_bwd_t<float>((const float*)dout, (const float*)a, (const float*)b, (float*)da, (float*)db, i0,
                                 i1, stream);
    case kBF16:
      return swiglu_bwd_t<BFloat16>((const BFloat16*)dout, (const BFloat16*)a, (const BFloat16*)b, (BFloat16*)da,
                                    (BFloat16*)db, i0, i1, stream);
    default:
      return swiglu_bwd_t<double>((const double*)dout, (const double*)a, (const double*)b, (double*)da, (double*)db,
                                  i0, i1, stream);
  }
}

#define LLAMACTL_STR2(x) #x
#define LLAMACTL_STR(x) LLAMACTL_STR2(x)
// Constant-initialised (no code runs at load time in this object).
constexpr KernelTable kTable{LLAMACTL_STR(CPU_CAPABILITY), &rms_fwd, &rms_bwd, &reduce_parts, &rope,
                             &swiglu_fwd, &swiglu_bwd, &softmax_xent};

}  // namespace

const KernelTable* kernel_table() { return &kTable; }

}  // namespace CPU_CAPABILITY
}  // namespace llamactl_cpu
