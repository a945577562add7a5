// Host launchers of the awpfast CUDA kernels (kernels.cu, compiled by nvcc). The pybind11
// module (module.cpp, compiled by the C++ compiler) calls these; neither side includes
// torch. Pointers, the output buffer, the float64 workspace and the stream arrive as
// integers. Every launch is checked; a failure throws std::runtime_error with the CUDA text.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace awpcuda {

using Ptrs = std::vector<uintptr_t>;
using Sizes = std::vector<int64_t>;
using Floats = std::vector<double>;

int64_t chunk_elems();
int max_tensors_per_launch();
// float64 elements of workspace that the multi-tensor ops need for these tensors
int64_t workspace_doubles(const Sizes& numel);
// float64 elements of workspace that pgd_l2 needs
int64_t pgd_workspace_doubles(int64_t batch, int64_t per_sample);
// "" when the kernels can run on the current device, else the CUDA error text
std::string probe();

void norms(const Ptrs& x, const Sizes& numel, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream);
void perturb(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Ptrs& v, const Sizes& numel,
             const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws, uintptr_t stream);
void restore(const Ptrs& p, const Ptrs& b, const Sizes& numel, int dtype, uintptr_t stream);
void unperturb(const Ptrs& p, const Ptrs& v, const Sizes& numel, int dtype, uintptr_t stream);
void ascent_step(const Ptrs& p, const Ptrs& w, const Ptrs& d, const Sizes& numel, const Floats& step,
                 const Floats& gamma, double eps, int dtype, uintptr_t out, uintptr_t ws,
                 uintptr_t stream);
void project(const Ptrs& p, const Ptrs& w, const Sizes& numel, const Floats& gamma, int dtype,
             uintptr_t ws, uintptr_t stream);
void pgd_linf(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t numel, double alpha, double eps,
              int dtype, uintptr_t stream);
void pgd_l2(uintptr_t xa, uintptr_t g, uintptr_t x, int64_t batch, int64_t per_sample, double alpha,
            double eps, int dtype, uintptr_t ws, uintptr_t stream);

// weight-perturbation family (SAM, ASAM, Box AWP). Per-tensor scales: a list, or (scale_ptr != 0)
// a float64 device array with one value per tensor, read by the kernels (no host sync).
void add_scaled(const Ptrs& p, const Ptrs& d, const Ptrs& base, const Ptrs& b, const Ptrs& v, const Sizes& numel,
                const Floats& scales, uintptr_t scale_ptr, bool has_clip, double clip, int dtype, uintptr_t ws,
                uintptr_t stream);
void global_sqnorm(const Ptrs& x, const Ptrs& w, const Sizes& numel, double eta, int dtype, uintptr_t out,
                   uintptr_t ws, uintptr_t stream);
void asam_apply(const Ptrs& p, const Ptrs& d, const Ptrs& b, const Sizes& numel, const Floats& scales,
                uintptr_t scale_ptr, double eta, int dtype, uintptr_t ws, uintptr_t stream);
void box_perturb(const Ptrs& p, const Ptrs& d, const Ptrs& o, const Sizes& numel, const Floats& lrs,
                 const Floats& aes, bool first, double eps, uintptr_t dnorm_ptr, uintptr_t wnorm_ptr, int dtype,
                 uintptr_t out, uintptr_t ws, uintptr_t stream);

}  // namespace awpcuda
