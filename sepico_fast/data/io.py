"""Reading and writing images and label maps.

* Images: any format PIL reads, returned as uint8 RGB ``[H, W, 3]``.
* 8-bit labels (GTA palette PNGs, Cityscapes ``labelIds``, our ``labelTrainIds``): the
  stored values (palette indices / gray levels), uint8 ``[H, W]``.
* 16-bit PNGs (SYNTHIA labels): PIL silently keeps only the high byte of each 16-bit RGB
  sample, which turns every SYNTHIA class id (< 256) into 0. ``read_png16`` keeps all 16
  bits: its fast path lets PIL's C decoder un-filter the stream twice, once unpacking the
  high bytes and once the low bytes (``RGB;16B`` / ``RGB;16L`` raw modes); the reference
  path is a self-contained zlib + numpy decoder (``decode_png``) used when the fast path
  is not available and by the tests to cross-check it.
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..reporting import first_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type → samples per pixel (palette excluded)


class DataFileError(Exception):
    """A data file that cannot be read; ``str()`` is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str, action: str = "read"):
        self.path = str(path)
        self.reason = reason
        self.action = action
        super().__init__(f"cannot {action} {self.path}: {reason}")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")


# Largest difference of aspect ratio (relative) between a label and its image that is still
# resized onto it as the authors' pipeline does (a few GTA labels have another size); a
# larger one would stretch the label over the wrong pixels and is refused.
RATIO_TOLERANCE = 0.05
# The label ids a raw label of each dataset may hold: Cityscapes label ids 0..33 (the
# official label definitions; GTA5 uses them as palette indices), and 255 (the id -1 of
# "license plate" as an unsigned byte). Any other value is a re-encoded or re-coloured label.
MAX_LABEL_ID = {"gta": 33, "cityscapes": 33}
UNSIGNED_MINUS_ONE = 255


@contextlib.contextmanager
def _open(path: str | os.PathLike):
    """``Image.open`` whose pixel-limit guard (``PIL.Image.MAX_IMAGE_PIXELS``; a warning past
    it, an error past twice it) is a one-line DataFileError naming the file either way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataFileError(path, f"{first_line(exc).split(',')[0]} (PIL.Image.MAX_IMAGE_PIXELS, PIL's guard "
                                  "against decompression bombs): not an image of a dataset") from None
    with im:
        yield im


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB ``[H, W, 3]``."""
    try:
        with _open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB") if im.mode != "RGB" else im)
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as exc:
        raise DataFileError(path, _reason(exc)) from None
    return arr


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) read from the file header, without decoding the pixels."""
    try:
        with _open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataFileError(path, _reason(exc)) from None
    return h, w


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit single-channel label map (palette indices or gray levels), uint8 ``[H, W]``.

    Only PNG files: a lossy format (a JPEG renamed ``.png``) changes the values at every
    class edge, which no value check can see."""
    try:
        with _open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"a {im.format or 'non-PNG'} file, not a PNG: a lossy format changes label values "
                                 "at every class edge; use the label as distributed (PNG)")
            im.load()
            if im.mode in ("P", "L"):
                arr = np.array(im)
            elif im.mode in ("I;16", "I;16B", "I"):
                arr = np.array(im)
                if arr.size and int(arr.max()) > 255:
                    raise ValueError(f"label values up to {int(arr.max())} do not fit 8 bits")
                arr = arr.astype(np.uint8)
            else:
                raise ValueError(f"expected a palette or gray-level label PNG, got PIL mode {im.mode}")
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as exc:
        raise DataFileError(path, _reason(exc)) from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def check_train_ids(label: np.ndarray, path: str | os.PathLike, num_classes: int = 19,
                    ignore_index: int = 255) -> np.ndarray:
    """``label`` if every pixel is a train id (0..num_classes-1) or ``ignore_index``, else a
    DataFileError naming ``path`` (a wrong value would otherwise surface as an index error
    deep inside a loss, naming no file)."""
    if label.size and int(label.max()) >= num_classes:
        bad = (label >= num_classes) & (label != ignore_index)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
            raise DataFileError(path, f"value {shown} is not a train id (0..{num_classes - 1} or {ignore_index}; "
                                      f"{int(bad.sum())} pixels)", "use")
    return label


def check_label_ids(label: np.ndarray, path: str | os.PathLike, dataset: str) -> np.ndarray:
    """``label`` if its values are label ids of ``dataset`` (``MAX_LABEL_ID``), else a
    DataFileError naming ``path``: a label re-encoded through a lossy format or re-coloured."""
    top = MAX_LABEL_ID.get(dataset)
    if top is not None and label.size and int(label.max()) > top:
        bad = (label > top) & (label != UNSIGNED_MINUS_ONE)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
            raise DataFileError(path, f"value {shown} is not a Cityscapes label id (0..{top} or 255 for -1; "
                                      f"{int(bad.sum())} pixels): a re-encoded (lossy) or re-coloured label? use the "
                                      "label as distributed", "use")
    return label


def check_label_shape(label_hw, image_hw, label_path: str | os.PathLike, image_path: str | os.PathLike) -> None:
    """A DataFileError naming ``label_path`` when the label's aspect ratio differs from its
    image's by more than ``RATIO_TOLERANCE`` (it would be stretched over the wrong pixels).
    A label of another size but the same shape is resized onto the image (nearest), as the
    authors' pipeline resizes it."""
    (lh, lw), (ih, iw) = (int(v) for v in label_hw[:2]), (int(v) for v in image_hw[:2])
    if (lh, lw) == (ih, iw) or abs(lh * iw - ih * lw) <= RATIO_TOLERANCE * ih * lw:
        return
    raise DataFileError(label_path, f"label is {lh}x{lw} (HxW) but its image {image_path} is {ih}x{iw}: another "
                                    "aspect ratio, the label would be stretched over the wrong pixels", "use")


def read_train_ids(path: str | os.PathLike, num_classes: int = 19, ignore_index: int = 255) -> np.ndarray:
    """``read_label`` + ``check_train_ids``: an 8-bit train-id map whose values are valid."""
    return check_train_ids(read_label(path), path, num_classes, ignore_index)


def write_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a uint8 ``[H, W]`` map as an 8-bit gray PNG, atomically (temp file + rename)."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label: expected uint8 [H, W], got {label.dtype} {list(label.shape)}")
    atomic_write(path, lambda tmp: Image.fromarray(label, mode="L").save(tmp, format="PNG", compress_level=3))


def atomic_write(path: str | os.PathLike, write) -> Path:
    """``write(tmp)`` into a temp file next to ``path``, then rename it to ``path``. On any
    failure (a full disk, an unwritable folder, an interrupt) the temp file is removed: no
    empty or half-written file stays behind, and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


TEMP_PREFIX = ".sepico_tmp."  # temp files of the atomic writes: ``remove_temp_files`` finds them


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_temp_files(folders) -> int:
    """Delete the temp files of ``atomic_write`` in ``folders`` (recursively) whose writer
    process is gone (killed, or stopped by a full disk); a live writer's are kept."""
    removed = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.rglob(f"{TEMP_PREFIX}*.tmp"):
            pid = p.name[:-len(".tmp")].rsplit(".", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def os_reason(exc: OSError) -> str:
    """``strerror`` of an OSError (also when it was raised with an errno only)."""
    if exc.strerror:
        return exc.strerror
    if isinstance(exc.errno, int):
        return os.strerror(exc.errno)
    return first_line(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- 16-bit PNG

def read_png16(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG keeping 16-bit samples: uint16 ``[H, W, C]`` (C = 1, 2, 3 or 4, file order RGB)."""
    arr = _read_png16_pil(path)
    if arr is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DataFileError(path, _reason(exc)) from None
        try:
            arr = decode_png(data)
        except (ValueError, zlib.error) as exc:
            raise DataFileError(path, _reason(exc)) from None
    return arr.astype(np.uint16, copy=False) if arr.dtype != np.uint16 else arr


def _read_png16_pil(path: str | os.PathLike) -> np.ndarray | None:
    """PIL fast path for 16-bit RGB PNGs (None when the file is not one, or PIL changed)."""
    try:
        with _open(path) as probe:
            if probe.format != "PNG":
                raise ValueError(f"expected a PNG file, got {probe.format}")
            tile = probe.tile
            if probe.mode != "RGB" or len(tile) != 1 or tuple(tile[0])[0] != "zip" \
                    or tuple(tile[0])[3] != "RGB;16B":
                if probe.mode in ("I;16", "I;16B"):
                    probe.load()
                    return np.asarray(probe).astype(np.uint16)[..., None]
                return None
        planes = []
        for rawmode in ("RGB;16B", "RGB;16L"):  # high bytes, then low bytes of every sample
            with _open(path) as im:
                codec, extents, offset, _ = tuple(im.tile[0])
                im.tile = [type(im.tile[0])(codec, extents, offset, rawmode)]
                im.load()
                planes.append(np.asarray(im).astype(np.uint16))
        return (planes[0] << 8) | planes[1]
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as exc:
        raise DataFileError(path, _reason(exc)) from None
    except (TypeError, AttributeError, IndexError):
        return None  # PIL internals differ from what the fast path expects: use decode_png


def decode_png(data: bytes) -> np.ndarray:
    """Reference PNG decoder (zlib + numpy): non-interlaced gray/RGB(A), 8 or 16 bits per sample.

    Un-filtering (PNG spec §9): byte x of a row is ``raw[x] + pred`` (mod 256) with the
    predictor from the left byte a (same sample lane one pixel back), the byte above b
    and above-left c: 0 none, 1 a, 2 b, 3 floor((a+b)/2), 4 Paeth(a, b, c). Rows with
    filters 1, 3, 4 are sequential along x and rows depend on the row above, so the
    loop runs over anti-diagonals (y + x = d): every pixel on one is independent of the
    others, which turns H·W scalar steps into H+W vector steps.
    """
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) != length:
            raise ValueError(f"truncated {ctype.decode('latin1')} chunk")
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("missing IHDR or IDAT chunk")
    width, height, depth, colour, _, _, interlace = header
    if colour not in _CHANNELS or depth not in (8, 16):
        raise ValueError(f"unsupported PNG colour type {colour} / bit depth {depth}")
    if interlace:
        raise ValueError("interlaced PNGs are not supported by the reference decoder")
    channels = _CHANNELS[colour]
    bpp = channels * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if raw.size != height * (1 + width * bpp):
        raise ValueError(f"decompressed size {raw.size} does not match {width}x{height}")
    raw = raw.reshape(height, 1 + width * bpp)
    filters = raw[:, 0].astype(np.int64)
    if filters.size and filters.max() > 4:
        raise ValueError(f"invalid PNG filter type {int(filters.max())}")
    pixels = _unfilter(raw[:, 1:].reshape(height, width, bpp), filters)
    if depth == 16:
        pixels = pixels.reshape(height, width, channels, 2)
        return (pixels[..., 0].astype(np.uint16) << 8) | pixels[..., 1]
    return pixels.reshape(height, width, channels)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter(rows: np.ndarray, filters: np.ndarray) -> np.ndarray:
    height, width, bpp = rows.shape
    out = np.zeros((height + 1, width + 1, bpp), dtype=np.int64)  # zero row above / column left
    src = rows.astype(np.int64)
    for d in range(height + width - 1):
        ys = np.arange(max(0, d - width + 1), min(height, d + 1))
        xs = d - ys
        a, b, c = out[ys + 1, xs], out[ys, xs + 1], out[ys, xs]
        f = filters[ys][:, None]
        pred = np.where(f == 1, a, np.where(f == 2, b, np.where(f == 3, (a + b) >> 1,
                        np.where(f == 4, _paeth(a, b, c), 0))))
        out[ys + 1, xs + 1] = (src[ys, xs] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def encode_png(array: np.ndarray, filters: int | list[int] = 0, *, palette: list[int] | None = None) -> bytes:
    """Minimal PNG encoder (8/16-bit gray, RGB, RGBA, or 8-bit palette) with chosen row filters.

    ``filters`` is one filter type for every row or a list cycled over the rows; writing
    every filter type exercises each branch of a decoder.
    """
    arr = np.asarray(array)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"array: expected uint8 or uint16, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    height, width, channels = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    if palette is not None:
        if depth != 8 or channels != 1:
            raise ValueError("palette PNGs need a uint8 [H, W] index array")
        colour = 3
    else:
        colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = channels * depth // 8
    rows = arr.astype(">u2").view(np.uint8) if depth == 16 else arr
    rows = rows.reshape(height, width * bpp).astype(np.int64)
    kinds = [filters] if isinstance(filters, int) else list(filters)
    out = bytearray()
    prior = np.zeros(width * bpp, dtype=np.int64)
    for y in range(height):
        f = kinds[y % len(kinds)]
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        pred = {0: 0, 1: left, 2: prior, 3: (left + prior) >> 1, 4: _paeth(left, prior, upleft)}[f]
        out.append(f)
        out += ((row - pred) & 255).astype(np.uint8).tobytes()
        prior = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", bytes(palette[:768]))
    return png + chunk(b"IDAT", zlib.compress(bytes(out), 6)) + chunk(b"IEND", b"")
