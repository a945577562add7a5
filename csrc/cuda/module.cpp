// awpfast._C_cuda: pybind11 bindings of the CUDA launchers in kernels.cu.
//
// A separate module from awpfast._C so that the CPU module imports on machines without
// the CUDA runtime. Linked against the static CUDA runtime only (no torch, no libcudart.so):
// Python passes data pointers, the float64 workspace, the output buffer and the current
// stream (torch.cuda.current_stream().cuda_stream) as integers, and makes the tensors'
// device current before calling. Launches are asynchronous; launch errors raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../dtype.h"
#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "awpfast native CUDA kernels (multi-tensor AWP ops); see csrc/README.md";
  m.attr("CHUNK") = awpcuda::chunk_elems();
  m.attr("MAX_TENSORS_PER_LAUNCH") = awpcuda::max_tensors_per_launch();
  m.def("workspace_doubles", &awpcuda::workspace_doubles, py::arg("numel"));
  m.def("pgd_workspace_doubles", &awpcuda::pgd_workspace_doubles, py::arg("batch"), py::arg("per_sample"));
  m.def("probe", &awpcuda::probe,
        "'' when the kernels can run on the current device, else the CUDA error text.");
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("norms", &awpcuda::norms, py::arg("x"), py::arg("numel"), py::arg("dtype"), py::arg("out"),
        py::arg("ws"), py::arg("stream"), nogil);
  m.def("perturb", &awpcuda::perturb, py::arg("params"), py::arg("directions"), py::arg("backups"),
        py::arg("deltas"), py::arg("numel"), py::arg("gammas"), py::arg("eps"), py::arg("dtype"),
        py::arg("out"), py::arg("ws"), py::arg("stream"), nogil);
  m.def("restore", &awpcuda::restore, py::arg("params"), py::arg("backups"), py::arg("numel"),
        py::arg("dtype"), py::arg("stream"), nogil);
  m.def("unperturb", &awpcuda::unperturb, py::arg("params"), py::arg("deltas"), py::arg("numel"),
        py::arg("dtype"), py::arg("stream"), nogil);
  m.def("ascent_step", &awpcuda::ascent_step, py::arg("params"), py::arg("backups"),
        py::arg("directions"), py::arg("numel"), py::arg("step_sizes"), py::arg("gammas"),
        py::arg("eps"), py::arg("dtype"), py::arg("out"), py::arg("ws"), py::arg("stream"), nogil);
  m.def("project", &awpcuda::project, py::arg("params"), py::arg("backups"), py::arg("numel"),
        py::arg("gammas"), py::arg("dtype"), py::arg("ws"), py::arg("stream"), nogil);
  m.def("pgd_linf", &awpcuda::pgd_linf, py::arg("x_adv"), py::arg("grad"), py::arg("x"),
        py::arg("numel"), py::arg("alpha"), py::arg("eps"), py::arg("dtype"), py::arg("stream"), nogil);
  m.def("pgd_l2", &awpcuda::pgd_l2, py::arg("x_adv"), py::arg("grad"), py::arg("x"), py::arg("batch"),
        py::arg("per_sample"), py::arg("alpha"), py::arg("eps"), py::arg("dtype"), py::arg("ws"),
        py::arg("stream"), nogil);
  // weight-perturbation family (SAM, ASAM, Box AWP)
  m.def("add_scaled", &awpcuda::add_scaled, py::arg("params"), py::arg("directions"), py::arg("base"),
        py::arg("backups"), py::arg("deltas"), py::arg("numel"), py::arg("scales"), py::arg("scale_ptr"),
        py::arg("has_clip"), py::arg("clip"), py::arg("dtype"), py::arg("ws"), py::arg("stream"), nogil);
  m.def("global_sqnorm", &awpcuda::global_sqnorm, py::arg("tensors"), py::arg("weights"), py::arg("numel"),
        py::arg("eta"), py::arg("dtype"), py::arg("out"), py::arg("ws"), py::arg("stream"), nogil);
  m.def("asam_apply", &awpcuda::asam_apply, py::arg("params"), py::arg("directions"), py::arg("backups"),
        py::arg("numel"), py::arg("scales"), py::arg("scale_ptr"), py::arg("eta"), py::arg("dtype"), py::arg("ws"),
        py::arg("stream"), nogil);
  m.def("box_perturb", &awpcuda::box_perturb, py::arg("params"), py::arg("directions"), py::arg("origins"),
        py::arg("numel"), py::arg("adv_lrs"), py::arg("adv_epss"), py::arg("first"), py::arg("eps"),
        py::arg("dnorm_ptr"), py::arg("wnorm_ptr"), py::arg("dtype"), py::arg("out"), py::arg("ws"),
        py::arg("stream"), nogil);
}
