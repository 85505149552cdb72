"""``--cuda-graphs`` (train/graphs.py): the graph-ready step is capturable, shown on the CPU.

A CUDA graph replays a fixed sequence of kernels on fixed memory. Here, without a GPU:

* two consecutive iterations after contrast start, with different data and different
  host draws (jitter on/off and order, blur on/off), dispatch the identical aten op
  sequence with identical shapes (so no allocation depends on the data or the draws),
  while the eager step's sequences differ between the same iterations;
* the graph-ready step has no host sync (the probe of tests/test_no_host_sync.py);
* the branch-free augmentation is the eager augmentation's maths;
* on the CPU ``GraphStep`` runs the graph-ready step eagerly and says so once.
"""
from __future__ import annotations

import logging
import random

import torch
from test_no_host_sync import HostSyncProbe, _device_constants
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sepico_fast import augment
from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train import graphs
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import build_optimizer
from sepico_fast.train.step import StepContext, iteration_seed, train_step
from sepico_fast.train.uda import make_teacher


class _Sequence(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple((tuple(t.shape), t.dtype) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


def _seed_with_differing_draws(it=3, p=0.5) -> int:
    """A seed whose iterations it and it+1 differ in the host draws of jitter AND blur."""
    for seed in range(100):
        a, b = (_decisions_of(seed, p, k) for k in (it, it + 1))
        if a[0] != b[0] and a[1] != b[1]:
            return seed
    raise AssertionError("no seed found")


def _decisions_of(seed, p, it):
    rng = random.Random(iteration_seed(seed, it, 0))
    d = augment.draw_strong_params(rng, 0.2, p, True)
    return d.jitter, d.blur


def _ctx(variant="dist", **over):
    values = dict(arch="daformer_tiny", crop=[32, 32], iters=20, warmup_iters=2, contrast_start=2, proj_dim=16,
                  variant=variant, memory_length=3, ema_alpha=0.5, color_jitter_p=0.5, blur=True,
                  seed=_seed_with_differing_draws(), pseudo_threshold=0.05, cuda_graphs=True)
    values.update(over)
    cfg = make_config(values)
    torch.manual_seed(0)
    student = build_segmentor(cfg.arch, 19, 16, drop_path_rate=0.1)
    return StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                       optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                       stats=ClassStats(19, 16, cfg.memory_length if variant == "bank" else 0),
                       device=torch.device("cpu"))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 6, (2, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    gt[0, :, :4, :4] = 255
    return ({"img": torch.randn(2, 3, 32, 32, generator=g), "gt": gt},
            {"img": torch.randn(2, 3, 32, 48, generator=g)})


def _sequences(ctx, its, static: bool):
    out = []
    for k, it in enumerate(its):
        src, tgt = _batch(10 + k)  # different data each iteration
        if static:
            ctx.static.prepare(ctx, it)
        with _Sequence() as seq:
            train_step(ctx, src, tgt, it)
        out.append(seq.ops)
    return out


def _warm(ctx, upto):
    src, tgt = _batch(1)
    for it in range(upto):
        if it >= graphs.static_from(ctx.cfg):
            ctx.static.prepare(ctx, it)
        train_step(ctx, src, tgt, it)


def test_graph_ready_step_dispatches_the_same_ops_every_iteration():
    ctx = _ctx()
    start = graphs.static_from(ctx.cfg)
    assert start == 2  # contrast start; the EMA weight is constant (0.5) from iteration 1
    a, b = 3, 4  # after contrast start (2); the seed makes their draws differ
    ctx.static = graphs.StaticInputs.build(2, ctx.device)
    ctx.stats.inplace = True
    _warm(ctx, a)
    first, second = _sequences(ctx, (a, b), static=True)
    assert len(first) > 500
    assert first == second, next((i, x, y) for i, (x, y) in enumerate(zip(first, second)) if x != y)
    # The eager step takes other branches in the same two iterations: the test means something.
    eager = _ctx(cuda_graphs=False)
    src, tgt = _batch(1)
    for it in range(a):
        train_step(eager, src, tgt, it)
    e1, e2 = _sequences(eager, (a, b), static=False)
    assert e1 != e2


def test_graph_ready_step_bank_variant_is_static_too():
    ctx = _ctx("bank")
    a, b = 3, 4
    ctx.static = graphs.StaticInputs.build(2, ctx.device)
    ctx.stats.inplace = True
    bank_before = ctx.stats.bank
    _warm(ctx, a)
    first, second = _sequences(ctx, (a, b), static=True)
    assert first == second
    assert ctx.stats.bank is bank_before and int(ctx.stats.bank_len.sum()) > 0  # updated in place


def test_graph_ready_step_has_no_host_sync():
    ctx = _ctx()
    src, tgt = _batch(1)
    ctx.static = graphs.StaticInputs.build(2, ctx.device)
    ctx.stats.inplace = True
    _warm(ctx, 3)
    ctx.static.prepare(ctx, 3)
    with HostSyncProbe(ctx, src, tgt, _device_constants(ctx.device)) as probe:
        probe.strict(True)
        out = train_step(ctx, src, tgt, 3)
    assert "tgt_contrast" in out["losses"]
    assert not probe.violations, "\n".join(sorted(set(probe.violations)))


def test_static_augment_is_the_eager_maths():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 20, generator=g)
    factors = torch.rand(2, 4, generator=g)
    for order in ((0, 2, 1, 3), (3, 0, 2, 1), (1, 3, 0, 2)):  # saturation and hue never adjacent
        ref = augment.color_jitter(img, 0.2, factors=factors, order=order)
        got = augment.static_jitter(img, 0.2, factors, torch.tensor([order]))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # sat/hue adjacent: eager shares one HSV round trip, the static path makes two
    ref = augment.color_jitter(img, 0.2, factors=factors, order=(2, 3, 0, 1))
    torch.testing.assert_close(augment.static_jitter(img, 0.2, factors, torch.tensor([(2, 3, 0, 1)])), ref,
                               rtol=1e-5, atol=1e-5)
    # one order per image
    orders = torch.tensor([(0, 2, 1, 3), (3, 1, 2, 0)])
    ref = augment.color_jitter(img, 0.2, factors=factors, order=[(0, 2, 1, 3), (3, 1, 2, 0)])
    torch.testing.assert_close(augment.static_jitter(img, 0.2, factors, orders), ref, rtol=0, atol=0)


def test_static_augment_flags_off_is_identity_and_on_matches_blur():
    static = graphs.StaticInputs.build(2, "cpu")
    img = torch.randn(2, 3, 16, 16)
    static.generator.manual_seed(5)
    out = augment.static_augment(img, static, static.orders[0:1], 0.2, blur=True)
    assert torch.equal(out, img)  # flags are off
    static.flags.fill_(True)
    static.generator.manual_seed(5)
    out = augment.static_augment(img, static, static.orders[0:1], 0.2, blur=True)
    gen = torch.Generator().manual_seed(5)
    factors = torch.rand(2, 4, generator=gen)
    lo, hi = augment.BLUR_SIGMA
    sigma = lo + (hi - lo) * torch.rand(1, generator=gen)
    jit = augment.renormalize(augment.static_jitter(augment.denormalize(img), 0.2, factors, static.orders[0:1]))
    torch.testing.assert_close(out, augment.gaussian_blur(jit, sigma), rtol=0, atol=0)


def test_graph_step_on_cpu_runs_eagerly_says_why_and_resumes_exactly(caplog):
    """CPU fallback of GraphStep: one line per reason; its randomness is a pure function of
    (seed, iteration, rank), so a copy of the state after iteration 2 replays 3 and 4 exactly."""
    import copy

    src, tgt = _batch(1)
    ctx = _ctx()
    step = graphs.make_step(ctx)
    assert isinstance(step, graphs.GraphStep)
    with caplog.at_level(logging.INFO, logger="sepico_fast.train"):
        for it in range(3):
            step(ctx, src, tgt, it)
        saved = copy.deepcopy((ctx.student.state_dict(), ctx.teacher.state_dict(), ctx.optimizer.state_dict(),
                               ctx.stats.state_dict()))
        first = [step(ctx, src, tgt, it)["losses"] for it in (3, 4)]
    lines = [r.getMessage() for r in caplog.records if "--cuda-graphs" in r.getMessage()]
    assert any("no CUDA device" in line for line in lines) and any("before 2" in line for line in lines)
    assert len(lines) == len(set(lines)) == 2  # each reason once
    assert ctx.static is not None and ctx.stats.inplace
    other = _ctx()
    other.student.load_state_dict(saved[0])
    other.teacher.load_state_dict(saved[1])
    other.optimizer.load_state_dict(saved[2])
    other.stats.load_state_dict(saved[3])
    resumed = graphs.make_step(other)
    again = [resumed(other, src, tgt, it)["losses"] for it in (3, 4)]
    for a, b in zip(first, again):
        assert "tgt_contrast" in a
        for k in a:
            assert torch.isfinite(a[k]) and torch.equal(a[k], b[k]), k
