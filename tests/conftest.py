"""Test-session setup shared by every test file.

Without a GPU the Triton kernels run in Triton's interpreter: the variable must be set
before ``triton`` is first imported, which is why it is done here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
