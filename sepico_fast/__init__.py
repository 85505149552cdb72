"""sepico_fast: fast, faithful SePiCo (semantic-guided pixel contrast) for domain-adaptive segmentation."""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# The Triton kernels live in the top-level ``kernels/`` folder of the source tree; an
# install maps them to ``sepico_fast/kernels`` (setup.py: package_dir). From a source
# checkout used without ``pip install`` (``PYTHONPATH=.``, as on the GPU machine) that
# mapping does not exist, so a finder serves ``sepico_fast.kernels`` from the sibling
# folder. It is registered only for a source tree (``setup.py`` next to this package) and
# takes precedence there, so a checkout always runs its own kernels, never those of
# another editable install. Nothing is imported until ``sepico_fast.kernels`` is asked for
# (it imports triton).
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_KERNELS = os.path.join(_SOURCE_ROOT, "kernels")


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "sepico_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_SOURCE_KERNELS, "__init__.py"),
            submodule_search_locations=[_SOURCE_KERNELS])


if (not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
        and os.path.isfile(os.path.join(_SOURCE_KERNELS, "__init__.py"))
        and os.path.isfile(os.path.join(_SOURCE_ROOT, "setup.py"))
        and not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path)):
    sys.meta_path.insert(0, _SourceKernelsFinder())
