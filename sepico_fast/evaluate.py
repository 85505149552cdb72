"""Evaluation (method §7): ``python -m sepico_fast.evaluate --checkpoint CKPT``.

Whole-image inference at the eval scale (the data layer resizes to fit 1280×640, Dark
Zurich 1280×720), logits bilinearly upsampled to the network input size and then to the
original label size (two resizes, as the authors' ``encode_decode`` + ``whole_inference``),
arg-max, 19×19 confusion matrix, per-class IoU table, mIoU over classes present in
prediction or ground truth. Dark Zurich images (``*_rgb_anon.png``) get the authors'
test-time class re-weighting: soft-max at the network input size × log-frequency class
weights (scale 0.16), then the resize and the arg-max (``--no-dz-test-reweight`` turns it
off; the table and ``metrics.json`` say which was used). ``--sliding`` runs overlapping
crop windows instead (mmseg "slide" mode: window = training crop, stride 2/3 of it,
logits averaged where windows overlap, at the input size). ``--out DIR`` writes
``DIR/labelTrainIds/<original stem>.png`` (8-bit train ids) and ``DIR/labelTrainIds.zip``
with the same ``labelTrainIds/`` layout (a benchmark server's upload: ``--format``, below);
``--split test`` predicts the unlabelled test images of Cityscapes, ACDC or Dark Zurich.
``--format {cityscapes,acdc,darkzurich}`` writes instead what that benchmark server takes
(``sepico_fast.submission``: file names, folders, label encoding, image-size predictions,
Dark Zurich confidence and invalid maps, one zip) and checks the zip against the split's
image list; ACDC validation also reports the mIoU of each condition (``per_condition``).
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from .device import autocast, choose_precision, resolve_device
from .metrics import ConfusionMatrix

# Dark Zurich test-time class re-weighting (method §7): scale of the log-frequency weights.
DZ_TEST_WEIGHT_SCALE = 0.16


def dark_zurich_class_weights(scale: float = DZ_TEST_WEIGHT_SCALE) -> torch.Tensor:
    """float32 [19] log-frequency class weights w_c = (mean(l) - l_c) / std(l) · scale + 1,
    l = log of the Cityscapes class frequencies: scale 0.16 at test time (method §7), 0.05 in
    training (``train.uda.log_frequency_class_weights``, the same function)."""
    from .data.labels import log_frequency_weights

    return torch.from_numpy(log_frequency_weights(scale)).float()


def is_dark_zurich_image(file) -> bool:
    """Whether the test-time re-weighting applies: a Dark Zurich file ``*_rgb_anon.png``
    (also its cached ``*_rgb_anon.jpg`` copy)."""
    if isinstance(file, (list, tuple)):
        file = file[0] if file else ""
    return bool(file) and Path(str(file)).stem.endswith("_rgb_anon")


@torch.no_grad()
def input_size_logits(model, img: torch.Tensor, amp_dtype=None) -> torch.Tensor:
    """Logits [B,C,h,w] fp32 of the whole (already resized) image, upsampled to its size h×w
    (the authors' ``encode_decode``)."""
    with autocast(img.device, amp_dtype):
        logits = model.predict(img)
    return F.interpolate(logits.float(), size=img.shape[-2:], mode="bilinear", align_corners=False)


def to_label_size(logits: torch.Tensor, out_hw: tuple[int, int], class_weight: torch.Tensor | None = None):
    """Second resize of method §7: input-size scores to the label size ``out_hw`` (bilinear).

    With ``class_weight`` (Dark Zurich test-time re-weighting) the soft-max probabilities at
    the input size are multiplied by the weights first; the arg-max of the result is the
    prediction either way."""
    if class_weight is not None:
        logits = torch.softmax(logits, dim=1) * class_weight.to(logits).view(1, -1, 1, 1)
    return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)


@torch.no_grad()
def sliding_logits(model, img: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int] | None = None,
                   amp_dtype=None, num_classes: int = 19) -> torch.Tensor:
    """Overlapping windows (last row/column aligned to the border), each window's logits
    upsampled to the window size and averaged: [B,C,h,w] at the input size."""
    b, _, h, w = img.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    ny = max(h - ch + sh - 1, 0) // sh + 1
    nx = max(w - cw + sw - 1, 0) // sw + 1
    acc = torch.zeros(b, num_classes, h, w, device=img.device)
    cnt = torch.zeros(1, 1, h, w, device=img.device)
    for iy in range(ny):
        for ix in range(nx):
            y1, x1 = min(iy * sh, h - ch), min(ix * sw, w - cw)
            win = img[:, :, y1:y1 + ch, x1:x1 + cw]
            acc[:, :, y1:y1 + ch, x1:x1 + cw] += input_size_logits(model, win, amp_dtype)
            cnt[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return acc / cnt


def evaluate_model(model, batches: Iterable[dict], num_classes: int = 19, *, device=None, amp_dtype=None,
                   sliding: bool = False, crop: tuple[int, int] = (640, 640), max_images: int = 0,
                   out_dir: str | Path | None = None, test_class_weight: torch.Tensor | None = None,
                   report: dict | None = None, writer=None, groups: dict | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` (put in eval mode, restored afterwards) over ``batches``
    (``{"img", "gt" [1,1,H0,W0] or absent, "name", "file"}``). Writes train-id PNGs to ``out_dir``.

    ``test_class_weight`` (e.g. ``dark_zurich_class_weights()``) re-weights the soft-max of
    every Dark Zurich image (``is_dark_zurich_image(file)``) before the final resize; other
    images are predicted plainly. ``report``, when given, receives ``images`` and
    ``reweighted_images`` counts.

    ``writer`` (a ``submission.SubmissionWriter``) writes each prediction in a benchmark
    format instead of ``out_dir``'s train-id PNGs; ``groups`` (a dict) receives one confusion
    matrix per non-empty batch ``"group"`` (the ACDC condition; ACDC images, although named
    ``*_rgb_anon.png``, are never re-weighted)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    counts = {"images": 0, "reweighted_images": 0}
    cm = ConfusionMatrix(num_classes, device=device)
    was_training = model.training
    model.eval()
    label_dir = Path(out_dir) / "labelTrainIds" if (out_dir is not None and writer is None) else None
    if label_dir is not None:
        label_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n, batch in enumerate(batches):
            if max_images and n >= max_images:
                break
            img = batch["img"].to(device)
            gt = batch.get("gt")
            out_hw = tuple(gt.shape[-2:]) if gt is not None else tuple(batch.get("orig_hw", img.shape[-2:]))
            weight = None
            group = batch.get("group") or ""
            group = group[0] if isinstance(group, (list, tuple)) else group
            if (test_class_weight is not None and not group
                    and is_dark_zurich_image(batch.get("file") or batch.get("name"))):
                weight = test_class_weight
                if weight.numel() != num_classes:
                    raise ValueError(f"test_class_weight: expected {num_classes} class weights, got {weight.numel()}")
            if sliding:
                logits = sliding_logits(model, img, crop, amp_dtype=amp_dtype, num_classes=num_classes)
            else:
                logits = input_size_logits(model, img, amp_dtype)
            pred = to_label_size(logits, out_hw, weight).argmax(dim=1)
            counts["images"] += 1
            counts["reweighted_images"] += int(weight is not None)
            if gt is not None:
                cm.update(pred, gt.to(device).reshape(pred.shape))
                if groups is not None and group:
                    if group not in groups:
                        groups[group] = ConfusionMatrix(num_classes, device=device)
                    groups[group].update(pred, gt.to(device).reshape(pred.shape))
            if writer is not None:
                conf = None
                if writer.needs_confidence:  # soft-max probability of the predicted class at the label size
                    prob = to_label_size(torch.softmax(logits, dim=1), out_hw)
                    conf = prob.gather(1, pred[:, None])[0, 0]
                writer.write(batch, pred[0], conf, n)
            elif label_dir is not None:
                _write_prediction(label_dir, batch.get("name"), pred, n)
    finally:
        model.train(was_training)
        if report is not None:
            report.update(counts)
    return cm


def group_summary(groups: dict) -> dict:
    """``{group: {"miou", "miou_unit", "per_class_iou"}}`` (ACDC: one entry per condition, in
    the order fog, night, rain, snow)."""
    from .data.layouts import ACDC_CONDITIONS

    order = {c: i for i, c in enumerate(ACDC_CONDITIONS)}
    return {g: iou_summary(groups[g]) for g in sorted(groups, key=lambda g: (order.get(g, len(order)), g))}


def group_lines(per_group: dict) -> str:
    """One printed line: mIoU of each condition."""
    return "per condition mIoU: " + ", ".join(f"{g} {r['miou']:.2f}" for g, r in per_group.items())


def reweighting_record(enabled: bool, report: dict, scale: float = DZ_TEST_WEIGHT_SCALE) -> dict:
    """What metrics.json says about the Dark Zurich test-time class re-weighting."""
    return {"dz_test_reweight": {"enabled": bool(enabled), "scale": float(scale) if enabled else None,
                                 "reweighted_images": int(report.get("reweighted_images", 0)),
                                 "images": int(report.get("images", 0))}}


def reweighting_line(record: dict) -> str:
    """One line for the printed table: which prediction rule produced it."""
    r = record["dz_test_reweight"]
    if not r["enabled"]:
        return "Dark Zurich test-time class re-weighting: off"
    if not r["reweighted_images"]:
        return "Dark Zurich test-time class re-weighting: on, but no *_rgb_anon.png image (not applied)"
    return (f"Dark Zurich test-time class re-weighting: on (softmax x log-frequency weights, scale {r['scale']}) "
            f"for {r['reweighted_images']} of {r['images']} images")


def _stem(name) -> str:
    if isinstance(name, (list, tuple)):
        name = name[0]
    return Path(str(name)).stem if name else ""


def _write_prediction(label_dir: Path, name, pred: torch.Tensor, index: int) -> None:
    from PIL import Image

    stem = _stem(name) or f"image_{index:05d}"
    for suffix in ("_leftImg8bit", "_gtFine_labelTrainIds", "_gt_labelTrainIds"):
        stem = stem.replace(suffix, "")
    Image.fromarray(pred[0].to(torch.uint8).cpu().numpy()).save(label_dir / f"{stem}.png")


def zip_predictions(out_dir: str | Path) -> Path:
    """``labelTrainIds.zip`` holding ``labelTrainIds/<stem>.png`` (benchmark-server layout)."""
    out_dir = Path(out_dir)
    archive = out_dir / "labelTrainIds.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for png in sorted((out_dir / "labelTrainIds").glob("*.png")):
            zf.write(png, f"labelTrainIds/{png.name}")
    return archive


def training_crop(config: dict, fallback: tuple[int, int] = (640, 640)) -> tuple[int, int]:
    """(H, W) of the training crop a checkpoint's config names: ``[0, 0]`` (``--crop 0``,
    stored unresolved by runs before it was resolved) is the dataset pair's default crop;
    no config at all gives ``fallback``."""
    crop = [int(c) for c in (config.get("crop") or fallback)]
    crop = crop * 2 if len(crop) == 1 else crop
    if min(crop) <= 0:
        from .data import dataset_defaults

        try:
            crop = list(dataset_defaults(config.get("source", "gta"), config.get("target", "cityscapes"))["crop_size"])
        except ValueError:
            crop = list(fallback)
    return int(crop[0]), int(crop[-1])


# ----------------------------------------------------------------------------------------
# Checks of the command lines (evaluate and export): one line naming the flag or the file
# ----------------------------------------------------------------------------------------
MIN_WINDOW = 32  # the coarsest backbone stride: a smaller window is less than one feature cell


def non_finite_tensor(model: torch.nn.Module, prefix: str = "") -> str | None:
    """``None`` when every floating-point parameter and buffer is finite, else one line naming
    the first tensor holding NaN or Inf (a run that diverged still writes its checkpoints)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return (f"tensor {prefix}{name} holds {bad} NaN/Inf value(s) of {t.numel()}: the training diverged "
                    "before this checkpoint; use an earlier one")
    return None


def check_window(crop, flag: str = "--crop") -> tuple[int, int]:
    """``--crop H W`` (or one value for both) of at least MIN_WINDOW pixels each, else SystemExit."""
    crop = [int(c) for c in crop]
    if len(crop) not in (1, 2) or min(crop) < MIN_WINDOW:
        raise SystemExit(f"{flag}: expected H W (or one size) of at least {MIN_WINDOW} pixels each, the coarsest "
                         f"stride of the networks (a smaller window sees less than one feature cell), got "
                         f"{' '.join(map(str, crop))}")
    return crop[0], crop[-1]


def check_writable(folder: str | Path, flag: str, hint: str = "") -> Path:
    """Create ``folder`` and write (then remove) a probe file in it; a read-only, full or
    unreachable place is one SystemExit line naming ``flag`` instead of a traceback after
    the work is done."""
    import os

    folder = Path(folder)
    probe = folder / f".sepico_probe.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or (os.strerror(err.errno) if isinstance(err.errno, int) else type(err).__name__)
        if folder.exists() and not folder.is_dir():
            reason = "a file, not a folder"
        raise SystemExit(f"{flag}: cannot write in {folder} ({reason}){hint}") from None
    return folder


def _cli(main) -> None:
    """Run a command line's ``main``: a one-line SystemExit message (bad input, a file it
    cannot read or write) goes to stderr with exit status 2."""
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise


def iou_summary(cm: ConfusionMatrix) -> dict:
    iou = cm.iou().cpu().tolist()
    miou = float(cm.miou())
    return {"miou": 100.0 * miou, "miou_unit": "percent", "per_class_iou": [100.0 * v for v in iou]}


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def _unlabelled_batches(dataset: str, root: Path, scale, device):
    """Test images (labels withheld) of Cityscapes ``leftImg8bit/test/<city>/``, Dark Zurich
    ``rgb_anon/test/night/<seq>/`` or ACDC ``rgb_anon/<condition>/test/<seq>/``."""
    from .data.io import read_image
    from .data.layouts import LayoutError, acdc_condition, server_test_files
    from .data.transforms import fit_size, normalize, resize_image

    try:
        entries = server_test_files(dataset, root)
    except LayoutError as err:
        raise SystemExit(f"--data-root: {err}") from None
    for entry in entries:
        path = entry.image
        arr = read_image(path)
        h0, w0 = arr.shape[:2]
        img = normalize(resize_image(arr, fit_size(h0, w0, scale)))[None].to(device)
        yield {"img": img, "name": path.name, "file": path.name, "orig_hw": (h0, w0),
               "group": acdc_condition(path) if dataset == "acdc" else ""}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sepico_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="sepico_fast checkpoint, or an upstream .pth / .safetensors file with --arch")
    p.add_argument("--dataset", default=None, choices=("cityscapes", "darkzurich", "acdc", "synthetic"),
                   help="evaluation set (default: the checkpoint's training target)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset folders")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="test: the unlabelled test images (Cityscapes, ACDC, Dark Zurich) for a benchmark server")
    p.add_argument("--arch", default=None, help="segmentor (default: from the checkpoint's config)")
    p.add_argument("--sliding", action="store_true", help="sliding-window instead of whole-image inference")
    p.add_argument("--crop", type=int, nargs="+", default=None, help="sliding window H W (default: training crop)")
    p.add_argument("--out", default=None, help="write labelTrainIds PNGs and a zip here")
    # benchmark-server formats (docs/submitting.md)
    p.add_argument("--format", default="trainids", choices=("trainids", "cityscapes", "acdc", "darkzurich"),
                   help="what --out writes: trainids (labelTrainIds/<stem>.png + labelTrainIds.zip, the default) "
                        "or the exact upload of the Cityscapes, ACDC or Dark Zurich server (checked after writing)")
    p.add_argument("--dz-invalid-below", type=float, default=0.0,
                   help="--format darkzurich: mark pixels whose confidence is below this as invalid (255) in "
                        "labelTrainIds_invalid (default 0: none, the prediction itself)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision as in training: on CUDA bf16 autocast where the GPU has bf16 tensor "
                        "cores, else fp16; on the CPU float32 unless --cpu-amp")
    p.add_argument("--cpu-amp", action="store_true", help="with --amp on the CPU, use bf16 autocast")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (default 0: all)")
    p.add_argument("--weights", default="model", choices=("model", "ema_model"),
                   help="student (upstream default) or teacher weights")
    p.add_argument("--no-dz-test-reweight", dest="dz_test_reweight", action="store_false",
                   help="turn off the authors' Dark Zurich test-time class re-weighting (softmax x log-frequency "
                        f"weights, scale {DZ_TEST_WEIGHT_SCALE}, on *_rgb_anon.png images; on by default)")
    return p


def dataset_root_of(dataset: str, data_root) -> Path:
    from .data.datasets import dataset_root

    return dataset_root(dataset, data_root)


def main(argv=None) -> dict:
    from .checkpoint import num_classes_of, segmentor_from_checkpoint
    from .data.labels import CLASSES
    from .models import ARCHS
    from .reporting import iou_table

    args = build_parser().parse_args(argv)
    try:  # auto | cpu | cuda | cuda:N, checked against this machine
        device = resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.arch is not None and args.arch not in ARCHS:
        raise SystemExit(f"--arch: expected one of {', '.join(sorted(ARCHS))}, got {args.arch!r}")
    ckpt_path = Path(args.checkpoint)
    if not ckpt_path.exists():
        raise SystemExit(f"--checkpoint: file {str(ckpt_path)!r} does not exist")
    try:  # the same reading and model building as export: widths from the config or the weights
        model, config = segmentor_from_checkpoint(ckpt_path, args.arch, prefix=args.weights + ".")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--checkpoint: {err}") from None
    bad = non_finite_tensor(model, args.weights + ".")
    if bad:
        raise SystemExit(f"--checkpoint: {ckpt_path}: {bad}")
    if args.max_images < 0:
        raise SystemExit(f"--max-images: expected 0 (all images) or a positive count, got {args.max_images}")
    if args.out:
        check_writable(args.out, "--out", "; pass --out DIR in a writable place")
    model = model.to(device)
    num_classes = int(config.get("num_classes") or num_classes_of(model) or 19)
    dataset = args.dataset or config.get("target") or "cityscapes"
    precision = choose_precision(device, args.amp, args.cpu_amp)  # the rule of training's --amp
    amp_dtype = precision.dtype
    crop = check_window(args.crop) if args.crop else training_crop(config)

    from .data import build_val_set, val_loader
    writer = None
    if args.format != "trainids":
        from .submission import SERVER_FORMATS, SubmissionWriter

        if SERVER_FORMATS[args.format].dataset != dataset:
            raise SystemExit(f"--format {args.format}: predictions of {SERVER_FORMATS[args.format].dataset} images, "
                             f"got --dataset {dataset}")
        if not args.out:
            raise SystemExit(f"--format {args.format}: needs --out DIR (the folder to write the submission to)")
        try:
            writer = SubmissionWriter(args.out, args.format, args.dz_invalid_below)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.split == "test":
        if dataset not in ("darkzurich", "cityscapes", "acdc"):
            raise SystemExit("--split test: Cityscapes, ACDC and Dark Zurich have an unlabelled test split, "
                             f"not {dataset}")
        from .data.datasets import EVAL_SCALES, dataset_root
        root = dataset_root(dataset, args.data_root)
        batches = _unlabelled_batches(dataset, root, EVAL_SCALES[dataset], device)
    else:
        from .data.synthetic import SyntheticDataError
        try:  # only the evaluation set: no source dataset has to be present
            val_set = build_val_set(dataset, args.data_root)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"--data-root: cannot load {dataset}: {err}") from None
        except SyntheticDataError as err:  # a full disk or an unwritable cache folder
            raise SystemExit(f"synthetic data: {err}") from None
        batches = val_loader(val_set, device)
    report: dict = {}
    groups: dict = {}
    reweight = args.dz_test_reweight and dataset != "acdc"  # ACDC's *_rgb_anon.png images are not Dark Zurich
    from .data.io import DataFileError
    try:
        cm = evaluate_model(model, batches, num_classes, device=device, amp_dtype=amp_dtype,
                            sliding=args.sliding, crop=crop, max_images=args.max_images, out_dir=args.out,
                            test_class_weight=dark_zurich_class_weights() if reweight else None,
                            report=report, writer=writer, groups=groups)
    except DataFileError as exc:  # one line naming the bad evaluation file
        raise SystemExit(f"error: {exc}") from None
    result = {"checkpoint": str(ckpt_path), "dataset": dataset, "split": args.split, "sliding": args.sliding,
              "precision": precision.description}
    result.update(reweighting_record(reweight, report))
    print(reweighting_line(result))
    if args.split != "test":
        result.update(iou_summary(cm))
        print(iou_table(cm.iou().cpu().tolist(), CLASSES, title=dataset))
        if groups:
            result["per_condition"] = group_summary(groups)
            print(group_lines(result["per_condition"]))
    if writer is not None:
        from .submission import validate

        result["format"], result["zip"] = args.format, str(writer.finish())
        ok, line = validate(result["zip"], args.format, dataset_root_of(dataset, args.data_root), args.split)
        result["submission_check"] = {"ok": ok, "line": line}
        print(line)
        Path(args.out, "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"submission: {result['zip']}")
    elif args.out:
        result["zip"] = str(zip_predictions(args.out))
        Path(args.out, "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"predictions: {Path(args.out) / 'labelTrainIds'}  zip: {result['zip']}")
    return result


if __name__ == "__main__":
    _cli(main)
