"""Build script for sepico_fast.

Install with ``pip install --no-build-isolation -e .`` after pinning torch (see README):
build isolation would pull a CUDA torch wheel just to run this file.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as
``sepico_fast.kernels`` so that nothing named ``kernels`` lands in site-packages
(PyPI has an unrelated, popular ``kernels`` package).

The CUDA C++ kernels in ``csrc/`` are compiled into the optional extension
``sepico_fast.ops._C`` only when the installed torch is a CUDA build and ``nvcc`` is found
(``CUDA_HOME``); otherwise, or when ``SEPICO_FAST_NO_EXT=1``, the package installs without
it and ``sepico_fast.ops`` uses its torch implementations. A failed extension build is
reported and skipped unless ``SEPICO_FAST_REQUIRE_EXT=1``, which turns it into an error.
"""
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["sepico_fast", "sepico_fast.*"]) + ["sepico_fast.kernels"]

CSRC_SOURCES = [
    "csrc/torch_binding.cpp",
    "csrc/crop_scores.cu",
    "csrc/classmix.cu",
    "csrc/pseudo_label.cu",
]
# sm_80 (A100) and sm_90 (H100) machine code, plus sm_90 PTX so newer GPUs can JIT it.
NVCC_ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]


def _note(message: str) -> None:
    print(f"sepico_fast setup: {message}", file=sys.stderr)


def _cuda_extension() -> tuple[list, dict]:
    """The (ext_modules, cmdclass) pair: empty unless a CUDA torch and nvcc are available."""
    require = os.environ.get("SEPICO_FAST_REQUIRE_EXT") == "1"
    if os.environ.get("SEPICO_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # e.g. under build isolation without torch
        if require:
            raise
        _note(f"torch not importable ({exc}); CUDA extension not built")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if torch.version.cuda is None or nvcc is None or not os.path.exists(nvcc):
        if require:
            raise RuntimeError("SEPICO_FAST_REQUIRE_EXT=1 but torch is not a CUDA build or nvcc "
                               f"was not found (torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return [], {}  # CPU torch or no nvcc: the torch fallbacks are used, silently

    class OptionalBuildExtension(BuildExtension):
        """Skips the extension with a warning when it fails to build (e.g. CUDA version mismatch)."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolkit failure
                if require:
                    raise
                _note(f"WARNING: CUDA extension build failed, using torch fallbacks: {exc}")
                # Nothing was built: later steps (in-place copy, output lists) must skip it.
                self.extensions = []

    ext = CUDAExtension(
        name="sepico_fast.ops._C",
        sources=CSRC_SOURCES,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *NVCC_ARCH_FLAGS]},
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="sepico_fast",
    version="0.1.0",
    description="Fast, faithful SePiCo (semantic-guided pixel contrast) trainer",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sepico_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        'triton>=3.0; platform_system == "Linux"',
        "safetensors",  # Hugging Face weight files (--pretrained, evaluate --checkpoint)
    ],
    extras_require={
        # Everything the tests use: the SegFormer reference (transformers 5.x renamed the
        # modules the nvidia/mit-b* hub files are written in, so 4.x), the ONNX export check,
        # curves and TensorBoard scalars.
        "dev": ["pytest", "transformers>=4.40,<5", "onnx", "onnxruntime", "onnxscript", "matplotlib",
                "tensorboard"],
        "dali": ["nvidia-dali-cuda130"],
        "tb": ["tensorboard"],
        "plots": ["matplotlib"],  # curves.png, bench charts
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
