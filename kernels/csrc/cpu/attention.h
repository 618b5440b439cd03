// The interface between the per-ISA softmax passes of causal attention (attention_isa.cpp) and its
// binding (attention.cpp): plain pointers only, like kernels.h.
#pragma once
#include <cstdint>

namespace llamactl_cpu {

enum AttnDType : int { kAttnF32 = 0, kAttnF64 = 2 };

// A block of scores is m rows (queries q0 .. q0+m-1) by n columns (keys 0 .. n-1), row-major with
// leading dimension n; row r sees keys [0, q0 + r] (causal) and everything after is masked.
struct AttentionTable {
  // s := softmax(scale * s) over each row's visible keys, 0 on masked ones; lse[r] = log-sum-exp of
  // scale * s over the visible keys (what the backward needs to rebuild the probabilities).
  void (*softmax_fwd)(int dt, void* s, int64_t m, int64_t n, int64_t q0, double scale, void* lse);
  // s holds the block's scores again and dp = dout @ V^T: s := p = exp(scale * s - lse) and
  // dp := scale * p * (dp - delta), delta[r] = dout[r] . o[r] (rows of o and dout: leading dims ldo, lddo).
  void (*softmax_bwd)(int dt, void* s, void* dp, int64_t m, int64_t n, int64_t q0, double scale, const void* lse,
                      const void* o, int64_t ldo, const void* dout, int64_t lddo, int64_t D);
};

namespace DEFAULT { const AttentionTable* attention_table(); }
namespace AVX2 { const AttentionTable* attention_table(); }
namespace AVX512 { const AttentionTable* attention_table(); }

}  // namespace llamactl_cpu
