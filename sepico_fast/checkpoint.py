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

Hugging Face SegFormer encoders (``nvidia/mit-b0`` ... ``nvidia/mit-b5``: ``pytorch_model.bin`` or
``model.safetensors``, or the folder holding one of them) are recognised by their
``segformer.encoder.*`` / ``encoder.*`` keys (the layout transformers 4.x writes), renamed to
the MiT names (query + key/value -> ``q`` + ``kv``) and then loaded like an ImageNet backbone
file, with the same strictness; their classifier / decode head is ignored.

Hugging Face DINOv2 encoders (``facebook/dinov2-{small,base,large}`` and
``facebook/dinov2-with-registers-*``: the same files or folder) are recognised by their
``embeddings.patch_embeddings.projection.*`` key (bare, or under ``dinov2.`` /
``dinov2_with_registers.``), renamed to the ``dinov2_*`` backbone names (query, key and value
-> one ``qkv``; ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``) and loaded with the same
strictness; the pre-training mask token and any classifier are ignored (listed in the report).

Files: ``torch.save`` pickles are read with ``weights_only=True`` (tensors, plain containers and
numeric numpy arrays only); ``.safetensors`` files (recognised by content) need the
``safetensors`` package.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import ARCHS, build_segmentor
from .models.dinov2 import DinoVisionTransformer
from .models.mit import MixVisionTransformer

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
    layout: "upstream" (mmseg / NVlabs / mmcv key names) or "huggingface" (a transformers
    SegFormer encoder, renamed to the MiT names).
    """

    kind: str
    prefix: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)
    layout: str = "upstream"

    def __repr__(self) -> str:
        def few(xs: list[str]) -> str:
            return f"{len(xs)}" + (f" e.g. {xs[:3]}" if xs else "")

        return (f"LoadReport(kind={self.kind!r}, prefix={self.prefix!r}, loaded={self.loaded}, "
                f"missing={few(self.missing)}, unexpected={few(self.unexpected)}, "
                f"ignored={few(self.ignored)}, random_init={self.random_init}, layout={self.layout!r})")


# Files a Hugging Face model folder may hold, in the order they are tried.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _numpy_safe_globals() -> list:
    """What unpickling numeric numpy arrays and scalars needs (e.g. an RNG state in a
    training checkpoint); object arrays still fail because their items are other globals."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    dtypes = {type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                          np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                          np.float64, np.complex64, np.complex128)}
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def _allow(safe: list):
    """Context allowing ``safe`` globals in weights-only unpickling (process-wide on torch 2.4)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(safe)
    torch.serialization.add_safe_globals(safe)
    return contextlib.nullcontext()


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """True when the file has the safetensors layout (8-byte little-endian header size, JSON header)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + size <= os.path.getsize(path)


def _weights_file(path: str) -> str:
    """A checkpoint path, or the weights file inside a Hugging Face model folder."""
    if os.path.isdir(path):
        for name in _HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        if any(n.endswith(".index.json") for n in os.listdir(path)):
            raise ValueError(f"{path} holds a sharded checkpoint (*.index.json); merge the shards into one file")
        raise FileNotFoundError(f"checkpoint folder {path} holds none of {list(_HF_WEIGHT_FILES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"{path} is a safetensors file; reading it needs the safetensors package "
                         "(pip install safetensors)") from None
    return load_file(path, device="cpu")


# Training checkpoints (``sepico_fast.train``): the formats this version reads and the
# config fields it knows. A checkpoint naming another ``sepico_fast/*`` format, or holding a
# config field not listed here, was written by a newer version: every reader (resume,
# evaluate, export, --pretrained) refuses it in one line instead of silently ignoring what it
# does not understand. ``TRAINING_CONFIG_FIELDS`` equals ``train.config.TrainConfig``'s
# fields (tests/test_train_config.py checks it): a new config field is added to both.
TRAINING_FORMAT = "sepico_fast/2"
KNOWN_TRAINING_FORMATS = ("sepico_fast/1", "sepico_fast/2")
TRAINING_CONFIG_FIELDS = frozenset({
    "amp", "arch", "batch_size", "betas", "blur", "cache", "cat_max_ratio", "ce_mean_over_all",
    "checkpoint_interval", "color_jitter_p", "color_jitter_strength", "compile", "contrast_start",
    "contrast_weight", "cpu_amp", "crop", "crop_tries", "data_root", "day_ratio", "ddp_schedule", "ddp_timeout",
    "cuda_graphs", "debug_checks", "debug_interval", "decay_rule", "deterministic", "device", "drop_path_rate", "dz_class_weight",
    "dz_test_reweight", "ema_alpha", "eval_interval", "eval_max_images", "fused_jitter", "head_lr_mult", "iters",
    "keep_checkpoints", "layer_decay", "log_interval", "lr", "max_skipped_steps", "memory_length", "method",
    "min_ratio", "num_classes", "num_workers", "nvtx", "overwrite", "pipeline", "poly_power", "preset",
    "pretrained", "profile", "profile_iters", "proj_dim", "pseudo_diagnostics", "pseudo_ignore_bottom",
    "pseudo_ignore_top", "pseudo_threshold", "reg_weight", "regen_pseudo", "resume", "resume_override", "seed",
    "source", "stop_at", "target", "temperature", "variant", "warmup_iters", "warmup_ratio", "weight_decay",
    "work_dir"})


def newer_format_reason(checkpoint: Mapping) -> str | None:
    """Why a training checkpoint is of a newer format than this version reads, or None.

    Only our own checkpoints are judged (``meta.format`` starting with ``sepico_fast/``);
    upstream / mmcv files and bare state dicts carry no such format and pass."""
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
    fmt = meta.get("format")
    if not (isinstance(fmt, str) and fmt.startswith("sepico_fast/")):
        return None
    update = "written by a newer sepico_fast; update sepico_fast to read it"
    if fmt not in KNOWN_TRAINING_FORMATS:
        return (f"checkpoint format {fmt!r} is unknown to this version (it reads "
                f"{', '.join(KNOWN_TRAINING_FORMATS)}): {update}")
    config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    unknown = sorted(set(config) - TRAINING_CONFIG_FIELDS)
    if unknown:
        return f"config field(s) {', '.join(unknown)} unknown to this version: {update}"
    return None


def read_checkpoint(checkpoint, weights_only: bool = True) -> Mapping:
    """The object stored in a checkpoint file (``torch.save`` pickle or safetensors), or
    ``checkpoint`` itself when it is already a dict.

    A directory is taken as a Hugging Face model folder (``model.safetensors`` or
    ``pytorch_model.bin`` inside). With ``weights_only`` (the default) a pickle may hold
    tensors, plain Python containers and numeric numpy arrays, nothing that runs code.
    """
    path = None
    if isinstance(checkpoint, (str, os.PathLike)):
        path = _weights_file(os.fspath(checkpoint))
        if is_safetensors_file(path):
            return _read_safetensors(path)
        try:
            if weights_only:
                with _allow(_numpy_safe_globals()):
                    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            else:
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # pickle errors come in several types
            # torch's message opens with generic advice; the reason follows "WeightsUnpickler error:".
            found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
            detail = found.group(1).strip() if found else (lines[0] if lines else repr(err))
            refused = detail if "Unsupported global" in detail else None
            if weights_only and refused:
                raise ValueError(
                    f"could not read {path} as weights only ({refused}): it holds pickled Python objects "
                    "other than tensors, which are not unpickled because that can run code; if you trust "
                    "the file, re-save its weights once with torch.save(torch.load(PATH, weights_only=False)"
                    "['state_dict'], NEW_PATH), or call load_official(..., weights_only=False) from Python"
                ) from err
            raise ValueError(f"could not read {path}: not a torch.save or safetensors file, or damaged "
                             f"({type(err).__name__}: {detail})") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    reason = newer_format_reason(checkpoint)
    if reason:
        raise ValueError(f"{path}: {reason}" if path else reason)
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


# ----------------------------------------------------------------------------- Hugging Face SegFormer
# transformers 4.x SegFormer encoder names (the layout of the nvidia/mit-b* hub files).
_HF_ENCODER = re.compile(r"^(?:segformer\.)?encoder\.")
_HF_PATCH = re.compile(r"^patch_embeddings\.(\d+)\.(proj|layer_norm)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^block\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_STAGE_NORM = re.compile(r"^layer_norm\.(\d+)\.(weight|bias)$")
# Module inside one HF SegformerLayer -> ours; query/key/value are special-cased (q, kv).
_HF_LAYER_MODULES = {
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}


def is_hf_segformer(flat: Mapping[str, torch.Tensor]) -> bool:
    """Whether a flat state dict holds a Hugging Face SegFormer encoder (``segformer.encoder.*`` or
    ``encoder.*`` with ``patch_embeddings`` / ``block`` / ``layer_norm`` below it)."""
    return any(_HF_ENCODER.match(k) and _HF_ENCODER.sub("", k).split(".", 1)[0]
               in ("patch_embeddings", "block", "layer_norm") for k in flat)


def hf_segformer_to_mit(flat: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(MiT backbone state dict with our names, ignored non-encoder keys) of a HF SegFormer file.

    Every encoder key must be one the transformers 4.x layout defines; query and the separate
    key / value projections become ``attn.q`` and one ``attn.kv`` (K rows first, then V, as
    the MiT code splits them). Raises ValueError naming the keys it cannot place.
    """
    out: dict[str, torch.Tensor] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}
    unknown, ignored = [], []
    for key, value in flat.items():
        if not _HF_ENCODER.match(key):
            ignored.append(key)  # classifier.*, the HF decode head, ...
            continue
        rest = _HF_ENCODER.sub("", key)
        if m := _HF_PATCH.match(rest):
            stage, module, param = int(m[1]), m[2], m[3]
            out[f"patch_embed{stage + 1}.{'proj' if module == 'proj' else 'norm'}.{param}"] = value
        elif m := _HF_STAGE_NORM.match(rest):
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = value
        elif (m := _HF_BLOCK.match(rest)) and (m[3] in _HF_LAYER_MODULES or m[3] in (
                "attention.self.key", "attention.self.value")):
            ours = f"block{int(m[1]) + 1}.{m[2]}"
            if m[3] in _HF_LAYER_MODULES:
                out[f"{ours}.{_HF_LAYER_MODULES[m[3]]}.{m[4]}"] = value
            else:
                kv.setdefault(f"{ours}.attn.kv.{m[4]}", {})[m[3].rsplit(".", 1)[1]] = value
        else:
            unknown.append(key)
    for name, parts in kv.items():
        if set(parts) != {"key", "value"}:
            unknown.append(f"{name}: only attention.self.{next(iter(parts))} present (needs key and value)")
            continue
        out[name] = torch.cat([parts["key"], parts["value"]], dim=0)
    if unknown:
        raise ValueError(f"Hugging Face SegFormer checkpoint has {len(unknown)} encoder keys that are not "
                         f"part of the transformers 4.x layout, e.g. {sorted(unknown)[:_MAX_LISTED]}")
    return out, ignored


# ----------------------------------------------------------------------------- Hugging Face DINOv2
# transformers 4.x Dinov2Model / Dinov2WithRegistersModel names (the facebook/dinov2-* hub files).
_HF_DINO_PREFIX = re.compile(r"^(?:dinov2(?:_with_registers)?\.)?")
_HF_DINO_MARK = re.compile(r"^(?:dinov2(?:_with_registers)?\.)?embeddings\.patch_embeddings\.projection\.")
_HF_DINO_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DINO_IGNORED = ("embeddings.mask_token",)  # masked-image pre-training only
_HF_DINO_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_DINO_LAYER_MODULES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_DINO_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def is_hf_dinov2(flat: Mapping[str, torch.Tensor]) -> bool:
    """Whether a flat state dict holds a Hugging Face DINOv2 encoder."""
    return any(_HF_DINO_MARK.match(k) for k in flat)


def hf_dinov2_to_vit(flat: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(``dinov2_*`` backbone state dict, ignored keys) of a HF DINOv2 file; query, key and value
    become one ``qkv`` (rows q, k, v). Raises ValueError naming the keys it cannot place."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown, ignored = [], []
    for key, value in flat.items():
        rest = _HF_DINO_PREFIX.sub("", key, count=1)
        if not rest.startswith(("embeddings.", "encoder.", "layernorm.")):
            ignored.append(key)  # classifier.*, ...
        elif rest in _HF_DINO_IGNORED:
            ignored.append(key)
        elif rest in _HF_DINO_FIXED:
            out[_HF_DINO_FIXED[rest]] = value
        elif (m := _HF_DINO_LAYER.match(rest)) and m[2] in _HF_DINO_LAYER_MODULES:
            out[f"blocks.{m[1]}.{_HF_DINO_LAYER_MODULES[m[2]]}"] = value
        elif m and (q := _HF_DINO_QKV.match(m[2])):
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{q[2]}", {})[q[1]] = value
        else:
            unknown.append(key)
    for name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            unknown.append(f"{name}: only attention.attention.{sorted(parts)} present (needs query, key and value)")
            continue
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        raise ValueError(f"Hugging Face DINOv2 checkpoint has {len(unknown)} encoder keys that are not part of "
                         f"the transformers 4.x Dinov2Model layout (MLP ViT-S/B/L), e.g. {sorted(unknown)[:_MAX_LISTED]}")
    return out, ignored


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


def num_classes_of(model: nn.Module) -> int | None:
    """Number of classes a segmentor's decode head predicts (None if not recognised)."""
    return _num_classes(model.state_dict())


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
    flat = flat_state_dict(read_checkpoint(checkpoint, weights_only))
    if not flat:
        raise ValueError("checkpoint holds no tensors")
    layout, hf_ignored = "upstream", []
    if is_hf_dinov2(flat):
        if not isinstance(model.backbone, DinoVisionTransformer):
            raise ValueError(f"checkpoint is a Hugging Face DINOv2 encoder but {_arch(model)} has a "
                             f"{type(model.backbone).__name__} backbone; use a dinov2_* architecture")
        flat, hf_ignored = hf_dinov2_to_vit(flat)
        layout = "huggingface"
        foreign = sorted(set(flat) - set(model.backbone.state_dict()))
        if foreign:  # every encoder key is the backbone's (e.g. registers offered to a model without)
            hint = (" (a with-registers model: use a dinov2_*_reg architecture)" if "register_tokens" in foreign
                    else _guess_arch(flat, model))
            raise ValueError(f"checkpoint does not fit the {_arch(model)} backbone: {len(foreign)} keys not in this "
                             f"architecture, e.g. {foreign[:_MAX_LISTED]}{hint}")
    elif is_hf_segformer(flat):
        if not isinstance(model.backbone, MixVisionTransformer):
            raise ValueError(f"checkpoint is a Hugging Face SegFormer (MiT) encoder but {_arch(model)} has a "
                             f"{type(model.backbone).__name__} backbone; use a daformer_mit* architecture")
        flat, hf_ignored = hf_segformer_to_mit(flat)
        layout = "huggingface"

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
        log.info("loaded an ImageNet backbone file (%s layout) into %s; decode_head and auxiliary_head "
                 "stay randomly initialised", layout, _arch(model))

    report = LoadReport(kind=kind, prefix=prefix if kind != "backbone" else "", loaded=len(tensors),
                        missing=missing, unexpected=unexpected,
                        ignored=ignored_branch + hf_ignored + ignored, random_init=random_init, layout=layout)
    if unexpected:
        log.warning("checkpoint has %d unexpected keys (not loaded), e.g. %s",
                    len(unexpected), unexpected[:_MAX_LISTED])
    if missing:
        log.warning("checkpoint lacks %d keys (left as initialised), e.g. %s",
                    len(missing), missing[:_MAX_LISTED])
    return report


def load_pretrained(model: nn.Module, path, *, verbose: bool = True) -> LoadReport:
    """``--pretrained PATH``: :func:`load_official` into ``model`` (student weights of a UDA
    checkpoint); a bad file exits with one line naming the flag, success prints one line."""
    try:
        report = load_official(model, path)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--pretrained: {err}") from None
    if verbose:
        what = {"backbone": "backbone", "segmentor": "segmentor", "uda": "student of a UDA checkpoint"}[report.kind]
        print(f"pretrained: {report.loaded} tensors ({what}, {report.layout} layout) from {path}"
              + (f"; randomly initialised: {', '.join(report.random_init)}" if report.random_init else ""))
    return report


# Where the paper presets' ImageNet backbones come from (docs/models.md, "Pretrained weights").
_MIT_PAGE = "https://huggingface.co/nvidia/mit-b{n}"
RESNET101_V1C_URL = "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth"


def _how_to_get(arch: str, path: str) -> str:
    """How to obtain the ImageNet backbone of ``arch``, put where ``path`` says (one clause)."""
    if arch.startswith("daformer_mitb") and arch[-1].isdigit():
        n = arch[-1]
        folder = path if not os.path.splitext(path)[1] else f"pretrained/mit-b{n}"
        then = "" if folder == path else f", then pass --pretrained {folder}"
        return (f"get the ImageNet MiT-B{n} encoder ({_MIT_PAGE.format(n=n)}) with "
                f"'hf download nvidia/mit-b{n} --local-dir {folder}'{then}")
    if arch == "dlv2_r101":
        return f"download the ImageNet ResNet-101 V1c backbone ({RESNET101_V1C_URL}) to {path}"
    return "pass an existing weights file or folder, or --pretrained '' to start from random weights"


def check_pretrained_exists(path: str, arch: str) -> None:
    """``--pretrained`` before any work: a missing file (or a folder without weights) exits with
    one line saying where the weights are expected and how to get them."""
    try:
        _weights_file(path)
    except FileNotFoundError:
        where = "folder holds no model.safetensors or pytorch_model.bin" if os.path.isdir(path) else "not found"
        print(f"--pretrained: {path} {where} (relative to {os.getcwd()}); {_how_to_get(arch, path)}; "
              "see docs/models.md", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError:  # e.g. a sharded folder: the loader names the problem
        pass


def segmentor_from_checkpoint(checkpoint, arch: str | None = None, prefix: str = "model.", *,
                              weights_only: bool = True):
    """(segmentor with the checkpoint's weights, the training config dict or {}).

    The architecture, class count and projection width come from the checkpoint's
    ``meta.config`` (our training checkpoints); otherwise ``arch`` must be given and the
    widths are read from the weights themselves (upstream / safetensors files).
    """
    ckpt = read_checkpoint(checkpoint, weights_only)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
    config = dict(meta.get("config") or {})
    arch = arch or config.get("arch")
    if arch is None:
        raise ValueError("the checkpoint carries no training config: name the architecture (--arch)")
    flat = flat_state_dict(ckpt)
    branch = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)} or flat
    num_classes = config.get("num_classes") or _num_classes(branch) or 19
    proj_dim = config.get("proj_dim") or _proj_dim(branch) or 512
    model = build_segmentor(arch, int(num_classes), int(proj_dim))
    load_official(model, ckpt, prefix=prefix)
    return model, config


def _arch(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__))


def uda_state_dict(student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Upstream UDA key layout: ``model.<key>`` for the student, ``ema_model.<key>`` for the teacher."""
    out = {f"model.{k}": v for k, v in student.state_dict().items()}
    if teacher is not None:
        out.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    return out
