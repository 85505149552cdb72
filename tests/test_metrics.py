"""ConfusionMatrix on hand-checked examples and against a direct count."""
import math

import pytest
import torch

from sepico_fast.metrics import ConfusionMatrix


def test_known_example_with_ignore_and_absent_class():
    cm = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 3, 1]])  # the 3 sits on an ignored pixel: not counted
    cm.update(pred, target)
    assert cm.state.tolist() == [[1, 1, 0, 0],
                                 [0, 3, 0, 0],
                                 [1, 0, 1, 0],
                                 [0, 0, 0, 0]]
    iou = cm.iou()
    # class 0: TP 1, FP 1 (from gt 2), FN 1 -> 1/3; class 1: TP 3, FP 1, FN 0 -> 3/4;
    # class 2: TP 1, FN 1 -> 1/2; class 3: absent from both -> NaN.
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(iou[3].item())
    assert cm.miou().item() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([2, 1]), torch.tensor([1, 1]))
    iou = cm.iou()
    assert math.isnan(iou[0].item()) and iou[1].item() == 0.5 and iou[2].item() == 0.0
    assert cm.miou().item() == pytest.approx(0.25)


def test_accumulates_and_matches_direct_count():
    g = torch.Generator().manual_seed(0)
    cm = ConfusionMatrix(19)
    total = torch.zeros(19, 19, dtype=torch.int64)
    for _ in range(3):
        target = torch.randint(0, 19, (2, 1, 16, 24), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        pred = torch.randint(0, 19, (2, 16, 24), generator=g)  # [B,H,W] vs [B,1,H,W]
        cm.update(pred, target)
        for t, p in zip(target.reshape(-1).tolist(), pred.reshape(-1).tolist()):
            if t != 255:
                total[t, p] += 1
    assert torch.equal(cm.state, total)
    cm.reset()
    assert cm.state.sum() == 0 and torch.isnan(cm.miou())


def test_validation():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    cm.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert cm.state.sum() == 0
    cm.all_reduce()  # no process group: no-op
    assert cm.state.sum() == 0


def test_iou_table_names_rows_and_averages_defined_classes():
    """reporting.iou_table (moved out of train so evaluate does not import train)."""
    from sepico_fast.data.labels import CLASSES
    from sepico_fast.reporting import first_line, iou_table

    table = iou_table([0.5, float("nan"), 1.0, 0.25], CLASSES[:3], title="cityscapes").splitlines()
    assert table[0].split() == ["class", "IoU", "%"]
    assert table[1].split() == ["road", "50.00"] and table[2].split() == ["sidewalk", "n/a"]
    assert table[3].split() == ["building", "100.00"] and table[4].split() == ["class3", "25.00"]
    assert table[5].split() == ["mIoU", "(cityscapes)", f"{100 * (0.5 + 1.0 + 0.25) / 3:.2f}"]
    assert first_line(RuntimeError("\n  first\nsecond")) == "first" and first_line(ValueError()) == ""
    assert first_line(OSError("abcdef"), 3) == "abc"
