"""Load upstream SePiCo / DAFormer / mmseg checkpoints (and ImageNet backbones) strictly.

Accepted inputs (a path or an already loaded dict; nothing is ever downloaded):

* mmcv checkpoint files: ``{"meta", "state_dict", "optimizer"}`` — only ``state_dict`` is read;
* upstream UDA checkpoints: keys ``model.<segmentor key>`` (student) and
  ``ema_model.<segmentor key>`` (teacher); ``prefix`` picks one ("model." or "ema_model.");
  nested ``{"model": {...}, "ema_model": {...}}`` dicts are flattened to the same keys;
* published checkpoints (student only, with or without the ``model.`` prefix) and bare
  segmentor state dicts (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``);
* ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrapper prefixes anywhere in a key;
* ImageNet backbone files with backbone-local names: NVlabs ``mit_b*.pth`` (possibly under
  ``state_dict``/``model``; classifier ``head.*`` ignored) and ResNet-V1c weights
  (``stem.0.weight``, ``layer1.0.conv1.weight``...; classifier ``fc.*`` ignored). Only the
  backbone is loaded; both heads keep their random initialisation.

Strictness: every key the target needs must be present with the right shape (BatchNorm
``num_batches_tracked`` counters excepted: numerically unused with momentum 0.1, absent from
some old backbone files; a missing one is listed in the report and left at 0), and keys that
fall inside one of the target's own modules but are not part of it (e.g. ResNet-101's extra
``backbone.layer3.6`` blocks offered to a ResNet-50) raise too. Keys outside the target's
modules (the other UDA branch, classifier heads, ``imnet_model.*``...) are ignored and
listed in the report; unknown ones are logged as a warning.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

_UDA_PREFIXES = ("model.", "ema_model.")
_WRAPPER = re.compile(r"(^|\.)(module|_orig_mod)\.")
# Top-level entries of mmcv checkpoint dicts that are not weights.
_NON_WEIGHT_ENTRIES = ("meta", "optimizer", "optimizer_state", "scheduler", "lr_scheduler")
# Classifier heads of ImageNet backbone files (NVlabs MiT: head.*, torchvision/mmcls ResNet: fc.*).
_CLASSIFIER_PREFIXES = ("head.", "fc.")
_MAX_LISTED = 5
# BatchNorm's counter only matters with momentum=None (never here); old files may lack it.
_BN_COUNTER = "num_batches_tracked"


@dataclass
class LoadReport:
    """What ``load_official`` did.

    kind: "uda" (model./ema_model. checkpoint), "segmentor" (student-only or bare state
    dict) or "backbone" (ImageNet backbone file).
    loaded: number of tensors copied into the model.
    missing: target keys not set by the checkpoint (non-empty only with strict=False).
    unexpected: checkpoint keys nobody asked for and not known to be ignorable (warned).
    ignored: checkpoint keys skipped by design (other UDA branch, classifier head...).
    random_init: module prefixes left at their random initialisation.
    """

    kind: str
    prefix: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        def few(xs: list[str]) -> str:
            return f"{len(xs)}" + (f" e.g. {xs[:3]}" if xs else "")

        return (f"LoadReport(kind={self.kind!r}, prefix={self.prefix!r}, loaded={self.loaded}, "
                f"missing={few(self.missing)}, unexpected={few(self.unexpected)}, "
                f"ignored={few(self.ignored)}, random_init={self.random_init})")


def _read(checkpoint, weights_only: bool) -> Mapping:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:  # pickle errors come in several types
            if weights_only:
                raise ValueError(
                    f"could not read {path} with torch.load(weights_only=True) ({err}); if the "
                    "file is trusted, pass weights_only=False") from err
            raise
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    return checkpoint


def _flatten(d: Mapping, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            _flatten(v, f"{prefix}{k}.", out)


def flat_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint as a flat ``{dotted key: tensor}`` with wrapper prefixes removed."""
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    else:
        checkpoint = {k: v for k, v in checkpoint.items() if k not in _NON_WEIGHT_ENTRIES}
    flat: dict[str, torch.Tensor] = {}
    _flatten(checkpoint, "", flat)
    out = {}
    for k, v in flat.items():
        out[_WRAPPER.sub(r"\1", _WRAPPER.sub(r"\1", k))] = v  # twice: "module._orig_mod."
    return out


def _own_children(module: nn.Module) -> set[str]:
    """First key components that belong to ``module`` (its submodules and direct tensors)."""
    return {k.split(".", 1)[0] for k in module.state_dict()}


def _check(target: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, strict: bool,
           ignorable: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """Compare ``sd`` with ``target.state_dict()``; raise ValueError on a mismatch."""
    expected = target.state_dict()
    children = _own_children(target)
    missing = [k for k in expected if k not in sd]
    shape_bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and (sd[k].shape != v.shape or sd[k].is_floating_point() != v.is_floating_point())
    ]
    extra = [k for k in sd if k not in expected]
    foreign = [k for k in extra if k.split(".", 1)[0] in children]  # inside our modules
    outside = [k for k in extra if k.split(".", 1)[0] not in children]
    ignored = [k for k in outside if k.startswith(ignorable)]
    unexpected = [k for k in outside if not k.startswith(ignorable)]
    problems = []
    if shape_bad:
        problems.append(f"{len(shape_bad)} shape mismatches, e.g. {shape_bad[:_MAX_LISTED]}")
    needed = [k for k in missing if not k.endswith(_BN_COUNTER)]
    if strict and needed:
        problems.append(f"{len(needed)} missing keys, e.g. {needed[:_MAX_LISTED]}")
    if strict and foreign:
        problems.append(f"{len(foreign)} keys not in this architecture, e.g. {foreign[:_MAX_LISTED]}")
    if problems:
        raise ValueError(f"checkpoint does not fit {what}: " + "; ".join(problems)
                         + _guess_arch(sd, target))
    return missing, unexpected + foreign, ignored


@functools.lru_cache(maxsize=8)
def _known_layouts(num_classes: int, proj_dim: int) -> list[tuple[str, dict, dict]]:
    """(arch, segmentor {key: shape}, backbone {key: shape}) of every known architecture."""
    from .models import ARCHS, build_segmentor

    out = []
    for arch in ARCHS:
        with torch.device("meta"):
            ref = build_segmentor(arch, num_classes=num_classes, proj_dim=proj_dim)
        out.append((arch, {k: tuple(v.shape) for k, v in ref.state_dict().items()},
                    {k: tuple(v.shape) for k, v in ref.backbone.state_dict().items()}))
    return out


def _guess_arch(sd: Mapping[str, torch.Tensor], target: nn.Module) -> str:
    """Name the known architecture whose layout the checkpoint matches, if any (error path only)."""
    keys = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    for arch, full, backbone in _known_layouts(_num_classes(sd) or 19, _proj_dim(sd) or 512):
        if keys == full:
            return f" (it matches the {arch} layout)"
        if keys == backbone:
            return f" (it matches the {arch} backbone layout)"
    return ""


def _num_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    for k in ("decode_head.conv_seg.bias", "decode_head.aspp_modules.0.conv.bias"):
        if k in sd:
            return int(sd[k].shape[0])
    return None


def _proj_dim(sd: Mapping[str, torch.Tensor]) -> int | None:
    k = "auxiliary_head.convs.1.bn.weight"
    return int(sd[k].shape[0]) if k in sd else None


def load_official(model: nn.Module, checkpoint, prefix: str = "model.", *,
                  strict: bool = True, weights_only: bool = True) -> LoadReport:
    """Load a checkpoint (path or dict) into a ``Segmentor`` in place; see the module doc.

    prefix: which UDA branch to load when the checkpoint has ``model.``/``ema_model.`` keys
    ("model." = student, as upstream evaluation does; "ema_model." = teacher).
    strict=False only tolerates missing keys (reported); shape mismatches always raise.
    Returns a :class:`LoadReport`.
    """
    if prefix not in _UDA_PREFIXES + ("",):
        raise ValueError(f"prefix must be one of {_UDA_PREFIXES + ('',)}, got {prefix!r}")
    for name in ("backbone", "decode_head", "auxiliary_head"):
        if not isinstance(getattr(model, name, None), nn.Module):
            raise ValueError(f"model must be a segmentor with a .{name} module")
    flat = flat_state_dict(_read(checkpoint, weights_only))
    if not flat:
        raise ValueError("checkpoint holds no tensors")

    branches = {p for p in _UDA_PREFIXES if any(k.startswith(p) for k in flat)}
    ignored_branch: list[str] = []
    if prefix and prefix in branches:
        ignored_branch = [k for k in flat if not k.startswith(prefix)]
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        kind = "uda" if branches == set(_UDA_PREFIXES) else "segmentor"
    elif branches:
        raise ValueError(f"checkpoint has {sorted(branches)} weights but prefix={prefix!r} was "
                         "requested (published checkpoints hold the student, 'model.', only)")
    else:
        sd, kind = flat, "segmentor"

    children = _own_children(model)
    if any(k.split(".", 1)[0] in children for k in sd):
        if kind == "segmentor" and prefix == "ema_model.":
            raise ValueError("prefix='ema_model.' requested but the checkpoint has no teacher "
                             "(ema_model.) weights; it is a student-only segmentor checkpoint")
        missing, unexpected, ignored = _check(model, sd, what=f"{_arch(model)}", strict=strict,
                                              ignorable=())
        wanted = model.state_dict().keys()
        tensors = {k: v for k, v in sd.items() if k in wanted}
        model.load_state_dict(tensors, strict=False)
        random_init = sorted({k.split(".", 1)[0] for k in missing if not k.endswith(_BN_COUNTER)})
    else:
        # An ImageNet backbone file: backbone-local names.
        if ignored_branch:  # a UDA-style prefix on backbone-local keys makes no sense
            raise ValueError("checkpoint keys are neither segmentor nor backbone keys")
        kind = "backbone"
        missing, unexpected, ignored = _check(model.backbone, sd, what=f"the {_arch(model)} backbone",
                                              strict=strict, ignorable=_CLASSIFIER_PREFIXES)
        wanted = model.backbone.state_dict().keys()
        tensors = {k: v for k, v in sd.items() if k in wanted}
        model.backbone.load_state_dict(tensors, strict=False)
        missing = [f"backbone.{k}" for k in missing]
        random_init = ["decode_head", "auxiliary_head"]
        log.info("loaded an ImageNet backbone file into %s; decode_head and auxiliary_head stay "
                 "randomly initialised", _arch(model))

    report = LoadReport(kind=kind, prefix=prefix if kind != "backbone" else "", loaded=len(tensors),
                        missing=missing, unexpected=unexpected,
                        ignored=ignored_branch + ignored, random_init=random_init)
    if unexpected:
        log.warning("checkpoint has %d unexpected keys (not loaded), e.g. %s",
                    len(unexpected), unexpected[:_MAX_LISTED])
    if missing:
        log.warning("checkpoint lacks %d keys (left as initialised), e.g. %s",
                    len(missing), missing[:_MAX_LISTED])
    return report


def _arch(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__))


def uda_state_dict(student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Upstream UDA key layout: ``model.<key>`` for the student, ``ema_model.<key>`` for the teacher."""
    out = {f"model.{k}": v for k, v in student.state_dict().items()}
    if teacher is not None:
        out.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    return out
