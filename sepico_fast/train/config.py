"""Training configuration: one dataclass, named presets, a generated command line.

Every field documents itself through ``field(metadata={"help": ...})``; the argparse
parser is generated from the dataclass so the two can never drift apart. Precedence:
dataclass defaults < preset (``--preset NAME``) < explicit command-line flags. The
dataclass defaults ARE the bare run (``python -m sepico_fast.train``, preset
``synthetic``); the paper presets list every value in which they differ.
Validation errors name the offending flag (``--crop``, not ``crop``) and what is allowed.
Resuming: ``resumed_config`` (the checkpoint's config + this run's explicit flags).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..contrast.validation import debug_checks_from_env
from ..data.loader import PIPELINES
from ..models import ARCHS, DECAY_RULES

DATASETS = ("gta", "synthia", "cityscapes", "darkzurich", "acdc", "synthetic")
METHODS = ("sepico", "source_only")
VARIANTS = ("dist", "bank", "proto")
DDP_SCHEDULES = ("steps", "samples")


# Resume policy of a field (``_f(..., resume=...)``), applied by ``resumed_config``:
#   "method"     (the default, so also of every field added later): changes what is trained;
#                a value other than the checkpoint's is refused unless --resume-override;
#   "harmless"   may change on resume without changing what is trained: applied and logged;
#   "invocation" a setting of one invocation, never taken from the checkpoint.
RESUME_POLICIES = ("method", "harmless", "invocation")


class Allowed:
    """The allowed values of a numeric field: ``lo <= v <= hi`` (``lo_open`` / ``hi_open``:
    strict), always finite; ``extra``: values allowed besides the range (e.g. -1 = auto).
    ``describe()`` is what the one-line error says."""

    def __init__(self, lo=None, hi=None, *, lo_open=False, hi_open=False, extra=(), why=""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.extra, self.why = lo, hi, lo_open, hi_open, extra, why

    def ok(self, v) -> bool:
        if v in self.extra:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            text = f"must be in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"must be {'>' if self.lo_open else '>='} {lo}"
        elif self.hi is not None:
            text = f"must be {'<' if self.hi_open else '<='} {hi}"
        else:
            text = "must be a finite number"
        if self.extra:
            text += f" (or {' or '.join(map(str, self.extra))})"
        return text + (f" ({self.why})" if self.why else "")


def _f(default: Any, help: str, choices: Sequence[str] | None = None, *, resume: str = "method",
       allowed: Allowed | None = None, **kw):
    assert resume in RESUME_POLICIES, resume
    meta = {"help": help, "resume": resume}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if allowed is not None:
        meta["allowed"] = allowed
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # --- run -------------------------------------------------------------------------
    preset: str = _f("synthetic", "named configuration applied before the other flags (see --list-presets); "
                     "the defaults shown here are those of the bare run, preset synthetic")
    work_dir: str = _f("", "output folder, one run's only (locked while it trains); default "
                       "work_dirs/<preset>_<method>_<variant>_s<seed>_<UTC time>_<random suffix>",
                       resume="invocation")
    seed: int = _f(0, "seed of every random choice (data order, crops, augmentation, init)",
                   allowed=Allowed(0, 2**63 - 1))
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)", resume="harmless")
    method: str = _f("sepico", "sepico (full UDA) or source_only (student on source CE only)", METHODS)
    variant: str = _f("dist", "contrast variant: dist (DistCL), bank (BankCL), proto (ProtoCL)", VARIANTS)
    # --- model -----------------------------------------------------------------------
    arch: str = _f("dlv2_tiny", "segmentor (the *_tiny ones are small CPU variants, not upstream)", tuple(ARCHS))
    pretrained: str = _f("", "weights loaded into the student (and teacher): ImageNet backbone file (NVlabs mit_b*.pth, "
                         "mmcv ResNet-V1c), Hugging Face SegFormer encoder (nvidia/mit-b*: pytorch_model.bin, "
                         "model.safetensors or its folder) or DINOv2 encoder (facebook/dinov2-*, same files), "
                         "or a segmentor / UDA checkpoint", resume="harmless")
    num_classes: int = _f(19, "number of classes",
                          allowed=Allowed(19, 255, why="the datasets' label ids are 0..18; 255 is the ignore id"))
    proj_dim: int = _f(64, "projection (contrast feature) dimension A (paper: 512)", allowed=Allowed(1, 4096))
    drop_path_rate: float = _f(0.1, "student drop-path rate (the teacher always runs without)",
                               allowed=Allowed(0.0, 1.0, hi_open=True))
    # --- data ------------------------------------------------------------------------
    source: str = _f("synthetic", "source (labelled) dataset", DATASETS)
    target: str = _f("synthetic", "target (unlabelled) dataset; also the evaluation set", DATASETS)
    data_root: str = _f("", "folder holding the dataset folders (e.g. <root>/gta, <root>/cityscapes)",
                        resume="harmless")
    pipeline: str = _f("torch", "input pipeline: auto (dali on CUDA when installed), torch (workers) or dali",
                       PIPELINES)
    num_workers: int = _f(-1, "data loader worker processes per rank (-1: from the CPU count: 0 when the data "
                          "are held in memory, as the synthetic pair, else min(8, usable CPUs per rank - 1))",
                          resume="harmless", allowed=Allowed(-1, 256))
    # prepare --cache copies (docs/data.md, "Pre-resized cache")
    cache: str = _f("auto", "read the pre-resized images of `python -m sepico_fast.prepare ... --cache`: auto (a "
                    "dataset's png cache when it is complete and newer than its originals, else the originals, "
                    "with one line saying why), png, jpeg (lossy; fails when missing or stale) or off",
                    ("auto", "off", "png", "jpeg"), resume="harmless")
    batch_size: int = _f(2, "source images (and target images) per rank and iteration", allowed=Allowed(1, 1024))
    crop: list = _f([128, 128], "training crop H W (one number for a square; 0: the dataset's default); "
                    "a multiple of the network's output stride (8 for dlv2_*, 4 for daformer_* and dinov2_*, which pad to a "
                    "multiple of 14 inside); "
                    "the target crop is chosen on pseudo labels")
    # --- schedule ----------------------------------------------------------------------
    iters: int = _f(2000, "number of training iterations", allowed=Allowed(1, 10**9))
    lr: float = _f(6e-4, "AdamW learning rate of the backbone", allowed=Allowed(0.0, 1.0, lo_open=True))
    head_lr_mult: float = _f(10.0, "learning-rate multiplier of decode and projection heads",
                             allowed=Allowed(0.0, 1000.0, lo_open=True))
    weight_decay: float = _f(0.01, "AdamW weight decay (none on MiT norm / position-block parameters)",
                             allowed=Allowed(0.0, 10.0))
    betas: list = _f([0.9, 0.999], "AdamW betas")
    warmup_iters: int = _f(75, "linear warm-up iterations", allowed=Allowed(0, 10**9))
    warmup_ratio: float = _f(1e-6, "learning-rate factor at iteration 0 of the warm-up", allowed=Allowed(0.0, 1.0))
    poly_power: float = _f(1.0, "power of the polynomial decay to 0 at the last iteration", allowed=Allowed(0.0, 100.0))
    # ViT fine-tuning (dinov2_* archs; docs/models.md)
    layer_decay: float = _f(1.0, "layer-wise learning-rate decay of a dinov2_* backbone: block i of L at lr x "
                            "decay^(L+1-i), patch/position embeddings at decay^(L+1), final norm and heads "
                            "undecayed (1.0: off; other archs need 1.0)",
                            allowed=Allowed(0.0, 1.0, lo_open=True))
    decay_rule: str = _f("auto", "which parameters get weight decay: upstream (SePiCo's paramwise_cfg: none on MiT "
                         "norms only), vit (none on biases, norms, LayerScale, position/cls/register tokens), "
                         "auto (vit for dinov2_*, upstream otherwise)", DECAY_RULES)
    # DDP schedule
    ddp_schedule: str = _f("steps", "with N processes (torchrun): 'steps' runs --iters steps of N x the batch "
                           "(N x the samples of one GPU, same lr); 'samples' divides --iters, --warmup-iters, "
                           "--contrast-start, --eval-interval and --checkpoint-interval by N (the samples seen "
                           "of the one-GPU run, same lr); recorded in config.json and metrics.json",
                           DDP_SCHEDULES)
    # --- UDA ---------------------------------------------------------------------------
    ema_alpha: float = _f(0.99, "teacher EMA momentum (alpha_t = min(1 - 1/(t+1), alpha))", allowed=Allowed(0.0, 1.0))
    pseudo_threshold: float = _f(0.9, "confidence threshold defining the pseudo-label weight q",
                                 allowed=Allowed(0.0, 1.0))
    color_jitter_strength: float = _f(0.2, "colour jitter strength s (brightness, contrast, saturation, hue)",
                                      allowed=Allowed(0.0, 0.5, why="the hue shift is a fraction of a half turn"))
    color_jitter_p: float = _f(0.2, "jitter happens when u > p, u ~ U(0,1) drawn once per iteration",
                               allowed=Allowed(0.0, 1.0))
    blur: bool = _f(True, "Gaussian blur when u' > 0.5 (drawn once per iteration)")
    fused_jitter: bool = _f(False, "colour jitter: adjacent saturation and hue share one HSV round trip "
                            "(faster; kornia 0.5.8, the default, makes one per op)")
    crop_tries: int = _f(10, "class-balanced crop: random windows scored per target image", allowed=Allowed(1, 1000))
    cat_max_ratio: float = _f(0.75, "class-balanced crop: largest class share allowed",
                              allowed=Allowed(0.0, 1.0, lo_open=True))
    regen_pseudo: bool = _f(True, "rerun the teacher on the target crop to regenerate the pseudo labels")
    pseudo_ignore_top: int = _f(-1, "rows of the target crop with pseudo weight 0 at the top, at 640-row scale "
                                "(-1: 15 for GTA/SYNTHIA->Cityscapes, else 0); scaled to the crop height",
                                allowed=Allowed(0, 640, extra=(-1,)))
    pseudo_ignore_bottom: int = _f(-1, "same at the bottom (-1: 120 for GTA/SYNTHIA->Cityscapes, else 0)",
                                   allowed=Allowed(0, 640, extra=(-1,)))
    day_ratio: float = _f(0.8, "Dark Zurich: day-probability weight on shift-insensitive classes",
                          allowed=Allowed(0.0, 1.0))
    dz_class_weight: bool = _f(True, "Dark Zurich: per-class weights (log frequency, std 0.05) on probabilities and CE")
    # --- contrast ------------------------------------------------------------------------
    contrast_start: int = _f(150, "iteration at which source and target contrast losses start",
                             allowed=Allowed(0, 10**9))
    contrast_weight: float = _f(1.0, "weight of the contrast losses", allowed=Allowed(0.0, 1e6))
    temperature: float = _f(100.0, "contrast temperature tau (a divisor)", allowed=Allowed(0.0, 1e6, lo_open=True))
    reg_weight: float = _f(1.0, "regulariser weight; upstream adds +r (quirk), use -1.0 for the fixed sign",
                           allowed=Allowed(-1e6, 1e6))
    memory_length: int = _f(200, "BankCL memory length per class", allowed=Allowed(0, 100000))
    min_ratio: float = _f(0.75, "label downscaling: minimum class share of a feature cell", allowed=Allowed(0.0, 1.0))
    ce_mean_over_all: bool = _f(True, "seg CE averaged over all pixels incl. ignored (mmseg 0.16 quirk)")
    # --- numerics / speed ----------------------------------------------------------------------
    amp: bool = _f(False, "mixed precision: bf16 autocast where supported, else fp16 + GradScaler")
    cpu_amp: bool = _f(False, "with --amp on the CPU, really use bf16 autocast (slower than fp32 for the "
                       "tiny models on a 2-core Intel Xeon CPU, see docs/training.md, so off by default)")
    compile: bool = _f(False, "torch.compile each model pass with its loss (teacher labels and features, "
                       "student source, target and ClassMix losses), forward and backward", resume="harmless")
    # whole-step CUDA graphs (train/graphs.py)
    cuda_graphs: bool = _f(False, "capture one iteration after contrast start as a CUDA graph and replay it "
                           "(jitter/blur decisions as device data; eager on the CPU, with DDP or fp16)")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible runs and resumes; slower)",
                             resume="harmless")
    max_skipped_steps: int = _f(20, "stop after this many optimizer steps skipped for NaN/Inf losses",
                                resume="harmless", allowed=Allowed(0, 10**9))
    # debugging (does not change the method)
    debug_checks: bool = _f(False, "check label ranges and finite statistics eagerly, with readable "
                            "messages (one host sync per check; same as SEPICO_FAST_DEBUG_CHECKS=1); "
                            "without it a failed check on CUDA is a bare 'device-side assert'")
    # --- outputs --------------------------------------------------------------------------
    log_interval: int = _f(50, "iterations between log lines (the only host syncs of the loop)",
                           resume="harmless", allowed=Allowed(1, 10**9))
    eval_interval: int = _f(0, "iterations between evaluations (0: only at the end)",
                            resume="harmless", allowed=Allowed(0, 10**9))
    checkpoint_interval: int = _f(1000, "iterations between checkpoints (0: only at the end)",
                                  resume="harmless", allowed=Allowed(0, 10**9))
    keep_checkpoints: int = _f(2, "number of iteration checkpoints kept (latest.pt is extra)",
                               resume="harmless", allowed=Allowed(0, 10**6))
    debug_interval: int = _f(500, "iterations between debug pictures (0: never)",
                             resume="harmless", allowed=Allowed(0, 10**9))
    resume: str = _f("", "checkpoint to resume from, or 'auto' for the newest intact one in --work-dir "
                     "(none yet: start at 0); the run continues with the checkpoint's config", resume="invocation")
    stop_at: int = _f(0, "end the run after this many iterations with a checkpoint, as if interrupted "
                      "(0: run to --iters); the schedule still follows --iters",
                      resume="invocation", allowed=Allowed(0, 10**9))
    profile: bool = _f(False, "torch.profiler trace + per-phase time table for a few iterations", resume="invocation")
    profile_iters: int = _f(10, "iterations recorded by --profile", resume="invocation", allowed=Allowed(1, 10**6))
    nvtx: bool = _f(False, "NVTX ranges around each phase (for Nsight Systems)", resume="invocation")
    eval_max_images: int = _f(0, "evaluate on at most this many validation images (0: all)",
                              resume="harmless", allowed=Allowed(0, 10**9))
    # evaluation rule
    dz_test_reweight: bool = _f(True, "Dark Zurich evaluation: the authors' test-time class re-weighting "
                                "(softmax at the input size x log-frequency weights, scale 0.16, on *_rgb_anon.png "
                                "images, then resize and arg-max); --no-dz-test-reweight for the plain arg-max",
                                resume="harmless")
    # --- resume and faults --------------------------------------------------------------------
    resume_override: bool = _f(False, "with --resume: apply flags that differ from the checkpoint's config "
                               "even when they change the method or the data (refused otherwise, with a list)",
                               resume="invocation")
    ddp_timeout: int = _f(900, "seconds a rank waits for the others in a collective before the job fails "
                          "(a stalled rank then stops torchrun instead of hanging it); must exceed the longest "
                          "evaluation or checkpoint on rank 0",
                          resume="harmless", allowed=Allowed(1, 7 * 24 * 3600, why="at most a week"))
    # --- diagnostics ------------------------------------------------------------------------
    pseudo_diagnostics: bool = _f(False, "per-class precision and coverage of the teacher's pseudo labels against "
                                  "the target training labels (synthetic, cityscapes), counted on the device, "
                                  "logged on logging steps, a table at each evaluation; never used by the training",
                                  resume="harmless")
    # --- one run, one folder ----------------------------------------------------------------
    overwrite: bool = _f(False, "start a new run in a --work-dir that holds another run's outputs: its files are "
                         "moved aside into <work-dir>/overwritten_<UTC time>/ (never deleted); without it such a "
                         "folder is refused", resume="invocation")

    # Names of the fields set by flags / overrides (not by a preset or a default); resume
    # checks only these against the checkpoint's config. A class attribute, not a field:
    # never saved, never a flag.
    explicit = frozenset()

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def crop_hw(self) -> tuple[int, int]:
        """(H, W) of the training crop (resolved by the runner when --crop 0)."""
        return int(self.crop[0]), int(self.crop[-1])

    @property
    def dark_zurich(self) -> bool:
        return self.target == "darkzurich"

    def ignore_rows(self) -> tuple[int, int]:
        """Pseudo-weight rows (top, bottom) zeroed in the target crop, scaled to its height."""
        street = self.source in ("gta", "synthia") and self.target == "cityscapes"
        top = self.pseudo_ignore_top if self.pseudo_ignore_top >= 0 else (15 if street else 0)
        bottom = self.pseudo_ignore_bottom if self.pseudo_ignore_bottom >= 0 else (120 if street else 0)
        scale = self.crop_hw[0] / 640.0
        return int(round(top * scale)), int(round(bottom * scale))


# ----------------------------------------------------------------------------------------
# Presets. The six paper configurations (method §6, §8) and the CPU-sized synthetic default.
# Seeds: upstream's released GTA/SYNTHIA runs use seed 76, Dark Zurich seed 42.
# ----------------------------------------------------------------------------------------
_PAPER = dict(iters=40000, batch_size=2, crop=[640, 640], lr=6e-5, warmup_iters=1500,
              contrast_start=3000, ema_alpha=0.999, pseudo_threshold=0.968, proj_dim=512,
              log_interval=50, eval_interval=4000, checkpoint_interval=4000, debug_interval=1000,
              pipeline="auto", memory_length=200)

PRESETS: dict[str, dict] = {
    "daformer_gta2cs": dict(_PAPER, arch="daformer_mitb5", source="gta", target="cityscapes", seed=76,
                            pretrained="pretrained/mit-b5"),
    "daformer_synthia2cs": dict(_PAPER, arch="daformer_mitb5", source="synthia", target="cityscapes", seed=76,
                                pretrained="pretrained/mit-b5"),
    "daformer_cs2dz": dict(_PAPER, arch="daformer_mitb5", source="cityscapes", target="darkzurich", seed=42,
                           iters=60000, pretrained="pretrained/mit-b5"),
    "dlv2_gta2cs": dict(_PAPER, arch="dlv2_r101", source="gta", target="cityscapes", seed=76,
                        pretrained="pretrained/resnet101_v1c.pth"),
    "dlv2_synthia2cs": dict(_PAPER, arch="dlv2_r101", source="synthia", target="cityscapes", seed=76,
                            pretrained="pretrained/resnet101_v1c.pth"),
    "dlv2_cs2dz": dict(_PAPER, arch="dlv2_r101", source="cityscapes", target="darkzurich", seed=42,
                       iters=60000, pretrained="pretrained/resnet101_v1c.pth"),
    # The bare run = the dataclass defaults (see docs/training.md, "Schedule of the synthetic
    # default"): the tiny DeepLab-v2 trains from scratch at the pair's native 128x128 crop;
    # the paper schedule is scaled to the run length (warm-up 1500/40000 and contrast start
    # 3000/40000 of the iterations); the teacher EMA and the confidence threshold are relaxed
    # because a 2000-iteration from-scratch model is never as confident as a pretrained
    # MiT-B5 at 40k.
    "synthetic": {},
    # SePiCo on DINOv2 ViT encoders (not upstream; docs/models.md): the DAFormer GTA->Cityscapes
    # schedule with the ViT recipe (layer-wise lr decay 0.7 for ViT-B / 0.8 for ViT-L as ViTDet,
    # weight decay 0.05 as BEiT / MAE segmentation fine-tuning, none on norms, biases and tokens).
    # Weights: the Hugging Face model folder (facebook/dinov2-base, facebook/dinov2-large).
    "dinov2b_gta2cs": dict(_PAPER, arch="dinov2_vitb14", source="gta", target="cityscapes", seed=76,
                           pretrained="pretrained/dinov2-base", layer_decay=0.7, weight_decay=0.05, decay_rule="vit"),
    "dinov2l_gta2cs": dict(_PAPER, arch="dinov2_vitl14", source="gta", target="cityscapes", seed=76,
                           pretrained="pretrained/dinov2-large", layer_decay=0.8, weight_decay=0.05, decay_rule="vit"),
}

# Cityscapes -> ACDC (docs/data.md): SePiCo published no ACDC configuration, so these are the
# Dark Zurich presets' recipe (paper schedule, real-to-real target: no ignored rows) with the
# DAFormer family's Cityscapes -> ACDC data settings: Cityscapes fit 1024x512, ACDC 1920x1080
# fit 960x540 for training and evaluation, crop 512x512, 40k iterations, seed 0.
PRESETS.update({
    "daformer_cs2acdc": dict(_PAPER, arch="daformer_mitb5", source="cityscapes", target="acdc", seed=0,
                             crop=[512, 512], pretrained="pretrained/mit-b5"),
    "dlv2_cs2acdc": dict(_PAPER, arch="dlv2_r101", source="cityscapes", target="acdc", seed=0,
                         crop=[512, 512], pretrained="pretrained/resnet101_v1c.pth"),
})


# ----------------------------------------------------------------------------------------
# Command line generated from the dataclass
# ----------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field):
    return _type_hints()[f.name]


@functools.lru_cache(maxsize=None)
def _type_hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """Errors as one line (the generated usage would be dozens of lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if value == "" else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sepico_fast.train",
        description="SePiCo training (method §5-7). A bare run (no flags) is --preset synthetic: dlv2_tiny "
                    "trained from scratch on the built-in synthetic pair; the defaults below are that run's. "
                    "--preset NAME starts from a paper configuration instead (--list-presets prints what each "
                    "changes); explicit flags win over both. Boolean flags: --amp / --no-amp / --amp=false.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    for f in dataclasses.fields(TrainConfig):
        typ = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f" ({f.metadata['allowed'].describe()})" if "allowed" in f.metadata else ""
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {_shown(default)}){allowed}"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if typ is bool:
            # --amp turns it on, --no-amp off; --amp=false also works.
            parser.add_argument(_flag(f.name), nargs="?", const=True, type=_parse_bool, **kwargs)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
        elif typ is list:
            parser.add_argument(_flag(f.name), nargs="+", type=_list_item(f.name), **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=typ, **kwargs)
    return parser


def _list_item(name: str):
    def parse(text: str):
        parts = text.lower().replace("x", " ").split() if name == "crop" else [text]
        try:
            vals = [int(p) if name == "crop" else float(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_flag(name)}: expected numbers, got {text!r}") from None
        return vals if len(vals) > 1 else vals[0]
    return parse


def _flatten(values) -> list:
    out = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


def make_config(overrides: dict | None = None, preset: str | None = None) -> TrainConfig:
    """Defaults < preset < overrides, then validation. Usable from Python and tests."""
    overrides = dict(overrides or {})
    explicit = set(overrides) | ({"preset"} if preset is not None else set())
    name = preset if preset is not None else overrides.pop("preset", TrainConfig.preset)
    overrides.pop("preset", None)
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}")
    cfg = _build(dict(values, preset=name))
    cfg.explicit = frozenset(explicit)
    validate(cfg)
    return cfg


def _build(values: dict) -> TrainConfig:
    cfg = TrainConfig(**values)
    if isinstance(cfg.crop, int):
        cfg.crop = [cfg.crop, cfg.crop]
    cfg.crop = [int(c) for c in cfg.crop]
    if len(cfg.crop) == 1:
        cfg.crop = cfg.crop * 2
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    if ns.pop("list_presets", False):
        for name, values in PRESETS.items():
            print(f"{name}: {json.dumps(values) if values else '(the defaults of --help: the bare run)'}")
        raise SystemExit(0)
    for key in ("crop", "betas"):
        if key in ns:
            ns[key] = _flatten(ns[key])
    try:
        debug_checks_from_env()  # an unrecognised SEPICO_FAST_DEBUG_CHECKS value: one line, status 2
        return make_config(ns)
    except ValueError as err:
        parser.error(str(err))  # SystemExit(2) with the message naming the flag
        raise  # unreachable


def output_stride(arch: str) -> int:
    """Stride of the features the label downscaling and the contrast losses work on."""
    return 8 if ARCHS[arch][0] == "dlv2" else 4


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the flag of the first invalid value and what is allowed."""
    def bad(name: str, why: str):
        value = getattr(cfg, name)
        raise ValueError(f"{_flag(name)}: {why} (got {_shown(value) if isinstance(value, list) else repr(value)})")

    for f in dataclasses.fields(cfg):
        if "choices" in f.metadata and getattr(cfg, f.name) not in f.metadata["choices"]:
            bad(f.name, f"expected one of {', '.join(f.metadata['choices'])}")
    for f in dataclasses.fields(cfg):  # the range declared with each numeric field (_f(..., allowed=...))
        allowed = f.metadata.get("allowed")
        if allowed is not None and not allowed.ok(getattr(cfg, f.name)):
            bad(f.name, allowed.describe())
    _validate_crop(cfg, bad)
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        bad("betas", "expected two numbers in [0, 1)")
    _validate_relations(cfg, bad)
    if cfg.layer_decay != 1.0 and ARCHS[cfg.arch][0] != "dinov2":
        bad("layer_decay", f"layer-wise lr decay is for dinov2_* (ViT) archs; use 1.0 with {cfg.arch}")
    if cfg.source == "darkzurich":
        bad("source", "darkzurich has no training labels; use it as --target")
    if cfg.source == "acdc":
        bad("source", "acdc is supported as --target (Cityscapes -> ACDC); choose gta, synthia or cityscapes")
    if (cfg.source == "synthetic") != (cfg.target == "synthetic"):
        bad("target", "the synthetic pair is used as a whole: give --source synthetic --target synthetic")
    if cfg.target == "darkzurich" and cfg.num_classes != 19 and (cfg.dz_class_weight or cfg.dz_test_reweight):
        bad("num_classes", "the Dark Zurich class weights are defined for the 19 Cityscapes classes; "
            "use 19, or --no-dz-class-weight --no-dz-test-reweight")
    _validate_device(cfg, bad)
    if not cfg.pretrained == "" and cfg.pretrained.startswith("-"):
        bad("pretrained", "expected a path")
    if cfg.resume == "auto" and not cfg.work_dir:
        bad("resume", "auto needs --work-dir, the run folder to continue (the default folder is new every run)")
    if cfg.resume not in ("", "auto") and not os.path.isfile(cfg.resume):
        bad("resume", "expected 'auto' or an existing checkpoint file")
    if cfg.pseudo_diagnostics and (cfg.method != "sepico" or cfg.target == "darkzurich"):
        bad("pseudo_diagnostics", "needs --method sepico (pseudo labels) and a labelled target training set "
            "(synthetic or cityscapes; Dark Zurich train has no labels)")


def _validate_relations(cfg: TrainConfig, bad) -> None:
    """Values that are allowed alone but not together."""
    if cfg.method == "sepico" and cfg.variant == "bank" and cfg.memory_length < 1:
        bad("memory_length", "must be >= 1 with --variant bank (the memory bank holds that many features per class)")
    # Checked when given: the defaults (150, 75) with a short --iters are the usual quick test.
    if "contrast_start" in cfg.explicit and cfg.method == "sepico" and cfg.contrast_start > cfg.iters:
        bad("contrast_start", f"must be at most --iters ({cfg.iters}): the contrast losses would never be used")
    if "warmup_iters" in cfg.explicit and cfg.warmup_iters > cfg.iters:
        bad("warmup_iters", f"must be at most --iters ({cfg.iters}): the warm-up would never end")
    if cfg.data_root and cfg.source == "synthetic":
        bad("data_root", "the synthetic pair is generated, not read from a data root; drop --data-root, or give "
            "--source/--target datasets that live there")


def _validate_crop(cfg: TrainConfig, bad) -> None:
    if len(cfg.crop) != 2 or (min(cfg.crop) < 8 and cfg.crop != [0, 0]) or max(cfg.crop) > 8192:
        bad("crop", "expected H W (or one number), each in 8 .. 8192, or 0 for the dataset default")
    stride = output_stride(cfg.arch)
    if cfg.crop != [0, 0] and any(c % stride for c in cfg.crop):
        near = sorted({max(stride, c // stride * stride) for c in cfg.crop} | {-(-c // stride) * stride for c in cfg.crop})
        bad("crop", f"each side must be a multiple of {stride}, the output stride of {cfg.arch} (the labels are "
                    f"downscaled by it for the contrast losses); e.g. {' or '.join(map(str, near))}")


def _validate_device(cfg: TrainConfig, bad) -> None:
    from ..device import device_problem  # torch only when validating

    problem = device_problem(cfg.device)
    if problem is not None:
        bad("device", problem)


# ----------------------------------------------------------------------------------------
# Resume: the checkpoint's config + the flags given now
# ----------------------------------------------------------------------------------------
def _fields_with_policy(policy: str) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == policy)


# The resume policy is declared with each field (``_f(..., resume=...)``, see RESUME_POLICIES).
# Settings of one invocation: never taken from the checkpoint (``work_dir`` defaults to the
# checkpoint's folder with --resume PATH).
INVOCATION_FIELDS = _fields_with_policy("invocation")
# Settings a resumed run may change without changing what it trains: applied and logged.
# Every other field -- including any field added later -- changes the method or the data,
# and a different value is refused unless --resume-override is given.
HARMLESS_FIELDS = _fields_with_policy("harmless")


def resumed_config(saved: dict, cfg: TrainConfig, ckpt_path) -> tuple[TrainConfig, list[str]]:
    """(config a run resumed from ``ckpt_path`` continues with, notes "--flag old -> new").

    ``saved`` is the checkpoint's config; fields it lacks (added since) come from its
    preset. Of ``cfg`` only its explicit flags count: harmless ones are applied, others
    raise ValueError listing every refused "--flag old -> new" unless ``cfg.resume_override``.
    """
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    preset = saved.get("preset") if saved.get("preset") in PRESETS else TrainConfig.preset
    values = {name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for name, f in known.items()}
    values.update(PRESETS[preset])
    values.update({k: v for k, v in saved.items() if k in known})
    applied, refused = [], []
    for name in sorted(cfg.explicit - INVOCATION_FIELDS):
        old, new = values[name], getattr(cfg, name)
        if _same(old, new):
            continue
        change = f"{_flag(name)} {_shown(old) if old != '' else repr(old)} -> {_shown(new) if new != '' else repr(new)}"
        if name in HARMLESS_FIELDS or cfg.resume_override:
            applied.append(change)
            values[name] = new
        else:
            refused.append(change)
    if refused:
        raise ValueError(f"--resume: {ckpt_path} was trained with other settings: {'; '.join(refused)}. Drop these "
                         "flags to continue that run, or add --resume-override to apply them")
    for name in INVOCATION_FIELDS:
        values[name] = getattr(cfg, name)
    if "work_dir" not in cfg.explicit or not cfg.work_dir:
        values["work_dir"] = str(Path(ckpt_path).parent)
    out = _build(values)
    out.explicit = cfg.explicit
    validate(out)
    return out, applied


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return a == b
