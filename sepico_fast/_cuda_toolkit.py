"""Where the CUDA toolkit is, and which GPUs the extension has code for (stdlib only).

Used by ``setup.py`` (loaded by file path, before anything of the package is importable),
by ``sepico_fast.ops`` at run time (which GPUs the built extension can run on) and by
``scripts/gpu_check.sh`` (``python -m sepico_fast._cuda_toolkit`` prints the check).

Why not torch's own guess: ``torch.utils.cpp_extension`` takes ``$CUDA_HOME``, else the
folder above the ``nvcc`` found on PATH, else /usr/local/cuda. When that ``nvcc`` is a
wrapper script outside the toolkit (e.g. ``/usr/local/bin/nvcc`` running
``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the guess is ``/usr/local``, which has no
``include/cuda_runtime.h``, and the build of the extension fails.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

# GPUs the extension is compiled for: machine code (SASS) for sm_75 (T4, RTX 20xx: the
# authors' card), sm_80 (A100; also runs on sm_86/sm_89) and sm_90 (H100/H200), plus
# compute_90 PTX that the driver JIT-compiles for newer GPUs.
SASS_ARCHS: tuple[tuple[int, int], ...] = ((7, 5), (8, 0), (9, 0))
PTX_ARCH: tuple[int, int] = (9, 0)


def nvcc_gencode_flags() -> list[str]:
    flags = []
    for major, minor in SASS_ARCHS:
        flags += ["-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}"]
    major, minor = PTX_ARCH
    return flags + ["-gencode", f"arch=compute_{major}{minor},code=compute_{major}{minor}"]


def extension_runs_on(capability: tuple[int, int]) -> bool:
    """Whether the extension has code a GPU of this compute capability can run.

    SASS of sm_XY runs on sm_XZ for Z >= Y (same major); PTX is JIT-compiled for any GPU
    at least as new as its virtual architecture.
    """
    major, minor = capability
    if any(major == m and minor >= n for m, n in SASS_ARCHS):
        return True
    return (major, minor) >= PTX_ARCH


def archs_text() -> str:
    sass = ", ".join(f"sm_{m}{n}" for m, n in SASS_ARCHS)
    return f"{sass} + compute_{PTX_ARCH[0]}{PTX_ARCH[1]} PTX"


# ---------------------------------------------------------------------------------------
# Toolkit resolution
# ---------------------------------------------------------------------------------------
# The extension links ``-lcudart``: torch's build looks in ``lib64/`` (else ``lib/``).
CUDART_DIRS = ("lib64", "lib")


def missing_parts(root: str) -> list[str]:
    """What a CUDA toolkit root lacks to build and link the extension (empty: nothing)."""
    missing = [rel for rel in (os.path.join("include", "cuda_runtime.h"), os.path.join("bin", "nvcc"))
               if not os.path.isfile(os.path.join(root, rel))]
    if not any(os.path.isfile(os.path.join(root, d, "libcudart.so")) for d in CUDART_DIRS):
        missing.append(" or ".join(os.path.join(d, "libcudart.so") for d in CUDART_DIRS))
    return missing


def is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit root: ``include/cuda_runtime.h``, ``bin/nvcc`` and ``libcudart.so``
    in ``lib64/`` or ``lib/`` (headers to compile, nvcc to build, cudart to link)."""
    return bool(root) and not missing_parts(root)


def toolkit_version(root: str) -> tuple[int, int] | None:
    """(major, minor) from ``include/cuda.h`` (``#define CUDA_VERSION 13000``), or None."""
    try:
        with open(os.path.join(root, "include", "cuda.h"), encoding="utf-8", errors="replace") as f:
            match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    if not match:
        return None
    value = int(match.group(1))
    return value // 1000, (value % 1000) // 10


def _root_of(nvcc_path: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(nvcc_path)))


def _roots_named_in_script(path: str) -> list[str]:
    """Toolkit roots of absolute ``.../bin/nvcc`` paths written in a small wrapper script."""
    try:
        if os.path.getsize(path) > 64 * 1024:
            return []  # a real nvcc binary, not a script
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    if not text.startswith("#!"):
        return []
    return [_root_of(p) for p in re.findall(r"(/[^\s'\"`;|&]*/bin/nvcc)\b", text)]


def _root_from_dryrun(nvcc: str, run: Callable[..., subprocess.CompletedProcess]) -> str | None:
    """Ask nvcc itself: ``nvcc --dryrun`` prints ``#$ _HERE_=<toolkit>/bin`` (any wrapper)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            proc = run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                       capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ _HERE_=(.+)$", (proc.stdout or "") + (proc.stderr or ""), re.M)
    return os.path.dirname(match.group(1).strip()) if match else None


@dataclass
class ToolkitChoice:
    """The resolved toolkit root (None: none found), how it was found, and what was rejected."""
    home: str | None
    how: str
    rejected: list[str] = field(default_factory=list)

    def describe(self) -> str:
        found = f"CUDA_HOME={self.home} ({self.how})" if self.home else f"no CUDA toolkit found ({self.how})"
        return found + "".join(f"; rejected {r}" for r in self.rejected)


def find_cuda_home(environ: Mapping[str, str] | None = None,
                   which: Callable[[str], str | None] = shutil.which,
                   prefixes: Sequence[str] = ("/usr/local",),
                   torch_cuda: str | None = None,
                   run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> ToolkitChoice:
    """The CUDA toolkit to build with, checked to have ``include/cuda_runtime.h``,
    ``bin/nvcc`` and ``lib64/`` or ``lib/`` with ``libcudart.so`` (:func:`missing_parts`).

    In order: ``$CUDA_HOME`` / ``$CUDA_PATH``; the toolkit behind the ``nvcc`` on PATH (its
    folder, the target of a symlink, an absolute ``.../bin/nvcc`` named in a wrapper
    script, or what ``nvcc --dryrun`` reports); ``<prefix>/cuda`` and ``<prefix>/cuda-X.Y``
    (a version matching ``torch_cuda``'s major first, then the newest).
    """
    env = os.environ if environ is None else environ
    rejected: list[str] = []

    def check(root: str | None, how: str) -> ToolkitChoice | None:
        if not root:
            return None
        missing = missing_parts(root)
        if not missing:
            return ToolkitChoice(os.path.abspath(root), how, rejected)
        rejected.append(f"{root} ({how}: no {', no '.join(missing)})")
        return None

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if found := check(env.get(var), f"${var}"):
            return found

    nvcc = which("nvcc")
    if nvcc:
        candidates = [(_root_of(nvcc), "folder of nvcc on PATH")]
        real = os.path.realpath(nvcc)
        if real != os.path.abspath(nvcc):
            candidates.append((_root_of(real), "symlink target of nvcc on PATH"))
        candidates += [(r, f"named in the nvcc wrapper {nvcc}") for r in _roots_named_in_script(real)]
        for root, how in candidates:
            if found := check(root, how):
                return found
        if found := check(_root_from_dryrun(nvcc, run), f"nvcc --dryrun of {nvcc}"):
            return found

    want_major = int(torch_cuda.split(".")[0]) if torch_cuda else None

    def rank(root: str) -> tuple:
        """Same major as torch first, then the prefix's default ``cuda`` link, then newest."""
        version = toolkit_version(root) or (0, 0)
        same = want_major is None or version[0] == want_major
        return same, os.path.basename(root) == "cuda", version

    for prefix in prefixes:
        try:
            names = sorted(n for n in os.listdir(prefix) if re.fullmatch(r"cuda(-\d+(\.\d+)*)?", n))
        except OSError:
            names = []
        roots = [os.path.join(prefix, n) for n in names if is_toolkit(os.path.join(prefix, n))]
        if roots:
            return ToolkitChoice(max(roots, key=rank), f"standard prefix {prefix}/cuda*", rejected)
    return ToolkitChoice(None, "no $CUDA_HOME, no nvcc on PATH behind which a toolkit was found, "
                               f"nothing under {', '.join(p + '/cuda*' for p in prefixes)}", rejected)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the toolkit check (used by scripts/gpu_check.sh); exit 1 when none is found."""
    torch_cuda = None
    try:
        import torch
        torch_cuda = torch.version.cuda
    except ImportError:
        pass
    choice = find_cuda_home(torch_cuda=torch_cuda)
    print(f"cuda toolkit: {choice.describe()}")
    if choice.home:
        version = toolkit_version(choice.home)
        print(f"cuda toolkit version: {'.'.join(map(str, version)) if version else 'unknown'}; "
              f"torch.version.cuda: {torch_cuda}")
    print(f"extension architectures: {archs_text()}")
    return 0 if choice.home else 1


if __name__ == "__main__":
    sys.exit(main())
