"""Build script for sepico_fast.

Install with ``pip install --no-build-isolation -e .`` after pinning torch (see README):
build isolation would pull a CUDA torch wheel just to run this file.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as
``sepico_fast.kernels`` so that nothing named ``kernels`` lands in site-packages
(PyPI has an unrelated, popular ``kernels`` package).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["sepico_fast", "sepico_fast.*"]) + ["sepico_fast.kernels"]

setup(
    name="sepico_fast",
    version="0.1.0",
    description="Fast, faithful SePiCo (semantic-guided pixel contrast) trainer",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sepico_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        'triton>=3.0; platform_system == "Linux"',
    ],
    extras_require={
        "dev": ["pytest"],
        "dali": ["nvidia-dali-cuda130"],
        "tb": ["tensorboard"],
    },
)
