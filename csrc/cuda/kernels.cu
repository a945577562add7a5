// awpfast CUDA kernels: multi-tensor versions of the seam ops (see awpfast/ops/__init__.py).
//
// Layout. Every tensor is cut into chunks of kChunk elements, numbered tensor by tensor
// over the whole call ("global chunk index"). A launch covers up to kMaxT non-empty
// tensors, passed by value in a TLMeta kernel argument (pointers, sizes, first chunk):
// no device allocation, no host->device copy, nothing that breaks CUDA graph capture.
// One block per chunk; the block finds its tensor by binary search over the chunk starts.
//
// Reductions are deterministic: each block writes one partial (float64) per chunk at a
// fixed slot of the workspace, reduced inside the block in a fixed shuffle tree; a
// finalize kernel (one warp per tensor, fixed lane assignment and shuffle tree) then adds
// up a tensor's partials.
// Per-tensor scalars (the perturbation scale, the projection factor) are computed by the
// finalize kernels into the workspace and read by the apply kernels: no host sync.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../dtype.h"
#include "../args.h"
#include "kernels.h"

namespace awpcuda {
namespace {

constexpr int kChunk = 1 << 14;   // elements per chunk (16 KiB-64 KiB: several waves of blocks)
constexpr int kThreads = 256;     // threads per block of the chunk kernels
constexpr int kMaxT = 64;         // tensors per launch (kernel argument size < 4 KB)
constexpr int kMaxF = 160;        // tensors per finalize launch
constexpr int kFinThreads = 128;  // finalize: one warp per tensor, 4 tensors per block

// ------------------------------------------------------------------ errors
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("awpfast._C_cuda: ") + what + " failed: " +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}
#define AWP_CHECK_LAUNCH(name) check(cudaGetLastError(), "launch of " name)

// ------------------------------------------------------------------ scalar types
template <class T> struct Cv;
template <> struct Cv<float> {
  using A = float;
  __device__ static float ld(float x) { return x; }
  __device__ static float st(float x) { return x; }
};
template <> struct Cv<double> {
  using A = double;
  __device__ static double ld(double x) { return x; }
  __device__ static double st(double x) { return x; }
};
template <> struct Cv<__half> {
  using A = float;
  __device__ static float ld(__half x) { return __half2float(x); }
  __device__ static __half st(float x) { return __float2half_rn(x); }
};
template <> struct Cv<__nv_bfloat16> {
  using A = float;
  __device__ static float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 st(float x) { return __float2bfloat16_rn(x); }
};

// V = elements per 16-byte vector
template <class T> struct Vw { static constexpr int V = 16 / sizeof(T); };

// Load n (<= V) elements at p[i..] converted to A; missing lanes read as 0.
template <class T>
__device__ __forceinline__ void load(const T* p, int64_t i, int n, bool vec,
                                     typename Cv<T>::A (&r)[Vw<T>::V]) {
  constexpr int V = Vw<T>::V;
  if (vec) {
    uint4 raw = *reinterpret_cast<const uint4*>(p + i);
    T e[V];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = Cv<T>::ld(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = k < n ? Cv<T>::ld(p[i + k]) : typename Cv<T>::A(0);
  }
}

template <class T>
__device__ __forceinline__ void store(T* p, int64_t i, int n, bool vec,
                                      const typename Cv<T>::A (&r)[Vw<T>::V]) {
  constexpr int V = Vw<T>::V;
  if (vec) {
    T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = Cv<T>::st(r[k]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(p + i) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) p[i + k] = Cv<T>::st(r[k]);
  }
}

// raw copy of n (<= V) elements
template <class T>
__device__ __forceinline__ void copy_raw(T* dst, const T* src, int64_t i, int n, bool vec) {
  constexpr int V = Vw<T>::V;
  if (vec) {
    *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(src + i);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) dst[i + k] = src[i + k];
  }
}

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
template <int NP>
struct TLMeta {
  void* ptr[NP][kMaxT];
  int64_t numel[kMaxT];
  int32_t cstart[kMaxT + 1];  // first chunk of each tensor, relative to chunk_base
  int32_t tidx[kMaxT];        // index of the tensor in the whole call
  int32_t ntensors;
  int64_t chunk_base;         // global index of this launch's first chunk
};

struct ChunkPos {
  int t;        // slot in the meta
  int64_t off;  // element offset in the tensor
  int64_t len;  // elements in this chunk
  int64_t gc;   // global chunk index
};

template <int NP>
__device__ __forceinline__ ChunkPos locate(const TLMeta<NP>& m) {
  const int lc = blockIdx.x;
  int lo = 0, hi = m.ntensors - 1;
  while (lo < hi) {  // the last tensor whose first chunk is <= lc (all tensors are non-empty)
    const int mid = (lo + hi + 1) >> 1;
    if (m.cstart[mid] <= lc) lo = mid; else hi = mid - 1;
  }
  ChunkPos c;
  c.t = lo;
  c.off = (int64_t)(lc - m.cstart[lo]) * kChunk;
  c.len = m.numel[lo] - c.off;
  if (c.len > kChunk) c.len = kChunk;
  c.gc = m.chunk_base + lc;
  return c;
}

#define AWP_FOR_GROUPS(T, len)                                                          \
  for (int64_t i = (int64_t)threadIdx.x * Vw<T>::V; i < (len);                          \
       i += (int64_t)blockDim.x * Vw<T>::V)

// ------------------------------------------------------------------ chunk kernels
// partial[gc] = sum x^2
template <class T>
__global__ void __launch_bounds__(kThreads) k_sumsq(const __grid_constant__ TLMeta<1> m, double* part) {
  __shared__ double sh[32];
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  const T* x = static_cast<const T*>(m.ptr[0][c.t]) + c.off;
  const bool al = al16(x);
  double acc = 0.0;
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    A a[V];
    load<T>(x, i, n, al && n == V, a);
#pragma unroll
    for (int k = 0; k < V; ++k) acc += (double)a[k] * (double)a[k];
  }
  const double s = block_sum(acc, sh);
  if (threadIdx.x == 0) part[c.gc] = s;
}

// pa[gc] = sum a^2 and pb[gc] = sum b^2, or with DIFF: sum b^2 and sum (a - b)^2
// (a = params, b = backups for the projection).
template <class T, bool DIFF>
__global__ void __launch_bounds__(kThreads) k_sumsq2(const __grid_constant__ TLMeta<2> m, double* pa,
                                                      double* pb) {
  __shared__ double sh[32];
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  const T* a = static_cast<const T*>(m.ptr[0][c.t]) + c.off;
  const T* b = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  const bool al = al16(a) && al16(b);
  double s1 = 0.0, s2 = 0.0;
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    A x[V], y[V];
    load<T>(a, i, n, al && n == V, x);
    load<T>(b, i, n, al && n == V, y);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (DIFF) {
        const A v = x[k] - y[k];
        s1 += (double)y[k] * (double)y[k];
        s2 += (double)v * (double)v;
      } else {
        s1 += (double)x[k] * (double)x[k];
        s2 += (double)y[k] * (double)y[k];
      }
    }
  }
  const double r1 = block_sum(s1, sh);
  const double r2 = block_sum(s2, sh);
  if (threadIdx.x == 0) {
    pa[c.gc] = r1;
    pb[c.gc] = r2;
  }
}

// lists: params, directions, backups (or null), deltas (or null).
// backup <- p; v = scale * d; delta <- v; p <- p + v
template <class T, bool HAS_B, bool HAS_V>
__global__ void __launch_bounds__(kThreads) k_perturb_apply(const __grid_constant__ TLMeta<4> m,
                                                             const double* scale) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* d = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  T* b = HAS_B ? static_cast<T*>(m.ptr[2][c.t]) + c.off : nullptr;
  T* vo = HAS_V ? static_cast<T*>(m.ptr[3][c.t]) + c.off : nullptr;
  const bool al = al16(p) && al16(d) && (!HAS_B || al16(b)) && (!HAS_V || al16(vo));
  const A s = (A)scale[m.tidx[c.t]];
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    if (HAS_B) copy_raw<T>(b, p, i, n, vec);
    A w[V], v[V];
    load<T>(p, i, n, vec, w);
    load<T>(d, i, n, vec, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = s * v[k];
      w[k] = w[k] + v[k];
    }
    if (HAS_V) store<T>(vo, i, n, vec, v);
    store<T>(p, i, n, vec, w);
  }
}

// dst <- src
template <class T>
__global__ void __launch_bounds__(kThreads) k_copy(const __grid_constant__ TLMeta<2> m) {
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* dst = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* src = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  const bool al = al16(dst) && al16(src);
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    copy_raw<T>(dst, src, i, n, al && n == V);
  }
}

// p <- p - v
template <class T>
__global__ void __launch_bounds__(kThreads) k_sub(const __grid_constant__ TLMeta<2> m) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* v = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  const bool al = al16(p) && al16(v);
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    A x[V], y[V];
    load<T>(p, i, n, vec, x);
    load<T>(v, i, n, vec, y);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = x[k] - y[k];
    store<T>(p, i, n, vec, x);
  }
}

// lists: params, backups (w), directions. v = (p - w) + scale * d.
// WRITE = false: part[gc] = sum v^2.  WRITE = true: p <- w + factor * v.
template <class T, bool WRITE>
__global__ void __launch_bounds__(kThreads) k_ascent(const __grid_constant__ TLMeta<3> m,
                                                      const double* scale, const double* factor,
                                                      double* part) {
  __shared__ double sh[32];
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* w = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  const T* d = static_cast<const T*>(m.ptr[2][c.t]) + c.off;
  const bool al = al16(p) && al16(w) && al16(d);
  const int ti = m.tidx[c.t];
  const A s = (A)scale[ti];
  const A f = WRITE ? (A)factor[ti] : A(1);
  double acc = 0.0;
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    A x[V], y[V], z[V];
    load<T>(p, i, n, vec, x);
    load<T>(w, i, n, vec, y);
    load<T>(d, i, n, vec, z);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A v = (x[k] - y[k]) + s * z[k];
      if (WRITE) x[k] = y[k] + v * f;
      else acc += (double)v * (double)v;
    }
    if (WRITE) store<T>(p, i, n, vec, x);
  }
  if (!WRITE) {
    const double r = block_sum(acc, sh);
    if (threadIdx.x == 0) part[c.gc] = r;
  }
}

// lists: params, backups (w). p <- w + factor * (p - w)
template <class T>
__global__ void __launch_bounds__(kThreads) k_project_write(const __grid_constant__ TLMeta<2> m,
                                                             const double* factor) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* w = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  const bool al = al16(p) && al16(w);
  const A f = (A)factor[m.tidx[c.t]];
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    A x[V], y[V];
    load<T>(p, i, n, vec, x);
    load<T>(w, i, n, vec, y);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = y[k] + (x[k] - y[k]) * f;
    store<T>(p, i, n, vec, x);
  }
}

// ------------------------------------------------------------------ finalize (per tensor)
struct FinMeta {
  int32_t cstart[kMaxF + 1];  // global first chunk of tensors t0 .. t0 + n
  double gamma[kMaxF];
  int32_t n;
  int32_t t0;
};

enum FinMode { kFinNorms = 0, kFinScale = 1, kFinAscentFactor = 2, kFinProject = 3 };

// Sum of part[a..b) by one warp: lane j takes a+j, a+j+32, ...; then a fixed shuffle tree.
// The result is valid in lane 0.
__device__ __forceinline__ double warp_sum_range(const double* part, int32_t a, int32_t b, int lane) {
  double s = 0.0;
  for (int32_t c = a + lane; c < b; c += 32) s += part[c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  return s;
}

__device__ __forceinline__ double project_factor(double gamma, double wsq, double vsq) {
  const double radius = gamma * sqrt(wsq), vn = sqrt(vsq);
  if (!(vn > 0.0)) return 1.0;
  const double r = radius / vn;
  return r > 1.0 ? 1.0 : r;  // NaN stays NaN, as torch.clamp
}

__device__ __forceinline__ void write_out(void* out, bool out_f64, int t, double v) {
  if (out_f64) static_cast<double*>(out)[t] = v;
  else static_cast<float*>(out)[t] = (float)v;
}

// kFinNorms:        out = sqrt(sum pa)
// kFinScale:        sa = gamma * ||a|| / (||b|| + eps), sb = sum pa (= ||w||^2), out = ||b||
// kFinAscentFactor: sb = factor(gamma, sb, sum pa)   (pa = the v partials)
// kFinProject:      sa = factor(gamma, sum pa, sum pb)
template <int MODE>
__global__ void k_finalize(const __grid_constant__ FinMeta m, const double* pa, const double* pb,
                           double* sa, double* sb, double eps, void* out, bool out_f64) {
  const int i = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);  // one warp per tensor
  const int lane = threadIdx.x & 31;
  if (i >= m.n) return;  // uniform across the warp
  const int t = m.t0 + i;
  const int32_t c0 = m.cstart[i], c1 = m.cstart[i + 1];
  const double g = m.gamma[i];
  const double s1 = warp_sum_range(pa, c0, c1, lane);
  const double s2 = (MODE == kFinScale || MODE == kFinProject) ? warp_sum_range(pb, c0, c1, lane) : 0.0;
  if (lane != 0) return;
  if (MODE == kFinNorms) {
    write_out(out, out_f64, t, sqrt(s1));
  } else if (MODE == kFinScale) {
    const double dn = sqrt(s2);
    sa[t] = g * sqrt(s1) / (dn + eps);
    sb[t] = s1;
    write_out(out, out_f64, t, dn);
  } else if (MODE == kFinAscentFactor) {
    sb[t] = project_factor(g, sb[t], s1);
  } else {
    sa[t] = project_factor(g, s1, s2);
  }
}

// ------------------------------------------------------------------ PGD (one tensor)
// x_adv <- clamp(x + clamp(x_adv + alpha * sign(g) - x, -eps, eps), 0, 1)
template <class T>
__global__ void __launch_bounds__(kThreads) k_pgd_linf(T* xa, const T* g, const T* x, int64_t n,
                                                        typename Cv<T>::A alpha,
                                                        typename Cv<T>::A eps) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const bool al = al16(xa) && al16(g) && al16(x);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < n; i += stride) {
    const int cnt = (int)min((int64_t)V, n - i);
    const bool vec = al && cnt == V;
    A a[V], b[V], z[V];
    load<T>(xa, i, cnt, vec, a);
    load<T>(g, i, cnt, vec, b);
    load<T>(x, i, cnt, vec, z);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A gg = b[k];
      const A sg = gg > A(0) ? A(1) : (gg < A(0) ? A(-1) : gg);  // 0 -> 0, NaN -> NaN
      A dl = (a[k] + alpha * sg) - z[k];
      dl = dl < -eps ? -eps : (dl > eps ? eps : dl);
      A o = z[k] + dl;
      a[k] = o < A(0) ? A(0) : (o > A(1) ? A(1) : o);
    }
    store<T>(xa, i, cnt, vec, a);
  }
}

// L2: samples of `ps` elements, `cps` chunks per sample, one block per chunk.
// PHASE 0: part[blk] = sum g^2
// PHASE 1: part[blk] = sum (x_adv + s*g - x)^2 with s = scale[b]
// PHASE 2: x_adv <- clamp(x + factor[b] * (x_adv + s*g - x), 0, 1)
template <class T, int PHASE>
__global__ void __launch_bounds__(kThreads) k_pgd_l2(T* xa, const T* g, const T* x, int64_t ps,
                                                      int64_t cps, const double* scale,
                                                      const double* factor, double* part) {
  __shared__ double sh[32];
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / cps, cc = blk - b * cps;
  const int64_t off = b * ps + cc * (int64_t)kChunk;
  const int64_t len = min((int64_t)kChunk, ps - cc * (int64_t)kChunk);
  T* xp = xa + off;
  const T* gp = g + off;
  const T* x0 = x + off;
  const bool al = al16(xp) && al16(gp) && al16(x0);
  const A s = PHASE > 0 ? (A)scale[b] : A(0);
  const A f = PHASE == 2 ? (A)factor[b] : A(1);
  double acc = 0.0;
  AWP_FOR_GROUPS(T, len) {
    const int n = (int)min((int64_t)V, len - i);
    const bool vec = al && n == V;
    A gg[V];
    load<T>(gp, i, n, vec, gg);
    if (PHASE == 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) acc += (double)gg[k] * (double)gg[k];
      continue;
    }
    A a[V], z[V];
    load<T>(xp, i, n, vec, a);
    load<T>(x0, i, n, vec, z);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A dl = (a[k] + s * gg[k]) - z[k];
      if (PHASE == 1) {
        acc += (double)dl * (double)dl;
      } else {
        const A o = z[k] + dl * f;
        a[k] = o < A(0) ? A(0) : (o > A(1) ? A(1) : o);
      }
    }
    if (PHASE == 2) store<T>(xp, i, n, vec, a);
  }
  if (PHASE < 2) {
    const double r = block_sum(acc, sh);
    if (threadIdx.x == 0) part[blk] = r;
  }
}

// PHASE 0: scale[b] = alpha / (||g_b|| + 1e-10).  PHASE 1: factor[b] = min(1, eps / ||delta_b||)
template <int PHASE>
__global__ void k_pgd_l2_fin(const double* part, int64_t batch, int64_t cps, double alpha,
                             double eps, double* out) {
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

// ------------------------------------------------------------------ weight-perturbation family
static_assert(sizeof(TLMeta<5>) + 64 <= 4096, "TLMeta<5> plus scalars must fit the 4 KB kernel argument space");

// lists: params, directions, backups (or null), deltas (or null), base (or null).
// d = clamp(d, -clip, clip) (clip_on); v = scale * d; backup <- p; delta <- v; p <- (base or p) + v
template <class T, bool HAS_B, bool HAS_V>
__global__ void __launch_bounds__(kThreads) k_add_scaled(const __grid_constant__ TLMeta<5> m,
                                                          const double* scale, bool clip_on,
                                                          typename Cv<T>::A clip) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* d = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  T* b = HAS_B ? static_cast<T*>(m.ptr[2][c.t]) + c.off : nullptr;
  T* vo = HAS_V ? static_cast<T*>(m.ptr[3][c.t]) + c.off : nullptr;
  const T* base = m.ptr[4][c.t] ? static_cast<const T*>(m.ptr[4][c.t]) + c.off : nullptr;
  const bool al = al16(p) && al16(d) && (!HAS_B || al16(b)) && (!HAS_V || al16(vo)) && (!base || al16(base));
  const A s = (A)scale[m.tidx[c.t]];
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    if (HAS_B) copy_raw<T>(b, p, i, n, vec);
    A w[V], v[V];
    load<T>(base ? base : p, i, n, vec, w);
    load<T>(d, i, n, vec, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A dd = v[k];
      if (clip_on) dd = dd < -clip ? -clip : (dd > clip ? clip : dd);  // NaN stays NaN
      v[k] = s * dd;
      w[k] = w[k] + v[k];
    }
    if (HAS_V) store<T>(vo, i, n, vec, v);
    store<T>(p, i, n, vec, w);
  }
}

// part[gc] = sum over the chunk of (T x)^2, T = |w| + eta (WEIGHTED; the product in A, the square
// in double) or T = 1
template <class T, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads) k_wsumsq(const __grid_constant__ TLMeta<2> m, double* part,
                                                      typename Cv<T>::A eta) {
  __shared__ double sh[32];
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  const T* x = static_cast<const T*>(m.ptr[0][c.t]) + c.off;
  const T* w = WEIGHTED ? static_cast<const T*>(m.ptr[1][c.t]) + c.off : x;
  const bool al = al16(x) && al16(w);
  double acc = 0.0;
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    A a[V], ww[V];
    load<T>(x, i, n, vec, a);
    if (WEIGHTED) load<T>(w, i, n, vec, ww);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A y = a[k];
      if (WEIGHTED) {
        const A t = (ww[k] < A(0) ? -ww[k] : ww[k]) + eta;
        y = t * y;
      }
      acc += (double)y * (double)y;
    }
  }
  const double r = block_sum(acc, sh);
  if (threadIdx.x == 0) part[c.gc] = r;
}

// out[0] = sum of part[0..C) in a fixed order (one block: thread j takes j, j + blockDim, ...,
// then the fixed tree of block_sum)
__global__ void k_sum_all(const double* part, int64_t C, void* out, bool out_f64) {
  __shared__ double sh[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) s += part[i];
  const double r = block_sum(s, sh);
  if (threadIdx.x == 0) write_out(out, out_f64, 0, r);
}

// lists: params, directions, backups (or null). T = |p| + eta (before the write);
// backup <- p; p <- p + (scale * T^2) * d
template <class T, bool HAS_B>
__global__ void __launch_bounds__(kThreads) k_asam(const __grid_constant__ TLMeta<3> m, const double* scale,
                                                    typename Cv<T>::A eta) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* d = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  T* b = HAS_B ? static_cast<T*>(m.ptr[2][c.t]) + c.off : nullptr;
  const bool al = al16(p) && al16(d) && (!HAS_B || al16(b));
  const A s = (A)scale[m.tidx[c.t]];
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    if (HAS_B) copy_raw<T>(b, p, i, n, vec);
    A w[V], g[V];
    load<T>(p, i, n, vec, w);
    load<T>(d, i, n, vec, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A t = (w[k] < A(0) ? -w[k] : w[k]) + eta;
      w[k] = w[k] + (s * (t * t)) * g[k];
    }
    store<T>(p, i, n, vec, w);
  }
}

// Box AWP, per tensor: lr, adv_eps and the first chunk (one warp per tensor, as k_finalize).
struct BoxFinMeta {
  int32_t cstart[kMaxF + 1];
  double lr[kMaxF];
  double ae[kMaxF];
  int32_t n;
  int32_t t0;
};

// gn = ||d|| (sum of pb, or gd[t] when GIVEN), wn = ||p|| (pa or gw[t]), both rounded to the
// accumulate type (float32 unless out_f64); out[t] = gn. A zero or non-finite gn marks the tensor
// as skipped (sb[t] = -1), else sa[t] = lr (wn + eps) / (gn + eps) and sb[t] = adv_eps (>= 0).
template <bool GIVEN>
__global__ void k_box_fin(const __grid_constant__ BoxFinMeta m, const double* pa, const double* pb,
                          const double* gw, const double* gd, double* sa, double* sb, double eps, void* out,
                          bool out_f64) {
  const int i = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= m.n) return;
  const int t = m.t0 + i;
  double wsq = 0.0, dsq = 0.0;
  if (!GIVEN) {
    wsq = warp_sum_range(pa, m.cstart[i], m.cstart[i + 1], lane);
    dsq = warp_sum_range(pb, m.cstart[i], m.cstart[i + 1], lane);
  }
  if (lane != 0) return;
  double gn = GIVEN ? gd[t] : sqrt(dsq);
  double wn = GIVEN ? gw[t] : sqrt(wsq);
  if (!out_f64) {
    gn = (double)(float)gn;
    wn = (double)(float)wn;
  }
  const bool ok = isfinite(gn) && gn != 0.0;
  sa[t] = ok ? m.lr[i] * (wn + eps) / (gn + eps) : 0.0;
  sb[t] = ok ? m.ae[i] : -1.0;
  write_out(out, out_f64, t, gn);
}

// lists: params, directions, origins. FIRST: origin <- p. Unless skipped (sb < 0):
// p <- clamp(p + s*d, o - ae|o|, o + ae|o|) (NaN in p + s*d stays NaN)
template <class T, bool FIRST>
__global__ void __launch_bounds__(kThreads) k_box_apply(const __grid_constant__ TLMeta<3> m,
                                                         const double* sa, const double* sb) {
  using A = typename Cv<T>::A;
  constexpr int V = Vw<T>::V;
  const ChunkPos c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.off;
  const T* d = static_cast<const T*>(m.ptr[1][c.t]) + c.off;
  T* o = static_cast<T*>(m.ptr[2][c.t]) + c.off;
  const bool al = al16(p) && al16(d) && al16(o);
  const int ti = m.tidx[c.t];
  const double ae64 = sb[ti];
  if (ae64 < 0.0) {  // skipped tensor (uniform over the block): only the origin copy
    if (FIRST) {
      AWP_FOR_GROUPS(T, c.len) {
        const int n = (int)min((int64_t)V, c.len - i);
        copy_raw<T>(o, p, i, n, al && n == V);
      }
    }
    return;
  }
  const A s = (A)sa[ti], ae = (A)ae64;
  AWP_FOR_GROUPS(T, c.len) {
    const int n = (int)min((int64_t)V, c.len - i);
    const bool vec = al && n == V;
    A w[V], g[V], oo[V];
    if (FIRST) copy_raw<T>(o, p, i, n, vec);
    load<T>(p, i, n, vec, w);
    load<T>(d, i, n, vec, g);
    if (FIRST) {
#pragma unroll
      for (int k = 0; k < V; ++k) oo[k] = w[k];
    } else {
      load<T>(o, i, n, vec, oo);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A r = ae * (oo[k] < A(0) ? -oo[k] : oo[k]);
      const A lo = oo[k] - r, hi = oo[k] + r;
      const A x = w[k] + s * g[k];
      w[k] = x < lo ? lo : (x > hi ? hi : x);
    }
    store<T>(p, i, n, vec, w);
  }
}

// dst[t0 + i] = m.gamma[i]: per-tensor floats into device memory from kernel arguments (no
// host-to-device copy, so a CUDA graph captures the values)
__global__ void k_fill_per_tensor(const __grid_constant__ FinMeta m, double* dst) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < m.n) dst[m.t0 + i] = m.gamma[i];
}

// ------------------------------------------------------------------ host helpers
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

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

// Calls launch(meta, nchunks) for consecutive batches of up to kMaxT non-empty tensors.
template <int NP, class F>
void for_each_batch(const Ptrs* const (&lists)[NP], const Sizes& numel,
                    const std::vector<int64_t>& cs, F&& launch) {
  TLMeta<NP> m;
  std::memset(&m, 0, sizeof(m));
  int k = 0;
  auto flush = [&](int64_t end_chunk) {
    if (k == 0) return;
    m.ntensors = k;
    m.cstart[k] = (int32_t)(end_chunk - m.chunk_base);
    launch(m, (unsigned)m.cstart[k]);
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

// Calls launch(meta, nthreads_total) for batches of up to kMaxF tensors (empty ones included).
template <class F>
void for_each_fin_batch(const Sizes& numel, const std::vector<int64_t>& cs, const Floats* gamma,
                        F&& launch) {
  const int n = (int)numel.size();
  for (int t0 = 0; t0 < n; t0 += kMaxF) {
    FinMeta f;
    std::memset(&f, 0, sizeof(f));
    f.n = std::min(kMaxF, n - t0);
    f.t0 = t0;
    for (int i = 0; i <= f.n; ++i) f.cstart[i] = (int32_t)cs[t0 + i];
    for (int i = 0; i < f.n; ++i) f.gamma[i] = gamma ? (*gamma)[t0 + i] : 0.0;
    launch(f);
  }
}

unsigned fin_blocks(int n) { return (unsigned)(((int64_t)n * 32 + kFinThreads - 1) / kFinThreads); }

// Workspace: [pa: C][pb: C][pc: C][sa: N][sb: N] float64
struct Ws {
  double *pa, *pb, *pc, *sa, *sb;
};
Ws split_ws(uintptr_t ws, int64_t C, int64_t N) {
  double* base = reinterpret_cast<double*>(ws);
  return Ws{base, base + C, base + 2 * C, base + 3 * C, base + 3 * C + N};
}

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

template <class T>
void launch_sumsq2(bool diff, const Ptrs& a, const Ptrs& b, const Sizes& numel,
                   const std::vector<int64_t>& cs, double* pa, double* pb, cudaStream_t st) {
  const Ptrs* lists[2] = {&a, &b};
  for_each_batch<2>(lists, numel, cs, [&](const TLMeta<2>& m, unsigned nc) {
    if (diff) k_sumsq2<T, true><<<nc, kThreads, 0, st>>>(m, pa, pb);
    else k_sumsq2<T, false><<<nc, kThreads, 0, st>>>(m, pa, pb);
    AWP_CHECK_LAUNCH("k_sumsq2");
  });
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
  cudaError_t e = cudaFuncGetAttributes(&attr, k_copy<float>);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  return "";
}

void norms(const Ptrs& x, const Sizes& numel, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"tensors", x.size()}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)numel.size());
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Ptrs* lists[1] = {&x};
    for_each_batch<1>(lists, numel, cs, [&](const TLMeta<1>& m, unsigned nc) {
      k_sumsq<T><<<nc, kThreads, 0, st>>>(m, w.pa);
      AWP_CHECK_LAUNCH("k_sumsq");
    });
  });
  for_each_fin_batch(numel, cs, nullptr, [&](const FinMeta& f) {
    k_finalize<kFinNorms><<<fin_blocks(f.n), kFinThreads, 0, st>>>(
        f, w.pa, w.pb, w.sa, w.sb, 0.0, reinterpret_cast<void*>(out), dtype == kFloat64);
    AWP_CHECK_LAUNCH("k_finalize(norms)");
  });
}

void perturb(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Ptrs& v, const Sizes& numel,
             const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()},
                                    {"directions", d.size()},
                                    {"gammas", gamma.size()},
                                    {"backups", b.size(), true},
                                    {"deltas", v.size(), true}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_sumsq2<T>(false, p, d, numel, cs, w.pa, w.pb, st);
    for_each_fin_batch(numel, cs, &gamma, [&](const FinMeta& f) {
      k_finalize<kFinScale><<<fin_blocks(f.n), kFinThreads, 0, st>>>(
          f, w.pa, w.pb, w.sa, w.sb, eps, reinterpret_cast<void*>(out), dtype == kFloat64);
      AWP_CHECK_LAUNCH("k_finalize(perturb)");
    });
    const Ptrs* lists[4] = {&p, &d, b.empty() ? nullptr : &b, v.empty() ? nullptr : &v};
    for_each_batch<4>(lists, numel, cs, [&](const TLMeta<4>& m, unsigned nc) {
      if (!b.empty() && !v.empty()) k_perturb_apply<T, true, true><<<nc, kThreads, 0, st>>>(m, w.sa);
      else if (!b.empty()) k_perturb_apply<T, true, false><<<nc, kThreads, 0, st>>>(m, w.sa);
      else if (!v.empty()) k_perturb_apply<T, false, true><<<nc, kThreads, 0, st>>>(m, w.sa);
      else k_perturb_apply<T, false, false><<<nc, kThreads, 0, st>>>(m, w.sa);
      AWP_CHECK_LAUNCH("k_perturb_apply");
    });
  });
}

// p (op)= other over whole lists: restore (copy) and unperturb (subtract) share this launcher.
template <class Launch>
void binary_lists(const char* other_name, const Ptrs& p, const Ptrs& other, const Sizes& numel, int dtype,
                  uintptr_t stream, Launch&& launch) {
  check_lens("awpfast._C_cuda", numel.size(), {{"params", p.size()}, {other_name, other.size()}});
  const auto cs = chunk_starts(numel);
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    const Ptrs* lists[2] = {&p, &other};
    for_each_batch<2>(lists, numel, cs, [&](const TLMeta<2>& m, unsigned nc) { launch(tag, m, nc, st); });
  });
}

void restore(const Ptrs& p, const Ptrs& b, const Sizes& numel, int dtype, uintptr_t stream) {
  binary_lists("backups", p, b, numel, dtype, stream, [](auto tag, const TLMeta<2>& m, unsigned nc, cudaStream_t st) {
    using T = decltype(tag);
    k_copy<T><<<nc, kThreads, 0, st>>>(m);
    AWP_CHECK_LAUNCH("k_copy");
  });
}

void unperturb(const Ptrs& p, const Ptrs& v, const Sizes& numel, int dtype, uintptr_t stream) {
  binary_lists("deltas", p, v, numel, dtype, stream, [](auto tag, const TLMeta<2>& m, unsigned nc, cudaStream_t st) {
    using T = decltype(tag);
    k_sub<T><<<nc, kThreads, 0, st>>>(m);
    AWP_CHECK_LAUNCH("k_sub");
  });
}

void ascent_step(const Ptrs& p, const Ptrs& wl, const Ptrs& d, const Sizes& numel, const Floats& step,
                 const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws,
                 uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()},
                                    {"backups", wl.size()},
                                    {"directions", d.size()},
                                    {"step_sizes", step.size()},
                                    {"gammas", gamma.size()}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // ||w||, ||d|| -> scale (sa), ||w||^2 (sb), out = ||d||
    launch_sumsq2<T>(false, wl, d, numel, cs, w.pa, w.pb, st);
    for_each_fin_batch(numel, cs, &step, [&](const FinMeta& f) {
      k_finalize<kFinScale><<<fin_blocks(f.n), kFinThreads, 0, st>>>(
          f, w.pa, w.pb, w.sa, w.sb, eps, reinterpret_cast<void*>(out), dtype == kFloat64);
      AWP_CHECK_LAUNCH("k_finalize(ascent scale)");
    });
    const Ptrs* lists[3] = {&p, &wl, &d};
    // ||v|| partials -> pc
    for_each_batch<3>(lists, numel, cs, [&](const TLMeta<3>& m, unsigned nc) {
      k_ascent<T, false><<<nc, kThreads, 0, st>>>(m, w.sa, w.sb, w.pc);
      AWP_CHECK_LAUNCH("k_ascent(norm)");
    });
    // factor -> sb
    for_each_fin_batch(numel, cs, &gamma, [&](const FinMeta& f) {
      k_finalize<kFinAscentFactor><<<fin_blocks(f.n), kFinThreads, 0, st>>>(
          f, w.pc, w.pb, w.sa, w.sb, eps, nullptr, false);
      AWP_CHECK_LAUNCH("k_finalize(ascent factor)");
    });
    for_each_batch<3>(lists, numel, cs, [&](const TLMeta<3>& m, unsigned nc) {
      k_ascent<T, true><<<nc, kThreads, 0, st>>>(m, w.sa, w.sb, w.pc);
      AWP_CHECK_LAUNCH("k_ascent(write)");
    });
  });
}

void project(const Ptrs& p, const Ptrs& wl, const Sizes& numel, const Floats& gamma, int dtype,
             uintptr_t ws, uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()}, {"backups", wl.size()}, {"gammas", gamma.size()}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_sumsq2<T>(true, p, wl, numel, cs, w.pa, w.pb, st);  // pa = ||w||^2, pb = ||p - w||^2
    for_each_fin_batch(numel, cs, &gamma, [&](const FinMeta& f) {
      k_finalize<kFinProject><<<fin_blocks(f.n), kFinThreads, 0, st>>>(
          f, w.pa, w.pb, w.sa, w.sb, 0.0, nullptr, false);
      AWP_CHECK_LAUNCH("k_finalize(project)");
    });
    const Ptrs* lists[2] = {&p, &wl};
    for_each_batch<2>(lists, numel, cs, [&](const TLMeta<2>& m, unsigned nc) {
      k_project_write<T><<<nc, kThreads, 0, st>>>(m, w.sa);
      AWP_CHECK_LAUNCH("k_project_write");
    });
  });
}

void pgd_linf(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t numel, double alpha, double eps,
              int dtype, uintptr_t stream) {
  if (numel <= 0) return;
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Cv<T>::A;
    const int64_t groups = (numel + Vw<T>::V - 1) / Vw<T>::V;
    const unsigned blocks = (unsigned)std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535);
    k_pgd_linf<T><<<blocks, kThreads, 0, st>>>(reinterpret_cast<T*>(xa), reinterpret_cast<const T*>(g),
                                                reinterpret_cast<const T*>(x), numel, (A)alpha, (A)eps);
    AWP_CHECK_LAUNCH("k_pgd_linf");
  });
}

void pgd_l2(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t batch, int64_t per_sample, double alpha,
            double eps, int dtype, uintptr_t ws, uintptr_t stream) {
  if (batch <= 0 || per_sample <= 0) return;
  const int64_t cps = nchunks_of(per_sample);
  const int64_t C = batch * cps;
  if (C > (int64_t)INT32_MAX) throw std::invalid_argument("awpfast._C_cuda: batch too large");
  double* base = reinterpret_cast<double*>(ws);
  double *pg = base, *pd = base + C, *scale = base + 2 * C, *factor = base + 2 * C + batch;
  cudaStream_t st = as_stream(stream);
  const unsigned fb = (unsigned)((batch + kFinThreads - 1) / kFinThreads);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* xp = reinterpret_cast<T*>(xa);
    const T* gp = reinterpret_cast<const T*>(g);
    const T* x0 = reinterpret_cast<const T*>(x);
    k_pgd_l2<T, 0><<<(unsigned)C, kThreads, 0, st>>>(xp, gp, x0, per_sample, cps, scale, factor, pg);
    AWP_CHECK_LAUNCH("k_pgd_l2(grad norm)");
    k_pgd_l2_fin<0><<<fb, kFinThreads, 0, st>>>(pg, batch, cps, alpha, eps, scale);
    AWP_CHECK_LAUNCH("k_pgd_l2_fin(scale)");
    k_pgd_l2<T, 1><<<(unsigned)C, kThreads, 0, st>>>(xp, gp, x0, per_sample, cps, scale, factor, pd);
    AWP_CHECK_LAUNCH("k_pgd_l2(delta norm)");
    k_pgd_l2_fin<1><<<fb, kFinThreads, 0, st>>>(pd, batch, cps, alpha, eps, factor);
    AWP_CHECK_LAUNCH("k_pgd_l2_fin(factor)");
    k_pgd_l2<T, 2><<<(unsigned)C, kThreads, 0, st>>>(xp, gp, x0, per_sample, cps, scale, factor, pd);
    AWP_CHECK_LAUNCH("k_pgd_l2(write)");
  });
}

// ------------------------------------------------------------------ weight-perturbation family
namespace {

// The per-tensor scales: the caller's float64 device array, or the list written into `dst` by
// k_fill_per_tensor (values as kernel arguments).
const double* per_tensor_scales(const Floats& scales, uintptr_t scale_ptr, const Sizes& numel,
                                const std::vector<int64_t>& cs, double* dst, cudaStream_t st) {
  if (scale_ptr != 0) {
    if (!scales.empty())
      throw std::invalid_argument("awpfast._C_cuda: give the scales as a list or as a pointer, not both");
    return reinterpret_cast<const double*>(scale_ptr);
  }
  for_each_fin_batch(numel, cs, &scales, [&](const FinMeta& f) {
    k_fill_per_tensor<<<(unsigned)((f.n + kFinThreads - 1) / kFinThreads), kFinThreads, 0, st>>>(f, dst);
    AWP_CHECK_LAUNCH("k_fill_per_tensor");
  });
  return dst;
}

}  // namespace

void add_scaled(const Ptrs& p, const Ptrs& d, const Ptrs& base, const Ptrs& b, const Ptrs& v, const Sizes& numel,
                const Floats& scales, uintptr_t scale_ptr, bool has_clip, double clip, int dtype, uintptr_t ws,
                uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()},
                                    {"directions", d.size()},
                                    {"scales", scales.size(), scale_ptr != 0},
                                    {"base", base.size(), true},
                                    {"backups", b.size(), true},
                                    {"deltas", v.size(), true}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  const double* sc = per_tensor_scales(scales, scale_ptr, numel, cs, w.sa, st);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Cv<T>::A;
    const Ptrs* lists[5] = {&p, &d, b.empty() ? nullptr : &b, v.empty() ? nullptr : &v,
                            base.empty() ? nullptr : &base};
    const A cl = (A)clip;
    for_each_batch<5>(lists, numel, cs, [&](const TLMeta<5>& m, unsigned nc) {
      if (!b.empty() && !v.empty()) k_add_scaled<T, true, true><<<nc, kThreads, 0, st>>>(m, sc, has_clip, cl);
      else if (!b.empty()) k_add_scaled<T, true, false><<<nc, kThreads, 0, st>>>(m, sc, has_clip, cl);
      else if (!v.empty()) k_add_scaled<T, false, true><<<nc, kThreads, 0, st>>>(m, sc, has_clip, cl);
      else k_add_scaled<T, false, false><<<nc, kThreads, 0, st>>>(m, sc, has_clip, cl);
      AWP_CHECK_LAUNCH("k_add_scaled");
    });
  });
}

void global_sqnorm(const Ptrs& x, const Ptrs& wl, const Sizes& numel, double eta, int dtype, uintptr_t out,
                   uintptr_t ws, uintptr_t stream) {
  check_lens("awpfast._C_cuda", numel.size(), {{"tensors", x.size()}, {"weights", wl.size(), true}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)numel.size());
  cudaStream_t st = as_stream(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Cv<T>::A;
    const Ptrs* lists[2] = {&x, wl.empty() ? nullptr : &wl};
    for_each_batch<2>(lists, numel, cs, [&](const TLMeta<2>& m, unsigned nc) {
      if (wl.empty()) k_wsumsq<T, false><<<nc, kThreads, 0, st>>>(m, w.pa, (A)eta);
      else k_wsumsq<T, true><<<nc, kThreads, 0, st>>>(m, w.pa, (A)eta);
      AWP_CHECK_LAUNCH("k_wsumsq");
    });
  });
  k_sum_all<<<1, kThreads, 0, st>>>(w.pa, cs.back(), reinterpret_cast<void*>(out), dtype == kFloat64);
  AWP_CHECK_LAUNCH("k_sum_all");
}

void asam_apply(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Sizes& numel, const Floats& scales,
                uintptr_t scale_ptr, double eta, int dtype, uintptr_t ws, uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()},
                                    {"directions", d.size()},
                                    {"scales", scales.size(), scale_ptr != 0},
                                    {"backups", b.size(), true}});
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  const double* sc = per_tensor_scales(scales, scale_ptr, numel, cs, w.sa, st);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Cv<T>::A;
    const Ptrs* lists[3] = {&p, &d, b.empty() ? nullptr : &b};
    for_each_batch<3>(lists, numel, cs, [&](const TLMeta<3>& m, unsigned nc) {
      if (!b.empty()) k_asam<T, true><<<nc, kThreads, 0, st>>>(m, sc, (A)eta);
      else k_asam<T, false><<<nc, kThreads, 0, st>>>(m, sc, (A)eta);
      AWP_CHECK_LAUNCH("k_asam");
    });
  });
}

void box_perturb(const Ptrs& p, const Ptrs& d, const Ptrs& o, const Sizes& numel, const Floats& lrs,
                 const Floats& aes, bool first, double eps, uintptr_t dnorm_ptr, uintptr_t wnorm_ptr, int dtype,
                 uintptr_t out, uintptr_t ws, uintptr_t stream) {
  const size_t n = numel.size();
  check_lens("awpfast._C_cuda", n, {{"params", p.size()},
                                    {"directions", d.size()},
                                    {"origins", o.size()},
                                    {"adv_lrs", lrs.size()},
                                    {"adv_epss", aes.size()}});
  if ((dnorm_ptr == 0) != (wnorm_ptr == 0))
    throw std::invalid_argument("awpfast._C_cuda: give both norm arrays or neither");
  const bool given = dnorm_ptr != 0;
  const auto cs = chunk_starts(numel);
  const Ws w = split_ws(ws, cs.back(), (int64_t)n);
  cudaStream_t st = as_stream(stream);
  const double* gd = reinterpret_cast<const double*>(dnorm_ptr);
  const double* gw = reinterpret_cast<const double*>(wnorm_ptr);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!given) launch_sumsq2<T>(false, p, d, numel, cs, w.pa, w.pb, st);  // pa = ||p||^2, pb = ||d||^2
    for (int t0 = 0; t0 < (int)n; t0 += kMaxF) {
      BoxFinMeta f;
      std::memset(&f, 0, sizeof(f));
      f.n = std::min(kMaxF, (int)n - t0);
      f.t0 = t0;
      for (int i = 0; i <= f.n; ++i) f.cstart[i] = (int32_t)cs[t0 + i];
      for (int i = 0; i < f.n; ++i) {
        f.lr[i] = lrs[t0 + i];
        f.ae[i] = aes[t0 + i];
      }
      if (given) {
        k_box_fin<true><<<fin_blocks(f.n), kFinThreads, 0, st>>>(f, w.pa, w.pb, gw, gd, w.sa, w.sb, eps,
                                                                  reinterpret_cast<void*>(out), dtype == kFloat64);
      } else {
        k_box_fin<false><<<fin_blocks(f.n), kFinThreads, 0, st>>>(f, w.pa, w.pb, gw, gd, w.sa, w.sb, eps,
                                                                   reinterpret_cast<void*>(out), dtype == kFloat64);
      }
      AWP_CHECK_LAUNCH("k_box_fin");
    }
    const Ptrs* lists[3] = {&p, &d, &o};
    for_each_batch<3>(lists, numel, cs, [&](const TLMeta<3>& m, unsigned nc) {
      if (first) k_box_apply<T, true><<<nc, kThreads, 0, st>>>(m, w.sa, w.sb);
      else k_box_apply<T, false><<<nc, kThreads, 0, st>>>(m, w.sa, w.sb);
      AWP_CHECK_LAUNCH("k_box_apply");
    });
  });
}

}  // namespace awpcuda
