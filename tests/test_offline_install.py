"""The offline editable install of the GPU machine works, and through PEP 660.

``pip install --no-build-isolation --no-deps --no-index -e .`` must need no index at all.
Without ``pyproject.toml``, pip <= 25.2 takes the legacy ``setup.py develop`` route, and
setuptools >= 80 turns ``develop`` into a second ``pip install -e .`` with build isolation
and without ``--no-index``: offline it fails on "No matching distribution found for
setuptools". Here the install runs into a throwaway venv (on a copy of the tree) with every
index unreachable; the copy's editable finder must then map ``sepico_fast.kernels`` to the
top-level ``kernels/`` folder.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip_version() -> tuple[int, ...]:
    from importlib.metadata import version
    return tuple(int(p) for p in version("pip").split(".")[:2] if p.isdigit())


@pytest.mark.skipif(_pip_version() < (22, 3), reason="pip --python (to install into another venv) needs pip >= 22.3")
def test_offline_editable_install_takes_the_pep660_route(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_ext_build.json")
    for name in ("sepico_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # setuptools (and the rest) from this interpreter's site-packages, but none of its .pth
    # files: the checkout's own editable install must not answer for the copy
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    parents = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))] \
        or [sysconfig.get_paths()["purelib"]]
    Path(purelib, "zz_parent_site.pth").write_text("\n".join(parents) + "\n")

    # no PYTHONPATH either: it would put this checkout ahead of the copy
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_DEFAULT_TIMEOUT="3", PIP_DISABLE_PIP_VERSION_CHECK="1", SEPICO_FAST_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-v",
                           "--no-build-isolation", "--no-deps", "--no-index", "-e", str(src)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "setup.py develop" not in out, "pip took the legacy develop route:\n" + out[-4000:]
    assert "build_editable" in out or "Building editable" in out, out[-4000:]

    where = subprocess.run([str(py), "-c", "import sepico_fast, sepico_fast.kernels as k; "
                            "print(sepico_fast.__file__); print(k.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    package, kernels = where.stdout.split()
    assert Path(package) == src / "sepico_fast" / "__init__.py"
    assert Path(kernels) == src / "kernels" / "__init__.py"
