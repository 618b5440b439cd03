// CPU binding: the llamactl:: ops (schemas defined in kernels/ops.py) for CPU tensors.
//
// Compiled without ISA flags. Picks the kernel table (AVX512 > AVX2 > DEFAULT) once from what the host
// supports (optionally capped by LLAMACTL_CPU_ISA=default|avx2|avx512), and splits rows over threads
// with at::parallel_for. dw is reduced from fixed row chunks whose count depends only on the row count,
// never on the thread count or scheduling, so it is bit-identical from run to run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <emmintrin.h>  // SSE2: baseline on x86-64, no ISA flag needed
#endif

namespace llamactl_cpu {

int chosen_isa() {
  static const int isa = [] {
    int cap = 2;
    if (const char* s = std::getenv("LLAMACTL_CPU_ISA"); s && *s) {
      std::string v(s);
      for (auto& ch : v) ch = (char)std::tolower(ch);
      cap = v == "default" ? 0 : v == "avx2" ? 1 : 2;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma");
    const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    const bool has512 = false, has2 = false;
#endif
    return has512 && cap >= 2 ? 2 : has2 && cap >= 1 ? 1 : 0;
  }();
  return isa;
}

namespace {

// Outputs are fresh allocations; glibc serves large ones with new mmap'd pages, and faulting those in
// 4 KiB at a time can cost more than the kernel's own memory traffic (64 MiB: ~50 ms of faults vs ~9 ms
// on the dev VM). LLAMACTL_CPU_THP=1 asks for transparent huge pages before the first touch
// (MADV_HUGEPAGE), which removes most of it when free huge pages exist, but with THP defrag=madvise a
// fault may then stall in direct compaction (seen: 1 s steps on a busy host), so it is opt-in.
bool use_thp() {
  static const bool on = [] {
    const char* v = std::getenv("LLAMACTL_CPU_THP");
    return v && (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0);
  }();
  return on;
}

at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (nbytes >= (size_t(4) << 20) && use_thp()) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t page = 4096;
    const uintptr_t a = (p + page - 1) & ~(page - 1);
    const uintptr_t e = (p + nbytes) & ~(page - 1);
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Outputs of at least this many bytes are written with non-temporal stores: they cannot stay in the
// caches until their reader runs anyway, and streaming skips the read of every destination line that a
// normal store does first (a third of the memory traffic of a copy). Smaller outputs, such as the
// activations of a training step of a small model, stay in cache for the next op.
// LLAMACTL_CPU_STREAM_BYTES overrides the 16 MiB default (0 streams everything, -1 nothing).
bool streamed(size_t out_bytes) {
  static const int64_t limit = [] {
    const char* v = std::getenv("LLAMACTL_CPU_STREAM_BYTES");
    return v && *v ? std::strtoll(v, nullptr, 10) : int64_t(16) << 20;
  }();
  return limit >= 0 && int64_t(out_bytes) >= limit;
}

const KernelTable* pick_table() {
  switch (chosen_isa()) {
    case 2: return AVX512::kernel_table();
    case 1: return AVX2::kernel_table();
    default: return DEFAULT::kernel_table();
  }
}

const KernelTable* table() {
  static const KernelTable* t = pick_table();
  return t;
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "llamactl kernels: unsupported dtype ", t.scalar_type(), " (float32, bfloat16, float64)");
  }
  return -1;
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x needs at least one dim");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "rms_norm: weight must be (", n, ",)");
  const int dt = dtype_code(x);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = empty_out(x.sizes(), x.options());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type(x)));
  if (x.numel() == 0) return {y, rstd};
  const int64_t rows = x.numel() / n;
  const KernelTable* k = table();
  const void *xp = xc.data_ptr(), *wp = wc.data_ptr();
  void *yp = y.data_ptr(), *rp = rstd.data_ptr();
  const bool nt = streamed(y.nbytes());
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t b, int64_t e) {
    k->rms_fwd(dt, xp, wp, yp, rp, b, e, n, eps, nt);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "rms_norm backward: dy and x shapes differ");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && x.scalar_type() == w.scalar_type(),
              "rms_norm backward: dtypes differ");
  const int64_t n = x.size(-1);
  const int dt = dtype_code(x);
  auto dyc = dy.contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto rc = rstd.contiguous();
  auto dx = empty_out(x.sizes(), x.options());
  const int64_t rows = n ? x.numel() / n : 0;
  if (rows == 0) return {dx, at::zeros({n}, w.options())};
  // Fixed chunking: chunk size depends on rows only (>= 32 rows per chunk, at most 128 chunks).
  const int64_t want = std::min<int64_t>(128, std::max<int64_t>(1, (rows + 31) / 32));
  const int64_t cs = (rows + want - 1) / want;
  const int64_t nparts = (rows + cs - 1) / cs;
  auto part = at::empty({nparts, n}, x.options().dtype(acc_type(x)));
  auto dw = at::empty({n}, w.options());
  const KernelTable* k = table();
  const void *dyp = dyc.data_ptr(), *xp = xc.data_ptr(), *wp = wc.data_ptr(), *rp = rc.data_ptr();
  void *dxp = dx.data_ptr(), *pp = part.data_ptr(), *dwp = dw.data_ptr();
  const int64_t esz = part.element_size();
  const bool nt = streamed(dx.nbytes());
  at::parallel_for(0, nparts, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      k->rms_bwd(dt, dyp, xp, wp, rp, dxp, (char*)pp + c * n * esz, c * cs, std::min(rows, (c + 1) * cs), n, nt);
    }
  });
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) { k->reduce_parts(dt, pp, nparts, n, b, e, dwp); });
  return {dx, dw};
}

// cos/sin: (T, D/2) or (B|1, T, D/2), any strides; returned as fp32 with unit stride in the last dim.
at::Tensor table_view(const at::Tensor& t, int64_t B, int64_t T, int64_t half, int64_t& s_b, int64_t& s_t,
                      const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "rope: ", name, " must be (T, D/2) or (B, T, D/2)");
  TORCH_CHECK(t.size(-1) == half && t.size(-2) == T, "rope: ", name, " has shape ", t.sizes(), ", expected (.., ",
              T, ", ", half, ")");
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.stride(-1) != 1) f = f.contiguous();
  s_t = f.stride(-2);
  s_b = 0;
  if (f.dim() == 3) {
    TORCH_CHECK(f.size(0) == B || f.size(0) == 1, "rope: ", name, " batch dim ", f.size(0), " != ", B);
    s_b = f.size(0) == 1 ? 0 : f.stride(0);
  }
  return f;
}

void rope_one(const KernelTable* k, const at::Tensor& x, at::Tensor& out, const float* c, const float* s, int64_t b,
              int64_t e, int64_t T, int64_t cs_b, int64_t cs_t, int64_t ss_b, int64_t ss_t, bool inverse, bool nt) {
  k->rope(dtype_code(x), x.data_ptr(), out.data_ptr(), c, s, b, e, T, x.size(2), x.size(3), cs_b, cs_t, ss_b, ss_t,
          inverse, nt);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope: q and k must be (B, T, H, D)");
  const int64_t B = q.size(0), T = q.size(1), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == T && k.size(3) == D, "rope: q ", q.sizes(), " and k ", k.sizes(),
              " disagree on B, T or D");
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even, got ", D);
  dtype_code(q);
  dtype_code(k);
  int64_t cs_b, cs_t, ss_b, ss_t;
  auto c = table_view(cos, B, T, D / 2, cs_b, cs_t, "cos");
  auto s = table_view(sin, B, T, D / 2, ss_b, ss_t, "sin");
  auto qc = q.contiguous();
  auto kc = k.contiguous();
  auto qo = empty_out(q.sizes(), q.options());
  auto ko = empty_out(k.sizes(), k.options());
  const int64_t rows = B * T;
  if (rows == 0 || D == 0) return {qo, ko};
  const KernelTable* kt = table();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t per_row = (q.size(2) + k.size(2)) * D;
  const bool nt = streamed(qo.nbytes() + ko.nbytes());
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)), [&](int64_t b, int64_t e) {
    if (qc.numel()) rope_one(kt, qc, qo, cp, sp, b, e, T, cs_b, cs_t, ss_b, ss_t, inverse, nt);
    if (kc.numel()) rope_one(kt, kc, ko, cp, sp, b, e, T, cs_b, cs_t, ss_b, ss_t, inverse, nt);
  });
  return {qo, ko};
}

// Elementwise ops run over blocks of 64 elements (a multiple of every vector block), so each thread's
// range starts vector-aligned where the tensor does.
constexpr int64_t kElemBlock = 64;

template <typename F>
void over_elements(int64_t n, const F& f) {
  at::parallel_for(0, (n + kElemBlock - 1) / kElemBlock, 512, [&](int64_t b, int64_t e) {
    f(b * kElemBlock, std::min(n, e * kElemBlock));
  });
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": shapes ", a.sizes(), " and ", b.sizes(), " differ");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes ", a.scalar_type(), " and ", b.scalar_type(),
              " differ");
  dtype_code(a);
}

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, "swiglu");
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  auto out = empty_out(a.sizes(), a.options());
  const KernelTable* k = table();
  const int dt = dtype_code(a);
  const bool nt = streamed(out.nbytes());
  const void *ap = ac.data_ptr(), *bp = bc.data_ptr();
  void* op = out.data_ptr();
  over_elements(a.numel(), [&](int64_t i0, int64_t i1) { k->swiglu_fwd(dt, ap, bp, op, i0, i1, nt); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, "swiglu backward");
  check_pair(dout, a, "swiglu backward");
  auto dc = dout.contiguous();
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  auto da = empty_out(a.sizes(), a.options());
  auto db = empty_out(b.sizes(), b.options());
  const KernelTable* k = table();
  const int dt = dtype_code(a);
  const bool nt = streamed(da.nbytes() + db.nbytes());
  const void *dp = dc.data_ptr(), *ap = ac.data_ptr(), *bp = bc.data_ptr();
  void *dap = da.data_ptr(), *dbp = db.data_ptr();
  over_elements(a.numel(), [&](int64_t i0, int64_t i1) { k->swiglu_bwd(dt, dp, ap, bp, dap, dbp, i0, i1, nt); });
  return {da, db};
}

// The cross-entropy of the fused LM head (parallel/head_loss.py) on one device: fp32 logits rows,
// dst (may alias src) = softmax - onehot, returns the per-row loss. Rows where in_range is false get no
// one-hot (ignored targets) and their target is not read.
at::Tensor softmax_xent_(const at::Tensor& src, at::Tensor& dst, const at::Tensor& target, const at::Tensor& in_range) {
  TORCH_CHECK(src.dim() == 2 && src.scalar_type() == at::kFloat && src.is_contiguous(),
              "softmax_xent_: src must be contiguous (rows, V) float32");
  TORCH_CHECK(dst.sizes() == src.sizes() && dst.scalar_type() == at::kFloat && dst.is_contiguous(),
              "softmax_xent_: dst must be a contiguous float32 tensor shaped like src");
  const int64_t rows = src.size(0), V = src.size(1);
  auto t = target.reshape({-1}).to(at::kLong).contiguous();
  auto hit = in_range.reshape({-1}).to(at::kBool).contiguous();
  TORCH_CHECK(t.numel() == rows && hit.numel() == rows, "softmax_xent_: target and in_range need one entry per row");
  const int64_t* tp = t.data_ptr<int64_t>();
  const bool* hp = hit.data_ptr<bool>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(!hp[r] || (tp[r] >= 0 && tp[r] < V), "softmax_xent_: target ", tp[r], " of row ", r,
                " is outside [0, ", V, ")");
  }
  auto loss = at::empty({rows}, src.options());
  if (rows == 0) return loss;
  TORCH_CHECK(V > 0, "softmax_xent_: empty rows");
  const KernelTable* k = table();
  const float* sp = src.data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  float* lp = loss.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / V), [&](int64_t b, int64_t e) {
    k->softmax_xent(sp, dp, tp, hp, lp, b, e, V);
  });
  return loss;
}

// dst := src (same size, contiguous) with non-temporal stores: the least time any kernel that reads a
// tensor once and writes one of the same size can take (no read of the destination lines first). The
// kernel benchmark times it next to torch's copy_ as the floor (in time) for memory-bound ops.
void stream_copy_(at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.nbytes() == src.nbytes() && dst.is_cpu() &&
                  src.is_cpu(),
              "stream_copy_: contiguous CPU tensors of the same size");
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t n = int64_t(src.nbytes());
  constexpr int64_t kLine = 64;
  const int64_t head = std::min<int64_t>(n, (kLine - int64_t(reinterpret_cast<uintptr_t>(d) % kLine)) % kLine);
  std::memcpy(d, s, size_t(head));
  const int64_t lines = (n - head) / kLine;
  at::parallel_for(0, lines, 4096, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
    for (int64_t i = b; i < e; ++i) {
      const char* sp = s + head + i * kLine;
      __m128i* dp = reinterpret_cast<__m128i*>(d + head + i * kLine);
      for (int j = 0; j < 4; ++j)
        _mm_stream_si128(dp + j, _mm_loadu_si128(reinterpret_cast<const __m128i*>(sp) + j));
    }
    _mm_sfence();
#else
    std::memcpy(d + head + b * kLine, s + head + b * kLine, size_t((e - b) * kLine));
#endif
  });
  const int64_t done = head + lines * kLine;
  std::memcpy(d + done, s + done, size_t(n - done));
}

std::string isa() { return table()->isa; }

// How many threads one at::parallel_for in this library really uses: 1 if the binding was compiled
// without OpenMP (then every kernel silently runs on one core). A test checks it against
// torch.get_num_threads().
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    seen |= uint64_t(1) << (at::get_thread_num() % 64);
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace
}  // namespace llamactl_cpu

TORCH_LIBRARY(llamactl_cpu, m) {
  m.def("isa() -> str", &llamactl_cpu::isa);
  m.def("parallel_threads() -> int", &llamactl_cpu::parallel_threads);
  m.def("stream_copy_(Tensor(a!) dst, Tensor src) -> ()", &llamactl_cpu::stream_copy_);
  m.def("softmax_xent_(Tensor src, Tensor(a!) dst, Tensor target, Tensor in_range) -> Tensor",
        &llamactl_cpu::softmax_xent_);
}

TORCH_LIBRARY_IMPL(llamactl, CPU, m) {
  m.impl("rms_norm_fwd", &llamactl_cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &llamactl_cpu::rms_norm_bwd);
  m.impl("rope", &llamactl_cpu::rope);
  m.impl("swiglu", &llamactl_cpu::swiglu);
  m.impl("swiglu_bwd", &llamactl_cpu::swiglu_bwd);
}
