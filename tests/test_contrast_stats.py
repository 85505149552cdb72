"""ClassStats and class_moments_torch against statistics computed directly in the test."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sepico_fast.contrast import ClassStats
from sepico_fast.contrast.stats import class_moments_torch, merge_moments

IGNORE = 255


def direct_stats(feats, labels, num_classes):
    """Mean, population variance and count of every class over all pixels at once."""
    x = torch.cat(feats).double()
    y = torch.cat(labels)
    dim = x.shape[1]
    mean = torch.zeros(num_classes, dim, dtype=torch.float64)
    var = torch.zeros(num_classes, dim, dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        rows = x[y == c]
        count[c] = rows.shape[0]
        if rows.shape[0]:
            mean[c] = rows.mean(0)
            var[c] = rows.var(0, unbiased=False)
    return mean, var, count


def random_batch(n, dim, classes, g, *, offset=0.0, ignore_frac=0.15):
    classes = torch.as_tensor(classes)
    labels = classes[torch.randint(0, len(classes), (n,), generator=g)] if len(classes) else \
        torch.full((n,), IGNORE, dtype=torch.long)
    labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    # A large common offset makes E[z^2] - E[z]^2 cancel badly; the centred moments must not.
    feat = offset + torch.randn(n, dim, generator=g, dtype=torch.float64) \
        * (1 + labels.clamp_max(7)[:, None].double())
    return feat, labels


def batches(dim, num_classes, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    most = range(num_classes - 1)  # the last class never occurs
    mixes = [most, [0, 1], [], [2, 3, 4], most, [0], [1, 4]]
    sizes = [41, 17, 9, 33, 0, 5, 28]
    out = [random_batch(n, dim, list(mix), g, offset=offset) for n, mix in zip(sizes, mixes)]
    out.append((torch.zeros(0, dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    return out


@pytest.mark.parametrize("dim,num_classes", [(13, 6), (512, 19)])
def test_many_updates_equal_all_pixels_at_once_float64(dim, num_classes):
    data = batches(dim, num_classes, seed=dim)
    stats = ClassStats(num_classes, dim, dtype=torch.float64)
    for feat, labels in data:
        stats.update(feat, labels)
    mean, var, count = direct_stats(*zip(*data), num_classes)
    assert torch.equal(stats.count, count)
    assert count[-1] == 0 and (stats.mean[-1] == 0).all() and (stats.var[-1] == 0).all()
    torch.testing.assert_close(stats.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.var, var, rtol=0, atol=1e-6)
    # The stricter check the float64 path actually meets.
    torch.testing.assert_close(stats.var, var, rtol=1e-10, atol=1e-12)


def test_float32_state_and_cancellation():
    """float32 state for any feature dtype; a +30 offset does not wreck the variance."""
    data = batches(16, 5, seed=1, offset=30.0)
    mean, var, count = direct_stats(*zip(*data), 5)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        stats = ClassStats(5, 16)
        for feat, labels in data:
            stats.update(feat.to(dtype), labels)
        assert stats.mean.dtype == stats.var.dtype == stats.count.dtype == torch.float32
        assert torch.equal(stats.count, count.float())
        if dtype == torch.float32:
            torch.testing.assert_close(stats.mean.double(), mean, rtol=1e-6, atol=1e-5)
            # Relative to the variance itself (values 1..36): float32 centred moments.
            torch.testing.assert_close(stats.var.double(), var, rtol=2e-5, atol=1e-5)
        else:
            rounded = [(f.to(dtype).double(), y) for f, y in data]
            mean_r, var_r, _ = direct_stats(*zip(*rounded), 5)
            torch.testing.assert_close(stats.mean.double(), mean_r, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(stats.var.double(), var_r, rtol=2e-5, atol=1e-4)


def test_class_moments_torch_matches_direct_and_is_deterministic_alike():
    feat, labels = random_batch(57, 11, list(range(4)), torch.Generator().manual_seed(3))
    count, mean, m2 = class_moments_torch(feat, labels, 6, IGNORE)
    count_d, mean_d, m2_d = class_moments_torch(feat, labels, 6, IGNORE, deterministic=True)
    want_mean, want_var, want_count = direct_stats([feat], [labels], 6)
    assert count.dtype == mean.dtype == torch.float64  # float64 in, float64 out
    assert torch.equal(count, want_count)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(m2, want_var * want_count[:, None])
    torch.testing.assert_close((count_d, mean_d, m2_d), (count, mean, m2))
    c32, m32, s32 = class_moments_torch(feat.half(), labels, 6, IGNORE)
    assert c32.dtype == m32.dtype == s32.dtype == torch.float32


def test_merge_moments_is_chan_merge():
    g = torch.Generator().manual_seed(4)
    parts = [random_batch(n, 7, [0, 1, 2], g) for n in (12, 0, 30)]
    moments = [class_moments_torch(f, y, 4, IGNORE) for f, y in parts]
    count, mean, m2 = merge_moments(*(torch.stack(t) for t in zip(*moments)))
    want_mean, want_var, want_count = direct_stats(*zip(*parts), 4)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(m2, want_var * want_count[:, None])


def test_bank_fifo_order_and_eviction():
    dim, m = 3, 3
    stats = ClassStats(2, dim, memory_length=m)
    assert stats.bank.shape == (2, m, dim) and stats.bank_len.tolist() == [1, 1]
    assert (stats.bank == 0).all()

    def push(values_by_class):
        """One update whose class-c pixels all equal values_by_class[c] (batch mean = value)."""
        feats, labels = [], []
        for c, v in values_by_class.items():
            feats.append(torch.full((2, dim), float(v)))
            labels += [c, c]
        feats.append(torch.full((1, dim), 99.0))  # an ignore pixel: never pushed
        labels.append(IGNORE)
        stats.update(torch.cat(feats), torch.tensor(labels))

    def rows(c):
        return stats.bank[c, : int(stats.bank_len[c]), 0].tolist()

    push({0: 1})
    assert rows(0) == [0, 1] and rows(1) == [0]  # class 1 absent: no push
    push({0: 2, 1: 10})
    assert rows(0) == [0, 1, 2] and rows(1) == [0, 10]
    push({0: 3})  # M-th push: the initial zero row is evicted
    assert rows(0) == [1, 2, 3] and stats.bank_len.tolist() == [3, 2]
    push({0: 4, 1: 11})
    assert rows(0) == [2, 3, 4] and rows(1) == [0, 10, 11]
    push({1: 12})
    assert rows(0) == [2, 3, 4] and rows(1) == [10, 11, 12]
    push({})  # empty (all-ignore) batch: nothing moves
    assert rows(0) == [2, 3, 4] and rows(1) == [10, 11, 12]
    # Rows are full vectors, not just column 0.
    assert torch.equal(stats.bank[1, 2], torch.full((dim,), 12.0))


def test_bank_memory_length_zero_and_one():
    stats = ClassStats(3, 4)
    assert stats.bank.shape == (3, 0, 4) and stats.bank_len.tolist() == [0, 0, 0]
    stats.update(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    assert stats.bank.shape == (3, 0, 4)
    one = ClassStats(3, 4, memory_length=1)
    feat = torch.randn(5, 4)
    one.update(feat, torch.tensor([0, 1, 1, 0, 255]))
    torch.testing.assert_close(one.bank[1, 0], feat[1:3].mean(0))
    assert one.bank_len.tolist() == [1, 1, 1] and (one.bank[2] == 0).all()


def test_state_dict_roundtrip_and_validation():
    stats = ClassStats(4, 5, memory_length=2)
    stats.update(torch.randn(9, 5), torch.randint(0, 4, (9,)))
    other = ClassStats(4, 5, memory_length=2)
    other.load_state_dict(stats.state_dict())
    for key in ("mean", "var", "count", "bank", "bank_len"):
        assert torch.equal(getattr(other, key), getattr(stats, key))
    with pytest.raises(ValueError, match="bank"):
        ClassStats(4, 5, memory_length=3).load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="missing 'var'"):
        other.load_state_dict({k: v for k, v in stats.state_dict().items() if k != "var"})
    assert other.to("cpu") is other and other.device.type == "cpu"


def test_update_validation_and_impl():
    stats = ClassStats(4, 5)
    with pytest.raises(ValueError, match="2-D"):
        stats.update(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="5 columns"):
        stats.update(torch.randn(3, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entries"):
        stats.update(torch.randn(3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        stats.update(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="0..3"):
        stats.update(torch.randn(3, 5), torch.tensor([0, 4, 255]))
    assert (stats.count == 0).all()  # nothing was merged by the failed calls
    with pytest.raises(ValueError, match="impl must be"):
        ClassStats(4, 5, impl="fast")
    with pytest.raises(ValueError, match="available impls: torch, triton"):
        ClassStats(4, 5, impl="cuda")
    with pytest.raises(ValueError, match="memory_length"):
        ClassStats(4, 5, memory_length=-1)
    with pytest.raises(ValueError, match="dtype"):
        ClassStats(4, 5, dtype=torch.float16)


def test_update_does_not_track_gradients():
    stats = ClassStats(2, 3)
    feat = torch.randn(4, 3, requires_grad=True)
    stats.update(feat, torch.tensor([0, 1, 1, 0]))
    assert not stats.mean.requires_grad and not stats.var.requires_grad


# -------------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        data = batches(6, 5, seed=20)
        stats = ClassStats(5, 6, memory_length=3, dtype=torch.float64)
        # Each rank sees a different share (and a different class mix) of every step.
        for step in range(0, len(data), 2):
            feat, labels = data[step + rank] if step + rank < len(data) else data[-1]
            stats.update(feat, labels)
        torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_identical_statistics_of_all_pixels():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        states = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    data = batches(6, 5, seed=20)
    mean, var, count = direct_stats(*zip(*data), 5)
    assert torch.equal(states[0]["count"], count)
    torch.testing.assert_close(states[0]["mean"], mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(states[0]["var"], var, rtol=0, atol=1e-9)
    # One single-process update per step with both ranks' pixels gives the same bank.
    single = ClassStats(5, 6, memory_length=3, dtype=torch.float64)
    for step in range(0, len(data), 2):
        pair = data[step:step + 2]
        single.update(torch.cat([f for f, _ in pair]), torch.cat([y for _, y in pair]))
    torch.testing.assert_close(states[0]["bank"], single.bank)
    assert torch.equal(states[0]["bank_len"], single.bank_len)


def test_triton_impl_dispatches_to_kernel(monkeypatch):
    """ClassStats(impl="triton") takes its batch moments from sepico_fast.kernels.class_moments
    (stubbed with the torch reference here; the kernel is tested in its own file)."""
    import importlib
    try:
        kernels = importlib.import_module("sepico_fast.kernels")
    except Exception as exc:  # pragma: no cover - depends on triton being importable
        pytest.skip(f"sepico_fast.kernels does not import here: {exc}")
    calls = []

    def fake(feat, labels, num_classes, ignore_index, deterministic=False):
        calls.append((num_classes, ignore_index, deterministic))
        return class_moments_torch(feat, labels, num_classes, ignore_index)

    monkeypatch.setattr(kernels, "class_moments", fake, raising=False)
    feat, labels = random_batch(20, 4, [0, 1, 2], torch.Generator().manual_seed(9))
    stats = ClassStats(3, 4, impl="triton", deterministic=True)
    stats.update(feat.float(), labels)
    assert calls == [(3, IGNORE, True)]
    want = ClassStats(3, 4)
    want.update(feat.float(), labels)
    torch.testing.assert_close(stats.var, want.var)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: host-sync check needs one")
def test_no_host_sync_on_cuda():  # pragma: no cover - GPU only
    from sepico_fast.contrast import bank_contrast_loss, dist_contrast_loss, proto_contrast_loss
    dev = torch.device("cuda")
    feat = torch.randn(64, 8, device=dev, requires_grad=True)
    labels = torch.randint(0, 4, (64,), device=dev)
    labels[::7] = IGNORE
    stats = ClassStats(4, 8, memory_length=3, device=dev, impl="torch")
    stats.update(feat.detach(), labels)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.update(feat.detach(), labels)
        for impl in ("torch",):
            loss = (proto_contrast_loss(feat, labels, stats.mean, reg_weight=1.0, impl=impl)
                    + dist_contrast_loss(feat, labels, stats.mean, stats.var, reg_weight=1.0,
                                         impl=impl)
                    + bank_contrast_loss(feat, labels, stats.bank, stats.bank_len,
                                         mean=stats.mean, reg_weight=1.0, impl=impl))
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(feat.grad).all()
