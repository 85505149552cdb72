"""Honest throughput: FLOPs of what ``train_step`` runs, MFU per device, peaks by exact name,
images/s without the evaluation time, and the precision ``--amp`` picks on each GPU."""
from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train import runner
from sepico_fast.train.config import make_config
from sepico_fast.train.step import StepContext, train_step
from sepico_fast.train.throughput import IterationFlops, device_peak_tflops, flops_per_iteration, mfu, peak_tflops_for
from sepico_fast.train.uda import log_frequency_class_weights, make_teacher

C, A = 19, 16
aten = torch.ops.aten


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """Each of grad-input and grad-weight costs one forward convolution. torch's own formula
    leaves the groups out of the grad-weight term (a depthwise 64-channel conv's backward
    counts 65× its forward), which would swamp the depthwise convs of MiT and DAFormer."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def test_conv_backward_counter_fix_only_changes_grouped_convs():
    for groups in (1, 8):
        conv = torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=groups)
        x = torch.randn(2, 16, 9, 9, requires_grad=True)
        counts = []
        for mapping in ({}, {aten.convolution_backward: _conv_backward}):
            with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
                conv(x).sum().backward()
            counts.append(fc.get_flop_counts()["Global"])
        torch_bwd, fixed_bwd = (c[aten.convolution_backward] for c in counts)
        assert fixed_bwd == 2 * counts[1][aten.convolution]
        assert (torch_bwd == fixed_bwd) == (groups == 1)


# case: (config overrides, iterations counted); contrast starts at iteration 2
CASES = {
    "dist": (dict(), (1, 2)),
    "dark_zurich": (dict(source="cityscapes", target="darkzurich"), (1, 2)),
    "source_only": (dict(method="source_only"), (2,)),
    "crop_is_whole_target": (dict(), (2,)),          # target 32×32: no crop, no regeneration
    "no_regen": (dict(regen_pseudo=False), (2,)),
    "deeplab": (dict(arch="dlv2_tiny", variant="proto"), (2,)),
}


def _setup(case):
    over = dict(arch="daformer_tiny", crop=[32, 32], iters=10, warmup_iters=2, contrast_start=2, proj_dim=A,
                memory_length=3, seed=1, pseudo_threshold=0.05)
    over.update(CASES[case][0])
    cfg = make_config(over)
    torch.manual_seed(0)
    # The formula counts the method's products; the CPU tap convolutions (models/conv_taps.py)
    # compute some of them as elementwise ops the counter does not see, so count on F.conv2d.
    student = build_segmentor(cfg.arch, C, A, drop_path_rate=0.0).use_upstream_layout()
    sepico = cfg.method == "sepico"
    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student) if sepico else None,
                      optimizer=runner.build_optimizer(cfg, student, torch.device("cpu")),
                      stats=ClassStats(C, A, 3 if cfg.variant == "bank" else 0) if sepico else None,
                      device=torch.device("cpu"),
                      class_weight=log_frequency_class_weights() if cfg.dark_zurich else None)
    g = torch.Generator().manual_seed(2)
    gt = torch.randint(0, 6, (2, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    width = 32 if case == "crop_is_whole_target" else 48
    src = {"img": torch.randn(2, 3, 32, 32, generator=g), "gt": gt}
    tgt = {"img": torch.randn(2, 3, 32, width, generator=g)}
    if cfg.dark_zurich:
        tgt["ref_img"] = torch.randn(2, 3, 32, width, generator=g)
    return cfg, ctx, src, tgt


@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_per_iteration_matches_the_flop_counter(case):
    """Counted over a real train_step, before (iteration 1) and after (2) contrast start.
    The formula is ~0.3 % high: the first layer's backward needs no input gradient."""
    cfg, ctx, src, tgt = _setup(case)
    predicted = flops_per_iteration(cfg, tuple(tgt["img"].shape[-2:]))
    counted = {}
    for it in CASES[case][1]:
        with FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward}) as fc:
            train_step(ctx, src, tgt, it)
        counted[it] = fc.get_total_flops()
        assert predicted.at(it) == pytest.approx(counted[it], rel=0.01), f"iteration {it}"
    if 1 in counted:
        assert predicted.before_contrast == pytest.approx(counted[1], rel=0.01)
        assert counted[2] > counted[1]       # the contrast passes start at contrast_start


def test_iteration_flops_between_sums_the_phases():
    f = IterationFlops(before_contrast=2.0, after_contrast=5.0, contrast_start=10)
    for start, stop in [(0, 4), (8, 13), (10, 20), (12, 12), (0, 30), (15, 11)]:
        assert f.between(start, stop) == sum(2.0 if i < 10 else 5.0 for i in range(start, stop))


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05), ("NVIDIA A10", 125.0),
    ("Tesla T4", 65.0), ("Tesla V100-SXM2-16GB", 125.0), ("Tesla V100-PCIE-32GB", 112.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA GeForce RTX 2080 Ti", 53.8), ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA B200", None), ("Quadro P1000", None),
])
def test_peak_by_exact_device_name(name, tflops):
    assert peak_tflops_for(name) == tflops


def test_no_peak_on_the_cpu():
    assert device_peak_tflops(torch.device("cpu")) is None
    assert mfu(1e12, 1.0, None) is None


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_run(world: int, cfg):
    ctx = types.SimpleNamespace(skipped=torch.zeros(()),
                                optimizer=types.SimpleNamespace(param_groups=[{"lr": 1e-3}]))
    written = []
    writer = types.SimpleNamespace(write=lambda it, scalars: written.append((it, scalars)))
    run = types.SimpleNamespace(cfg=cfg, ctx=ctx, writer=writer, main=True,
                                dist_info=types.SimpleNamespace(world_size=world))
    return run, written


@pytest.mark.parametrize("world", [1, 4])
def test_log_excludes_evaluation_time_and_reports_per_device_mfu(monkeypatch, world):
    clock = _Clock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    cfg = make_config(dict(batch_size=2, contrast_start=15))
    run, written = _fake_run(world, cfg)
    bar = types.SimpleNamespace(update=lambda *a: None)
    flops = IterationFlops(before_contrast=1e12, after_contrast=3e12, contrast_start=15)
    window = runner._LogWindow(10)
    for _ in range(10):                       # iterations 10..19, 1 s each, evaluation after 12
        clock.t += 1.0
        window.add({"src_ce": torch.tensor(0.5)})
        if clock.t == 3.0:
            with window.paused(torch.device("cpu")):
                clock.t += 100.0              # a 100 s evaluation
    runner._log(run, window, 20, bar, flops, peak=400.0)
    (it, scalars), = written
    assert it == 20 and scalars["src_ce"] == pytest.approx(0.5)
    # 10 iterations in 10 s of training (not 110): 2 source + 2 target images per rank each
    assert scalars["images_per_s"] == pytest.approx(10 * 4 * world / 10.0)
    # one rank's FLOPs (5 iterations before contrast start, 5 after) over ONE device's peak
    assert scalars["mfu"] == pytest.approx((5 * 1e12 + 5 * 3e12) / 10.0 / 400e12)
    assert scalars["tflops_per_s"] == pytest.approx(2.0)
    assert window.it0 == 20 and window.excluded == 0.0   # the next window starts clean


def _fake_cuda(monkeypatch, native_bf16: bool):
    """A CUDA device as torch reports it: Volta/Turing (native_bf16=False) still answer
    is_bf16_supported() == True through emulation."""
    def is_bf16_supported(including_emulation: bool = True):
        return native_bf16 or including_emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


@pytest.mark.filterwarnings("ignore::UserWarning")  # GradScaler('cuda') without CUDA disables itself
@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_picks_fp16_with_grad_scaler_without_bf16_tensor_cores(monkeypatch, native_bf16, dtype):
    _fake_cuda(monkeypatch, native_bf16)
    amp_dtype, scaler, desc = runner.amp_setup(make_config(dict(amp=True)), torch.device("cuda", 0))
    assert amp_dtype == dtype
    assert (scaler is not None) == (dtype == torch.float16)
    assert ("GradScaler" in desc) == (dtype == torch.float16)


def test_log_averages_each_loss_over_the_iterations_that_produced_it():
    """Contrast starting inside a window (contrast_start 15, log every 10): src_contrast is
    the mean of its 5 values, not their sum over all 10 iterations of the window."""
    run, written = _fake_run(1, make_config(dict(contrast_start=15)))
    window = runner._LogWindow(10)
    for it in range(10, 20):
        losses = {"src_ce": torch.tensor(float(it))}
        if it >= 15:
            losses["src_contrast"] = torch.tensor(2.0 + (it - 15))  # 2, 3, 4, 5, 6
        window.add(losses)
    runner._log(run, window, 20, types.SimpleNamespace(update=lambda *a: None), None, peak=None)
    (_, scalars), = written
    assert scalars["src_contrast"] == pytest.approx(4.0) and scalars["src_ce"] == pytest.approx(14.5)


def test_checkpoints_debug_pictures_and_the_flop_count_are_not_training_time(tmp_path, monkeypatch):
    """A real tiny run on a fake clock: each iteration takes 1 s, each checkpoint write,
    debug picture and FLOP count 100 s. images/s must count only the iterations; the FLOP
    count runs once even when it answers None (None was also 'not computed yet')."""
    from sepico_fast.train import run_checkpoints

    clock = _Clock()
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=clock))
    real_step, real_save = runner.train_step, run_checkpoints.save_checkpoint
    flop_calls = []

    def slow(seconds, fn=None):
        def wrapped(*a, **k):
            clock.t += seconds
            return fn(*a, **k) if fn is not None else None
        return wrapped

    def flops(*a, **k):
        flop_calls.append(a)
        clock.t += 100.0

    monkeypatch.setattr(runner, "train_step", slow(1.0, real_step))
    monkeypatch.setattr(run_checkpoints, "save_checkpoint", slow(100.0, real_save))
    monkeypatch.setattr(runner, "save_debug_images", slow(100.0))
    monkeypatch.setattr(runner, "flops_per_iteration", flops)
    cfg = make_config(dict(iters=4, crop=[32, 32], batch_size=1, proj_dim=16, contrast_start=1, warmup_iters=1,
                           log_interval=2, checkpoint_interval=1, debug_interval=1, eval_max_images=1,
                           work_dir=str(tmp_path)))
    runner.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
    assert ips == [pytest.approx(2 * 2 / 2.0)] * 2  # 2 iterations x (1 source + 1 target image) in 2 s
    assert len(flop_calls) == 1
