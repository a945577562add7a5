// awpfast CUDA kernels: multi-tensor versions of the seam ops (see awpfast/ops/__init__.py).
//
// Layout. Every tensor is cut into chunks of kChunk elements, numbered tensor by tensor
// over the whole call ("global chunk index"). A launch covers up to kMaxT non-empty
// tensors, passed by value in a TLMeta kernel argument (pointers, sizes, first chunk):
// no device allocation, no host->device copy, nothing that breaks CUDA graph capture.
// One block per chunk; the block finds its tensor by binary search over the chunk starts.
// PGD's samples (BatchMeta: equal-sized slices of one tensor) are chunked the same way.
//
// Each op is a functor run by one of two generic kernels: k_apply (elementwise) or k_reduce
// (deterministic: one float64 partial per chunk at a fixed slot of the workspace, reduced
// inside the block in a fixed shuffle tree). Per-tensor functors run by k_finalize (one warp
// per tensor, fixed lane assignment and shuffle tree) add up a tensor's partials and compute
// its norm, scale or projection factor into the workspace, where the apply ops read them:
// no host sync. A list that is not given (backups, deltas, base, weights) is a row of null
// pointers in the metadata, tested by the op at run time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../args.h"
#include "../dtype_traits.h"
#include "kernels.h"

namespace awpcuda {
namespace {

constexpr int kChunk = 1 << 14;   // elements per chunk (16 KiB-64 KiB: several waves of blocks)
constexpr int kThreads = 256;     // threads per block of the chunk kernels
constexpr int kMaxT = 64;         // tensors per launch (kernel argument size < 4 KB)
constexpr int kMaxF = 160;        // tensors per finalize launch
constexpr int kFinThreads = 128;  // finalize: one warp per tensor, 4 tensors per block

// ------------------------------------------------------------------ launches
// Every launch goes through here: launch, then check (cudaGetLastError also clears a
// non-sticky error, so the next call starts clean); a failure throws with the CUDA text.
template <class... P, class... Args>
void launch(const char* name, void (*kernel)(P...), int64_t blocks, int threads, cudaStream_t st,
            const Args&... args) {
  kernel<<<(unsigned)blocks, threads, 0, st>>>(args...);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("awpfast._C_cuda: launch of ") + name + " failed: " + cudaGetErrorName(e) +
                             ": " + cudaGetErrorString(e));
}

// ------------------------------------------------------------------ element groups
template <class T> using Acc = typename Cvt<T>::A;
template <class T> constexpr int kVec = 16 / (int)sizeof(T);  // elements per 16-byte vector

// Explicitly rounded operations, for an op that pins its rounding (no contraction by the compiler)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ bool al16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    r = lane < nw ? sh[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  __syncthreads();  // sh may be reused right after
  return r;
}

// ------------------------------------------------------------------ launch metadata
// NP tensor lists; a list that is not given has null pointers.
template <int NP>
struct TLMeta {
  void* ptr[NP][kMaxT];
  int64_t numel[kMaxT];
  int32_t cstart[kMaxT + 1];  // first chunk of each tensor, relative to chunk_base
  int32_t tidx[kMaxT];        // index of the tensor in the whole call
  int32_t ntensors;
  int64_t chunk_base;         // global index of this launch's first chunk
};

// One tensor of `cps` chunks per sample of `ps` elements (PGD): sample b is "tensor" b.
template <int NP>
struct BatchMeta {
  void* ptr[NP];
  int64_t ps, cps;
};

// What a block sees of its chunk: the lists at its first element, and the group loop. A thread
// takes groups of V elements (one 16-byte vector when aligned and whole).
template <class T, int NP>
struct Chunk {
  using A = Acc<T>;
  static constexpr int V = kVec<T>;
  T* p[NP];         // the lists at the chunk's first element
  unsigned given;   // bit j: list j is given (has(j)); an absent one's pointer is list 0's, unused
  int64_t len;      // elements in this chunk
  int t;            // index of the tensor (sample) in the call: per-tensor scalars
  int64_t gc;       // global chunk index: the slot of this chunk's partials
  bool al;          // all given pointers 16-byte aligned

  // p[j] = q[j] + off. No null pointer in p: the compiler then knows them all to be global
  // memory (global loads and stores, as with one kernel per combination of lists).
  __device__ __forceinline__ void set(void* const (&q)[NP], int64_t off) {
    al = true;
    given = 0;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      p[j] = static_cast<T*>(q[j] ? q[j] : q[0]) + off;
      if (q[j]) {
        given |= 1u << j;
        al = al && al16(p[j]);
      }
    }
  }
  __device__ __forceinline__ bool has(int j) const { return (given >> j) & 1u; }
  // f(i, n, vec) for each group of this thread: n (<= V) elements at i; vec: one 16-byte access
  template <class F>
  __device__ __forceinline__ void each(F&& f) const {
    for (int64_t i = (int64_t)threadIdx.x * V; i < len; i += (int64_t)blockDim.x * V) {
      const int n = (int)min((int64_t)V, len - i);
      f(i, n, al && n == V);
    }
  }
  // r <- q[i..] (ld: list j at i), converted to A; missing lanes read as 0
  __device__ __forceinline__ static void load(const T* q, int64_t i, int n, bool vec, A (&r)[V]) {
    if (vec) {
      uint4 raw = *reinterpret_cast<const uint4*>(q + i);
      T e[V];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int k = 0; k < V; ++k) r[k] = Cvt<T>::load(e[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) r[k] = k < n ? Cvt<T>::load(q[i + k]) : A(0);
    }
  }
  __device__ __forceinline__ void ld(int j, int64_t i, int n, bool vec, A (&r)[V]) const { load(p[j], i, n, vec, r); }
  // list j at i <- r (n elements)
  __device__ __forceinline__ void st(int j, int64_t i, int n, bool vec, const A (&r)[V]) const {
    if (vec) {
      T e[V];
#pragma unroll
      for (int k = 0; k < V; ++k) e[k] = Cvt<T>::store(r[k]);
      uint4 raw;
      memcpy(&raw, e, sizeof(raw));
      *reinterpret_cast<uint4*>(p[j] + i) = raw;
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k < n) p[j][i + k] = Cvt<T>::store(r[k]);
    }
  }
  // list dst at i <- list src at i, raw
  __device__ __forceinline__ void copy(int dst, int src, int64_t i, int n, bool vec) const {
    if (vec) {
      *reinterpret_cast<uint4*>(p[dst] + i) = *reinterpret_cast<const uint4*>(p[src] + i);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k < n) p[dst][i + k] = p[src][i + k];
    }
  }
};

// w <- w + s v, and list j (deltas) <- s v when given. The rounding of the kernels so far, pinned:
// with deltas w + round(s v) (the stored delta), without one fused multiply-add.
template <class C, class A = typename C::A>
__device__ __forceinline__ void add_scaled_into(const C& c, int j, A s, A (&v)[C::V], A (&w)[C::V], int64_t i, int n,
                                                bool vec) {
  if (c.has(j)) {
#pragma unroll
    for (int k = 0; k < C::V; ++k) {
      v[k] = mul_rn(s, v[k]);
      w[k] = add_rn(w[k], v[k]);
    }
    c.st(j, i, n, vec, v);
  } else {
#pragma unroll
    for (int k = 0; k < C::V; ++k) w[k] = fma_rn(s, v[k], w[k]);
  }
}

template <class T, int NP>
__device__ __forceinline__ Chunk<T, NP> chunk_of(const TLMeta<NP>& m) {
  const int lc = blockIdx.x;
  int lo = 0, hi = m.ntensors - 1;
  while (lo < hi) {  // the last tensor whose first chunk is <= lc (all tensors are non-empty)
    const int mid = (lo + hi + 1) >> 1;
    if (m.cstart[mid] <= lc) lo = mid; else hi = mid - 1;
  }
  Chunk<T, NP> c;
  const int64_t off = (int64_t)(lc - m.cstart[lo]) * kChunk;
  c.len = min((int64_t)kChunk, m.numel[lo] - off);
  c.t = m.tidx[lo];
  c.gc = m.chunk_base + lc;
  void* q[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) q[j] = m.ptr[j][lo];
  c.set(q, off);
  return c;
}

template <class T, int NP>
__device__ __forceinline__ Chunk<T, NP> chunk_of(const BatchMeta<NP>& m) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / m.cps, cc = blk - b * m.cps;
  Chunk<T, NP> c;
  c.len = min((int64_t)kChunk, m.ps - cc * (int64_t)kChunk);
  c.t = (int)b;
  c.gc = blk;
  c.set(m.ptr, b * m.ps + cc * (int64_t)kChunk);
  return c;
}

// ------------------------------------------------------------------ the two chunk kernels
// An op names its storage type T, its numbers of lists and of sums, and kName. k_apply calls
// op(chunk); k_reduce calls op(chunk, acc) with acc[kSums] zeroed, then sums each accumulator
// over the block and writes it as the chunk's partial part_j[gc].
template <class Op, class Meta>
__global__ void __launch_bounds__(kThreads) k_apply(const __grid_constant__ Meta m, const Op op) {
  op(chunk_of<typename Op::T>(m));
}

template <class Op, class Meta>
__global__ void __launch_bounds__(kThreads) k_reduce(const __grid_constant__ Meta m, const Op op, double* part0,
                                                      double* part1) {
  __shared__ double sh[32];
  const auto c = chunk_of<typename Op::T>(m);
  double acc[Op::kSums] = {};
  op(c, acc);
  double* part[2] = {part0, part1};
#pragma unroll
  for (int j = 0; j < Op::kSums; ++j) {
    const double r = block_sum(acc[j], sh);
    if (threadIdx.x == 0) part[j][c.gc] = r;
  }
}

// ------------------------------------------------------------------ chunk ops
// Per op: its lists in order (? = may be absent) and what it computes per element, in the
// accumulate type A; squares in float64.
#define AWP_OP(STORAGE, NAME, NLISTS, NSUMS)                  \
  using T = STORAGE;                                          \
  using A = Acc<T>;                                           \
  using C = Chunk<T, NLISTS>;                                 \
  enum : int { V = kVec<T>, kLists = NLISTS, kSums = NSUMS }; \
  static constexpr const char* kName = NAME

// x: part0 += x^2
template <class T_> struct SumSq {
  AWP_OP(T_, "sumsq", 1, 1);
  __device__ void operator()(const C& c, double* acc) const {
    c.each([&](int64_t i, int n, bool vec) {
      A a[V];
      c.ld(0, i, n, vec, a);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[0] += (double)a[k] * (double)a[k];
    });
  }
};

// a, b: part0 += a^2, part1 += b^2.  DIFF (a = params, b = backups): part0 += b^2, part1 += (a - b)^2
template <class T_, bool DIFF> struct SumSq2 {
  AWP_OP(T_, DIFF ? "sumsq_w_diff" : "sumsq2", 2, 2);
  __device__ void operator()(const C& c, double* acc) const {
    c.each([&](int64_t i, int n, bool vec) {
      A x[V], y[V];
      c.ld(0, i, n, vec, x);
      c.ld(1, i, n, vec, y);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (DIFF) {
          const A v = x[k] - y[k];
          acc[0] += (double)y[k] * (double)y[k];
          acc[1] += (double)v * (double)v;
        } else {
          acc[0] += (double)x[k] * (double)x[k];
          acc[1] += (double)y[k] * (double)y[k];
        }
      }
    });
  }
};

// dst, src (restore: params, backups): dst <- src
template <class T_> struct Copy {
  AWP_OP(T_, "copy", 2, 0);
  __device__ void operator()(const C& c) const {
    c.each([&](int64_t i, int n, bool vec) { c.copy(0, 1, i, n, vec); });
  }
};

// params, deltas: p <- p - v
template <class T_> struct Sub {
  AWP_OP(T_, "sub", 2, 0);
  __device__ void operator()(const C& c) const {
    c.each([&](int64_t i, int n, bool vec) {
      A x[V], y[V];
      c.ld(0, i, n, vec, x);
      c.ld(1, i, n, vec, y);
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] = x[k] - y[k];
      c.st(0, i, n, vec, x);
    });
  }
};

// params p, backups w, directions d: v = (p - w) + s d with s = scale[t].
// SUM: part0 += v^2.  Else p <- w + v f with f = factor[t].
template <class T_, bool SUM> struct Ascent {
  AWP_OP(T_, SUM ? "ascent_sq" : "ascent_write", 3, SUM ? 1 : 0);
  const double *scale, *factor;
  __device__ void operator()(const C& c, double* acc = nullptr) const {
    const A s = (A)scale[c.t], f = SUM ? A(1) : (A)factor[c.t];
    c.each([&](int64_t i, int n, bool vec) {
      A x[V], y[V], z[V];
      c.ld(0, i, n, vec, x);
      c.ld(1, i, n, vec, y);
      c.ld(2, i, n, vec, z);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A v = (x[k] - y[k]) + s * z[k];
        if (SUM) acc[0] += (double)v * (double)v;
        else x[k] = y[k] + v * f;
      }
      if (!SUM) c.st(0, i, n, vec, x);
    });
  }
};

// params p, backups w: p <- w + (p - w) f with f = factor[t]
template <class T_> struct ProjectWrite {
  AWP_OP(T_, "project_write", 2, 0);
  const double* factor;
  __device__ void operator()(const C& c) const {
    const A f = (A)factor[c.t];
    c.each([&](int64_t i, int n, bool vec) {
      A x[V], y[V];
      c.ld(0, i, n, vec, x);
      c.ld(1, i, n, vec, y);
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] = y[k] + (x[k] - y[k]) * f;
      c.st(0, i, n, vec, x);
    });
  }
};

// x_adv, grad, x: x_adv <- clamp(x + clamp(x_adv + alpha sign(g) - x, -eps, eps), 0, 1)
template <class T_> struct PgdLinf {
  AWP_OP(T_, "pgd_linf", 3, 0);
  A alpha, eps;
  __device__ void operator()(const C& c) const {
    c.each([&](int64_t i, int n, bool vec) {
      A a[V], b[V], z[V];
      c.ld(0, i, n, vec, a);
      c.ld(1, i, n, vec, b);
      c.ld(2, i, n, vec, z);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A gg = b[k];
        const A sg = gg > A(0) ? A(1) : (gg < A(0) ? A(-1) : gg);  // 0 -> 0, NaN -> NaN
        const A dl = clampv((a[k] + alpha * sg) - z[k], -eps, eps);
        a[k] = clampv(z[k] + dl, A(0), A(1));
      }
      c.st(0, i, n, vec, a);
    });
  }
};

// PGD L2 on sample t (x_adv, grad, x), PHASE 0: part0 += g^2.  With s = scale[t] and
// dl = (x_adv + s g) - x, PHASE 1: part0 += dl^2; PHASE 2: x_adv <- clamp(x + factor[t] dl, 0, 1)
template <class T_, int PHASE> struct PgdL2 {
  AWP_OP(T_, PHASE == 0 ? "pgd_l2_grad_sq" : PHASE == 1 ? "pgd_l2_delta_sq" : "pgd_l2_write", 3, PHASE < 2);
  const double *scale, *factor;
  __device__ void operator()(const C& c, double* acc = nullptr) const {
    const A s = PHASE > 0 ? (A)scale[c.t] : A(0);
    const A f = PHASE == 2 ? (A)factor[c.t] : A(1);
    c.each([&](int64_t i, int n, bool vec) {
      A a[V], gg[V], z[V];
      c.ld(1, i, n, vec, gg);
      if (PHASE == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[0] += (double)gg[k] * (double)gg[k];
        return;
      }
      c.ld(0, i, n, vec, a);
      c.ld(2, i, n, vec, z);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A dl = (a[k] + s * gg[k]) - z[k];
        if (PHASE == 1) acc[0] += (double)dl * (double)dl;
        else a[k] = clampv(z[k] + dl * f, A(0), A(1));
      }
      if (PHASE == 2) c.st(0, i, n, vec, a);
    });
  }
};

// params, directions, backups?, deltas?, base?: d' = clamp(d, -clip, clip) (clip_on);
// v = s d' (s = scale[t]); backup <- p; delta <- v; p <- (base or p) + v (rounding: add_scaled_into).
// Also perturb's apply pass (no clip, no base).
template <class T_> struct AddScaled {
  AWP_OP(T_, "add_scaled", 5, 0);
  const double* scale;
  bool clip_on;
  A clip;
  __device__ void operator()(const C& c) const {
    const A s = (A)scale[c.t];
    const T* src = c.has(4) ? c.p[4] : c.p[0];
    c.each([&](int64_t i, int n, bool vec) {
      if (c.has(2)) c.copy(2, 0, i, n, vec);
      A w[V], v[V];
      c.load(src, i, n, vec, w);
      c.ld(1, i, n, vec, v);
      if (clip_on) {
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = clampv(v[k], -clip, clip);  // NaN stays NaN
      }
      add_scaled_into(c, 3, s, v, w, i, n, vec);
      c.st(0, i, n, vec, w);
    });
  }
};

// x, weights?: y = (|w| + eta) x (the product in A), or y = x without weights: part0 += y^2
template <class T_> struct WSumSq {
  AWP_OP(T_, "wsumsq", 2, 1);
  A eta;
  __device__ void operator()(const C& c, double* acc) const {
    const bool weighted = c.has(1);
    c.each([&](int64_t i, int n, bool vec) {
      A a[V], ww[V];
      c.ld(0, i, n, vec, a);
      if (weighted) c.ld(1, i, n, vec, ww);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        A y = a[k];
        if (weighted) y = (absv(ww[k]) + eta) * y;
        acc[0] += (double)y * (double)y;
      }
    });
  }
};

// params, directions, backups?: u = |p| + eta (before the write); backup <- p;
// p <- p + (s u^2) d with s = scale[t]
template <class T_> struct Asam {
  AWP_OP(T_, "asam", 3, 0);
  const double* scale;
  A eta;
  __device__ void operator()(const C& c) const {
    const A s = (A)scale[c.t];
    c.each([&](int64_t i, int n, bool vec) {
      if (c.has(2)) c.copy(2, 0, i, n, vec);
      A w[V], g[V];
      c.ld(0, i, n, vec, w);
      c.ld(1, i, n, vec, g);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A u = absv(w[k]) + eta;
        w[k] = w[k] + (s * (u * u)) * g[k];
      }
      c.st(0, i, n, vec, w);
    });
  }
};

// params, directions, origins. first: origin <- p. Unless the tensor is skipped (sb[t] < 0):
// p <- clamp(p + s d, o - ae |o|, o + ae |o|) with s = sa[t], ae = sb[t] (NaN in p + s d stays NaN)
template <class T_> struct BoxApply {
  AWP_OP(T_, "box_apply", 3, 0);
  const double *sa, *sb;
  bool first;
  __device__ void operator()(const C& c) const {
    const bool skip = sb[c.t] < 0.0;  // uniform over the block: only the origin copy
    if (skip && !first) return;
    const A s = (A)sa[c.t], ae = (A)sb[c.t];
    c.each([&](int64_t i, int n, bool vec) {
      if (first) c.copy(2, 0, i, n, vec);
      if (skip) return;
      A w[V], g[V], oo[V];
      c.ld(0, i, n, vec, w);
      c.ld(1, i, n, vec, g);
      if (first) {
#pragma unroll
        for (int k = 0; k < V; ++k) oo[k] = w[k];
      } else {
        c.ld(2, i, n, vec, oo);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A r = ae * absv(oo[k]);
        w[k] = clampv(w[k] + s * g[k], oo[k] - r, oo[k] + r);
      }
      c.st(0, i, n, vec, w);
    });
  }
};
#undef AWP_OP

static_assert(sizeof(TLMeta<5>) + sizeof(AddScaled<double>) <= 4096, "kernel arguments must fit in 4 KB");

// ------------------------------------------------------------------ per-tensor finalize
struct FinMeta {
  int32_t cstart[kMaxF + 1];  // global first chunk of tensors t0 .. t0 + n
  double a[kMaxF];            // per-tensor floats (gamma, step size, lr, scale)
  double b[kMaxF];            // second per-tensor floats (Box AWP's adv_eps)
  int32_t n;
  int32_t t0;
};

// Sum of part[a..b) by one warp: lane j takes a+j, a+j+32, ...; then a fixed shuffle tree.
// The result is valid in lane 0.
__device__ __forceinline__ double warp_sum_range(const double* part, int32_t a, int32_t b, int lane) {
  double s = 0.0;
  for (int32_t c = a + lane; c < b; c += 32) s += part[c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  return s;
}

// One warp per tensor: s0, s1 = the sums of the tensor's partials in p0, p1 (0 when null), then
// lane 0 runs fin(t, a[i], b[i], s0, s1).
template <class Fin>
__global__ void k_finalize(const __grid_constant__ FinMeta m, const double* p0, const double* p1, const Fin fin) {
  const int i = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= m.n) return;  // uniform across the warp
  const double s0 = p0 ? warp_sum_range(p0, m.cstart[i], m.cstart[i + 1], lane) : 0.0;
  const double s1 = p1 ? warp_sum_range(p1, m.cstart[i], m.cstart[i + 1], lane) : 0.0;
  if (lane == 0) fin(m.t0 + i, m.a[i], m.b[i], s0, s1);
}

__device__ __forceinline__ double project_factor(double gamma, double wsq, double vsq) {
  const double radius = gamma * sqrt(wsq), vn = sqrt(vsq);
  if (!(vn > 0.0)) return 1.0;
  const double r = radius / vn;
  return r > 1.0 ? 1.0 : r;  // NaN stays NaN, as torch.clamp
}

// The float32 or float64 output array of the norms
struct Out {
  void* p;
  bool f64;
  __device__ void put(int t, double v) const {
    if (f64) static_cast<double*>(p)[t] = v;
    else static_cast<float*>(p)[t] = (float)v;
  }
};

// out[t] = sqrt(s0)
struct NormsFin {
  Out out;
  __device__ void operator()(int t, double, double, double s0, double) const { out.put(t, sqrt(s0)); }
};

// s0 = ||w||^2, s1 = ||d||^2: sa = gamma ||w|| / (||d|| + eps), sb = ||w||^2, out = ||d||
struct ScaleFin {
  double *sa, *sb;
  double eps;
  Out out;
  __device__ void operator()(int t, double g, double, double s0, double s1) const {
    const double dn = sqrt(s1);
    sa[t] = g * sqrt(s0) / (dn + eps);
    sb[t] = s0;
    out.put(t, dn);
  }
};

// s0 = ||v||^2: sb = factor(gamma, sb (= ||w||^2), s0)
struct AscentFactorFin {
  double* sb;
  __device__ void operator()(int t, double g, double, double s0, double) const { sb[t] = project_factor(g, sb[t], s0); }
};

// s0 = ||w||^2, s1 = ||p - w||^2: sa = factor(gamma, s0, s1)
struct ProjectFin {
  double* sa;
  __device__ void operator()(int t, double g, double, double s0, double s1) const { sa[t] = project_factor(g, s0, s1); }
};

// dst[t] = a: per-tensor floats into device memory from kernel arguments (no host-to-device
// copy, so a CUDA graph captures the values)
struct FillFin {
  double* dst;
  __device__ void operator()(int t, double a, double, double, double) const { dst[t] = a; }
};

// Box AWP with a = lr, b = adv_eps. gn = ||d|| (s1, or gd[t] when given), wn = ||p|| (s0 or
// gw[t]), both rounded to the accumulate type (float32 unless out.f64); out[t] = gn. A zero or
// non-finite gn marks the tensor as skipped (sb[t] = -1), else sa[t] = lr (wn + eps) / (gn + eps)
// and sb[t] = adv_eps (>= 0).
struct BoxFin {
  const double *gw, *gd;  // null: the norms come from the partials
  double *sa, *sb;
  double eps;
  Out out;
  __device__ void operator()(int t, double lr, double ae, double s0, double s1) const {
    double gn = gd ? gd[t] : sqrt(s1);
    double wn = gw ? gw[t] : sqrt(s0);
    if (!out.f64) {
      gn = (double)(float)gn;
      wn = (double)(float)wn;
    }
    const bool ok = isfinite(gn) && gn != 0.0;
    sa[t] = ok ? lr * (wn + eps) / (gn + eps) : 0.0;
    sb[t] = ok ? ae : -1.0;
    out.put(t, gn);
  }
};

// out[0] = sum of part[0..C) in a fixed order (one block: thread j takes j, j + blockDim, ...,
// then the fixed tree of block_sum)
__global__ void k_sum_all(const double* part, int64_t C, Out out) {
  __shared__ double sh[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) s += part[i];
  const double r = block_sum(s, sh);
  if (threadIdx.x == 0) out.put(0, r);
}

// PGD L2, one thread per sample, the partials in chunk order.
// PHASE 0: scale[b] = alpha / (||g_b|| + 1e-10).  PHASE 1: factor[b] = min(1, eps / ||delta_b||)
template <int PHASE>
__global__ void k_pgd_l2_fin(const double* part, int64_t batch, int64_t cps, double alpha, double eps, double* out) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double s = 0.0;
  for (int64_t c = b * cps; c < (b + 1) * cps; ++c) s += part[c];
  if (PHASE == 0) {
    out[b] = alpha / (sqrt(s) + 1e-10);
  } else {
    const double r = eps / sqrt(s);  // ||delta|| == 0 -> inf -> 1
    out[b] = r > 1.0 ? 1.0 : r;
  }
}

// ------------------------------------------------------------------ host helpers
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
Out as_out(uintptr_t out, int dtype) { return Out{reinterpret_cast<void*>(out), dtype == kFloat64}; }

int64_t nchunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// global first chunk of every tensor, size numel.size() + 1
std::vector<int64_t> chunk_starts(const Sizes& numel) {
  std::vector<int64_t> cs(numel.size() + 1, 0);
  for (size_t t = 0; t < numel.size(); ++t) {
    if (numel[t] < 0) throw std::invalid_argument("awpfast._C_cuda: negative numel");
    cs[t + 1] = cs[t] + nchunks_of(numel[t]);
  }
  if (cs.back() > (int64_t)INT32_MAX) throw std::invalid_argument("awpfast._C_cuda: too many chunks");
  return cs;
}

const Ptrs* opt(const Ptrs& l) { return l.empty() ? nullptr : &l; }  // an optional list: null when not given

template <class F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float()); return;
    case kFloat64: f(double()); return;
    case kFloat16: f(__half()); return;
    case kBFloat16: f(__nv_bfloat16()); return;
  }
  throw std::invalid_argument("awpfast._C_cuda: unknown dtype code " + std::to_string(dtype));
}

// op over the chunks of m: k_apply, or k_reduce writing the partials to part0 (and part1)
template <class Op, class Meta>
void launch_op(const Op& op, const Meta& m, int64_t blocks, cudaStream_t st, double* part0, double* part1) {
  if constexpr (Op::kSums == 0) launch(Op::kName, k_apply<Op, Meta>, blocks, kThreads, st, m, op);
  else launch(Op::kName, k_reduce<Op, Meta>, blocks, kThreads, st, m, op, part0, part1);
}

// One multi-tensor call: chunk starts, the workspace [pa: C][pb: C][pc: C][sa: N][sb: N]
// (float64) and the stream; runs chunk ops and finalize functors over all tensors.
struct Call {
  const Sizes& numel;
  std::vector<int64_t> cs;
  double *pa = nullptr, *pb = nullptr, *pc = nullptr, *sa = nullptr, *sb = nullptr;
  cudaStream_t st;

  Call(const Sizes& n, uintptr_t ws, uintptr_t stream) : numel(n), cs(chunk_starts(n)), st(as_stream(stream)) {
    if (ws == 0) return;  // restore, unperturb: no workspace
    const int64_t C = cs.back(), N = (int64_t)n.size();
    pa = reinterpret_cast<double*>(ws);
    pb = pa + C;
    pc = pa + 2 * C;
    sa = pa + 3 * C;
    sb = sa + N;
  }

  // op over the lists (a null list: not given), in batches of up to kMaxT non-empty tensors;
  // a reduction writes its partials to part0 (and part1)
  template <class Op>
  void run(const Op& op, const Ptrs* const (&lists)[Op::kLists], double* part0 = nullptr,
           double* part1 = nullptr) const {
    constexpr int NP = Op::kLists;
    TLMeta<NP> m;
    std::memset(&m, 0, sizeof(m));
    int k = 0;
    auto flush = [&](int64_t end_chunk) {
      m.ntensors = k;
      m.cstart[k] = (int32_t)(end_chunk - m.chunk_base);
      launch_op(op, m, m.cstart[k], st, part0, part1);
      std::memset(&m, 0, sizeof(m));
      k = 0;
    };
    for (size_t t = 0; t < numel.size(); ++t) {
      if (numel[t] == 0) continue;
      if (k == 0) m.chunk_base = cs[t];
      for (int j = 0; j < NP; ++j) m.ptr[j][k] = lists[j] ? reinterpret_cast<void*>((*lists[j])[t]) : nullptr;
      m.numel[k] = numel[t];
      m.cstart[k] = (int32_t)(cs[t] - m.chunk_base);
      m.tidx[k] = (int32_t)t;
      ++k;
      if (k == kMaxT) flush(cs[t + 1]);
    }
    if (k > 0) flush(cs[numel.size()]);
  }

  // fin over all tensors (empty ones included), in batches of up to kMaxF, with the
  // per-tensor floats a (and b) and the sums of the partials in p0 (and p1)
  template <class Fin>
  void fin(const char* name, const Fin& f, const double* p0, const double* p1, const Floats* a,
           const Floats* b = nullptr) const {
    const int n = (int)numel.size();
    for (int t0 = 0; t0 < n; t0 += kMaxF) {
      FinMeta m;
      std::memset(&m, 0, sizeof(m));
      m.n = std::min(kMaxF, n - t0);
      m.t0 = t0;
      for (int i = 0; i <= m.n; ++i) m.cstart[i] = (int32_t)cs[t0 + i];
      for (int i = 0; i < m.n; ++i) {
        m.a[i] = a ? (*a)[t0 + i] : 0.0;
        m.b[i] = b ? (*b)[t0 + i] : 0.0;
      }
      launch(name, k_finalize<Fin>, ((int64_t)m.n * 32 + kFinThreads - 1) / kFinThreads, kFinThreads, st, m, p0, p1, f);
    }
  }

  // The per-tensor scales: the caller's float64 device array, or the list written into sa
  const double* scales(const Floats& list, uintptr_t ptr) const {
    if (ptr == 0) {
      fin("fill_per_tensor", FillFin{sa}, nullptr, nullptr, &list);
      return sa;
    }
    if (!list.empty()) throw std::invalid_argument("awpfast._C_cuda: give the scales as a list or as a pointer, not both");
    return reinterpret_cast<const double*>(ptr);
  }
};

// PGD: op over `batch` samples of `ps` elements (cps chunks each) of one tensor triple
template <class Op>
void run_batch(const Op& op, uintptr_t xa, uintptr_t g, uintptr_t x, int64_t batch, int64_t ps, cudaStream_t st,
               double* part = nullptr) {
  const int64_t cps = nchunks_of(ps);
  if (batch * cps > (int64_t)INT32_MAX) throw std::invalid_argument("awpfast._C_cuda: too many chunks");
  const BatchMeta<3> m{{reinterpret_cast<void*>(xa), reinterpret_cast<void*>(g), reinterpret_cast<void*>(x)}, ps, cps};
  launch_op(op, m, batch * cps, st, part, nullptr);
}

}  // namespace

// ================================================================== public launchers
int64_t chunk_elems() { return kChunk; }
int max_tensors_per_launch() { return kMaxT; }

int64_t workspace_doubles(const Sizes& numel) {
  return 3 * chunk_starts(numel).back() + 2 * (int64_t)numel.size();
}

int64_t pgd_workspace_doubles(int64_t batch, int64_t per_sample) {
  return 2 * batch * nchunks_of(per_sample) + 2 * batch;
}

std::string probe() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, k_apply<Copy<float>, TLMeta<2>>);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  return "";
}

void norms(const Ptrs& x, const Sizes& numel, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"tensors", x.size()}});
  const Call c(numel, ws, stream);
  dispatch(dtype, [&](auto tag) { c.run(SumSq<decltype(tag)>{}, {&x}, c.pa); });
  c.fin("norms", NormsFin{as_out(out, dtype)}, c.pa, nullptr, nullptr);
}

void perturb(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Ptrs& v, const Sizes& numel,
             const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"directions", d.size()},
              {"gammas", gamma.size()}, {"backups", b.size(), true}, {"deltas", v.size(), true}});
  const Call c(numel, ws, stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    c.run(SumSq2<T, false>{}, {&p, &d}, c.pa, c.pb);
    c.fin("perturb scale", ScaleFin{c.sa, c.sb, eps, as_out(out, dtype)}, c.pa, c.pb, &gamma);
    c.run(AddScaled<T>{c.sa, false, Acc<T>(0)}, {&p, &d, opt(b), opt(v), nullptr});
  });
}

void restore(const Ptrs& p, const Ptrs& b, const Sizes& numel, int dtype, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"backups", b.size()}});
  const Call c(numel, 0, stream);
  dispatch(dtype, [&](auto tag) { c.run(Copy<decltype(tag)>{}, {&p, &b}); });
}

void unperturb(const Ptrs& p, const Ptrs& v, const Sizes& numel, int dtype, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"deltas", v.size()}});
  const Call c(numel, 0, stream);
  dispatch(dtype, [&](auto tag) { c.run(Sub<decltype(tag)>{}, {&p, &v}); });
}

void ascent_step(const Ptrs& p, const Ptrs& wl, const Ptrs& d, const Sizes& numel, const Floats& step,
                 const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws,
                 uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"backups", wl.size()},
              {"directions", d.size()}, {"step_sizes", step.size()}, {"gammas", gamma.size()}});
  const Call c(numel, ws, stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // ||w||, ||d|| -> scale (sa), ||w||^2 (sb), out = ||d||
    c.run(SumSq2<T, false>{}, {&wl, &d}, c.pa, c.pb);
    c.fin("ascent scale", ScaleFin{c.sa, c.sb, eps, as_out(out, dtype)}, c.pa, c.pb, &step);
    c.run(Ascent<T, true>{c.sa, c.sb}, {&p, &wl, &d}, c.pc);                // ||v|| partials -> pc
    c.fin("ascent factor", AscentFactorFin{c.sb}, c.pc, nullptr, &gamma);  // factor -> sb
    c.run(Ascent<T, false>{c.sa, c.sb}, {&p, &wl, &d});
  });
}

void project(const Ptrs& p, const Ptrs& wl, const Sizes& numel, const Floats& gamma, int dtype,
             uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"backups", wl.size()}, {"gammas", gamma.size()}});
  const Call c(numel, ws, stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    c.run(SumSq2<T, true>{}, {&p, &wl}, c.pa, c.pb);  // pa = ||w||^2, pb = ||p - w||^2
    c.fin("project factor", ProjectFin{c.sa}, c.pa, c.pb, &gamma);
    c.run(ProjectWrite<T>{c.sa}, {&p, &wl});
  });
}

void pgd_linf(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t numel, double alpha, double eps,
              int dtype, uintptr_t stream) {
  if (numel <= 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    run_batch(PgdLinf<T>{(A)alpha, (A)eps}, xa, g, x, 1, numel, as_stream(stream));  // one "sample"
  });
}

void pgd_l2(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t batch, int64_t per_sample, double alpha,
            double eps, int dtype, uintptr_t ws, uintptr_t stream) {
  if (batch <= 0 || per_sample <= 0) return;
  const int64_t cps = nchunks_of(per_sample), C = batch * cps, fb = (batch + kFinThreads - 1) / kFinThreads;
  double* pg = reinterpret_cast<double*>(ws);  // [pg: C][pd: C][scale: batch][factor: batch]
  double *pd = pg + C, *scale = pg + 2 * C, *factor = pg + 2 * C + batch;
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    run_batch(PgdL2<T, 0>{scale, factor}, xa, g, x, batch, per_sample, st, pg);
    launch("pgd_l2 scale", k_pgd_l2_fin<0>, fb, kFinThreads, st, pg, batch, cps, alpha, eps, scale);
    run_batch(PgdL2<T, 1>{scale, factor}, xa, g, x, batch, per_sample, st, pd);
    launch("pgd_l2 factor", k_pgd_l2_fin<1>, fb, kFinThreads, st, pd, batch, cps, alpha, eps, factor);
    run_batch(PgdL2<T, 2>{scale, factor}, xa, g, x, batch, per_sample, st);
  });
}

// ------------------------------------------------------------------ weight-perturbation family
void add_scaled(const Ptrs& p, const Ptrs& d, const Ptrs& base, const Ptrs& b, const Ptrs& v, const Sizes& numel,
                const Floats& scales, uintptr_t scale_ptr, bool has_clip, double clip, int dtype, uintptr_t ws,
                uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"directions", d.size()},
              {"scales", scales.size(), scale_ptr != 0}, {"base", base.size(), true},
              {"backups", b.size(), true}, {"deltas", v.size(), true}});
  const Call c(numel, ws, stream);
  const double* sc = c.scales(scales, scale_ptr);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    c.run(AddScaled<T>{sc, has_clip, (Acc<T>)clip}, {&p, &d, opt(b), opt(v), opt(base)});
  });
}

void global_sqnorm(const Ptrs& x, const Ptrs& wl, const Sizes& numel, double eta, int dtype, uintptr_t out,
                   uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"tensors", x.size()}, {"weights", wl.size(), true}});
  const Call c(numel, ws, stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    c.run(WSumSq<T>{(Acc<T>)eta}, {&x, opt(wl)}, c.pa);
  });
  launch("sum_all", k_sum_all, 1, kThreads, c.st, c.pa, c.cs.back(), as_out(out, dtype));
}

void asam_apply(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Sizes& numel, const Floats& scales,
                uintptr_t scale_ptr, double eta, int dtype, uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"directions", d.size()},
              {"scales", scales.size(), scale_ptr != 0}, {"backups", b.size(), true}});
  const Call c(numel, ws, stream);
  const double* sc = c.scales(scales, scale_ptr);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    c.run(Asam<T>{sc, (Acc<T>)eta}, {&p, &d, opt(b)});
  });
}

void box_perturb(const Ptrs& p, const Ptrs& d, const Ptrs& o, const Sizes& numel, const Floats& lrs,
                 const Floats& aes, bool first, double eps, uintptr_t dnorm_ptr, uintptr_t wnorm_ptr, int dtype,
                 uintptr_t out, uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {"directions", d.size()},
              {"origins", o.size()}, {"adv_lrs", lrs.size()}, {"adv_epss", aes.size()}});
  if ((dnorm_ptr == 0) != (wnorm_ptr == 0))
    throw std::invalid_argument("awpfast._C_cuda: give both norm arrays or neither");
  const bool given = dnorm_ptr != 0;
  const Call c(numel, ws, stream);
  const BoxFin fin{reinterpret_cast<const double*>(wnorm_ptr), reinterpret_cast<const double*>(dnorm_ptr),
                   c.sa, c.sb, eps, as_out(out, dtype)};
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!given) c.run(SumSq2<T, false>{}, {&p, &d}, c.pa, c.pb);  // pa = ||p||^2, pb = ||d||^2
    c.fin("box scale", fin, given ? nullptr : c.pa, given ? nullptr : c.pb, &lrs, &aes);
    c.run(BoxApply<T>{c.sa, c.sb, first}, {&p, &d, &o});
  });
}

}  // namespace awpcuda
