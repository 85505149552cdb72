"""Triton kernels of sepico_fast, importable as ``sepico_fast.kernels``.

One file per op: the Triton kernels, the host launcher and the autograd.Function.
"""
