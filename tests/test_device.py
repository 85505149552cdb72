"""sepico_fast.device: one --device rule and one --amp precision rule, shared by training
and evaluation (no GPU needed: CUDA answers are faked where the rule reads them)."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from sepico_fast import device as devmod
from sepico_fast.device import autocast, choose_precision, device_problem, resolve_device

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def _fake_gpu(monkeypatch, native_bf16: bool):
    """A CUDA device as torch reports it: Volta/Turing (no bf16 tensor cores) still answer
    is_bf16_supported() == True through emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


@pytest.mark.parametrize("native_bf16, dtype, scaler", [(True, torch.bfloat16, False), (False, torch.float16, True)])
def test_cuda_precision_by_bf16_tensor_cores(monkeypatch, native_bf16, dtype, scaler):
    _fake_gpu(monkeypatch, native_bf16)
    p = choose_precision(CUDA, amp=True)
    assert (p.dtype, p.grad_scaler) == (dtype, scaler)
    assert choose_precision(CUDA, amp=False).dtype is None


def test_cpu_precision_is_float32_unless_cpu_amp():
    assert choose_precision(CPU, amp=False, cpu_amp=True).dtype is None
    plain = choose_precision(CPU, amp=True)
    assert plain.dtype is None and "--cpu-amp" in plain.description
    forced = choose_precision(CPU, amp=True, cpu_amp=True)
    assert (forced.dtype, forced.grad_scaler) == (torch.bfloat16, False)


def test_autocast_applies_the_chosen_dtype():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with autocast(CPU, torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (x @ w).dtype == torch.float32


def test_device_values(monkeypatch):
    assert resolve_device("cpu") == CPU
    assert device_problem("tpu") == "expected auto, cpu, cuda or cuda:N"
    with pytest.raises(ValueError, match=r"^--device: expected auto, cpu, cuda or cuda:N \(got 'cuda:x'\)$"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1) == CPU
    with pytest.raises(ValueError, match="^--device: CUDA is not available on this machine; use auto or cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto") == CUDA
    assert device_problem("cuda:2") == "this machine has 2 CUDA device(s): cuda:0 .. cuda:1"
    assert device_problem("cuda:1") is None


def test_training_and_evaluate_follow_the_same_rule(monkeypatch, tmp_path):
    """evaluate --amp [--cpu-amp] hands the model the dtype training would use on the device;
    training's amp_setup and config validation read the same functions."""
    from sepico_fast import evaluate
    from sepico_fast.models import build_segmentor
    from sepico_fast.train import runner
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed

    cfg = make_config({"proj_dim": 16})
    ckpt = atomic_save({"state_dict": prefixed("model.", build_segmentor(cfg.arch, 19, 16).state_dict()),
                        "meta": {"iter": 0, "config": cfg.to_dict()}}, tmp_path / "ckpt.pt")
    seen = []

    def fake_evaluate_model(model, batches, num_classes, *, amp_dtype, **kwargs):
        seen.append(amp_dtype)
        from sepico_fast.metrics import ConfusionMatrix
        return ConfusionMatrix(num_classes)

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    for flags, train_flags in (([], {}), (["--amp"], {"amp": True}), (["--amp", "--cpu-amp"], {"amp": True, "cpu_amp": True})):
        result = evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu", "--max-images", "1"] + flags)
        dtype, scaler, desc = runner.amp_setup(make_config(train_flags), CPU)
        assert seen[-1] == dtype and result["precision"] == desc and scaler is None
    assert seen == [None, None, torch.bfloat16]
    # on a GPU without bf16 tensor cores both pick fp16 (training adds the GradScaler)
    _fake_gpu(monkeypatch, native_bf16=False)
    with warnings.catch_warnings():  # GradScaler('cuda') without CUDA warns and disables itself
        warnings.simplefilter("ignore")
        dtype, scaler, desc = runner.amp_setup(make_config({"amp": True}), CUDA)
    assert dtype == choose_precision(CUDA, amp=True).dtype == torch.float16 and scaler is not None
    assert runner.choose_precision is devmod.choose_precision and evaluate.choose_precision is devmod.choose_precision
