"""16-bit PNG reading (SYNTHIA), label reading and clear errors for unreadable files."""
import numpy as np
import pytest
from PIL import Image

from sepico_fast.data import io


@pytest.mark.parametrize("filters", [0, 1, 2, 3, 4, [0, 1, 2, 3, 4]])
def test_png16_rgb_every_filter(tmp_path, filters):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, (13, 21, 3), dtype=np.uint16)
    arr[..., 0] = rng.integers(0, 34, (13, 21))  # SYNTHIA-like class ids in R
    data = io.encode_png(arr, filters)
    np.testing.assert_array_equal(io.decode_png(data), arr)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    out = io.read_png16(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)
    # PIL alone keeps only the high byte of each sample
    np.testing.assert_array_equal(np.asarray(Image.open(path)), (arr >> 8).astype(np.uint8))


def test_decode_png_8bit_and_gray16(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(io.decode_png(io.encode_png(rgb, [4, 3])), rgb)
    gray = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
    path = tmp_path / "g.png"
    path.write_bytes(io.encode_png(gray, 1))
    np.testing.assert_array_equal(io.read_png16(path)[..., 0], gray)


def test_read_label_palette_and_gray(tmp_path):
    ids = np.arange(40 * 7, dtype=np.int64).reshape(7, 40) % 34
    ids = ids.astype(np.uint8)
    p = tmp_path / "p.png"
    p.write_bytes(io.encode_png(ids, palette=list(range(256)) * 3))
    np.testing.assert_array_equal(io.read_label(p), ids)
    g = tmp_path / "g.png"
    Image.fromarray(ids).save(g)
    np.testing.assert_array_equal(io.read_label(g), ids)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(io.DataFileError, match="rgb.png.*mode RGB"):
        io.read_label(rgb)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 3)
    for reader in (io.read_image, io.read_label, io.read_png16):
        with pytest.raises(io.DataFileError) as exc:
            reader(bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(io.DataFileError, match="missing.png"):
        io.read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="signature"):
        io.decode_png(b"not a png")


def test_label_id_set_and_label_shape_checks(tmp_path):
    ids = np.array([[0, 7, 33, 255]], np.uint8)  # 255: the id -1 ("license plate") as an unsigned byte
    assert io.check_label_ids(ids, "a.png", "cityscapes") is ids
    with pytest.raises(io.DataFileError, match=r"a.png: value 34, 200 is not a Cityscapes label id \(0..33 or 255"):
        io.check_label_ids(np.array([[34, 200, 7]], np.uint8), "a.png", "gta")
    assert io.check_label_ids(np.array([[200]], np.uint8), "a.png", "darkzurich") is not None  # train ids: not here
    io.check_label_shape((1052, 1914), (1052, 1914), "l.png", "i.png")
    io.check_label_shape((720, 1280), (1052, 1914), "l.png", "i.png")  # 2.3 % apart: resized onto the image
    io.check_label_shape((48, 80), (24, 40), "l.png", "i.png")         # the same shape at twice the size
    for label_hw in ((24, 20), (40, 24), (27, 40)):
        with pytest.raises(io.DataFileError, match=r"l.png: label is .* but its image i.png is 24x40: another aspect"):
            io.check_label_shape(label_hw, (24, 40), "l.png", "i.png")
    png = tmp_path / "l.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="JPEG")
    with pytest.raises(io.DataFileError, match="l.png: ValueError: a JPEG file, not a PNG"):
        io.read_label(png)
