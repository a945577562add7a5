"""Build description of the awpfast native extensions, loaded by setup.py.

``extensions()`` returns ``(ext_modules, cmdclass)``:

* ``awpfast._C``: the CPU kernels (pybind11, C++17, no torch headers). Always built, unless
  ``AWPFAST_NATIVE=0`` (then the package is pure Python and uses the foreach backend).
  A source build without a working C++ compiler, or whose compile fails, stops with a message
  that starts ``awpfast: the native extension awpfast._C was NOT built:`` and says why.
* ``awpfast._C_cuda``: the CUDA kernels, built when ``nvcc`` is found. ``AWPFAST_CUDA=0``
  skips it, ``AWPFAST_CUDA=1`` makes a failure to build it an error (by default a failed
  CUDA build only warns, and the install goes on without it). ``AWPFAST_CUDA_ARCHS`` picks
  the GPU architectures (``"80;90"``, ``"8.0 9.0+PTX"``, ``"sm_80,sm_90"``; default
  ``"80;90+PTX"``: SASS for sm_80 and sm_90 plus PTX for newer GPUs). ``AWPFAST_NVCC`` or
  ``CUDA_HOME`` point at a specific toolkit. The module links the static CUDA runtime, so
  it needs no libcudart.so at run time. A build without it prints one line saying why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CPU_SOURCES = ["csrc/cpu/module.cpp", "csrc/cpu/kernels_base.cpp", "csrc/cpu/kernels_avx2.cpp"]
CUDA_CU_SOURCES = ["csrc/cuda/kernels.cu"]
CUDA_CPP_SOURCES = ["csrc/cuda/module.cpp"]
HEADERS = ["csrc/dtype.h", "csrc/dtype_traits.h", "csrc/args.h", "csrc/cpu/scalar.h", "csrc/cpu/kernels.inc",
           "csrc/cuda/kernels.h"]

CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden",
             "-Wall"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              "-lineinfo"]
# the start of the message of every build that leaves awpfast._C out (setup.py prints it too)
NOT_BUILT = "awpfast: the native extension awpfast._C was NOT built: "


def _env_flag(name: str):
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def _rel(path: str) -> str:
    """Source paths relative to the project root when setup.py runs from there."""
    if os.path.abspath(os.getcwd()) == ROOT:
        return path
    return os.path.join(ROOT, path)


# ------------------------------------------------------------------------- CUDA toolkit
def find_nvcc():
    cand = os.environ.get("AWPFAST_NVCC")
    if cand:
        return cand if os.path.exists(cand) or shutil.which(cand) else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def find_cuda_home(nvcc: str):
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             os.path.dirname(os.path.dirname(nvcc))]
    try:  # nvcc may be a wrapper script: ask it where its toolkit is
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True,
                             timeout=60).stderr
        m = re.search(r"^#\$ TOP=(\S+)", out, re.M)
        if m:
            homes.insert(0, m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    homes += ["/usr/local/cuda"]
    for h in homes:
        if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h")):
            return os.path.realpath(h)
    return None


def cuda_lib_dir(home: str):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.exists(os.path.join(d, "libcudart_static.a")):
            return d
    return None


def cuda_arch_flags(spec=None) -> list:
    """nvcc -gencode flags from an architecture list such as "80;90+PTX"."""
    spec = spec if spec is not None else os.environ.get("AWPFAST_CUDA_ARCHS", "80;90+PTX")
    flags = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        tok = re.sub(r"(?i)\+ptx$", "", tok)
        num = re.sub(r"(?i)^(sm_|compute_)", "", tok).replace(".", "")
        if not re.fullmatch(r"\d+[a-z]?", num):
            raise ValueError(f"AWPFAST_CUDA_ARCHS: cannot read architecture {tok!r} (use e.g. '80;90+PTX')")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    if not flags:
        raise ValueError("AWPFAST_CUDA_ARCHS is empty")
    return flags


def nvcc_compile_cmd(nvcc: str, src: str, obj: str, arch_flags=None, extra=()) -> list:
    return ([nvcc, "-c", src, "-o", obj] + NVCC_FLAGS + list(arch_flags or cuda_arch_flags())
            + list(extra))


# ------------------------------------------------------------------------- setuptools glue
def extensions():
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    if _env_flag("AWPFAST_NATIVE") is False:
        return [], {}

    try:
        import pybind11
    except ImportError as e:  # pyproject lists it; a --no-build-isolation build may lack it
        raise RuntimeError(
            "awpfast: building the native extension needs pybind11 (pip install pybind11), or "
            "set AWPFAST_NATIVE=0 to install the pure-Python package (foreach backend).") from e
    inc = [pybind11.get_include(), _rel("csrc")]

    cpu = Extension(
        "awpfast._C",
        sources=[_rel(s) for s in CPU_SOURCES],
        include_dirs=inc,
        depends=[_rel(h) for h in HEADERS],
        language="c++",
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-pthread"],
    )
    exts = [cpu]

    cuda_wanted = _env_flag("AWPFAST_CUDA")
    nvcc = find_nvcc() if cuda_wanted is not False else None
    if cuda_wanted and not nvcc:
        raise RuntimeError("AWPFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or AWPFAST_NVCC)")
    cuda_why = (None if nvcc else "AWPFAST_CUDA=0" if cuda_wanted is False
                else "nvcc not found (set CUDA_HOME or AWPFAST_NVCC to build it)")
    if nvcc:
        cu = Extension(
            "awpfast._C_cuda",
            sources=[_rel(s) for s in CUDA_CPP_SOURCES + CUDA_CU_SOURCES],
            include_dirs=inc,
            depends=[_rel(h) for h in HEADERS],
            language="c++",
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-pthread"],
        )
        cu._awp_nvcc = nvcc
        exts.append(cu)

    class BuildExt(build_ext):
        """build_ext that compiles .cu sources with nvcc and explains missing compilers."""

        def build_extensions(self):
            if cuda_why and any(e.name == "awpfast._C" for e in self.extensions):
                print(f"awpfast: the CUDA extension awpfast._C_cuda is not built: {cuda_why}",
                      file=sys.stderr, flush=True)
            self._check_cxx()
            # nvcc runs in the background while the C++ of awpfast._C compiles (the two take
            # about as long); the CUDA extension waits for its objects in build_extension.
            pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
            try:
                for ext in list(self.extensions):
                    if any(s.endswith(".cu") for s in ext.sources):
                        try:
                            self._prepare_cuda(ext, pool)
                        except Exception as e:  # noqa: BLE001 - any failure: skip unless forced
                            if cuda_wanted:
                                raise
                            self.warn(f"awpfast: skipping the CUDA extension ({e}); set AWPFAST_CUDA=1 "
                                      "to make this an error")
                            self.extensions.remove(ext)
                super().build_extensions()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            # a CUDA extension that failed (and was let go) is not copied or installed
            self.extensions = [e for e in self.extensions if not getattr(e, "_awp_failed", False)]

        def build_extension(self, ext):
            try:
                jobs = getattr(ext, "_awp_cu_jobs", None)
                if jobs:
                    ext.extra_objects = list(ext.extra_objects or []) + [job.result() for job in jobs]
                    ext._awp_cu_jobs = None
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if getattr(ext, "_awp_nvcc", None) and not cuda_wanted:
                    ext._awp_failed = True
                    self.warn(f"awpfast: the CUDA extension failed to build ({e}); continuing "
                              "without it (AWPFAST_CUDA=1 makes this an error)")
                    return
                if ext.name == "awpfast._C":
                    raise RuntimeError(
                        f"{NOT_BUILT}the compile failed (the compiler's output is above): {e}. It "
                        "needs a C++17 compiler (g++ >= 7 or clang >= 5). Set AWPFAST_NATIVE=0 to "
                        "install without it (the 'foreach' backend is used then).") from e
                raise

        def _check_cxx(self):
            cmd = None
            for attr in ("compiler_so_cxx", "compiler_cxx", "compiler_so"):
                val = getattr(self.compiler, attr, None)
                if val:
                    cmd = val[0] if isinstance(val, (list, tuple)) else str(val).split()[0]
                    break
            if cmd and shutil.which(cmd) is None and not os.path.exists(cmd):
                raise RuntimeError(
                    f"{NOT_BUILT}no C++ compiler found (looked for {cmd!r}). The native extension "
                    "awpfast._C needs one: install g++ or clang++ (e.g. apt-get install g++), "
                    "point CXX/CC at it, or set AWPFAST_NATIVE=0 to install the pure-Python "
                    "package (the 'foreach' backend is used then).")

        def _prepare_cuda(self, ext, pool):
            """Checks the toolkit, moves the .cu sources out of ``ext.sources`` and starts their
            nvcc compiles on ``pool`` (``ext._awp_cu_jobs``: futures of the object paths)."""
            nvcc = ext._awp_nvcc
            home = find_cuda_home(nvcc)
            if home is None:
                raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (set CUDA_HOME)")
            libdir = cuda_lib_dir(home)
            if libdir is None:
                raise RuntimeError(f"libcudart_static.a not found under {home}")
            arch = cuda_arch_flags()
            cus = [s for s in ext.sources if s.endswith(".cu")]
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            tmp = os.path.join(self.build_temp, "cuda")
            os.makedirs(tmp, exist_ok=True)
            incs = []
            for d in ext.include_dirs:
                incs += ["-I", d]
            host_cxx = os.environ.get("AWPFAST_NVCC_CCBIN")

            def one(src):
                obj = os.path.join(tmp, os.path.basename(src) + ".o")
                extra = incs + (["-ccbin", host_cxx] if host_cxx else [])
                cmd = nvcc_compile_cmd(nvcc, src, obj, arch, extra)
                newest = max(os.path.getmtime(p) for p in [src] + list(ext.depends) if os.path.exists(p))
                if self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                    self.announce(" ".join(cmd), level=2)
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        raise RuntimeError(f"nvcc failed on {src}:\n{r.stdout}{r.stderr}")
                return obj

            ext._awp_cu_jobs = [pool.submit(one, src) for src in cus]
            ext.depends = list(ext.depends) + cus  # relink when a .cu changes
            ext.include_dirs = list(ext.include_dirs) + [os.path.join(home, "include")]
            ext.library_dirs = list(ext.library_dirs or []) + [libdir]
            ext.libraries = list(ext.libraries or []) + ["cudart_static", "dl", "rt"]

    return exts, {"build_ext": BuildExt}


if __name__ == "__main__":  # a quick look at what would be built
    e, _ = extensions()
    print([x.name for x in e], "nvcc:", find_nvcc(), "python:", sys.version.split()[0],
          sysconfig.get_platform())
