// The CPU range kernels compiled for AVX2 + FMA + F16C, picked at run time when the CPU
// has them (see module.cpp). The arithmetic is the same as the baseline build bit for bit:
// same operation order, no FMA contraction (-ffp-contract=off), fixed reduction lanes.
#include "scalar.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define AWP_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace awp_avx2 {
#include "kernels.inc"
}  // namespace awp_avx2
#pragma GCC pop_options
#endif

namespace awp_avx2 {
#ifdef AWP_HAVE_AVX2_VARIANT
bool compiled() { return true; }
#else
bool compiled() { return false; }
void fill_tables(KernelTable*) {}
#endif
}  // namespace awp_avx2
