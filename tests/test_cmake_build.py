"""The CUDA C++ sources compile without a GPU: the CMake build and the torch binding.

Nothing here runs a kernel (CI has no GPU). On a GPU machine run the built tests with
``ctest --test-dir build --output-on-failure``.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# sm_75 (the oldest GPU the extension targets) and sm_90: device code must compile for both.
CUDA_ARCH = os.environ.get("SEPICO_CMAKE_CUDA_ARCH", "75;90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _run(cmd, cwd, timeout):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(_nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cmake_builds_library_tests_and_benchmark(tmp_path):
    build = tmp_path / "build"
    env_cmd = [f"-DCMAKE_CUDA_COMPILER={_nvcc()}"]
    _run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCH}",
          *env_cmd], ROOT, timeout=120)
    _run(["cmake", "--build", str(build), "-j2"], ROOT, timeout=300)
    assert (build / "libsepico_ops.a").is_file()
    for exe in ("test_crop_scores", "test_classmix", "test_pseudo_label", "bench_ops"):
        assert os.access(build / exe, os.X_OK), f"{exe} was not built"
    listed = _run(["ctest", "-N"], build, timeout=60).stdout
    for name in ("test_crop_scores", "test_classmix", "test_pseudo_label", "bench_ops"):
        assert name in listed, f"{name} is not registered with ctest:\n{listed}"


def _cuda_include() -> Path | None:
    """The toolkit's include folder, found as setup.py finds it (nvcc may be a wrapper)."""
    from sepico_fast._cuda_toolkit import find_cuda_home
    home = find_cuda_home().home
    return Path(home) / "include" if home else None


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers (cuda_runtime.h) not found")
def test_torch_binding_compiles_against_torch_headers(tmp_path):
    """Syntax and type check of csrc/torch_binding.cpp (the extension itself needs a CUDA torch).

    A CPU torch wheel ships the c10/cuda headers but not the build-generated
    c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is supplied for that.
    """
    torch_include = Path(torch.__file__).parent / "include"
    if not (torch_include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch wheel ships no c10/cuda headers")
    stub = tmp_path / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [stub, torch_include, torch_include / "torch" / "csrc" / "api" / "include",
                _cuda_include(), Path(sysconfig.get_paths()["include"])]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           *[f"-isystem{p}" for p in includes], f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "torch_binding.cpp")]
    _run(cmd, ROOT, timeout=180)


def test_setup_skips_the_extension_without_cuda_torch():
    """On a CPU torch, setup.py must configure no extension (the package installs without it)."""
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    code = ("import sys, setuptools; captured = {}\n"
            "setuptools.setup = lambda **kw: captured.update(kw)\n"
            "sys.argv = ['setup.py']\n"
            "exec(open('setup.py').read(), {'__file__': 'setup.py', '__name__': '__main__'})\n"
            "assert captured['ext_modules'] == [], captured['ext_modules']\n"
            "assert captured['package_dir'] == {'sepico_fast.kernels': 'kernels'}\n"
            "assert 'sepico_fast.kernels' in captured['packages']\n")
    _run([sys.executable, "-c", code], ROOT, timeout=120)
