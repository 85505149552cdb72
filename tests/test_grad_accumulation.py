"""Three backward passes accumulated into ``.grad``, as ``train_step`` runs them (source,
target, ClassMix) before one optimizer step, through every custom forward/backward path.

A path that hands two parameters views of one gradient buffer passes a one-backward test
(the values are right) and still goes wrong here: from the second pass on, autograd's
in-place accumulation runs once per alias. So every test below runs three passes with
different inputs, compares every ``.grad`` with the plain PyTorch formulation (float64
where the path takes it) and checks that no two ``.grad`` tensors share storage.

Paths: the tap convolutions (DeepLab-v2 classifier, DAFormer sep-ASPP depthwise convs, also
inside their heads), the Triton contrast losses and class statistics (Triton's interpreter
on the CPU), the torch pixel ops that carry gradients (ClassMix, crop), and a whole
``train_step`` of the tiny DeepLab-v2 and DAFormer segmentors against the per-conv path.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sepico_fast import ops
from sepico_fast.models import heads
from sepico_fast.models.conv_taps import depthwise_conv_taps, summed_conv_taps

PASSES = 3
IGNORE = 255
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-4)}


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def assert_own_grads(named) -> int:
    """No two ``.grad`` tensors share storage; returns how many grads were checked."""
    seen = {}
    for name, p in named:
        if p.grad is None:
            continue
        ptr = storage(p.grad)
        assert ptr not in seen, f"{name}.grad and {seen[ptr]}.grad share storage"
        seen[ptr] = name
    return len(seen)


def assert_grads_equal(named, named_ref, tol, min_count=1):
    named_ref = dict(named_ref)
    count = 0
    for name, p in named:
        ref = named_ref[name]
        assert (p.grad is None) == (ref.grad is None), name
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, ref.grad.to(p.grad.dtype), **tol, msg=lambda m: f"{name}: {m}")
        count += 1
    assert count >= min_count


def leaves(gen, dtype, *shapes):
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_leaves(ts, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in ts]


# --------------------------------------------------------------------------- tap convolutions
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_summed_conv_taps_three_passes(dtype):
    """DeepLab-v2 classifier: Σ_i conv_i(x) + b_i; dilation 12 > the map leaves one live tap."""
    g = torch.Generator().manual_seed(0)
    dil = (1, 2, 4, 12)
    x, *ws = leaves(g, dtype, (2, 6, 9, 11), *[(5, 6, 3, 3)] * 4)
    bs = leaves(g, dtype, *[(5,)] * 4)
    x_r, *ws_r = clone_leaves([x, *ws])
    bs_r = clone_leaves(bs)
    for k in range(PASSES):
        up = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64).to(dtype)
        scale = 1.0 + k  # each pass its own input: the same leaf x, scaled
        (summed_conv_taps(x * scale, ws, bs, dil) * up).sum().backward()
        y = sum(F.conv2d(x_r * scale, w, b, padding=d, dilation=d) for w, b, d in zip(ws_r, bs_r, dil))
        (y * up).sum().backward()
    names = ["x"] + [f"w{i}" for i in range(4)] + [f"b{i}" for i in range(4)]
    got, ref = list(zip(names, [x, *ws, *bs])), list(zip(names, [x_r, *ws_r, *bs_r]))
    assert assert_own_grads(got) == 9
    assert_grads_equal(got, ref, TOL[dtype], min_count=9)


def test_summed_conv_taps_three_passes_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    dil = (1, 2, 3, 4)
    x, *ws = leaves(g, torch.float32, (2, 8, 8, 8), *[(4, 8, 3, 3)] * 4)
    bs = leaves(g, torch.float32, *[(4,)] * 4)
    ws_r, bs_r = clone_leaves(ws), clone_leaves(bs)
    for k in range(PASSES):
        up = torch.randn(2, 4, 8, 8, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = summed_conv_taps(x.detach() * (k + 1), ws, bs, dil)
            y_r = sum(F.conv2d(x.detach() * (k + 1), w, b, padding=d, dilation=d)
                      for w, b, d in zip(ws_r, bs_r, dil))
        (y.float() * up).sum().backward()
        (y_r.float() * up).sum().backward()
    got = [(f"w{i}", w) for i, w in enumerate(ws)] + [(f"b{i}", b) for i, b in enumerate(bs)]
    ref = [(f"w{i}", w) for i, w in enumerate(ws_r)] + [(f"b{i}", b) for i, b in enumerate(bs_r)]
    assert assert_own_grads(got) == 8
    # bf16 operands, fp32 accumulation in both: rounding of the 16-bit products only
    assert_grads_equal(got, ref, dict(atol=0.1, rtol=2e-2), min_count=8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_taps_three_passes(dtype, bias):
    """DAFormer sep-ASPP depthwise 3×3 (dilation 6 > half the map: dead taps)."""
    g = torch.Generator().manual_seed(2)
    for d in (1, 2, 6):
        x, w = leaves(g, dtype, (2, 5, 7, 10), (5, 1, 3, 3))
        b = leaves(g, dtype, (5,))[0] if bias else None
        x_r, w_r = clone_leaves([x, w])
        b_r = clone_leaves([b])[0] if bias else None
        for k in range(PASSES):
            up = torch.randn(2, 5, 7, 10, generator=g, dtype=torch.float64).to(dtype)
            (depthwise_conv_taps(x * (k + 1), w, b, d, d) * up).sum().backward()
            (F.conv2d(x_r * (k + 1), w_r, b_r, padding=d, dilation=d, groups=5) * up).sum().backward()
        got = [("x", x), ("w", w)] + ([("b", b)] if bias else [])
        ref = [("x", x_r), ("w", w_r)] + ([("b", b_r)] if bias else [])
        assert assert_own_grads(got) == len(got)
        assert_grads_equal(got, ref, TOL[dtype], min_count=len(got))


def _per_conv(monkeypatch):
    monkeypatch.setattr(heads, "use_cpu_kernels", lambda module, x: False)


@pytest.mark.parametrize("which", ["dlv2", "sep_aspp"])
def test_heads_three_passes_match_the_per_conv_path(which, monkeypatch):
    """The heads' CPU tap path vs the same head through ``F.conv2d`` (float64, BN in train mode)."""
    torch.manual_seed(3)
    if which == "dlv2":
        head = heads.DLV2Head(12, num_classes=5).double()
        shape = (2, 12, 9, 9)
    else:
        head = heads.SepASPPFusion(8, 4, dilations=(1, 2, 3, 6)).double()
        shape = (2, 8, 9, 7)
    ref = copy.deepcopy(head)
    g = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(1, generator=g).item())
              for _ in range(PASSES)]

    def run(model):
        for x, s in inputs:
            out = model([x]) if which == "dlv2" else model(x)
            (out * torch.sin(3 * out.detach() + s)).sum().backward()

    run(head)
    with monkeypatch.context() as m:
        _per_conv(m)
        run(ref)
    assert assert_own_grads(head.named_parameters()) == len(list(head.parameters()))
    assert_grads_equal(head.named_parameters(), ref.named_parameters(), TOL[torch.float64],
                       min_count=len(list(head.parameters())))


# --------------------------------------------------------------- Triton losses and statistics
@pytest.mark.parametrize("variant", ["dist", "proto", "bank"])
def test_triton_contrast_three_passes(variant):
    """contrast API with impl="triton" (losses and class statistics) vs impl="torch" in float64:
    features from a parameter W (a projection) and a leaf used directly, statistics updated
    between the passes as the training step does."""
    pytest.importorskip("triton")
    pytest.importorskip("sepico_fast.kernels")
    from sepico_fast.contrast import ClassStats, bank_contrast_loss, dist_contrast_loss, proto_contrast_loss

    n, a_in, a, c = 24, 6, 8, 5
    g = torch.Generator().manual_seed(5)
    w, z0 = leaves(g, torch.float32, (a_in, a), (n, a))
    w_r, z0_r = clone_leaves([w, z0], torch.float64)
    stats = ClassStats(c, a, 4 if variant == "bank" else 0, impl="triton")
    stats_r = ClassStats(c, a, 4 if variant == "bank" else 0, impl="torch", dtype=torch.float64)

    def loss(feat, labels, st, impl):
        common = dict(temperature=0.5, reg_weight=1.0, ignore_index=IGNORE, impl=impl)
        if variant == "dist":
            return dist_contrast_loss(feat, labels, st.mean, st.var, ratio=1.0, **common)
        if variant == "proto":
            return proto_contrast_loss(feat, labels, st.mean, **common)
        return bank_contrast_loss(feat, labels, st.bank, st.bank_len, mean=st.mean, **common)

    for k in range(PASSES):
        x = torch.randn(n, a_in, generator=g, dtype=torch.float64)
        labels = torch.randint(0, c, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.2] = IGNORE
        feat = F.normalize(x.float() @ w + 0.3 * z0, dim=1)
        feat_r = F.normalize(x @ w_r + 0.3 * z0_r, dim=1)
        stats.update(feat.detach(), labels)
        stats_r.update(feat_r.detach(), labels)
        got, ref = loss(feat, labels, stats, "triton"), loss(feat_r, labels, stats_r, "torch")
        torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-5)
        got.backward()
        ref.backward()
        if k == 0:  # a leaf fed directly: autograd adopts the kernel's gradient buffer as .grad
            z0.grad = None
            z0_r.grad = None
        loss(z0 * (k + 1), labels, stats, "triton").backward()
        loss(z0_r * (k + 1), labels, stats_r, "torch").backward()
    torch.testing.assert_close(stats.mean.double(), stats_r.mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.var.double(), stats_r.var, atol=1e-6, rtol=1e-5)
    assert assert_own_grads([("w", w), ("z0", z0)]) == 2
    assert_grads_equal([("w", w), ("z0", z0)], [("w", w_r), ("z0", z0_r)], dict(atol=1e-5, rtol=1e-4),
                       min_count=2)


# ---------------------------------------------------------------------------- pixel ops (torch)
def test_classmix_and_crop_three_passes():
    """ops.classmix / ops.crop_batch (torch path; the CUDA kernels run without autograd under
    no_grad) carry gradients to both images; reference: masks and slices written out."""
    g = torch.Generator().manual_seed(6)
    src, tgt = leaves(g, torch.float64, (2, 3, 6, 8), (2, 3, 6, 8))
    src_r, tgt_r = clone_leaves([src, tgt])
    for _ in range(PASSES):
        src_lbl = torch.randint(0, 4, (2, 1, 6, 8), generator=g)
        tgt_lbl = torch.randint(0, 4, (2, 1, 6, 8), generator=g)
        weight = torch.rand(2, 1, 6, 8, generator=g, dtype=torch.float64)
        mix_classes = torch.zeros(2, 256, dtype=torch.bool)
        mix_classes[0, [0, 2]] = True
        mix_classes[1, [1]] = True
        offsets = torch.randint(0, 3, (2, 2), generator=g)
        up = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
        mixed, _, _ = ops.classmix(src, tgt, src_lbl, tgt_lbl, weight, mix_classes)
        (ops.crop_batch(mixed, offsets, (4, 5)) * up).sum().backward()
        ref = []
        for b in range(2):
            chosen = torch.tensor([[int(mix_classes[b, int(v)]) for v in row] for row in src_lbl[b, 0]],
                                  dtype=torch.bool)
            m = torch.where(chosen, src_r[b], tgt_r[b])
            y0, x0 = offsets[b].tolist()
            ref.append(m[:, y0:y0 + 4, x0:x0 + 5])
        (torch.stack(ref) * up).sum().backward()
    assert assert_own_grads([("src", src), ("tgt", tgt)]) == 2
    assert_grads_equal([("src", src), ("tgt", tgt)], [("src", src_r), ("tgt", tgt_r)], TOL[torch.float64],
                       min_count=2)


# ------------------------------------------------------------------------------ train_step
def _step_grads(arch, monkeypatch, per_conv: bool):
    """Gradients of the student after the three backward passes of one train_step (iteration
    1, past contrast start), captured just before the optimizer step."""
    from sepico_fast.contrast import ClassStats
    from sepico_fast.models import build_segmentor
    from sepico_fast.train import step as step_mod
    from sepico_fast.train.config import make_config
    from sepico_fast.train.runner import build_optimizer
    from sepico_fast.train.uda import make_teacher

    cfg = make_config(dict(arch=arch, method="sepico", variant="dist", seed=0, crop=[32, 32], iters=10,
                           warmup_iters=2, contrast_start=0, color_jitter_p=0.0, proj_dim=8,
                           pseudo_threshold=0.06))
    torch.manual_seed(0)
    student = build_segmentor(arch, 19, 8, drop_path_rate=0.0)
    for mod in student.modules():
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
            mod.p = 0.0
    teacher = make_teacher(student)
    opt = build_optimizer(cfg, student, torch.device("cpu"))
    stats = ClassStats(19, 8, 0)
    ctx = step_mod.StepContext(cfg=cfg, student=student, teacher=teacher, optimizer=opt, stats=stats,
                               device=torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 19, (2, 1, 4, 4), generator=g)  # 8×8 blocks: contrast rows survive downscaling
    gt = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)
    src = {"img": torch.randn(2, 3, 32, 32, generator=g), "gt": gt}
    tgt = {"img": torch.randn(2, 3, 32, 32, generator=g)}
    captured = {}
    real_step = step_mod.optimizer_step

    def capture(c, losses):
        captured["grads"] = {n: p.grad for n, p in student.named_parameters()}
        captured["storage_ok"] = assert_own_grads(student.named_parameters())
        captured["losses"] = dict(losses)
        real_step(c, losses)

    with monkeypatch.context() as m:
        m.setattr(step_mod, "optimizer_step", capture)
        if per_conv:
            _per_conv(m)
        step_mod.train_step(ctx, src, tgt, it=1)
    return captured


@pytest.mark.parametrize("arch", ["dlv2_tiny", "daformer_tiny"])
def test_train_step_grads_own_storage_and_match_per_conv_path(arch, monkeypatch):
    taps = _step_grads(arch, monkeypatch, per_conv=False)
    plain = _step_grads(arch, monkeypatch, per_conv=True)
    assert {"src_contrast", "tgt_contrast", "mix_ce"} <= set(taps["losses"])  # three backward passes
    assert taps["storage_ok"] >= 10
    grads = [n for n, gr in taps["grads"].items() if gr is not None]
    assert grads == [n for n, gr in plain["grads"].items() if gr is not None]
    assert any("aspp_modules" in n for n in grads)
    for name in grads:
        ref = plain["grads"][name]
        # float32 through a whole network: the tap and per-conv sums round differently
        torch.testing.assert_close(taps["grads"][name], ref, atol=1e-6 + 1e-3 * float(ref.abs().max()),
                                   rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_bias_sum_compiles_into_one_graph_with_a_gradient_per_bias():
    """Under ``torch.compile`` (inductor, the compiler users get) the bias sum stays in the
    graph (no graph break) and each bias still gets a gradient buffer of its own over
    three accumulated backward passes: inductor removes plain ``clone``s of one buffer,
    so the copies come from an opaque custom op (models/conv_taps.py)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(8)
    dil = (1, 2)
    ws = leaves(g, torch.float32, *[(3, 4, 3, 3)] * 2)
    bs = leaves(g, torch.float32, *[(3,)] * 2)
    bs_r = clone_leaves(bs)
    fn = lambda x: summed_conv_taps(x, ws, bs, dil)  # noqa: E731
    torch._dynamo.reset()
    try:
        e = torch._dynamo.explain(fn)(torch.randn(2, 4, 6, 6))
        assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons
        torch._dynamo.reset()
        f = torch.compile(fn, backend="inductor", dynamic=False)
        for k in range(PASSES):
            x = torch.randn(2, 4, 6, 6, generator=g) * (k + 1)
            up = torch.randn(2, 3, 6, 6, generator=g)
            (f(x) * up).sum().backward()
            y = sum(F.conv2d(x, w.detach(), b, padding=d, dilation=d) for w, b, d in zip(ws, bs_r, dil))
            (y * up).sum().backward()
    finally:
        torch._dynamo.reset()
    got = [(f"b{i}", b) for i, b in enumerate(bs)]
    assert assert_own_grads(got) == 2
    assert_grads_equal(got, [(f"b{i}", b) for i, b in enumerate(bs_r)], TOL[torch.float32], min_count=2)


def test_bias_sum_second_derivative():
    """The bias gradients' copies are differentiable (gradgradcheck, float64)."""
    g = torch.Generator().manual_seed(9)
    ws = [torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    bs = tuple(torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)

    def fn(*b):
        return summed_conv_taps(x, ws, list(b), (1, 2)) ** 2

    assert torch.autograd.gradcheck(fn, bs) and torch.autograd.gradgradcheck(fn, bs)
