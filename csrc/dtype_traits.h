// Dtype traits shared by the CPU kernels (cpu/scalar.h, g++) and the CUDA kernels
// (cuda/kernels.cu, nvcc): the accumulate type of each storage type, its load/store
// conversions, and the NaN-passing clamp and absolute value that both sides use.
//
// Cvt<T>::A is float for fp32/fp16/bf16 and double for fp64; Cvt<T>::load / store convert
// between the storage type T and A (fp16/bf16 stores round to nearest even). fp32 and fp64
// are defined here for both sides. The 16-bit storage types differ per side: the CPU's
// half_t / bf16_t with exact software conversions written to vectorize (cpu/scalar.h), and
// CUDA's __half / __nv_bfloat16 with the hardware conversions (below, nvcc only).
#pragma once

#include "dtype.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define AWP_HD __host__ __device__ __forceinline__
#else
#define AWP_HD inline
#endif

template <class T> struct Cvt;
template <> struct Cvt<float> {
  using A = float;
  static AWP_HD float load(float x) { return x; }
  static AWP_HD float store(float x) { return x; }
};
template <> struct Cvt<double> {
  using A = double;
  static AWP_HD double load(double x) { return x; }
  static AWP_HD double store(double x) { return x; }
};

#if defined(__CUDACC__)
template <> struct Cvt<__half> {
  using A = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
#endif

// clamp that lets NaN through (as torch.clamp does)
template <class A>
static AWP_HD A clampv(A x, A lo, A hi) { return x < lo ? lo : (x > hi ? hi : x); }

// |x| as a select (-0 stays -0, NaN stays NaN), the form both sides' kernels compute
template <class A>
static AWP_HD A absv(A x) { return x < A(0) ? -x : x; }
