"""Benchmark-server submissions: write predictions in each server's format, zip them, and
check a folder or zip against the image list of a split.

``python -m sepico_fast.evaluate --format F --out DIR`` writes through :class:`SubmissionWriter`;
``python -m sepico_fast.submission DIR_OR_ZIP --format F --split-root ROOT [--split test]``
checks the result and prints one line (exit status 0: ready to upload, 1: something is
missing or wrong, 2: bad arguments). Formats (docs/submitting.md):

* ``trainids`` (the default of ``evaluate --out``): ``labelTrainIds/<stem>.png``, 8-bit train
  ids, the stem without ``_leftImg8bit`` (and, for labelled images, without ``_rgb_anon``);
  ``labelTrainIds.zip``.
* ``cityscapes`` (Cityscapes test server, cityscapesscripts' pixel-level evaluation):
  ``labelIds/<city>_<seq>_<frame>_leftImg8bit.png``, 8-bit Cityscapes **label ids**
  (train id -> label id with the official table), at the image size (2048x1024);
  ``cityscapes_submission.zip``. The server looks for exactly one file matching
  ``<city>_<seq>_<frame>*.png`` per test image.
* ``acdc`` (ACDC benchmark): ``labelTrainIds/<image name>_rgb_anon.png``, 8-bit train ids at
  the image size (1920x1080), one file per test image of the four conditions;
  ``acdc_submission.zip``.
* ``darkzurich`` (Dark Zurich CodaLab server): three folders with the same file names
  ``<image name>_rgb_anon.png``: ``labelTrainIds/`` (8-bit train ids), ``confidence/``
  (16-bit gray, the soft-max probability of the predicted class x 65535, rounded) and
  ``labelTrainIds_invalid/`` (train ids, 255 where the confidence is below
  ``invalid_below``; none by default), at the image size (1920x1080);
  ``darkzurich_submission.zip`` holding the three folders.
"""
from __future__ import annotations

import argparse
import io as _io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("trainids", "cityscapes", "acdc", "darkzurich")
CONFIDENCE_SCALE = 65535  # 16-bit confidence maps: probability 1.0 -> 65535


@dataclass(frozen=True)
class ServerFormat:
    label_folder: str        # folder of the label maps
    encoding: str            # "trainids" | "labelids"
    zip_name: str
    dataset: str | None      # the benchmark's dataset (None: any, give --dataset)
    keep_image_name: bool    # file name = the image's file name (else the stripped stem)
    extra: tuple = ()        # further folders: ("confidence", "labelTrainIds_invalid")


SERVER_FORMATS = {
    "trainids": ServerFormat("labelTrainIds", "trainids", "labelTrainIds.zip", None, False),
    "cityscapes": ServerFormat("labelIds", "labelids", "cityscapes_submission.zip", "cityscapes", True),
    "acdc": ServerFormat("labelTrainIds", "trainids", "acdc_submission.zip", "acdc", True),
    "darkzurich": ServerFormat("labelTrainIds", "trainids", "darkzurich_submission.zip", "darkzurich", True,
                             ("confidence", "labelTrainIds_invalid")),
}
_STRIP = ("_leftImg8bit", "_gtFine_labelTrainIds", "_gt_labelTrainIds")


def train_id_to_label_id_lut() -> np.ndarray:
    """uint8 [256]: Cityscapes train id -> label id (official table); anything else -> 0 (unlabeled)."""
    from .data.labels import CITYSCAPES_TRAIN_TO_ID

    lut = np.zeros(256, np.uint8)
    lut[:len(CITYSCAPES_TRAIN_TO_ID)] = CITYSCAPES_TRAIN_TO_ID
    return lut


def _name_of(value) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return Path(str(value)).name if value else ""


def prediction_name(fmt: str, name, file=None, index: int = 0) -> str:
    """File name (inside the label folder) of the prediction of an image with batch
    ``name`` / ``file``: the image's file name (``.png``) for the server formats, the
    ``trainids`` stem rule otherwise (as ``evaluate --out`` has always written)."""
    if SERVER_FORMATS[fmt].keep_image_name:
        base = _name_of(file) or _name_of(name)
        if not base:
            return f"image_{index:05d}.png"
        return Path(base).stem + ".png"
    stem = Path(_name_of(name)).stem if _name_of(name) else f"image_{index:05d}"
    for suffix in _STRIP:
        stem = stem.replace(suffix, "")
    return f"{stem}.png"


class SubmissionWriter:
    """Writes one prediction per image in format ``fmt`` under ``out_dir`` and zips exactly
    the files written (``finish``). ``write(batch, pred, confidence)``: ``pred`` [H, W]
    integer train ids at the image size, ``confidence`` [H, W] in [0, 1] (``darkzurich``)."""

    def __init__(self, out_dir, fmt: str = "trainids", invalid_below: float = 0.0):
        if fmt not in SERVER_FORMATS:
            raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        if not 0.0 <= invalid_below <= 1.0:
            raise ValueError(f"--dz-invalid-below: expected a probability in [0, 1], got {invalid_below}")
        self.out_dir, self.fmt, self.layout = Path(out_dir), fmt, SERVER_FORMATS[fmt]
        self.invalid_below = float(invalid_below)
        self.written: list[str] = []
        self._lut = train_id_to_label_id_lut() if self.layout.encoding == "labelids" else None
        for folder in (self.layout.label_folder, *self.layout.extra):
            (self.out_dir / folder).mkdir(parents=True, exist_ok=True)

    @property
    def needs_confidence(self) -> bool:
        return "confidence" in self.layout.extra

    def _save(self, rel: str, array: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(array).save(self.out_dir / rel)
        self.written.append(rel)

    def write(self, batch: dict, pred, confidence=None, index: int = 0) -> None:
        import torch

        if isinstance(pred, torch.Tensor):
            pred = pred.detach().to("cpu", torch.uint8).numpy()
        pred = np.asarray(pred, np.uint8).reshape(np.shape(pred)[-2:])
        name = prediction_name(self.fmt, batch.get("name"), batch.get("file"), index)
        labels = self._lut[pred] if self._lut is not None else pred
        self._save(f"{self.layout.label_folder}/{name}", labels)
        if not self.needs_confidence:
            return
        if confidence is None:
            raise ValueError("darkzurich format: a confidence map is needed for every prediction")
        if isinstance(confidence, torch.Tensor):
            confidence = confidence.detach().float().cpu().numpy()
        conf = np.clip(np.asarray(confidence, np.float64).reshape(pred.shape), 0.0, 1.0)
        self._save(f"confidence/{name}", np.rint(conf * CONFIDENCE_SCALE).astype(np.uint16))
        invalid = pred.copy()
        if self.invalid_below > 0:
            invalid[conf < self.invalid_below] = 255
        self._save(f"labelTrainIds_invalid/{name}", invalid)

    def finish(self) -> Path:
        """The zip to upload, holding the files written (paths relative to ``out_dir``)."""
        archive = self.out_dir / self.layout.zip_name
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in sorted(self.written):
                zf.write(self.out_dir / rel, rel)
        return archive


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------
def expected_images(dataset: str, root, split: str):
    """Entries (image path, name) of the split a submission must cover."""
    from .data.layouts import list_files, server_test_files

    if split == "test":
        return server_test_files(dataset, root)
    return list_files(dataset, root, split)


class _Tree:
    """Files of a folder or a zip archive by relative POSIX path."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            self.files = {n for n in self.zip.namelist() if not n.endswith("/")}
        else:
            self.files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}

    def open(self, rel: str):
        from PIL import Image

        if self.zip is not None:
            return Image.open(_io.BytesIO(self.zip.read(rel)))
        return Image.open(self.path / rel)


def _allowed_values(fmt: str, folder: str, num_classes: int) -> np.ndarray:
    if folder == "confidence":
        return np.ones(65536, bool)
    ok = np.zeros(256, bool)
    if SERVER_FORMATS[fmt].encoding == "labelids" and folder == SERVER_FORMATS[fmt].label_folder:
        ok[train_id_to_label_id_lut()[:num_classes]] = True
    else:
        ok[:num_classes] = True
        if folder == "labelTrainIds_invalid":
            ok[255] = True
    return ok


def _describe_values(fmt: str, folder: str, num_classes: int) -> str:
    if folder == "confidence":
        return "16-bit gray"
    if SERVER_FORMATS[fmt].encoding == "labelids" and folder == SERVER_FORMATS[fmt].label_folder:
        return "Cityscapes label ids"
    return f"train ids 0..{num_classes - 1}" + (" or 255" if folder == "labelTrainIds_invalid" else "")


def validate(path, fmt: str, split_root, split: str = "test", dataset: str | None = None,
             num_classes: int = 19) -> tuple[bool, str]:
    """(ok, one line) for the folder or zip ``path`` in format ``fmt`` against the images of
    ``split`` under the dataset folder ``split_root``: every image has its prediction (one
    per folder of the format), no stray files in those folders, each file decodes, has the
    image's size, the right bit depth and only allowed values."""
    from .data.io import image_size

    layout = SERVER_FORMATS[fmt]
    dataset = layout.dataset or dataset
    if dataset is None:
        raise ValueError("--dataset: the trainids format needs the dataset (cityscapes, darkzurich or acdc)")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"submission: {path} does not exist (expected the output folder or its zip)")
    entries = expected_images(dataset, split_root, split)
    tree = _Tree(path)
    folders = (layout.label_folder, *layout.extra)
    problems: dict[str, list[str]] = {}

    def add(kind: str, text: str) -> None:
        problems.setdefault(kind, []).append(text)

    if layout.keep_image_name:
        wanted = {prediction_name(fmt, e.name, e.image.name): e for e in entries}
    else:  # trainids: <name>.png or <name>_*.png (test images keep their _rgb_anon suffix)
        wanted = {}
        present = {Path(r).name for r in tree.files if r.startswith(layout.label_folder + "/")}
        for e in entries:
            hits = sorted(n for n in present if n == f"{e.name}.png" or (n.startswith(f"{e.name}_")
                                                                         and n.endswith(".png")))
            if len(hits) > 1:
                add("ambiguous", f"{layout.label_folder}/{e.name}*.png ({len(hits)} files)")
            wanted[hits[0] if hits else f"{e.name}.png"] = e
    sizes: dict[Path, tuple[int, int]] = {}
    for folder in folders:
        for name, entry in wanted.items():
            rel = f"{folder}/{name}"
            if rel not in tree.files:
                add("missing", rel)
                continue
            try:
                with tree.open(rel) as im:
                    mode, (w, h) = im.mode, im.size
                    arr = np.asarray(im)
            except Exception as exc:  # noqa: BLE001 - any decoder error is "unreadable"
                add("unreadable", f"{rel} ({type(exc).__name__})")
                continue
            if entry.image not in sizes:
                sizes[entry.image] = image_size(entry.image)
            want_h, want_w = sizes[entry.image]
            if (h, w) != (want_h, want_w):
                add("wrong size", f"{rel} is {w}x{h}, the image {want_w}x{want_h}")
                continue
            sixteen = mode in ("I;16", "I;16B", "I;16L", "I")
            if (folder == "confidence") != sixteen or (not sixteen and mode not in ("L", "P")):
                want = "16-bit gray" if folder == "confidence" else "8-bit gray"
                add("wrong bit depth", f"{rel} has PIL mode {mode}, expected {want}")
                continue
            arr = arr.astype(np.int64)
            allowed = _allowed_values(fmt, folder, num_classes)
            if arr.min() < 0 or arr.max() >= allowed.size or not allowed[arr].all():
                bad = sorted(set(np.unique(arr).tolist()) - set(np.flatnonzero(allowed).tolist()))[:3]
                add("bad values", f"{rel} holds {bad}, expected {_describe_values(fmt, folder, num_classes)}")
        expected = {f"{folder}/{n}" for n in wanted}
        for rel in sorted(r for r in tree.files if r.startswith(folder + "/") and r not in expected):
            add("unexpected", rel)
    n = len(entries)
    what = f"{fmt} submission {path} for {dataset} {split} ({n} images)"
    if not problems:
        h, w = next(iter(sizes.values()))
        same = all(s == (h, w) for s in sizes.values())
        return True, (f"OK: {what}: every image has its {' + '.join(folders)} file, "
                      f"{f'{w}x{h}' if same else 'image-sized'}, values right")
    parts = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in problems.items()]
    return False, f"INVALID: {what}: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sepico_fast.submission",
                                description="Check a prediction folder or zip against the images of a split "
                                            "(one line; exit 0 ready to upload, 1 missing/wrong files, 2 bad "
                                            "arguments).")
    p.add_argument("path", help="the --out folder of python -m sepico_fast.evaluate, or its zip")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--split-root", required=True, help="the dataset folder (e.g. data/cityscapes, data/acdc)")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--dataset", default=None, choices=("cityscapes", "darkzurich", "acdc"),
                   help="only for --format trainids (the other formats name their dataset)")
    return p


def main(argv=None) -> int:
    from .data.layouts import LayoutError

    args = build_parser().parse_args(argv)
    try:
        ok, line = validate(args.path, args.format, args.split_root, args.split, args.dataset)
    except LayoutError as err:  # before ValueError: a LayoutError is one
        print(f"error: --split-root: {err}", file=sys.stderr)
        return 2
    except zipfile.BadZipFile as err:
        print(f"error: {args.path}: not a readable zip ({err})", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
