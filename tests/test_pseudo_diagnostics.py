"""--pseudo-diagnostics: counts vs a per-pixel loop, the data it needs, and that it never
changes the training (weights bitwise equal with and without it)."""
import json
import math

import numpy as np
import pytest
import torch

from sepico_fast.train import make_config
from sepico_fast.train.pseudo_diagnostics import PseudoDiagnostics
from sepico_fast.train.runner import run


def _loop_metrics(prob, plabel, gt, thr, c, top=0, bottom=0):
    """Independent formulation: walk every pixel, count per class."""
    tp = np.zeros(c); pred = np.zeros(c); lab = np.zeros(c); tp_t = np.zeros(c); pred_t = np.zeros(c)
    b, h, w = plabel.shape
    for i in range(b):
        for y in range(top, h - bottom):
            for x in range(w):
                g, p = int(gt[i, y, x]), int(plabel[i, y, x])
                if g == 255:
                    continue
                lab[g] += 1
                pred[p] += 1
                tp[p] += p == g
                if prob[i, y, x] >= thr:
                    pred_t[p] += 1
                    tp_t[p] += p == g
    nan = float("nan")
    out = {}
    for k in range(c):
        out[k] = (tp[k] / pred[k] if pred[k] else nan, tp[k] / lab[k] if lab[k] else nan,
                  tp_t[k] / pred_t[k] if pred_t[k] else nan, tp_t[k] / lab[k] if lab[k] else nan)
    return out, tp.sum() / lab.sum(), tp_t.sum() / pred_t.sum()


def test_counts_match_a_per_pixel_loop():
    c, thr = 5, 0.6
    g = torch.Generator().manual_seed(0)
    diag = PseudoDiagnostics(c, thr, torch.device("cpu"), ignore_rows=(1, 2))
    batches = []
    for _ in range(3):  # accumulated over several updates
        plabel = torch.randint(0, c, (2, 9, 7), generator=g)
        gt = torch.where(torch.rand(2, 9, 7, generator=g) < 0.6, plabel, torch.randint(0, c, (2, 9, 7), generator=g))
        gt[torch.rand(2, 9, 7, generator=g) < 0.2] = 255
        gt[:, :, 0] = 4  # class 4 only ever labelled in column 0 ...
        plabel[plabel == 4] = 3  # ... and never predicted: precision undefined, coverage 0
        prob = torch.rand(2, 9, 7, generator=g)
        diag.update(prob, plabel, gt.unsqueeze(1))
        batches.append((prob, plabel, gt))
    diag.stage()
    scalars = diag.collect()
    prob, plabel, gt = (torch.cat(t) for t in zip(*batches))
    want, acc, acc_thr = _loop_metrics(prob, plabel, gt, thr, c, top=1, bottom=2)
    names = ["road", "sidewalk", "building", "wall", "fence"]
    for k, name in enumerate(names):
        for metric, v in zip(("precision", "coverage", "precision_thr", "coverage_thr"), want[k]):
            key = f"pseudo/{metric}/{name}"
            if math.isnan(v):
                assert key not in scalars
            else:
                assert scalars[key] == pytest.approx(100 * v, abs=1e-9), key
    assert "pseudo/precision/fence" not in scalars and scalars["pseudo/coverage/fence"] == 0.0
    assert scalars["pseudo/accuracy"] == pytest.approx(100 * acc)
    assert scalars["pseudo/accuracy_thr"] == pytest.approx(100 * acc_thr)
    assert scalars["pseudo/precision_mean"] == pytest.approx(100 * np.mean([want[k][0] for k in range(4)]))
    table = diag.table()
    assert "fence" in table and "n/a" in table and "class mean" in table
    diag.stage()
    assert diag.collect() == {}  # counters restarted after each stage


def test_target_labels_follow_image_resize_and_flip():
    from sepico_fast.data import build_datasets
    from sepico_fast.data.loader import TrainLoader
    from sepico_fast.data.transforms import resize_label

    _, target, _ = build_datasets("synthetic", "synthetic", target_labels=True)
    flips = set()
    for seed in range(6):
        plan = target.plan(np.random.default_rng(seed))
        out = target.render(plan)
        lbl = resize_label(target.label(plan.index), plan.resized)
        lbl = lbl[:, ::-1] if plan.flip else lbl
        assert out["gt"].shape == (1, *out["img"].shape[-2:]) and out["gt"].dtype == torch.int64
        assert np.array_equal(out["gt"][0].numpy(), lbl)
        flips.add(plan.flip)
    assert flips == {True, False}
    source, _, _ = build_datasets("synthetic", "synthetic")
    loader = TrainLoader(source, target, 2, 0, pipeline="auto")
    assert loader.pipeline == "torch" and loader.batch(0)[1]["gt"].shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="--pseudo-diagnostics needs the target labels.*--pipeline torch"):
        TrainLoader(source, target, 2, 0, pipeline="dali")


def test_flag_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match=r"--pseudo-diagnostics: needs --method sepico"):
        make_config(dict(pseudo_diagnostics=True, method="source_only"))
    with pytest.raises(ValueError, match=r"--pseudo-diagnostics: .*Dark Zurich train has no labels"):
        make_config(dict(pseudo_diagnostics=True, source="cityscapes", target="darkzurich"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(work_dir, **kw):
    base = dict(iters=4, crop=[32, 32], batch_size=1, contrast_start=2, warmup_iters=1, log_interval=2,
                checkpoint_interval=0, debug_interval=0, eval_interval=2, eval_max_images=1, num_workers=0,
                work_dir=str(work_dir), deterministic=True, proj_dim=16, seed=5, pseudo_threshold=0.2)
    base.update(kw)
    return make_config(base)


def test_training_is_identical_with_and_without_diagnostics(tmp_path, one_thread, capsys):
    run(_cfg(tmp_path / "plain"))
    run(_cfg(tmp_path / "diag", pseudo_diagnostics=True))
    out = capsys.readouterr().out
    a = torch.load(tmp_path / "plain" / "latest.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "diag" / "latest.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "diag" / "scalars.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "pseudo/accuracy" in r]
    assert [r["iter"] for r in logged] == [2, 4]  # logging steps only
    assert all(0 <= r["pseudo/coverage_mean"] <= 100 for r in logged)
    plain_rows = (tmp_path / "plain" / "scalars.jsonl").read_text()
    assert "pseudo/" not in plain_rows
    assert out.count("pseudo labels vs target labels (synthetic train, up to iteration") == 2  # eval at 2, final
    assert "prec@thr" in (tmp_path / "diag" / "pseudo_diagnostics.txt").read_text()
    assert (tmp_path / "diag" / "curves.png").is_file()
