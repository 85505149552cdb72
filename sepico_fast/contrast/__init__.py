"""Pixel-contrast mathematics of SePiCo (method §3-5, public API of §10).

    downscale_label_ratio   labels at feature resolution (majority vote with min ratio)
    prepare_contrast        proj [B,A,h,w] + label [B,1,H,W] -> feat [N,A], labels [N]
    ClassStats              running per-class mean / diagonal variance / count / FIFO bank
    proto_contrast_loss, dist_contrast_loss, bank_contrast_loss
    implementation_report   which implementation (Triton / torch) each op takes on a device
"""
from .labels import downscale_label_ratio, prepare_contrast
from .losses import bank_contrast_loss, dist_contrast_loss, proto_contrast_loss
from .stats import ClassStats
from .validation import implementation_report, load_triton_kernels

__all__ = ["downscale_label_ratio", "ClassStats", "proto_contrast_loss", "dist_contrast_loss",
           "bank_contrast_loss", "prepare_contrast", "implementation_report", "load_triton_kernels"]
