// Helpers shared by the per-ISA sources (kernels_isa.cpp, attention_isa.cpp). Each includer is compiled
// once per ISA with -DCPU_CAPABILITY=<ISA>, so these land in that ISA's own namespace, never shared
// between copies built with different instruction sets.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace llamactl_cpu {
namespace CPU_CAPABILITY {

template <typename A>
inline A hsum(const at::vec::Vectorized<A>& v) {  // fixed lane order: deterministic
  alignas(64) A t[at::vec::Vectorized<A>::size()];
  v.store(t);
  A s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += t[i];
  return s;
}

}  // namespace CPU_CAPABILITY
}  // namespace llamactl_cpu
