"""TrainLoader / build_datasets on a small synthetic pair: shapes, determinism, resume, workers, ranks."""
import numpy as np
import pytest
import torch

from sepico_fast.data import IGNORE_INDEX, MEAN, STD, TrainLoader, build_datasets, val_loader
from sepico_fast.data.synthetic import SYNTHETIC_DEFAULTS

SMALL = {"num_source": 24, "num_target_train": 10, "num_target_val": 4}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synthetic")
    return build_datasets("synthetic", "synthetic", synthetic_cache=cache, synthetic_options=SMALL)


def test_batch_shapes_and_values(sets):
    src_set, tgt_set, val_set = sets
    loader = TrainLoader(src_set, tgt_set, batch_size=2, seed=0, num_iters=3, pipeline="torch")
    batches = list(loader)
    assert len(batches) == 3
    src, tgt = batches[0]
    ch, cw = SYNTHETIC_DEFAULTS["crop_size"]
    assert src["img"].shape == (2, 3, ch, cw) and src["img"].dtype == torch.float32
    assert src["gt"].shape == (2, 1, ch, cw) and src["gt"].dtype == torch.int64
    tw, th = SYNTHETIC_DEFAULTS["target_scale"]
    assert tgt["img"].shape == (2, 3, th, tw) and "ref_img" not in tgt
    values = set(torch.unique(src["gt"]).tolist())
    assert values <= set(range(19)) | {IGNORE_INDEX} and len(values) > 1
    # normalised: the extreme values come from 0..255 through (x - mean) / std
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((255 - m) / s for m, s in zip(MEAN, STD))
    assert src["img"].min() >= lo - 1e-5 and src["img"].max() <= hi + 1e-5
    assert src["img"].std() > 0.1


def test_batches_are_pure_functions_of_seed_and_iteration(sets):
    src_set, tgt_set, _ = sets
    a = list(TrainLoader(src_set, tgt_set, 2, seed=3, num_iters=4, pipeline="torch"))
    resumed = list(TrainLoader(src_set, tgt_set, 2, seed=3, start_iter=2, num_iters=2, pipeline="torch"))
    workers = list(TrainLoader(src_set, tgt_set, 2, seed=3, num_iters=4, pipeline="torch", num_workers=2))
    for (s1, t1), (s2, t2) in zip(a[2:], resumed):
        assert torch.equal(s1["img"], s2["img"]) and torch.equal(s1["gt"], s2["gt"]) and torch.equal(t1["img"], t2["img"])
    for (s1, t1), (s2, t2) in zip(a, workers):
        assert torch.equal(s1["img"], s2["img"]) and torch.equal(s1["gt"], s2["gt"]) and torch.equal(t1["img"], t2["img"])
    other_seed = next(iter(TrainLoader(src_set, tgt_set, 2, seed=4, num_iters=1, pipeline="torch")))
    assert not torch.equal(other_seed[0]["img"], a[0][0]["img"])
    rank1 = TrainLoader(src_set, tgt_set, 2, seed=3, rank=1, world_size=2, pipeline="torch").batch(0)
    assert not torch.equal(rank1[0]["img"], a[0][0]["img"])
    direct = TrainLoader(src_set, tgt_set, 2, seed=3, pipeline="torch").batch(1)
    assert torch.equal(direct[0]["img"], a[1][0]["img"]) and torch.equal(direct[1]["img"], a[1][1]["img"])


def test_rcs_favours_rare_classes(sets):
    src_set, tgt_set, _ = sets
    loader = TrainLoader(src_set, tgt_set, 4, seed=0, pipeline="torch")
    drawn = np.array([p[0].rcs_class for t in range(60) for p in loader.plans(t)])
    rcs = src_set.rcs
    freq = rcs.class_freq
    # the most frequent classes (road, building) are practically never drawn by RCS
    common = int(np.argmax(freq))
    assert (drawn == common).mean() < 0.05
    assert len(set(drawn.tolist())) >= 5
    assert np.isclose(rcs.class_prob.sum(), 1.0)


def test_val_batches(sets):
    _, _, val_set = sets
    batches = list(val_loader(val_set))
    assert len(batches) == len(val_set) == SMALL["num_target_val"]
    b = batches[0]
    ew, eh = SYNTHETIC_DEFAULTS["eval_scale"]
    assert b["img"].shape == (1, 3, eh, ew) and b["img"].dtype == torch.float32
    assert b["gt"].dtype == torch.int64 and b["gt"].shape[:2] == (1, 1)
    assert isinstance(b["name"], str) and b["name"].endswith("_000019")


def test_bad_arguments(sets):
    src_set, tgt_set, _ = sets
    with pytest.raises(ValueError, match="pipeline"):
        TrainLoader(src_set, tgt_set, 2, seed=0, pipeline="fast")
    with pytest.raises(ValueError, match="batch_size"):
        TrainLoader(src_set, tgt_set, 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        TrainLoader(src_set, tgt_set, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="source"):
        build_datasets("kitti", "cityscapes")


class _SigintState(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        import signal
        return int(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)


def test_workers_leave_ctrl_c_to_the_main_process(sets, monkeypatch):
    """A terminal's Ctrl-C also reaches the DataLoader workers: they ignore it (the main
    process stops after its iteration with a checkpoint and shuts them down)."""
    from sepico_fast.data import loader as loader_mod

    got = list(torch.utils.data.DataLoader(_SigintState(), batch_size=None, num_workers=1,
                                           worker_init_fn=loader_mod.ignore_sigint))
    assert got == [1]
    seen = {}

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(torch.utils.data, "DataLoader", fake_loader)
    src, tgt, _ = sets
    next(iter(TrainLoader(src, tgt, batch_size=1, seed=0, num_workers=2)), None)
    assert seen["worker_init_fn"] is loader_mod.ignore_sigint and seen["num_workers"] == 2
