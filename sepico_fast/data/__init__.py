"""Datasets, per-sample pipelines, rare class sampling and the training input pipelines (method §1, §6.9)."""
from .datasets import SourceSet, TargetSet, ValSet, build_datasets, build_val_set, dataset_defaults, val_loader
from .labels import CLASSES, IGNORE_INDEX, MEAN, NUM_CLASSES, PALETTE, STD
from .layouts import LayoutError

__all__ = ["build_datasets", "build_val_set", "dataset_defaults", "val_loader", "SourceSet", "TargetSet", "ValSet", "LayoutError",
           "CLASSES", "PALETTE", "MEAN", "STD", "NUM_CLASSES", "IGNORE_INDEX", "TrainLoader"]


def __getattr__(name):  # TrainLoader pulls in torch.utils.data workers; import it lazily
    if name == "TrainLoader":
        from .loader import TrainLoader
        return TrainLoader
    raise AttributeError(name)
