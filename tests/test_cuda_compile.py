"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) for sm_90, so that a CUDA build
break fails CI on machines without a GPU, and a check of the generated PTX for approximate
or flush-to-zero square roots and divisions (a tiny norm must not become 0). Skipped only
when nvcc is absent."""
import glob
import os
import re
import subprocess

import pytest

from conftest import ROOT, load_source

build = load_source("awpfast_csrc_build_test", "csrc/build.py")
NVCC = build.find_nvcc()


def test_cuda_sources_listed():
    assert build.CUDA_CU_SOURCES, "no CUDA sources listed in csrc/build.py"
    for src in build.CUDA_CU_SOURCES + build.CUDA_CPP_SOURCES:
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_arch_list_parsing():
    assert build.cuda_arch_flags("80;90+PTX") == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    assert build.cuda_arch_flags("sm_80, 9.0") == build.cuda_arch_flags("80 90")
    with pytest.raises(ValueError):
        build.cuda_arch_flags("ampere")


def test_no_fast_math_flags():
    """--use_fast_math (or -ftz=true, -prec-div/-prec-sqrt=false) would flush subnormals and
    use approximate sqrt/division in the norms and scales."""
    flags = " ".join(build.NVCC_FLAGS + build.CXX_FLAGS)
    for bad in ("fast_math", "fast-math", "-ftz=true", "-prec-div=false", "-prec-sqrt=false", "-ffast-math"):
        assert bad not in flags, bad


def test_one_checked_launch_site():
    """Every kernel launch of csrc/cuda/kernels.cu goes through its launch() helper, which checks
    it: one <<<...>>> in the file."""
    with open(os.path.join(ROOT, "csrc", "cuda", "kernels.cu")) as f:
        src = f.read()
    assert src.count("<<<") == 1, "a kernel launch outside launch() (unchecked)"


BAD_PTX = re.compile(r"\b(sqrt|div)\.(approx|full)[a-z0-9.]*|\b[a-z]+\.ftz\.f32\b")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("src", build.CUDA_CU_SOURCES)
def test_nvcc_compiles_for_sm90(src, tmp_path):
    obj = tmp_path / (os.path.basename(src) + ".o")
    cmd = build.nvcc_compile_cmd(NVCC, os.path.join(ROOT, src), str(obj), ["-arch=sm_90"],
                                 ["-I", os.path.join(ROOT, "csrc"), "-Werror", "all-warnings",
                                  "--keep", "--keep-dir", str(tmp_path)])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert obj.exists() and obj.stat().st_size > 0
    ptx = "".join(open(f).read() for f in glob.glob(str(tmp_path / "*.ptx")))
    assert "sqrt.rn.f64" in ptx, "the norms' square roots should be IEEE float64"
    bad = sorted(set(m.group(0) for m in BAD_PTX.finditer(ptx)))
    assert not bad, f"approximate / flush-to-zero math in the CUDA kernels: {bad}"
    # perturb / add_scaled with deltas: p + delta with the delta rounded (pinned, never contracted)
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "mul.rn.f64" in ptx
    # the ops' per-thread arrays stay in registers (a list picked by a run-time index would not)
    assert ".local" not in ptx, "local memory in the CUDA kernels"
