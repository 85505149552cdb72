"""A source checkout used without ``pip install`` (PYTHONPATH=.) finds its own Triton
kernels as ``sepico_fast.kernels``."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_source_checkout_serves_its_own_kernels(tmp_path):
    for name in ("sepico_fast", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    code = ("import importlib.util, sepico_fast\n"
            "spec = importlib.util.find_spec('sepico_fast.kernels')\n"
            "print(spec.origin)\n"
            "print(importlib.util.find_spec('sepico_fast.kernels.dist_contrast').origin)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]) == tmp_path / "kernels" / "__init__.py"
    assert Path(out[1]) == tmp_path / "kernels" / "dist_contrast.py"
