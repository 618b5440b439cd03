// CPU binding of llamactl::causal_attention / causal_attention_bwd: causal self-attention for training.
//
// Why not torch's CPU flash attention: at a training shape of the small preset (T = 256, head_dim 64) it
// reaches ~20 GFLOP/s forward + backward on the dev VM, against ~110 for the same products as plain
// GEMMs. Here each (batch, kv head) is one task: for each block of BQ queries, S = Q K^T over the keys
// the block can see (keys past the block's last query are never computed), the softmax pass on S while
// it is in cache (attention_isa.cpp), then O = P V. Only O and the per-row log-sum-exp are kept; the
// backward rebuilds P from them (as FlashAttention does), so memory stays O(T) per head, not O(T^2).
// The GEMMs are the BLAS that torch links (sgemm_/dgemm_, found at load time), single-threaded inside
// the per-head tasks. GQA: the query heads of one kv head share its task, so dK and dV are summed over
// them without races, in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "attention.h"
#include "kernels.h"

namespace llamactl_cpu {
namespace {

// Fortran BLAS (column-major), as exported by torch's MKL or OpenBLAS.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);

struct Blas {
  sgemm_fn s = nullptr;
  dgemm_fn d = nullptr;
};

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    r.s = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    r.d = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
    return r;
  }();
  return b;
}

// Each task's GEMMs run on the task's own thread: MKL is told so for the task's duration (C API
// MKL_Set_Num_Threads_Local, by value; ~8 % faster on the dev VM than letting MKL decide). Other BLAS
// libraries run single-threaded inside an OpenMP parallel region anyway.
struct OneBlasThread {
  using set_fn = int (*)(int);
  int saved = 0;
  set_fn set = nullptr;
  OneBlasThread() {
    static const set_fn f = reinterpret_cast<set_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    set = f;
    if (set) saved = set(1);
  }
  ~OneBlasThread() {
    if (set) set(saved);
  }
};

bool has_blas() { return blas().s != nullptr && blas().d != nullptr; }

const AttentionTable* table() {
  static const AttentionTable* t = [] {
    switch (chosen_isa()) {
      case 2: return AVX512::attention_table();
      case 1: return AVX2::attention_table();
      default: return DEFAULT::attention_table();
    }
  }();
  return t;
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, through column-major BLAS as C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
  const char* opa = tb ? "T" : "N";
  const char* opb = ta ? "T" : "N";
  if constexpr (std::is_same_v<T, float>) {
    blas().s(opa, opb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
  } else {
    blas().d(opa, opb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
  }
}

// Queries per block: S is BQ x T. Smaller blocks skip more of the masked half of Q K^T; larger ones make
// better GEMMs. 64 measured best at T = 256..1024 on the dev VM.
constexpr int64_t BQ = 64;

// (B, H, T, D) view with unit stride on D: element (b, h, t, 0) is at p + b*sb + h*sh + t*st.
template <typename T>
struct Heads {
  T* p;
  int64_t sb, sh, st;
  Heads(const at::Tensor& x) : p(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  T* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

at::Tensor unit_last(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attention: q, k, v must be (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), "causal_attention: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "causal_attention: q ", q.sizes(), " and k ", k.sizes(), " need the same batch, length and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "causal_attention: ", q.size(1),
              " query heads are not a multiple of ", k.size(1), " kv heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "causal_attention: q, k, v dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "causal_attention: float32 or float64 only, got ", q.scalar_type());
  TORCH_CHECK(has_blas(), "causal_attention: torch exports no sgemm_/dgemm_ BLAS symbols in this build");
  TORCH_CHECK(q.size(2) * std::max(q.size(1), int64_t(1)) * q.size(3) < (int64_t(1) << 31),
              "causal_attention: too large for 32-bit BLAS indices");
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  double scale) {
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), L = q.size(2), D = q.size(3), rep = H / Hk;
  const Heads<T> Q(q), K(k), Vv(v), O(out);
  T* lp = lse.data_ptr<T>();
  const int dt = std::is_same_v<T, double> ? kAttnF64 : kAttnF32;
  const AttentionTable* tab = table();
  at::parallel_for(0, B * Hk, 1, [&](int64_t i0, int64_t i1) {
    OneBlasThread one;
    std::vector<T> s(std::min(BQ, L) * L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hk, hk = i % Hk;
      const T *kp = K.at(b, hk), *vp = Vv.at(b, hk);
      for (int64_t h = hk * rep; h < (hk + 1) * rep; ++h) {
        const T* qp = Q.at(b, h);
        T* op = O.at(b, h);
        T* lh = lp + (b * H + h) * L;
        for (int64_t q0 = 0; q0 < L; q0 += BQ) {
          const int64_t m = std::min(BQ, L - q0), n = q0 + m;
          gemm<T>(false, true, m, n, D, T(1), qp + q0 * Q.st, Q.st, kp, K.st, T(0), s.data(), n);
          tab->softmax_fwd(dt, s.data(), m, n, q0, scale, lh + q0);
          gemm<T>(false, false, m, D, n, T(1), s.data(), n, vp, Vv.st, T(0), op + q0 * O.st, O.st);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                    double scale) {
  check_inputs(q_, k_, v_);
  auto q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  auto out = at::empty_like(q);  // q's layout: (B, T, H, D) memory when q is a transposed view
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.numel() == 0) return {out, lse};
  if (q.scalar_type() == at::kDouble) forward_impl<double>(q, k, v, out, lse, scale);
  else forward_impl<float>(q, k, v, out, lse, scale);
  return {out, lse};
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   double scale) {
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), L = q.size(2), D = q.size(3), rep = H / Hk;
  const Heads<T> Q(q), K(k), Vv(v), O(out), G(dout), DQ(dq), DK(dk), DV(dv);
  const T* lp = lse.data_ptr<T>();
  const int dt = std::is_same_v<T, double> ? kAttnF64 : kAttnF32;
  const AttentionTable* tab = table();
  at::parallel_for(0, B * Hk, 1, [&](int64_t i0, int64_t i1) {
    OneBlasThread one;
    const int64_t cap = std::min(BQ, L) * L;
    std::vector<T> s(cap), dp(cap);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hk, hk = i % Hk;
      const T *kp = K.at(b, hk), *vp = Vv.at(b, hk);
      T *dkp = DK.at(b, hk), *dvp = DV.at(b, hk);
      for (int64_t t = 0; t < L; ++t) {
        std::fill(dkp + t * DK.st, dkp + t * DK.st + D, T(0));
        std::fill(dvp + t * DV.st, dvp + t * DV.st + D, T(0));
      }
      for (int64_t h = hk * rep; h < (hk + 1) * rep; ++h) {
        const T *qp = Q.at(b, h), *op = O.at(b, h), *gp = G.at(b, h);
        T* dqp = DQ.at(b, h);
        const T* lh = lp + (b * H + h) * L;
        for (int64_t q0 = 0; q0 < L; q0 += BQ) {
          const int64_t m = std::min(BQ, L - q0), n = q0 + m;
          const T *qb = qp + q0 * Q.st, *gb = gp + q0 * G.st;
          gemm<T>(false, true, m, n, D, T(1), qb, Q.st, kp, K.st, T(0), s.data(), n);      // S = Q K^T
          gemm<T>(false, true, m, n, D, T(1), gb, G.st, vp, Vv.st, T(0), dp.data(), n);    // dP = dO V^T
          tab->softmax_bwd(dt, s.data(), dp.data(), m, n, q0, scale, lh + q0, op + q0 * O.st, O.st, gb, G.st, D);
          gemm<T>(true, false, n, D, m, T(1), s.data(), n, gb, G.st, T(1), dvp, DV.st);    // dV += P^T dO
          gemm<T>(false, false, m, D, n, T(1), dp.data(), n, kp, K.st, T(0), dqp + q0 * DQ.st, DQ.st);  // dQ = dS K
          gemm<T>(true, false, n, D, m, T(1), dp.data(), n, qb, Q.st, T(1), dkp, DK.st);   // dK += dS^T Q
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                                    const at::Tensor& k_, const at::Tensor& v_,
                                                                    const at::Tensor& out_, const at::Tensor& lse_,
                                                                    double scale) {
  check_inputs(q_, k_, v_);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(), "causal_attention backward: dout ",
              dout_.sizes(), " and out ", out_.sizes(), " must match q ", q_.sizes());
  TORCH_CHECK(dout_.scalar_type() == q_.scalar_type() && out_.scalar_type() == q_.scalar_type() &&
                  lse_.scalar_type() == q_.scalar_type(),
              "causal_attention backward: dtypes differ");
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q_.size(0) && lse_.size(1) == q_.size(1) && lse_.size(2) == q_.size(2),
              "causal_attention backward: lse must be (B, H, T)");
  auto q = unit_last(q_), k = unit_last(k_), v = unit_last(v_), out = unit_last(out_), dout = unit_last(dout_);
  auto lse = lse_.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  if (q.scalar_type() == at::kDouble) backward_impl<double>(dout, q, k, v, out, lse, dq, dk, dv, scale);
  else backward_impl<float>(dout, q, k, v, out, lse, dq, dk, dv, scale);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace llamactl_cpu

TORCH_LIBRARY_FRAGMENT(llamactl_cpu, m) {
  m.def("has_blas() -> bool", &llamactl_cpu::has_blas);
}

TORCH_LIBRARY_IMPL(llamactl, CPU, m) {
  m.impl("causal_attention", &llamactl_cpu::causal_attention);
  m.impl("causal_attention_bwd", &llamactl_cpu::causal_attention_bwd);
}
