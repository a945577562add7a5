// awpfast._C: the fused multi-tensor CPU ops behind the "native" backend.
//
// No torch headers and no torch ABI: Python passes data pointers (ints), element counts,
// a dtype code (dtype.h), per-tensor floats and the number of threads to use. Tensors must
// be dense with matching layouts (awpfast/ops/native.py checks and handles the rest).
//
// Work is cut into fixed chunks of kChunk elements, numbered tensor by tensor. Reductions
// write one partial per chunk; a tensor's total is the sum of its chunk partials in chunk
// order, so results do not depend on the number of threads or on which thread ran which
// chunk (bitwise). Multi-phase ops (perturb: norms, then apply) run segment by segment:
// a segment is a run of whole tensors of about `segment_bytes`; every thread takes the
// same static share of the segment's chunks in every phase, so the second phase finds its
// inputs in that core's cache instead of re-reading them from memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "scalar.h"
#include "../args.h"

#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#define AWP_HAVE_SSE2 1
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kChunk = 1 << 15;          // elements per chunk
constexpr int64_t kParallelMin = 1 << 17;    // below this many elements: one thread
constexpr int64_t kPerThreadMin = 1 << 16;   // and at least this many per extra thread
constexpr int64_t kDefaultSegmentBytes = 2 << 20;

KernelTable g_tables[kNumDtypes];
bool g_use_avx2 = false;
bool g_nt_backup = true;  // write backups with non-temporal stores (no read-for-ownership)

// dst <- src (n bytes), streaming the stores past the caches where the CPU allows: the
// backup is written once and read back only by restore, much later.
void copy_stream(char* dst, const char* src, size_t n) {
#ifdef AWP_HAVE_SSE2
  if (g_nt_backup && n >= 256) {
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
      __m128i a = _mm_loadu_si128((const __m128i*)(src + i));
      __m128i b = _mm_loadu_si128((const __m128i*)(src + i + 16));
      __m128i c = _mm_loadu_si128((const __m128i*)(src + i + 32));
      __m128i d = _mm_loadu_si128((const __m128i*)(src + i + 48));
      _mm_stream_si128((__m128i*)(dst + i), a);
      _mm_stream_si128((__m128i*)(dst + i + 16), b);
      _mm_stream_si128((__m128i*)(dst + i + 32), c);
      _mm_stream_si128((__m128i*)(dst + i + 48), d);
    }
    std::memcpy(dst + i, src + i, n - i);
    _mm_sfence();
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool select_isa(const std::string& isa) {
  if (isa == "avx2") {
    if (!awp_avx2::compiled() || !cpu_has_avx2()) return false;
    awp_avx2::fill_tables(g_tables);
    g_use_avx2 = true;
    return true;
  }
  if (isa == "baseline") {
    awp_base::fill_tables(g_tables);
    g_use_avx2 = false;
    return true;
  }
  if (isa == "auto") {
    if (!select_isa("avx2")) select_isa("baseline");
    return true;
  }
  throw std::invalid_argument("isa must be 'auto', 'avx2' or 'baseline', got '" + isa + "'");
}

int elem_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kFloat16: return 2;
    case kBFloat16: return 2;
  }
  throw std::invalid_argument("awpfast._C: unknown dtype code " + std::to_string(dtype));
}

const KernelTable& table(int dtype) {
  elem_size(dtype);  // validates
  return g_tables[dtype];
}

// ------------------------------------------------------------------ chunk layout
struct Layout {
  std::vector<int64_t> numel;    // per tensor
  std::vector<int64_t> cbegin;   // first chunk of each tensor; size ntensors + 1
  std::vector<int32_t> ctensor;  // tensor of each chunk
  int64_t total = 0;
  int64_t nchunks() const { return (int64_t)ctensor.size(); }
  int64_t offset(int64_t c) const { return (c - cbegin[ctensor[c]]) * kChunk; }
  int64_t len(int64_t c) const {
    int64_t off = offset(c);
    return std::min(kChunk, numel[ctensor[c]] - off);
  }
};

Layout make_layout(const std::vector<int64_t>& numel) {
  Layout L;
  L.numel = numel;
  L.cbegin.resize(numel.size() + 1);
  int64_t c = 0;
  for (size_t t = 0; t < numel.size(); ++t) {
    if (numel[t] < 0) throw std::invalid_argument("awpfast._C: negative numel");
    if (t > (size_t)std::numeric_limits<int32_t>::max()) throw std::invalid_argument("too many tensors");
    L.cbegin[t] = c;
    int64_t k = (numel[t] + kChunk - 1) / kChunk;
    for (int64_t j = 0; j < k; ++j) L.ctensor.push_back((int32_t)t);
    c += k;
    L.total += numel[t];
  }
  L.cbegin[numel.size()] = c;
  return L;
}

// Sum of tensor t's chunk partials, in chunk order (the fixed combination order).
double tensor_sum(const Layout& L, const std::vector<double>& part, int64_t t) {
  double s = 0.0;
  for (int64_t c = L.cbegin[t]; c < L.cbegin[t + 1]; ++c) s += part[c];
  return s;
}

// ------------------------------------------------------------------ threads
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ <= 1) return;
    int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lk(m_);
        gen_.store(gen + 1, std::memory_order_release);
      }
      cv_.notify_all();
      return;
    }
    for (int i = 0; i < 4000; ++i) {
      if (gen_.load(std::memory_order_acquire) != gen) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    std::unique_lock<std::mutex> lk(m_);
    cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != gen; });
  }

 private:
  int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

int pick_threads(int requested, const Layout& L) {
  if (requested < 1) requested = 1;
  if (L.total < kParallelMin) return 1;
  // spawning a thread costs tens of microseconds: give each one enough work
  int64_t cap = std::max<int64_t>(1, std::min<int64_t>(L.nchunks(), L.total / kPerThreadMin));
  return (int)std::min<int64_t>(requested, cap);
}

template <class F>
void run_threads(int nt, F&& f) {
  if (nt <= 1) {
    f(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) pool.emplace_back([&f, t] { f(t); });
  f(0);
  for (auto& th : pool) th.join();
}

// Runs fn(tid, phase, chunk) for every phase of every segment; a barrier separates the phases
// of a segment. Thread `tid` takes the same contiguous share of a segment's chunks in
// every phase.
template <class F>
void run_phased(const Layout& L, int nphases, int64_t bytes_per_elem, int64_t segment_bytes,
                int nthreads, F&& fn) {
  const int64_t nt_tensors = (int64_t)L.numel.size();
  // segments: [chunk begin, chunk end) over runs of whole tensors
  std::vector<int64_t> seg{0};
  if (nphases > 1 && segment_bytes > 0) {
    int64_t acc = 0;
    for (int64_t t = 0; t < nt_tensors; ++t) {
      acc += L.numel[t] * bytes_per_elem;
      if (acc >= segment_bytes && L.cbegin[t + 1] > seg.back()) {
        seg.push_back(L.cbegin[t + 1]);
        acc = 0;
      }
    }
  }
  if (L.nchunks() > seg.back()) seg.push_back(L.nchunks());
  const int nt = pick_threads(nthreads, L);
  Barrier barrier(nt);
  run_threads(nt, [&](int tid) {
    for (size_t s = 0; s + 1 < seg.size(); ++s) {
      const int64_t c0 = seg[s], n = seg[s + 1] - seg[s];
      const int64_t lo = c0 + n * tid / nt, hi = c0 + n * (tid + 1) / nt;
      for (int ph = 0; ph < nphases; ++ph) {
        if (ph > 0) barrier.wait();
        for (int64_t c = lo; c < hi; ++c) fn(tid, ph, c);
      }
    }
  });
}

// Per-thread memo of the per-tensor scalars (scale, factor) derived from the partials, so
// that a thread sums a tensor's partials once per phase, not once per chunk.
struct Memo {
  int64_t t = -1;
  int phase = -1;
  double a = 0.0, b = 0.0;
  bool hit(int64_t tensor, int ph) {
    if (t == tensor && phase == ph) return true;
    t = tensor;
    phase = ph;
    return false;
  }
};

// ------------------------------------------------------------------ argument helpers
using Ptrs = std::vector<uintptr_t>;
using Sizes = std::vector<int64_t>;
using Floats = std::vector<double>;

char* at(uintptr_t base, int64_t elem_off, int es) { return (char*)base + elem_off * es; }

void write_norms(uintptr_t out, int dtype, const std::vector<double>& sq) {
  if (!out) return;
  if (dtype == kFloat64) {
    double* o = (double*)out;
    for (size_t i = 0; i < sq.size(); ++i) o[i] = std::sqrt(sq[i]);
  } else {
    float* o = (float*)out;
    for (size_t i = 0; i < sq.size(); ++i) o[i] = (float)std::sqrt(sq[i]);
  }
}

// ------------------------------------------------------------------ ops
void op_norms(const Ptrs& x, const Sizes& numel, int dtype, uintptr_t out, int nthreads) {
  check_lens("awpfast._C", numel.size(), {{"x", x.size()}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> part(L.nchunks());
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    part[c] = K.sumsq(at(x[L.ctensor[c]], L.offset(c), es), L.len(c));
  });
  std::vector<double> sq(numel.size());
  for (size_t t = 0; t < numel.size(); ++t) sq[t] = tensor_sum(L, part, t);
  write_norms(out, dtype, sq);
}

double perturb_scale(double gamma, double wsq, double dsq, double eps) {
  double wn = std::sqrt(wsq), dn = std::sqrt(dsq);
  return gamma * wn / (dn + eps);
}

void op_perturb(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Ptrs& v, const Sizes& numel,
                const Floats& gamma, double eps, int dtype, uintptr_t out, int nthreads,
                int64_t segment_bytes) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()},
                               {"directions", d.size()},
                               {"gammas", gamma.size()},
                               {"backups", b.size(), true},
                               {"deltas", v.size(), true}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> pw(L.nchunks()), pd(L.nchunks());
  std::vector<Memo> memo((size_t)std::max(nthreads, 1));
  run_phased(L, 2, 2 * es, segment_bytes, nthreads, [&](int tid, int ph, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (ph == 0) {
      K.sumsq2(at(p[t], off, es), at(d[t], off, es), len, &pw[c], &pd[c]);
      return;
    }
    Memo& mm = memo[tid];
    if (!mm.hit(t, ph)) mm.a = perturb_scale(gamma[t], tensor_sum(L, pw, t), tensor_sum(L, pd, t), eps);
    const double s = mm.a;
    if (!b.empty()) copy_stream(at(b[t], off, es), at(p[t], off, es), (size_t)(len * es));
    K.perturb_apply(at(p[t], off, es), at(d[t], off, es), nullptr,
                    v.empty() ? nullptr : at(v[t], off, es), s, len);
  });
  std::vector<double> sq(n);
  for (size_t t = 0; t < n; ++t) sq[t] = tensor_sum(L, pd, t);
  write_norms(out, dtype, sq);
}

void op_restore(const Ptrs& p, const Ptrs& b, const Sizes& numel, int dtype, int nthreads) {
  check_lens("awpfast._C", numel.size(), {{"params", p.size()}, {"backups", b.size()}});
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t t = L.ctensor[c];
    std::memcpy(at(p[t], L.offset(c), es), at(b[t], L.offset(c), es), (size_t)(L.len(c) * es));
  });
}

void op_unperturb(const Ptrs& p, const Ptrs& v, const Sizes& numel, int dtype, int nthreads) {
  check_lens("awpfast._C", numel.size(), {{"params", p.size()}, {"deltas", v.size()}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t t = L.ctensor[c];
    K.sub(at(p[t], L.offset(c), es), at(v[t], L.offset(c), es), L.len(c));
  });
}

double project_factor(double gamma, double wsq, double vsq) {
  double radius = gamma * std::sqrt(wsq), vn = std::sqrt(vsq);
  if (!(vn > 0.0)) return 1.0;
  double r = radius / vn;
  return r > 1.0 ? 1.0 : r;  // NaN stays NaN, as torch.clamp
}

void op_ascent(const Ptrs& p, const Ptrs& w, const Ptrs& d, const Sizes& numel, const Floats& step,
               const Floats& gamma, double eps, int dtype, uintptr_t out, int nthreads,
               int64_t segment_bytes) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()},
                               {"backups", w.size()},
                               {"directions", d.size()},
                               {"step_sizes", step.size()},
                               {"gammas", gamma.size()}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> pw(L.nchunks()), pd(L.nchunks()), pv(L.nchunks());
  std::vector<Memo> memo((size_t)std::max(nthreads, 1));
  run_phased(L, 3, 3 * es, segment_bytes, nthreads, [&](int tid, int ph, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (ph == 0) {
      K.sumsq2(at(w[t], off, es), at(d[t], off, es), len, &pw[c], &pd[c]);
      return;
    }
    Memo& mm = memo[tid];
    if (!mm.hit(t, ph)) {
      const double wsq = tensor_sum(L, pw, t);
      mm.a = perturb_scale(step[t], wsq, tensor_sum(L, pd, t), eps);
      if (ph == 2) mm.b = project_factor(gamma[t], wsq, tensor_sum(L, pv, t));
    }
    const double s = mm.a, f = mm.b;
    if (ph == 1) {
      pv[c] = K.ascent_vnorm(at(p[t], off, es), at(w[t], off, es), at(d[t], off, es), s, len);
      return;
    }
    K.ascent_write(at(p[t], off, es), at(w[t], off, es), at(d[t], off, es), s, f, len);
  });
  std::vector<double> sq(n);
  for (size_t t = 0; t < n; ++t) sq[t] = tensor_sum(L, pd, t);
  write_norms(out, dtype, sq);
}

void op_project(const Ptrs& p, const Ptrs& w, const Sizes& numel, const Floats& gamma, int dtype,
                int nthreads, int64_t segment_bytes) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()}, {"backups", w.size()}, {"gammas", gamma.size()}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> pw(L.nchunks()), pv(L.nchunks());
  std::vector<Memo> memo((size_t)std::max(nthreads, 1));
  run_phased(L, 2, 2 * es, segment_bytes, nthreads, [&](int tid, int ph, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (ph == 0) {
      K.sumsq_w_diff(at(p[t], off, es), at(w[t], off, es), len, &pw[c], &pv[c]);
      return;
    }
    Memo& mm = memo[tid];
    if (!mm.hit(t, ph)) mm.a = project_factor(gamma[t], tensor_sum(L, pw, t), tensor_sum(L, pv, t));
    K.project_write(at(p[t], off, es), at(w[t], off, es), mm.a, len);
  });
}

void op_pgd_linf(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t numel, double alpha, double eps,
                 int dtype, int nthreads) {
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout({numel});
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t off = L.offset(c);
    K.pgd_linf(at(xa, off, es), at(g, off, es), at(x, off, es), alpha, eps, L.len(c));
  });
}

void op_pgd_l2(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t batch, int64_t per_sample,
               double alpha, double eps, int dtype, int nthreads, int64_t segment_bytes) {
  if (batch < 0 || per_sample < 0) throw std::invalid_argument("awpfast._C: negative size");
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(Sizes((size_t)batch, per_sample));
  std::vector<double> pg(L.nchunks()), pd(L.nchunks());
  std::vector<Memo> memo((size_t)std::max(nthreads, 1));
  run_phased(L, 3, 3 * es, segment_bytes, nthreads, [&](int tid, int ph, int64_t c) {
    const int64_t t = L.ctensor[c], off = t * per_sample + L.offset(c), len = L.len(c);
    if (ph == 0) {
      pg[c] = K.sumsq(at(g, off, es), len);
      return;
    }
    Memo& mm = memo[tid];
    if (!mm.hit(t, ph)) {
      mm.a = alpha / (std::sqrt(tensor_sum(L, pg, t)) + 1e-10);
      if (ph == 2) {
        const double r = eps / std::sqrt(tensor_sum(L, pd, t));  // dn == 0 -> inf -> 1
        mm.b = r > 1.0 ? 1.0 : r;
      }
    }
    const double s = mm.a, f = mm.b;
    if (ph == 1) {
      pd[c] = K.pgd_l2_dnorm(at(xa, off, es), at(g, off, es), at(x, off, es), s, len);
      return;
    }
    K.pgd_l2_write(at(xa, off, es), at(g, off, es), at(x, off, es), s, f, len);
  });
}

// ------------------------------------------------------------------ weight-perturbation family
// Per-tensor values given either as a list of floats or (ptr != 0) as a float64 array with one
// value per tensor (a CPU tensor's data: read without any host sync on the Python side).
struct PerTensor {
  const Floats* list;
  const double* ptr;
  double at(int64_t t) const { return ptr ? ptr[t] : (*list)[(size_t)t]; }
};

// Rounds a float64 per-tensor value to the accumulate type of the dtype (the precision in which
// the reference holds norms: float32 except for float64 tensors).
double round_acc(int dtype, double x) { return dtype == kFloat64 ? x : (double)(float)x; }

// params <- (base or params) + scale_t * clamp(directions, +-clip); backups <- params (before);
// deltas <- the added term. One pass.
void op_add_scaled(const Ptrs& p, const Ptrs& d, const Ptrs& base, const Ptrs& b, const Ptrs& v,
                   const Sizes& numel, const Floats& scales, uintptr_t scale_ptr, bool has_clip,
                   double clip, int dtype, int nthreads) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()},
                               {"directions", d.size()},
                               {"scales", scales.size(), scale_ptr != 0},
                               {"base", base.size(), true},
                               {"backups", b.size(), true},
                               {"deltas", v.size(), true}});
  if (scale_ptr != 0 && !scales.empty())
    throw std::invalid_argument("awpfast._C: give the scales as a list or as a pointer, not both");
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  const PerTensor S{&scales, reinterpret_cast<const double*>(scale_ptr)};
  Layout L = make_layout(numel);
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (!b.empty()) copy_stream(at(b[t], off, es), at(p[t], off, es), (size_t)(len * es));
    K.add_scaled(at(p[t], off, es), at(d[t], off, es), base.empty() ? nullptr : at(base[t], off, es),
                 v.empty() ? nullptr : at(v[t], off, es), S.at(t), clip, has_clip, len);
  });
}

// sum_t ||T_t * x_t||^2 (T = |w| + eta; without weights T = 1) into out[0] (float64 for
// float64 tensors, else float32). Per-chunk partials added in chunk order: the same bits for
// any thread count.
void op_global_sqnorm(const Ptrs& x, const Ptrs& w, const Sizes& numel, double eta, int dtype,
                      uintptr_t out, int nthreads) {
  check_lens("awpfast._C", numel.size(), {{"tensors", x.size()}, {"weights", w.size(), true}});
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> part(L.nchunks());
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    part[c] = w.empty() ? K.sumsq(at(x[t], off, es), len)
                        : K.wsumsq(at(x[t], off, es), at(w[t], off, es), eta, len);
  });
  double total = 0.0;
  for (double q : part) total += q;
  if (!out) return;
  if (dtype == kFloat64) *(double*)out = total;
  else *(float*)out = (float)total;
}

// ASAM: backups <- params; params += scale_t * (|params| + eta)^2 * directions. One pass.
void op_asam(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Sizes& numel, const Floats& scales,
             uintptr_t scale_ptr, double eta, int dtype, int nthreads) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()},
                               {"directions", d.size()},
                               {"scales", scales.size(), scale_ptr != 0},
                               {"backups", b.size(), true}});
  if (scale_ptr != 0 && !scales.empty())
    throw std::invalid_argument("awpfast._C: give the scales as a list or as a pointer, not both");
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  const PerTensor S{&scales, reinterpret_cast<const double*>(scale_ptr)};
  Layout L = make_layout(numel);
  run_phased(L, 1, es, 0, nthreads, [&](int, int, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (!b.empty()) copy_stream(at(b[t], off, es), at(p[t], off, es), (size_t)(len * es));
    K.asam_apply(at(p[t], off, es), at(d[t], off, es), S.at(t), eta, len);
  });
}

// Box AWP. Phase 0 (unless the norms are given): ||p||^2, ||d||^2 partials. Apply phase: if
// `first`, origins <- params; tensors whose direction norm is 0 or not finite are left alone;
// else params <- clamp(params + s*d, o - ae|o|, o + ae|o|), s = lr (||p|| + eps) / (||d|| + eps),
// with both norms rounded to the accumulate type first (the reference's float32 norms).
// out[t] <- ||d_t||.
void op_box(const Ptrs& p, const Ptrs& d, const Ptrs& o, const Sizes& numel, const Floats& lrs,
            const Floats& aes, bool first, double eps, uintptr_t dnorm_ptr, uintptr_t wnorm_ptr, int dtype,
            uintptr_t out, int nthreads, int64_t segment_bytes) {
  const size_t n = numel.size();
  check_lens("awpfast._C", n, {{"params", p.size()},
                               {"directions", d.size()},
                               {"origins", o.size()},
                               {"adv_lrs", lrs.size()},
                               {"adv_epss", aes.size()}});
  if ((dnorm_ptr == 0) != (wnorm_ptr == 0))
    throw std::invalid_argument("awpfast._C: give both norm arrays or neither");
  const bool given = dnorm_ptr != 0;
  const double* gd = reinterpret_cast<const double*>(dnorm_ptr);
  const double* gw = reinterpret_cast<const double*>(wnorm_ptr);
  const KernelTable& K = table(dtype);
  const int es = elem_size(dtype);
  Layout L = make_layout(numel);
  std::vector<double> pw(given ? 0 : L.nchunks()), pd(given ? 0 : L.nchunks());
  std::vector<Memo> memo((size_t)std::max(nthreads, 1));
  auto dnorm = [&](int64_t t) { return round_acc(dtype, given ? gd[t] : std::sqrt(tensor_sum(L, pd, t))); };
  const int apply = given ? 0 : 1;
  run_phased(L, apply + 1, 2 * es, segment_bytes, nthreads, [&](int tid, int ph, int64_t c) {
    const int64_t t = L.ctensor[c], off = L.offset(c), len = L.len(c);
    if (ph < apply) {
      K.sumsq2(at(p[t], off, es), at(d[t], off, es), len, &pw[c], &pd[c]);
      return;
    }
    Memo& mm = memo[tid];
    if (!mm.hit(t, ph)) {
      const double gn = dnorm(t);
      const double wn = round_acc(dtype, given ? gw[t] : std::sqrt(tensor_sum(L, pw, t)));
      const bool ok = std::isfinite(gn) && gn != 0.0;
      mm.a = ok ? lrs[t] * (wn + eps) / (gn + eps) : 0.0;
      mm.b = ok ? 1.0 : 0.0;
    }
    if (first) copy_stream(at(o[t], off, es), at(p[t], off, es), (size_t)(len * es));
    if (mm.b != 0.0) K.box_apply(at(p[t], off, es), at(d[t], off, es), at(o[t], off, es), mm.a, aes[t], len);
  });
  if (!out) return;
  for (size_t t = 0; t < n; ++t) {
    const double gn = dnorm((int64_t)t);
    if (dtype == kFloat64) ((double*)out)[t] = gn;
    else ((float*)out)[t] = (float)gn;
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "awpfast native CPU kernels (fused multi-tensor AWP ops); see csrc/README.md";
  select_isa("auto");
  m.attr("CHUNK") = kChunk;
  m.attr("PARALLEL_MIN") = kParallelMin;
  m.attr("DEFAULT_SEGMENT_BYTES") = kDefaultSegmentBytes;
  m.attr("FLOAT32") = (int)kFloat32;
  m.attr("FLOAT64") = (int)kFloat64;
  m.attr("FLOAT16") = (int)kFloat16;
  m.attr("BFLOAT16") = (int)kBFloat16;
  m.def("set_stream_backups", [](bool on) { g_nt_backup = on; }, py::arg("on"),
        "Write perturb backups with non-temporal stores (default on; results are identical).");
  m.def("isa", [] { return std::string(g_use_avx2 ? "avx2" : "baseline"); },
        "The instruction-set variant of the kernels in use.");
  m.def("set_isa", &select_isa, py::arg("isa"),
        "Pick the kernel variant: 'auto', 'avx2' or 'baseline'. Returns False if unavailable. "
        "Both give bitwise-identical results (tests check this).");
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("norms", &op_norms, py::arg("x"), py::arg("numel"), py::arg("dtype"), py::arg("out"),
        py::arg("nthreads"), nogil);
  m.def("perturb", &op_perturb, py::arg("params"), py::arg("directions"), py::arg("backups"),
        py::arg("deltas"), py::arg("numel"), py::arg("gammas"), py::arg("eps"), py::arg("dtype"),
        py::arg("out"), py::arg("nthreads"), py::arg("segment_bytes") = kDefaultSegmentBytes, nogil);
  m.def("restore", &op_restore, py::arg("params"), py::arg("backups"), py::arg("numel"),
        py::arg("dtype"), py::arg("nthreads"), nogil);
  m.def("unperturb", &op_unperturb, py::arg("params"), py::arg("deltas"), py::arg("numel"),
        py::arg("dtype"), py::arg("nthreads"), nogil);
  m.def("ascent_step", &op_ascent, py::arg("params"), py::arg("backups"), py::arg("directions"),
        py::arg("numel"), py::arg("step_sizes"), py::arg("gammas"), py::arg("eps"), py::arg("dtype"),
        py::arg("out"), py::arg("nthreads"), py::arg("segment_bytes") = kDefaultSegmentBytes, nogil);
  m.def("project", &op_project, py::arg("params"), py::arg("backups"), py::arg("numel"),
        py::arg("gammas"), py::arg("dtype"), py::arg("nthreads"),
        py::arg("segment_bytes") = kDefaultSegmentBytes, nogil);
  m.def("pgd_linf", &op_pgd_linf, py::arg("x_adv"), py::arg("grad"), py::arg("x"), py::arg("numel"),
        py::arg("alpha"), py::arg("eps"), py::arg("dtype"), py::arg("nthreads"), nogil);
  m.def("pgd_l2", &op_pgd_l2, py::arg("x_adv"), py::arg("grad"), py::arg("x"), py::arg("batch"),
        py::arg("per_sample"), py::arg("alpha"), py::arg("eps"), py::arg("dtype"),
        py::arg("nthreads"), py::arg("segment_bytes") = kDefaultSegmentBytes, nogil);
  // weight-perturbation family (SAM, ASAM, Box AWP)
  m.def("add_scaled", &op_add_scaled, py::arg("params"), py::arg("directions"), py::arg("base"),
        py::arg("backups"), py::arg("deltas"), py::arg("numel"), py::arg("scales"), py::arg("scale_ptr"),
        py::arg("has_clip"), py::arg("clip"), py::arg("dtype"), py::arg("nthreads"), nogil);
  m.def("global_sqnorm", &op_global_sqnorm, py::arg("tensors"), py::arg("weights"), py::arg("numel"),
        py::arg("eta"), py::arg("dtype"), py::arg("out"), py::arg("nthreads"), nogil);
  m.def("asam_apply", &op_asam, py::arg("params"), py::arg("directions"), py::arg("backups"),
        py::arg("numel"), py::arg("scales"), py::arg("scale_ptr"), py::arg("eta"), py::arg("dtype"),
        py::arg("nthreads"), nogil);
  m.def("box_perturb", &op_box, py::arg("params"), py::arg("directions"), py::arg("origins"),
        py::arg("numel"), py::arg("adv_lrs"), py::arg("adv_epss"), py::arg("first"), py::arg("eps"),
        py::arg("dnorm_ptr"), py::arg("wnorm_ptr"), py::arg("dtype"), py::arg("out"), py::arg("nthreads"),
        py::arg("segment_bytes") = kDefaultSegmentBytes, nogil);
}
