"""pseudo_label (torch path) against a per-pixel softmax/max reference and the upstream version."""
import math

import pytest
import torch

from sepico_fast import ops
from sepico_fast.ops.upstream import upstream_pseudo_label


def slow_pseudo_label(logits, threshold):
    """Per pixel: softmax in double, max and first arg-max; q = confident / all pixels.

    The threshold is compared in fp32, as torch compares an fp32 tensor with a Python float.
    """
    threshold32 = float(torch.tensor(threshold, dtype=torch.float32))
    batch, classes, height, width = logits.shape
    prob = torch.empty(batch, height, width)
    label = torch.empty(batch, height, width, dtype=torch.int64)
    confident = 0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                values = [float(logits[b, c, y, x]) for c in range(classes)]
                top = max(values)
                denom = sum(math.exp(v - top) for v in values)
                prob[b, y, x] = 1.0 / denom
                label[b, y, x] = values.index(top)  # first maximal class
                confident += float(prob[b, y, x]) >= threshold32
    return prob, label, confident / (batch * height * width)


def test_matches_slow_softmax_max_reference():
    g = torch.Generator().manual_seed(0)
    scale = 10 * torch.rand(2, 1, 6, 9, generator=g)  # spreads confidence over (1/C, 1)
    logits = scale * torch.randn(2, 19, 6, 9, generator=g)
    prob, label, q = ops.pseudo_label(logits, 0.968, impl="torch")
    ref_prob, ref_label, ref_q = slow_pseudo_label(logits, 0.968)
    assert prob.dtype == torch.float32 and label.dtype == torch.int64
    assert q.dtype == torch.float32 and q.dim() == 0
    torch.testing.assert_close(prob, ref_prob, rtol=1e-6, atol=1e-7)
    assert torch.equal(label, ref_label)
    assert 0 < ref_q < 1
    assert q.item() == pytest.approx(ref_q, abs=1e-7)


def test_ties_pick_the_first_class_and_threshold_is_inclusive():
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, 1, 0, 0] = logits[0, 3, 0, 0] = 5.0   # tie between 1 and 3
    logits[0, :, 0, 1] = 2.0                        # all equal: class 0, prob 1/4
    logits[0, 2, 0, 2] = 30.0                       # confident
    prob, label, q = ops.pseudo_label(logits, impl="torch")
    assert label.tolist() == [[[1, 0, 2]]]
    assert prob[0, 0, 1].item() == pytest.approx(0.25)
    assert q.item() == pytest.approx(1 / 3)
    # A pixel whose probability equals the threshold counts as confident (p >= threshold).
    _, _, q_at = ops.pseudo_label(logits, threshold=prob[0, 0, 0].item(), impl="torch")
    assert q_at.item() == pytest.approx(2 / 3)


def test_half_precision_logits_and_upstream_agreement():
    g = torch.Generator().manual_seed(1)
    logits = (8 * torch.randn(2, 5, 7, 7, generator=g)).to(torch.bfloat16)
    prob, label, q = ops.pseudo_label(logits, 0.9, impl="torch")
    up_prob, up_label, up_q = upstream_pseudo_label(logits.float(), 0.9)
    torch.testing.assert_close(prob, up_prob)
    assert torch.equal(label, up_label)
    assert q.item() == pytest.approx(up_q, abs=1e-7)


def test_bad_logits_raise_value_errors():
    with pytest.raises(ValueError, match="logits"):
        ops.pseudo_label(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="logits"):
        ops.pseudo_label(torch.zeros(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="impl"):
        ops.pseudo_label(torch.zeros(1, 3, 2, 2), impl="fast")


def test_the_trainer_takes_pseudo_labels_from_this_op_without_day_images(monkeypatch):
    """train_step's teacher pass calls ops.pseudo_label on the upsampled logits (plain path);
    the Dark Zurich fusion needs the probabilities and keeps softmax + fusion."""
    from types import SimpleNamespace

    from sepico_fast.train import step

    calls, real = [], ops.pseudo_label

    def spy(logits, threshold=0.968, **kw):
        calls.append((tuple(logits.shape), threshold))
        return real(logits, threshold, **kw)

    monkeypatch.setattr(step.ops, "pseudo_label", spy)
    def predict(img):  # 5-class logits at 1/4 resolution
        return img[:, :1, ::4, ::4] * torch.arange(5.0).view(1, 5, 1, 1)

    teacher = SimpleNamespace(predict=predict)
    cfg = SimpleNamespace(pseudo_threshold=0.5, day_ratio=0.8)
    ctx = SimpleNamespace(cfg=cfg, teacher=teacher, device=torch.device("cpu"), amp_dtype=None, class_weight=None,
                          static=None)
    img = torch.rand(2, 3, 16, 24)
    prob, label, q = step.teacher_pseudo_labels(ctx, img, None)
    assert calls == [((2, 5, 16, 24), 0.5)] and prob.shape == label.shape == (2, 16, 24)
    ref = torch.softmax(torch.nn.functional.interpolate(teacher.predict(img), size=(16, 24), mode="bilinear"), 1)
    torch.testing.assert_close(prob, ref.max(1).values)
    step.teacher_pseudo_labels(ctx, img, img.flip(-1))
    assert len(calls) == 1  # day/night fusion: softmax + fusion, not this op
