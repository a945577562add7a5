// Scalar types, conversions and the kernel table shared by the awpfast CPU sources.
// No torch headers: tensors arrive as raw pointers plus a dtype code (see dtype.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "../dtype_traits.h"  // Cvt<float>, Cvt<double>, clampv (shared with the CUDA kernels)

// 16-bit storage types. Arithmetic always happens after conversion to float.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

static inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> binary32, exact (normals, subnormals, zeros, inf, NaN). Written with
// selects only so that loops over it vectorize.
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;                       // exponent and mantissa
  // normal numbers: rebias the exponent (15 -> 127) and widen the mantissa (10 -> 23 bits)
  uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  // inf / NaN: exponent all ones -> 255, mantissa kept (NaN stays NaN)
  uint32_t infnan = (em << 13) | 0x7f800000u;
  // subnormals and zero: value = em * 2^-24, exact in float
  float sub = (float)(int32_t)em * 5.9604644775390625e-08f;
  uint32_t r = em >= 0x7c00u ? infnan : normal;
  r = em < 0x0400u ? f32_bits(sub) : r;
  return bits_f32(r | sign);
}

// binary32 -> binary16, round to nearest even; overflow -> inf, NaN -> quiet NaN.
static inline uint16_t float_to_half(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // normal half range (2^-14 <= |f| < 65536): rebias, then round the 13 dropped bits to
  // nearest even; a carry out of the mantissa bumps the exponent, up to inf (0x7c00).
  uint32_t odd = (a >> 13) & 1u;
  uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + odd) >> 13;
  // subnormal half range (|f| < 2^-14): adding 0.5 puts the float's last mantissa bit at
  // 2^-24, so the float adder rounds to nearest even at exactly the half subnormal step.
  float t = bits_f32(a) + 0.5f;
  uint32_t sub = f32_bits(t) - f32_bits(0.5f);
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x47800000u ? 0x7c00u : r;              // |f| >= 65536 (and inf) -> inf
  r = a > 0x7f800000u ? 0x7e00u : r;               // NaN
  return (uint16_t)(r | sign);
}

static inline float bf16_to_float(uint16_t b) { return bits_f32((uint32_t)b << 16); }

static inline uint16_t float_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x0040u;              // keep sign and payload, force quiet
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// Cvt<T> for the CPU's 16-bit storage types (fp32 and fp64: dtype_traits.h).
template <> struct Cvt<half_t> {
  using A = float;
  static inline float load(half_t x) { return half_to_float(x.bits); }
  static inline half_t store(float x) { return half_t{float_to_half(x)}; }
};
template <> struct Cvt<bf16_t> {
  using A = float;
  static inline float load(bf16_t x) { return bf16_to_float(x.bits); }
  static inline bf16_t store(float x) { return bf16_t{float_to_bf16(x)}; }
};

// One set of range kernels for one dtype (see kernels.inc for what each computes).
struct KernelTable {
  double (*sumsq)(const void* x, int64_t n);
  void (*sumsq2)(const void* a, const void* b, int64_t n, double* sa, double* sb);
  void (*sumsq_w_diff)(const void* p, const void* w, int64_t n, double* sw, double* sv);
  void (*perturb_apply)(void* p, const void* d, void* b, void* v, double s, int64_t n);
  void (*sub)(void* p, const void* v, int64_t n);
  double (*ascent_vnorm)(const void* p, const void* w, const void* d, double s, int64_t n);
  void (*ascent_write)(void* p, const void* w, const void* d, double s, double f, int64_t n);
  void (*project_write)(void* p, const void* w, double f, int64_t n);
  void (*pgd_linf)(void* xa, const void* g, const void* x, double alpha, double eps, int64_t n);
  double (*pgd_l2_dnorm)(const void* xa, const void* g, const void* x, double s, int64_t n);
  void (*pgd_l2_write)(void* xa, const void* g, const void* x, double s, double f, int64_t n);
  // weight-perturbation family (SAM, ASAM, Box AWP)
  double (*wsumsq)(const void* x, const void* w, double eta, int64_t n);
  void (*add_scaled)(void* p, const void* d, const void* base, void* delta, double s, double clip,
                     bool has_clip, int64_t n);
  void (*asam_apply)(void* p, const void* d, double s, double eta, int64_t n);
  void (*box_apply)(void* p, const void* d, const void* o, double s, double ae, int64_t n);
};

namespace awp_base { void fill_tables(KernelTable* out); }
namespace awp_avx2 { void fill_tables(KernelTable* out); bool compiled(); }
