"""Deployable segmentors: ``python -m sepico_fast.export --checkpoint CKPT --format onnx|torchscript``.

Exports the inference path only — backbone and decode head, no projection head — in
eval mode (BatchNorm running statistics, no dropout / drop-path) as a graph whose input is
a normalised RGB batch ``image`` [B,3,H,W] float32 of any batch size and image size, and
whose output is ``logits`` [B,C,H,W] float32, bilinearly upsampled to the input size
(``--native-stride``: at the decoder's stride, H/4 for DAFormer, H/8 for DeepLab-v2).
Normalise as in training: RGB in [0, 255], minus ImageNet mean (123.675, 116.28, 103.53),
divided by std (58.395, 57.12, 57.375).

* ``--format onnx``: ``torch.onnx.export``; ``--onnx-exporter dynamo`` (default: the
  torch.export-based exporter, needs ``onnxscript``) or ``legacy`` (the TorchScript-based
  one, deprecated by PyTorch but faster to run); batch, height and width are dynamic axes.
  The written file is checked once with onnxruntime when it is installed.
* ``--format torchscript``: ``torch.jit.trace`` of the same module (sizes are traced as
  shape computations, so other image sizes run too; checked at a second size).

The ``export`` extra installs onnx, onnxruntime and onnxscript.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("dynamo", "legacy")


class InferenceSegmentor(nn.Module):
    """``image`` [B,3,H,W] -> ``logits`` [B,C,H,W] (or at the native stride)."""

    def __init__(self, segmentor: nn.Module, upsample: bool = True):
        super().__init__()
        self.segmentor = segmentor
        self.upsample = upsample

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.segmentor.decode(self.segmentor.extract(image))
        if self.upsample:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def inference_module(segmentor: nn.Module, upsample: bool = True) -> InferenceSegmentor:
    module = InferenceSegmentor(segmentor, upsample).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def export_onnx(module: nn.Module, example: torch.Tensor, out: str | Path, exporter: str = "dynamo",
                opset: int | None = None) -> Path:
    """Write ``module`` as ONNX with dynamic batch, height and width."""
    out = Path(out)
    kwargs = {} if opset is None else {"opset_version": opset}
    if exporter == "dynamo":
        from torch.export import Dim

        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise SystemExit("--onnx-exporter dynamo needs onnxscript (pip install onnxscript, or the [export] "
                             "extra); --onnx-exporter legacy does not") from None
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}},
                                    verbose=False, **kwargs)
        program.save(str(out))
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        torch.onnx.export(module, (example,), str(out), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=opset or 17)
    return out


def export_torchscript(module: nn.Module, example: torch.Tensor, out: str | Path) -> Path:
    out = Path(out)
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(out))
    return out


def _check(fn, module: nn.Module, example: torch.Tensor, what: str) -> float:
    """Max |exported - eager| / max |eager| on an input of another size than the traced one."""
    h, w = example.shape[-2:]
    other = torch.randn(1, 3, h + 32, w + 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module(other)
    got = fn(other)
    if tuple(got.shape) != tuple(ref.shape):
        raise SystemExit(f"export check failed: {what} gives shape {tuple(got.shape)} for input "
                         f"{tuple(other.shape)}, expected {tuple(ref.shape)}")
    diff = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if diff != diff or diff == float("inf"):
        raise SystemExit(f"export check failed: {what} and PyTorch give non-finite logits (difference {diff})")
    return diff


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sepico_fast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="sepico_fast checkpoint, or an upstream .pth / .safetensors file with --arch")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", default=None, help="output file (default: next to the checkpoint, .onnx / .ts.pt)")
    p.add_argument("--arch", default=None, help="segmentor (default: from the checkpoint's config)")
    p.add_argument("--weights", default="model", choices=("model", "ema_model"),
                   help="student (upstream default) or teacher weights")
    p.add_argument("--native-stride", action="store_true",
                   help="output logits at the decoder's stride instead of upsampled to the input size")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example input size used for tracing (default: the training crop, its dataset's "
                        "default for --crop 0, else 512 512)")
    p.add_argument("--onnx-exporter", default="dynamo", choices=EXPORTERS, help="torch.onnx exporter")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's; dynamo 18 or newer, legacy 11..20)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported file once")
    return p


def opset_range(exporter: str) -> tuple[int, int]:
    """Opsets ``--opset`` accepts: legacy 11 (the first whose Resize matches PyTorch's bilinear
    interpolation) .. its newest; dynamo 18 (its own base; older ones go through a version
    converter) .. the newest the installed onnx knows (past it the exporter writes 18)."""
    from torch.onnx import _constants

    if exporter == "legacy":
        return 11, int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17))
    try:
        import onnx

        newest = int(onnx.defs.onnx_opset_version())
    except ImportError:
        newest = int(_constants.ONNX_MAX_OPSET)
    return 18, newest


def _check_args(args) -> None:
    """One line naming the flag for values the exporters would ignore or fail on late."""
    if args.opset is not None:
        if args.format != "onnx":
            raise SystemExit("--opset: only for --format onnx")
        lo, hi = opset_range(args.onnx_exporter)
        if not lo <= args.opset <= hi:
            other = " (11..17: --onnx-exporter legacy)" if args.onnx_exporter == "dynamo" else ""
            raise SystemExit(f"--opset: expected {lo}..{hi} with --onnx-exporter {args.onnx_exporter}{other}, "
                             f"got {args.opset}")


def _written_opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def main(argv=None) -> dict:
    from .checkpoint import segmentor_from_checkpoint
    from .evaluate import check_writable, non_finite_tensor, training_crop

    args = build_parser().parse_args(argv)
    _check_args(args)
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise SystemExit(f"--checkpoint: file {str(ckpt)!r} does not exist")
    try:
        segmentor, config = segmentor_from_checkpoint(ckpt, args.arch, prefix=args.weights + ".")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--checkpoint: {err}") from None
    bad = non_finite_tensor(segmentor, args.weights + ".")
    if bad:
        raise SystemExit(f"--checkpoint: {ckpt}: {bad}")
    module = inference_module(segmentor, upsample=not args.native_stride)
    size = args.size or list(training_crop(config, fallback=(512, 512)))
    if len(size) != 2 or min(size) < 32:
        raise SystemExit(f"--size: expected H W of at least 32 each, got {size}")
    example = torch.randn(2, 3, int(size[0]), int(size[-1]), generator=torch.Generator().manual_seed(0))
    suffix = ".onnx" if args.format == "onnx" else ".ts.pt"
    out = Path(args.out) if args.out else ckpt.with_name(ckpt.name.split(".")[0] + suffix)
    check_writable(out.parent, "--out", "" if args.out else " (the default, next to the checkpoint); pass --out "
                   "FILE in a writable place")
    result = {"checkpoint": str(ckpt), "format": args.format, "out": str(out), "arch": segmentor.arch,
              "upsampled": not args.native_stride}
    try:
        if args.format == "onnx":
            export_onnx(module, example, out, args.onnx_exporter, args.opset)
        else:
            export_torchscript(module, example, out)
    except OSError as err:  # e.g. the disk filled up while writing
        out.unlink(missing_ok=True)
        raise SystemExit(f"--out: cannot write {out} ({err.strerror or type(err).__name__})") from None
    if args.format == "onnx":
        written = _written_opset(out) if args.opset is not None else None
        if written is not None and written != args.opset:
            out.unlink(missing_ok=True)
            raise SystemExit(f"--opset: the {args.onnx_exporter} exporter wrote opset {written} instead of "
                             f"{args.opset}; file removed: choose another --opset or --onnx-exporter")
        result["exporter"] = args.onnx_exporter
        if not args.no_check:
            try:
                import onnxruntime as ort
            except ImportError:
                print("export check skipped: onnxruntime is not installed (pip install onnxruntime)")
            else:
                sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                result["check_rel_diff"] = _check(lambda x: torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]),
                                                  module, example, "onnxruntime")
    else:
        if not args.no_check:
            loaded = torch.jit.load(str(out))
            with torch.no_grad():
                result["check_rel_diff"] = _check(loaded, module, example, "the TorchScript module")
    print(f"exported {segmentor.arch} ({args.weights} weights) to {out}"
          + (f"; max relative difference to PyTorch at another size: {result['check_rel_diff']:.1e}"
             if "check_rel_diff" in result else ""))
    return result


if __name__ == "__main__":
    from .evaluate import _cli

    _cli(main)
