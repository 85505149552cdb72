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
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.loader import PIPELINES
from ..models import ARCHS

DATASETS = ("gta", "synthia", "cityscapes", "darkzurich", "synthetic")
METHODS = ("sepico", "source_only")
VARIANTS = ("dist", "bank", "proto")
DDP_SCHEDULES = ("steps", "samples")


def _f(default: Any, help: str, choices: Sequence[str] | None = None, **kw):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # --- run -------------------------------------------------------------------------
    preset: str = _f("synthetic", "named configuration applied before the other flags (see --list-presets); "
                     "the defaults shown here are those of the bare run, preset synthetic")
    work_dir: str = _f("", "output folder; default work_dirs/<preset>_<method>_<variant>_s<seed>_<UTC timestamp>")
    seed: int = _f(0, "seed of every random choice (data order, crops, augmentation, init)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    method: str = _f("sepico", "sepico (full UDA) or source_only (student on source CE only)", METHODS)
    variant: str = _f("dist", "contrast variant: dist (DistCL), bank (BankCL), proto (ProtoCL)", VARIANTS)
    # --- model -----------------------------------------------------------------------
    arch: str = _f("dlv2_tiny", "segmentor (the *_tiny ones are small CPU variants, not upstream)", tuple(ARCHS))
    pretrained: str = _f("", "weights loaded into the student (and teacher): ImageNet backbone file (NVlabs mit_b*.pth, "
                         "mmcv ResNet-V1c), Hugging Face SegFormer encoder (nvidia/mit-b*: pytorch_model.bin, "
                         "model.safetensors or its folder), or a segmentor / UDA checkpoint")
    num_classes: int = _f(19, "number of classes")
    proj_dim: int = _f(64, "projection (contrast feature) dimension A (paper: 512)")
    drop_path_rate: float = _f(0.1, "student drop-path rate (the teacher always runs without)")
    # --- data ------------------------------------------------------------------------
    source: str = _f("synthetic", "source (labelled) dataset", DATASETS)
    target: str = _f("synthetic", "target (unlabelled) dataset; also the evaluation set", DATASETS)
    data_root: str = _f("", "folder holding the dataset folders (e.g. <root>/gta, <root>/cityscapes)")
    pipeline: str = _f("torch", "input pipeline: auto (dali on CUDA when installed), torch (workers) or dali",
                       PIPELINES)
    num_workers: int = _f(0, "data loader worker processes per rank")
    batch_size: int = _f(2, "source images (and target images) per rank and iteration")
    crop: list = _f([128, 128], "training crop H W (one number for a square; 0: the dataset's default); "
                    "a multiple of the network's output stride (8 for dlv2_*, 4 for daformer_*); "
                    "the target crop is chosen on pseudo labels")
    # --- schedule ----------------------------------------------------------------------
    iters: int = _f(2000, "number of training iterations")
    lr: float = _f(6e-4, "AdamW learning rate of the backbone")
    head_lr_mult: float = _f(10.0, "learning-rate multiplier of decode and projection heads")
    weight_decay: float = _f(0.01, "AdamW weight decay (none on MiT norm / position-block parameters)")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    warmup_iters: int = _f(75, "linear warm-up iterations")
    warmup_ratio: float = _f(1e-6, "learning-rate factor at iteration 0 of the warm-up")
    poly_power: float = _f(1.0, "power of the polynomial decay to 0 at the last iteration")
    # DDP schedule (issue 13)
    ddp_schedule: str = _f("steps", "with N processes (torchrun): 'steps' runs --iters steps of N x the batch "
                           "(N x the samples of one GPU, same lr); 'samples' divides --iters, --warmup-iters, "
                           "--contrast-start, --eval-interval and --checkpoint-interval by N (the samples seen "
                           "of the one-GPU run, same lr); recorded in config.json and metrics.json",
                           DDP_SCHEDULES)
    # --- UDA ---------------------------------------------------------------------------
    ema_alpha: float = _f(0.99, "teacher EMA momentum (alpha_t = min(1 - 1/(t+1), alpha))")
    pseudo_threshold: float = _f(0.9, "confidence threshold defining the pseudo-label weight q")
    color_jitter_strength: float = _f(0.2, "colour jitter strength s (brightness, contrast, saturation, hue)")
    color_jitter_p: float = _f(0.2, "jitter happens when u > p, u ~ U(0,1) drawn once per iteration")
    blur: bool = _f(True, "Gaussian blur when u' > 0.5 (drawn once per iteration)")
    crop_tries: int = _f(10, "class-balanced crop: random windows scored per target image")
    cat_max_ratio: float = _f(0.75, "class-balanced crop: largest class share allowed")
    regen_pseudo: bool = _f(True, "rerun the teacher on the target crop to regenerate the pseudo labels")
    pseudo_ignore_top: int = _f(-1, "rows of the target crop with pseudo weight 0 at the top, at 640-row scale "
                                "(-1: 15 for GTA/SYNTHIA->Cityscapes, else 0); scaled to the crop height")
    pseudo_ignore_bottom: int = _f(-1, "same at the bottom (-1: 120 for GTA/SYNTHIA->Cityscapes, else 0)")
    day_ratio: float = _f(0.8, "Dark Zurich: day-probability weight on shift-insensitive classes")
    dz_class_weight: bool = _f(True, "Dark Zurich: per-class weights (log frequency, std 0.05) on probabilities and CE")
    # --- contrast ------------------------------------------------------------------------
    contrast_start: int = _f(150, "iteration at which source and target contrast losses start")
    contrast_weight: float = _f(1.0, "weight of the contrast losses")
    temperature: float = _f(100.0, "contrast temperature tau (a divisor)")
    reg_weight: float = _f(1.0, "regulariser weight; upstream adds +r (quirk), use -1.0 for the fixed sign")
    memory_length: int = _f(200, "BankCL memory length per class")
    min_ratio: float = _f(0.75, "label downscaling: minimum class share of a feature cell")
    ce_mean_over_all: bool = _f(True, "seg CE averaged over all pixels incl. ignored (mmseg 0.16 quirk)")
    # --- numerics / speed ----------------------------------------------------------------------
    amp: bool = _f(False, "mixed precision: bf16 autocast where supported, else fp16 + GradScaler")
    cpu_amp: bool = _f(False, "with --amp on the CPU, really use bf16 autocast (slower than fp32 for the "
                       "tiny models on the 2-core dev machine, so off by default)")
    compile: bool = _f(False, "torch.compile the student and teacher")
    # whole-step CUDA graphs (train/graphs.py)
    cuda_graphs: bool = _f(False, "capture one iteration after contrast start as a CUDA graph and replay it "
                           "(jitter/blur decisions as device data; eager on the CPU, with DDP or fp16)")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible runs and resumes; slower)")
    max_skipped_steps: int = _f(20, "stop after this many optimizer steps skipped for NaN/Inf losses")
    # debugging (does not change the method)
    debug_checks: bool = _f(False, "check label ranges and finite statistics eagerly, with readable "
                            "messages (one host sync per check; same as SEPICO_FAST_DEBUG_CHECKS=1); "
                            "without it a failed check on CUDA is a bare 'device-side assert'")
    # --- outputs --------------------------------------------------------------------------
    log_interval: int = _f(50, "iterations between log lines (the only host syncs of the loop)")
    eval_interval: int = _f(0, "iterations between evaluations (0: only at the end)")
    checkpoint_interval: int = _f(1000, "iterations between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "number of iteration checkpoints kept (latest.pt is extra)")
    debug_interval: int = _f(500, "iterations between debug pictures (0: never)")
    resume: str = _f("", "checkpoint to resume from, or 'auto' for the newest intact one in --work-dir "
                     "(none yet: start at 0); the run continues with the checkpoint's config")
    stop_at: int = _f(0, "end the run after this many iterations with a checkpoint, as if interrupted "
                      "(0: run to --iters); the schedule still follows --iters")
    profile: bool = _f(False, "torch.profiler trace + per-phase time table for a few iterations")
    profile_iters: int = _f(10, "iterations recorded by --profile")
    nvtx: bool = _f(False, "NVTX ranges around each phase (for Nsight Systems)")
    eval_max_images: int = _f(0, "evaluate on at most this many validation images (0: all)")
    # evaluation rule (issue 13)
    dz_test_reweight: bool = _f(True, "Dark Zurich evaluation: the authors' test-time class re-weighting "
                                "(softmax at the input size x log-frequency weights, scale 0.16, on *_rgb_anon.png "
                                "images, then resize and arg-max); --no-dz-test-reweight for the plain arg-max")
    # --- resume and faults --------------------------------------------------------------------
    resume_override: bool = _f(False, "with --resume: apply flags that differ from the checkpoint's config "
                               "even when they change the method or the data (refused otherwise, with a list)")
    ddp_timeout: int = _f(900, "seconds a rank waits for the others in a collective before the job fails "
                          "(a stalled rank then stops torchrun instead of hanging it); must exceed the longest "
                          "evaluation or checkpoint on rank 0")
    # --- diagnostics ------------------------------------------------------------------------
    pseudo_diagnostics: bool = _f(False, "per-class precision and coverage of the teacher's pseudo labels against "
                                  "the target training labels (synthetic, cityscapes), counted on the device, "
                                  "logged on logging steps, a table at each evaluation; never used by the training")

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
              num_workers=4, pipeline="auto", memory_length=200)

PRESETS: dict[str, dict] = {
    "daformer_gta2cs": dict(_PAPER, arch="daformer_mitb5", source="gta", target="cityscapes", seed=76,
                            pretrained="pretrained/mit_b5.pth"),
    "daformer_synthia2cs": dict(_PAPER, arch="daformer_mitb5", source="synthia", target="cityscapes", seed=76,
                                pretrained="pretrained/mit_b5.pth"),
    "daformer_cs2dz": dict(_PAPER, arch="daformer_mitb5", source="cityscapes", target="darkzurich", seed=42,
                           iters=60000, pretrained="pretrained/mit_b5.pth"),
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
}


# ----------------------------------------------------------------------------------------
# Command line generated from the dataclass
# ----------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


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
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {_shown(default)})"}
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
    for name in ("iters", "batch_size", "num_classes", "proj_dim", "crop_tries", "log_interval", "profile_iters",
                 "ddp_timeout"):
        if getattr(cfg, name) < 1:
            bad(name, "must be >= 1")
    for name in ("warmup_iters", "contrast_start", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                 "debug_interval", "num_workers", "max_skipped_steps", "memory_length", "eval_max_images",
                 "stop_at"):
        if getattr(cfg, name) < 0:
            bad(name, "must be >= 0")
    if not 0 <= cfg.seed < 2**63:
        bad("seed", "must be in 0 .. 2**63-1")
    _validate_crop(cfg, bad)
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        bad("betas", "expected two numbers in [0, 1)")
    for name in ("lr", "temperature"):
        if not getattr(cfg, name) > 0:
            bad(name, "must be > 0")
    for name in ("ema_alpha", "pseudo_threshold", "cat_max_ratio", "min_ratio", "color_jitter_p", "day_ratio"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, "must be in [0, 1]")
    if cfg.weight_decay < 0 or cfg.head_lr_mult <= 0 or cfg.poly_power < 0:
        bad("weight_decay" if cfg.weight_decay < 0 else "head_lr_mult" if cfg.head_lr_mult <= 0 else "poly_power",
            "out of range")
    if not 0.0 <= cfg.color_jitter_strength <= 0.5:
        bad("color_jitter_strength", "must be in [0, 0.5] (hue shift is a fraction of a half turn)")
    if cfg.source == "darkzurich":
        bad("source", "darkzurich has no training labels; use it as --target")
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


def _validate_crop(cfg: TrainConfig, bad) -> None:
    if len(cfg.crop) != 2 or (min(cfg.crop) < 8 and cfg.crop != [0, 0]):
        bad("crop", "expected H W (or one number), each >= 8, or 0 for the dataset default")
    stride = output_stride(cfg.arch)
    if cfg.crop != [0, 0] and any(c % stride for c in cfg.crop):
        near = sorted({max(stride, c // stride * stride) for c in cfg.crop} | {-(-c // stride) * stride for c in cfg.crop})
        bad("crop", f"each side must be a multiple of {stride}, the output stride of {cfg.arch} (the labels are "
                    f"downscaled by it for the contrast losses); e.g. {' or '.join(map(str, near))}")


def _validate_device(cfg: TrainConfig, bad) -> None:
    dev = cfg.device
    if dev in ("auto", "cpu"):
        return
    if dev != "cuda" and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        bad("device", "expected auto, cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        bad("device", "CUDA is not available on this machine; use auto or cpu")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        bad("device", f"this machine has {torch.cuda.device_count()} CUDA device(s): cuda:0 .. "
                      f"cuda:{torch.cuda.device_count() - 1}")


# ----------------------------------------------------------------------------------------
# Resume: the checkpoint's config + the flags given now
# ----------------------------------------------------------------------------------------
# Settings of one invocation: never taken from the checkpoint (``work_dir`` defaults to the
# checkpoint's folder with --resume PATH).
INVOCATION_FIELDS = frozenset({"resume", "resume_override", "stop_at", "work_dir", "profile", "profile_iters",
                               "nvtx"})
# Settings a resumed run may change without changing what it trains: applied and logged.
# Every other field -- including any field added later -- changes the method or the data,
# and a different value is refused unless --resume-override is given.
HARMLESS_FIELDS = frozenset({"log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                             "debug_interval", "eval_max_images", "data_root", "pretrained", "device",
                             "num_workers", "compile", "deterministic", "max_skipped_steps", "ddp_timeout",
                             "dz_test_reweight", "pseudo_diagnostics"})


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
