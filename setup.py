"""Build script for sepico_fast.

Install with ``pip install --no-build-isolation -e .`` after installing torch (see docs/install.md):
under build isolation this file cannot import torch and skips the CUDA extension (fine on a CPU).

The Triton kernels live in the top-level ``kernels/`` folder but are installed as
``sepico_fast.kernels`` so that nothing named ``kernels`` lands in site-packages
(PyPI has an unrelated, popular ``kernels`` package).

The CUDA C++ kernels in ``csrc/`` are compiled into the optional extension
``sepico_fast.ops._C`` (sm_75, sm_80, sm_90 + PTX) only when the installed torch is a CUDA
build and a CUDA toolkit is found (``sepico_fast/_cuda_toolkit.py``: ``$CUDA_HOME``, the
toolkit behind ``nvcc``, /usr/local/cuda*, each checked for ``include/cuda_runtime.h``,
``bin/nvcc`` and ``lib64/`` or ``lib/`` with ``libcudart.so``);
otherwise, or when ``SEPICO_FAST_NO_EXT=1``, the package installs without it and
``sepico_fast.ops`` uses its torch implementations. A skipped or failed build is printed
and recorded in ``sepico_fast/ops/_ext_build.json`` (pip hides setup output without
``-v``; ``sepico_fast.ops`` warns with that reason on the first CUDA call), and
``SEPICO_FAST_REQUIRE_EXT=1`` turns it into an install error.
"""
import importlib.util
import json
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["sepico_fast", "sepico_fast.*"]) + ["sepico_fast.kernels"]

CSRC_SOURCES = [
    "csrc/torch_binding.cpp",
    "csrc/crop_scores.cu",
    "csrc/classmix.cu",
    "csrc/pseudo_label.cu",
]
# What the install decided about the extension, read by sepico_fast.ops at run time: pip
# shows no output of a successful setup.py without -v, so the reason has to travel.
STATUS_FILE = os.path.join("sepico_fast", "ops", "_ext_build.json")


def _load_toolkit_module():
    """sepico_fast/_cuda_toolkit.py by file path (stdlib only; the package is not installed yet)."""
    spec = importlib.util.spec_from_file_location(
        "_sepico_fast_cuda_toolkit", os.path.join(ROOT, "sepico_fast", "_cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


toolkit = _load_toolkit_module()


def _note(message: str) -> None:
    """On stdout (seen with ``python setup.py``, ``pip install -v`` and in build logs)."""
    print(f"sepico_fast setup: {message}", flush=True)


def _write_status(state: str, detail: str, *dirs: str) -> None:
    record = json.dumps({"state": state, "detail": detail, "archs": toolkit.archs_text()}) + "\n"
    for folder in (os.path.join(ROOT, os.path.dirname(STATUS_FILE)), *dirs):
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, os.path.basename(STATUS_FILE)), "w") as f:
                f.write(record)
        except OSError as exc:  # a read-only tree: the run-time message is less precise
            _note(f"could not write {STATUS_FILE} in {folder}: {exc}")


def _skip(require: bool, reason: str) -> tuple[list, dict]:
    if require:
        raise RuntimeError(f"SEPICO_FAST_REQUIRE_EXT=1 but the CUDA extension cannot be built: {reason}")
    _note(f"CUDA extension not built ({reason}); sepico_fast.ops uses its torch implementations")
    _write_status("skipped", reason)
    return [], {}


def _cuda_extension() -> tuple[list, dict]:
    """The (ext_modules, cmdclass) pair: empty unless a CUDA torch and a CUDA toolkit are found."""
    require = os.environ.get("SEPICO_FAST_REQUIRE_EXT") == "1"
    if os.environ.get("SEPICO_FAST_NO_EXT") == "1":
        if require:
            raise RuntimeError("SEPICO_FAST_REQUIRE_EXT=1 and SEPICO_FAST_NO_EXT=1 contradict each other")
        return _skip(False, "SEPICO_FAST_NO_EXT=1")
    try:
        import torch
    except ImportError as exc:  # e.g. under build isolation without torch
        return _skip(require, f"torch not importable at install time ({exc}); install torch first and "
                              "use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(require, f"torch {torch.__version__} is not a CUDA build")
    choice = toolkit.find_cuda_home(torch_cuda=torch.version.cuda)
    if choice.home is None:
        return _skip(require, choice.describe())
    if choice.rejected or os.environ.get("CUDA_HOME") != choice.home:
        _note(f"using {choice.describe()}")
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it before (and after).
    os.environ["CUDA_HOME"] = choice.home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = choice.home

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Skips the extension, loudly, when it fails to build (e.g. CUDA version mismatch)."""

        def build_extensions(self) -> None:
            status_dir = os.path.join(os.path.abspath(self.build_lib), os.path.dirname(STATUS_FILE))
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolkit failure
                reason = f"build failed with {choice.home}: {type(exc).__name__}: {exc}"
                _write_status("failed", reason, status_dir)
                if require:
                    raise
                _note("WARNING: " + reason)
                _note("WARNING: sepico_fast.ops falls back to torch on the GPU; set "
                      "SEPICO_FAST_REQUIRE_EXT=1 to make this an error, pip install -v to see the log")
                # Nothing was built: later steps (in-place copy, output lists) must skip it.
                self.extensions = []
                return
            _write_status("built", f"built with {choice.home} for {toolkit.archs_text()}", status_dir)

    ext = cpp_extension.CUDAExtension(
        name="sepico_fast.ops._C",
        sources=CSRC_SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo", *toolkit.nvcc_gencode_flags()]},
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
    package_data={"sepico_fast.ops": ["_ext_build.json"]},
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
                "tensorboard", "ruff"],
        "dali": ["nvidia-dali-cuda130"],
        "tb": ["tensorboard"],
        "plots": ["matplotlib"],  # curves.png, bench charts
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
