"""Segmentors of SePiCo (method §2): DAFormer (MiT-B0..B5) and DeepLab-v2 (ResNet-V1c 50/101),
and SePiCo's heads on DINOv2 ViT encoders (``dinov2_*``, not upstream; docs/models.md).

``build_segmentor(arch)`` returns a :class:`Segmentor` whose ``state_dict`` keys, order,
dtypes and shapes equal the upstream SePiCo checkpoints (``tests/data/keys_*.txt``,
described in docs/models.md).
``daformer_tiny``, ``dlv2_tiny`` and ``dinov2_tiny`` are NOT upstream: small CPU variants with
the same module structure for smoke runs and tests.
"""
from __future__ import annotations

from torch import nn

from .dinov2 import DINOV2_CONFIGS, DinoVisionTransformer
from .heads import DAFormerHead, DLV2Head, ProjHead
from .mit import MIT_CONFIGS, MixVisionTransformer
from .resnet import RESNET_CONFIGS, ResNetV1c
from .segmentor import Segmentor

# arch name -> (family, backbone variant, decoder embedding width)
ARCHS: dict[str, tuple[str, str, int]] = {
    **{f"daformer_mit{v}": ("daformer", v, 256) for v in ("b0", "b1", "b2", "b3", "b4", "b5")},
    "daformer_tiny": ("daformer", "tiny", 64),
    "dlv2_r50": ("dlv2", "r50", 0),
    "dlv2_r101": ("dlv2", "r101", 0),
    "dlv2_tiny": ("dlv2", "tiny", 0),
    # DINOv2 encoders (facebook/dinov2-*, -with-registers-*) with DAFormer's head: not upstream.
    **{f"dinov2_{v}": ("dinov2", v, 256) for v in DINOV2_CONFIGS if v != "tiny"},
    "dinov2_tiny": ("dinov2", "tiny", 64),
}
UPSTREAM_ARCHS = tuple(a for a in ARCHS if not a.endswith("_tiny") and ARCHS[a][0] != "dinov2")


def build_daformer(variant: str, num_classes: int = 19, proj_dim: int = 512, *,
                   embed_dim: int = 256, drop_path_rate: float = 0.1,
                   dropout: float = 0.1, arch: str | None = None) -> Segmentor:
    """DAFormer: MiT backbone, sep-ASPP DAFormer head, resize-concat ProjHead (stride 4)."""
    backbone = MixVisionTransformer(MIT_CONFIGS[variant], drop_path_rate=drop_path_rate)
    decode_head = DAFormerHead(backbone.widths, num_classes, embed_dim, dropout=dropout)
    auxiliary_head = ProjHead(backbone.widths, proj_dim, resize_concat=True)
    return Segmentor(arch or f"daformer_mit{variant}", backbone, decode_head, auxiliary_head, 4)


def build_dlv2(variant: str, num_classes: int = 19, proj_dim: int = 512, *,
               arch: str | None = None) -> Segmentor:
    """DeepLab-v2: ResNet-V1c backbone (output stride 8), DLV2 head, last-stage ProjHead."""
    backbone = ResNetV1c(RESNET_CONFIGS[variant])
    decode_head = DLV2Head(backbone.widths[-1], num_classes)
    auxiliary_head = ProjHead(backbone.widths, proj_dim, resize_concat=False)
    return Segmentor(arch or f"dlv2_{variant}", backbone, decode_head, auxiliary_head, 8)


def build_dinov2(variant: str, num_classes: int = 19, proj_dim: int = 512, *,
                 embed_dim: int = 256, drop_path_rate: float = 0.1, dropout: float = 0.1,
                 arch: str | None = None) -> Segmentor:
    """DINOv2 ViT -> stride-4/8/16/32 pyramid (models/dinov2.py), then DAFormer's head and
    SePiCo's resize-concat ProjHead exactly as on MiT (output stride 4)."""
    backbone = DinoVisionTransformer(DINOV2_CONFIGS[variant], drop_path_rate=drop_path_rate)
    decode_head = DAFormerHead(backbone.widths, num_classes, embed_dim, dropout=dropout)
    auxiliary_head = ProjHead(backbone.widths, proj_dim, resize_concat=True)
    return Segmentor(arch or f"dinov2_{variant}", backbone, decode_head, auxiliary_head, 4)


def build_segmentor(arch: str, num_classes: int = 19, proj_dim: int = 512, *,
                    drop_path_rate: float = 0.1) -> Segmentor:
    """Build a segmentor by name with random weights (upstream init).

    Pretrained weights are loaded afterwards with :func:`sepico_fast.checkpoint.load_official`
    (ImageNet backbone file, Hugging Face SegFormer encoder or full checkpoint); this package
    never imports ``sepico_fast.checkpoint`` (the import graph is one-directional).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(proj_dim, int) or proj_dim < 1:
        raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
    family, variant, embed_dim = ARCHS[arch]
    if family == "daformer":
        model = build_daformer(variant, num_classes, proj_dim, embed_dim=embed_dim,
                               drop_path_rate=drop_path_rate, arch=arch)
    elif family == "dinov2":
        model = build_dinov2(variant, num_classes, proj_dim, embed_dim=embed_dim,
                             drop_path_rate=drop_path_rate, arch=arch)
    else:
        model = build_dlv2(variant, num_classes, proj_dim, arch=arch)
    return model


DECAY_RULES = ("auto", "upstream", "vit")
# Backbone parameters of a ViT that are embeddings rather than weights: no weight decay.
_VIT_TOKENS = ("cls_token", "pos_embed", "register_tokens")


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT/MAE layer index of a DINOv2 backbone parameter (name relative to the backbone):
    0 for the patch/position/cls/register embeddings, i+1 for ``blocks.i``, depth+1 for the
    final norm."""
    if name.startswith(("patch_embed.",) + _VIT_TOKENS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".", 2)[1]) + 1
    return depth + 1


def resolved_decay_rule(model: nn.Module, rule: str = "auto") -> str:
    """``auto`` -> ``vit`` for a DINOv2 backbone, ``upstream`` otherwise."""
    if rule not in DECAY_RULES:
        raise ValueError(f"decay rule must be one of {DECAY_RULES}, got {rule!r}")
    if rule == "auto":
        return "vit" if isinstance(getattr(model, "backbone", None), DinoVisionTransformer) else "upstream"
    return rule


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 head_lr_mult: float = 10.0, *, layer_decay: float = 1.0,
                 decay_rule: str = "upstream") -> list[dict]:
    """AdamW parameter groups.

    ``decay_rule="upstream"`` (the SePiCo / DAFormer archs' default): upstream's
    ``paramwise_cfg`` custom keys (mmcv DefaultOptimizerConstructor, custom keys ``head``: lr
    x10, and for MiT ``pos_block`` / ``norm``: decay x0), which applies only the FIRST
    matching key, tried longest first then alphabetically: ``pos_block``, ``head``, ``norm``.
    Hence, by substring of the parameter name:
      * contains ``pos_block`` -> lr, no weight decay (no such parameter in these models);
      * contains ``head`` (``decode_head.*``, ``auxiliary_head.*``) -> lr x head_lr_mult,
        full weight decay (head BN parameters are therefore decayed, as upstream);
      * contains ``norm`` (MiT LayerNorms: ``patch_embedN.norm``, ``blockN.i.norm1/2``,
        ``blockN.i.attn.norm``, ``normN``) -> lr, no weight decay, MiT only;
      * everything else -> lr, full weight decay (incl. ResNet BN ``bnN``/``stem.N``/
        ``downsample.1``, whose names do not contain ``norm``).

    ``decay_rule="vit"`` (ViT fine-tuning, BEiT / MAE / timm): no weight decay on any
    parameter with at most one dimension (biases, every norm incl. the heads' BN, LayerScale)
    nor on the cls / position / register tokens; full decay on the other weights; heads at
    lr x head_lr_mult.

    ``layer_decay`` < 1 (DINOv2 backbones only): layer-wise learning-rate decay, backbone
    parameter of layer i (:func:`vit_layer_id`, L blocks) at lr x layer_decay^(L+1-i): the
    last block x layer_decay, the embeddings x layer_decay^(L+1); the final norm and the
    heads are not decayed.

    Each group carries ``lr_mult`` and ``decay_mult`` so a scheduler can rescale the base lr.
    """
    if decay_rule not in ("upstream", "vit"):
        raise ValueError(f"decay_rule must be 'upstream' or 'vit' (resolve 'auto' with resolved_decay_rule), "
                         f"got {decay_rule!r}")
    backbone = getattr(model, "backbone", None)
    is_mit = isinstance(backbone, MixVisionTransformer)
    is_vit = isinstance(backbone, DinoVisionTransformer)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if layer_decay != 1.0 and not is_vit:
        raise ValueError(f"layer-wise lr decay needs a DINOv2 (ViT) backbone, not {type(backbone).__name__}")
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay_mult = 1.0, 1.0
        if decay_rule == "upstream":
            if is_mit and "pos_block" in name:
                decay_mult = 0.0
            elif "head" in name:
                lr_mult = head_lr_mult
            elif is_mit and "norm" in name:
                decay_mult = 0.0
        else:
            if p.ndim <= 1 or (is_vit and name.startswith("backbone.") and name[9:].startswith(_VIT_TOKENS)):
                decay_mult = 0.0
            if name.startswith(("decode_head.", "auxiliary_head.")):
                lr_mult = head_lr_mult
        if is_vit and layer_decay != 1.0 and name.startswith("backbone."):
            depth = backbone.config.depth
            lr_mult = layer_decay ** (depth + 1 - vit_layer_id(name[9:], depth))
        groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [
        {"params": params, "lr": lr * lr_mult, "weight_decay": weight_decay * decay_mult,
         "lr_mult": lr_mult, "decay_mult": decay_mult}
        for (lr_mult, decay_mult), params in groups.items()
    ]


__all__ = [
    "ARCHS", "UPSTREAM_ARCHS", "Segmentor", "build_segmentor", "build_daformer", "build_dlv2",
    "build_dinov2", "param_groups", "resolved_decay_rule", "vit_layer_id", "DECAY_RULES", "DAFormerHead", "DLV2Head", "ProjHead", "MixVisionTransformer",
    "ResNetV1c", "DinoVisionTransformer",
]
