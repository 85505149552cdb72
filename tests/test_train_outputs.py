"""What a run leaves for a person to look at: titled debug pictures, curves.png, TensorBoard."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.train.debug_images import COLUMNS, PALETTE, TITLES, save_debug_images, title_row


def _vis(b=2, h=48, w=64):
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.randn(b, 3, h, w, generator=g)  # noqa: E731
    lbl = lambda: torch.randint(0, 19, (b, 1, h, w), generator=g)  # noqa: E731
    gray = lambda: torch.rand(b, h, w, generator=g)  # noqa: E731
    return dict(source=img(), source_strong=img(), source_gt=lbl(), source_pseudo=lbl()[:, 0], target=img(),
                pseudo_label=lbl()[:, 0], pseudo_weight=gray(), mix_mask=gray(), mixed_img=img(), mixed_label=lbl())


def test_debug_picture_carries_column_titles(tmp_path):
    vis = _vis()
    path = save_debug_images(vis, tmp_path / "debug" / "iter_000000.png")
    pic = np.asarray(Image.open(path).convert("RGB"))
    widths = [64 + 2] * len(COLUMNS)
    header = title_row([TITLES[n] for n, _ in COLUMNS], widths)
    hh = header.shape[0]
    assert hh >= 11 and pic.shape == (hh + 2 * (48 + 2), sum(widths), 3)
    assert np.array_equal(pic[:hh], header)
    for c in range(len(COLUMNS)):  # ink (dark text pixels) above every column
        assert (pic[:hh, c * 66:(c + 1) * 66] < 128).any(), COLUMNS[c][0]
    # The tiles sit right under the header: source label of sample 1 in column 2.
    y0 = hh + 48 + 2
    want = PALETTE[vis["source_gt"][1, 0].numpy()]
    assert np.array_equal(pic[y0:y0 + 48, 2 * 66:2 * 66 + 64], want)
    assert (tmp_path / "debug" / "columns.txt").read_text().startswith("source, source_strong")


def test_long_titles_wrap_inside_narrow_columns():
    header = title_row(["teacher on source", "x"], [34, 34])
    one_line = title_row(["x", "x"], [34, 34])
    assert header.shape[0] > one_line.shape[0]  # wrapped onto more lines, not spilled sideways


def _fake_scalars(path):
    rows = []
    for it in range(10, 101, 10):
        rows.append({"iter": it, "src_ce": 2.0 / it, "mix_ce": 1.0 / it, "pseudo_q": it / 100, "lr": 1e-3,
                     "images_per_s": 50.0, "skipped_steps": 0})
    rows.append({"iter": 50, "val/miou": 20.0})
    rows.append({"iter": 100, "val/miou": 30.0})
    rows.append({"iter": 100, "src_ce": 0.5})  # a resumed run repeating iteration 100: last wins
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"iter\": 110, \"src_c")  # cut last line


def test_read_scalars_merges_lines_and_keeps_the_last_value(tmp_path):
    from sepico_fast.train.curves import read_scalars

    _fake_scalars(tmp_path / "scalars.jsonl")
    s = read_scalars(tmp_path / "scalars.jsonl")
    assert s["val/miou"] == [(50, 20.0), (100, 30.0)]
    assert s["src_ce"][-1] == (100, 0.5) and len(s["src_ce"]) == 10
    assert [it for it, _ in s["pseudo_q"]] == list(range(10, 101, 10))


def test_curves_png_has_one_panel_per_quantity(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (plots extra) is not installed")
    from sepico_fast.train.curves import update_curves

    _fake_scalars(tmp_path / "scalars.jsonl")
    out = update_curves(tmp_path, "test run")
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert out == tmp_path / "curves.png" and pic.shape == (600, 1260, 3)  # 2 rows x 3 columns of panels
    # Five panels have data (losses, q, lr, img/s, mIoU): five axes frames, the sixth cell stays blank.
    cells = [pic[r * 300 + 40:(r + 1) * 300 - 40, c * 420 + 60:(c + 1) * 420 - 20] for r in range(2) for c in range(3)]
    inked = [(cell < 200).mean() for cell in cells]
    assert all(v > 0.01 for v in inked[:5]) and inked[5] < 1e-3


def test_curves_and_tensorboard_say_so_when_missing(tmp_path, monkeypatch, capsys):
    import sys

    from sepico_fast.train import curves
    from sepico_fast.train.logging import ScalarWriter

    _fake_scalars(tmp_path / "scalars.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setattr(curves, "_MISSING_SAID", False)
    assert curves.update_curves(tmp_path) is None and curves.update_curves(tmp_path) is None
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    writer = ScalarWriter(tmp_path / "w")
    writer.write(1, {"a": 1.0})
    writer.close()
    out = capsys.readouterr().out.splitlines()
    assert out.count("curves.png skipped: matplotlib is not installed (pip install matplotlib, or the [plots] "
                     "extra)") == 1
    assert len(out) == 2 and out[1].startswith(f"scalars: {tmp_path / 'w' / 'scalars.jsonl'} only, no TensorBoard")
    assert not (tmp_path / "curves.png").exists() and not writer.tensorboard


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (tb extra) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sepico_fast.train.logging import ScalarWriter

    writer = ScalarWriter(tmp_path)
    assert writer.tensorboard
    for it in (1, 2, 3):
        writer.write(it, {"src_ce": 1.0 / it, "val/miou": 10.0 * it})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"src_ce", "val/miou"}
    assert [(e.step, e.value) for e in acc.Scalars("val/miou")] == [(1, 10.0), (2, 20.0), (3, 30.0)]
