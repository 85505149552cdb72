"""Fallbacks on CUDA inputs are loud; the trainer says what runs; debug checks are eager.

No GPU here: CUDA conditions are faked (objects that say they are on CUDA, a patched
compute capability, a patched import of the Triton kernels), since only the choice of
implementation is under test, never a kernel.
"""
import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from sepico_fast import dispatch
from sepico_fast.contrast import validation
from sepico_fast.dispatch import resolve_impl
from sepico_fast.ops import _dispatch

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fresh_logs(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_logged", set())


def warnings_of(caplog, name):
    return [r for r in caplog.records if r.name == name and r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------- ops (extension)
def test_ops_fallback_on_cuda_warns_once_with_the_reason(monkeypatch, caplog, fresh_logs):
    monkeypatch.setattr(_dispatch, "EXTENSION_AVAILABLE", False)
    monkeypatch.setattr(_dispatch, "EXTENSION_STATUS", "not built: its build failed at install (boom)")
    caplog.set_level(logging.INFO, logger="sepico_fast.ops")
    for _ in range(3):
        assert resolve_impl("classmix", None, CUDA) == "torch"
    warned = warnings_of(caplog, "sepico_fast.ops")
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "classmix" in warned[0].getMessage() and "boom" in warned[0].getMessage()
    # another op warns on its own; CPU inputs never warn
    resolve_impl("pseudo_label", None, CUDA)
    resolve_impl("pseudo_label", None, torch.device("cpu"))
    assert len(warnings_of(caplog, "sepico_fast.ops")) == 2


def test_ops_no_kernel_image_for_the_gpu_falls_back(monkeypatch, caplog, fresh_logs):
    """Built extension, GPU without code in it (sm_70): torch, with a warning; sm_86 runs
    the sm_80 machine code."""
    monkeypatch.setattr(_dispatch, "EXTENSION_AVAILABLE", True)
    cap = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    caplog.set_level(logging.INFO, logger="sepico_fast.ops")
    assert resolve_impl("select_crop_windows", None, CUDA) == "torch"
    (warned,) = warnings_of(caplog, "sepico_fast.ops")
    assert "sm_70" in warned.getMessage() and "sm_75" in warned.getMessage()
    with pytest.raises(RuntimeError, match="sm_70"):
        resolve_impl("select_crop_windows", "cuda", CUDA)
    cap["value"] = (8, 6)
    assert resolve_impl("select_crop_windows", None, CUDA) == "cuda"
    assert len(warnings_of(caplog, "sepico_fast.ops")) == 1
    report = _dispatch.implementation_report(CUDA)
    assert set(report) == set(_dispatch.CUDA_OPS) and {v[0] for v in report.values()} == {"cuda"}


def test_install_record_names_why_the_extension_is_missing(monkeypatch, tmp_path):
    status = tmp_path / "_ext_build.json"
    monkeypatch.setattr(_dispatch, "_STATUS_FILE", status)
    monkeypatch.delenv("SEPICO_FAST_DISABLE_EXT", raising=False)
    status.write_text(json.dumps({"state": "failed", "detail": "nvcc: cuda_runtime.h not found"}))
    ok, why = _dispatch._load_extension()
    if ok:
        pytest.skip("the CUDA extension is built and loads here")
    assert why == "not built: its build failed at install (nvcc: cuda_runtime.h not found)"
    status.write_text(json.dumps({"state": "skipped", "detail": "torch is not a CUDA build"}))
    assert _dispatch._load_extension()[1] == "not built at install (torch is not a CUDA build)"
    status.unlink()
    assert _dispatch._load_extension()[1].startswith("not built (")


# ----------------------------------------------------------------------------- contrast (Triton)
def test_contrast_fallback_on_cuda_warns_once_per_op_and_reason(monkeypatch, caplog, fresh_logs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    caplog.set_level(logging.WARNING, logger="sepico_fast.contrast")
    for _ in range(2):  # float64 features have no Triton kernel
        assert resolve_impl("dist_contrast_loss", None, CUDA, dtype=torch.float64) == "torch"
    monkeypatch.setattr(validation, "_kernels_import",
                        lambda: (None, "ModuleNotFoundError: No module named 'triton'"))
    for _ in range(2):
        assert resolve_impl("dist_contrast_loss", None, CUDA, dtype=torch.bfloat16) == "torch"
    messages = [r.getMessage() for r in warnings_of(caplog, "sepico_fast.contrast")]
    assert len(messages) == 2, messages
    assert "torch.float64" in messages[0] and "No module named 'triton'" in messages[1]
    # CPU inputs: the torch reference is the intended path, no warning
    resolve_impl("dist_contrast_loss", None, torch.device("cpu"), dtype=torch.float32)
    assert len(warnings_of(caplog, "sepico_fast.contrast")) == 2


def test_contrast_old_gpu_takes_torch(monkeypatch, caplog, fresh_logs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(validation, "_kernels_import", lambda: (object(), ""))
    caplog.set_level(logging.WARNING, logger="sepico_fast.contrast")
    assert resolve_impl("class_moments", None, CUDA, dtype=torch.float16) == "torch"
    (warned,) = warnings_of(caplog, "sepico_fast.contrast")
    assert "sm_70" in warned.getMessage()


def test_contrast_report_lists_every_kernel(monkeypatch):
    fake_kernels = types.SimpleNamespace(**{op: object() for op in validation.TRITON_OPS})
    monkeypatch.setattr(validation, "_kernels_import", lambda: (fake_kernels, ""))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    from sepico_fast.contrast import implementation_report
    cuda = implementation_report("cuda:0")
    assert set(cuda) == set(validation.TRITON_OPS)
    assert all(impl == "triton" for impl, _ in cuda.values())
    assert all(impl == "torch" and why == "inputs not on CUDA"
               for impl, why in implementation_report("cpu").values())


# ----------------------------------------------------------------------------- trainer
def test_trainer_prints_the_implementation_of_each_op(capsys, monkeypatch):
    from sepico_fast.train.config import parse_args
    from sepico_fast.train.implementations import announce_implementations
    monkeypatch.setattr(validation, "_debug_checks", False)
    announce_implementations(parse_args([]), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.startswith("implementations on cpu:")
    for op in validation.TRITON_OPS + _dispatch.CUDA_OPS:
        assert op in out, op
    assert "debug checks" not in out


def test_configure_logging_shows_sepico_fast_warnings(monkeypatch):
    code = ("import logging, sys\n"
            "from sepico_fast.train.implementations import configure_logging\n"
            "configure_logging()\n"
            "logging.getLogger('sepico_fast.ops').warning('fallback: why')\n"
            "logging.getLogger('sepico_fast.ops').info('chosen: what')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING sepico_fast.ops: fallback: why" in proc.stderr
    assert "INFO sepico_fast.ops: chosen: what" in proc.stderr


# ----------------------------------------------------------------------------- debug checks
class _FalseOnCuda:
    """A failed 0-d boolean check that says it lives on CUDA."""
    device = CUDA

    def dim(self):
        return 0

    def __bool__(self):
        return False


def test_check_value_is_async_on_cuda_and_eager_in_debug_mode(monkeypatch):
    queued = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: queued.append(msg))
    monkeypatch.setattr(validation, "_debug_checks", False)
    validation.check_value(_FalseOnCuda(), "labels must hold values in 0..18")
    assert queued == ["labels must hold values in 0..18"], "default: queued, no sync"
    validation.set_debug_checks(True)
    with pytest.raises(ValueError, match=r"labels must hold values in 0\.\.18"):
        validation.check_value(_FalseOnCuda(), "labels must hold values in 0..18")
    assert len(queued) == 1
    validation.set_debug_checks(False)
    assert not validation.debug_checks()


def test_debug_checks_switches(monkeypatch, capsys):
    code = "from sepico_fast.contrast import validation; print(validation.debug_checks())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "SEPICO_FAST_DEBUG_CHECKS": value}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.stdout.strip() == expected, proc.stderr
    from sepico_fast.train.config import parse_args
    from sepico_fast.train.implementations import announce_implementations
    monkeypatch.setattr(validation, "_debug_checks", False)
    cfg = parse_args(["--debug-checks"])
    assert cfg.debug_checks is True
    announce_implementations(cfg, torch.device("cpu"))
    assert validation.debug_checks()
    assert "debug checks: on" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one rule, both families
def test_one_dispatch_rule_for_contrast_and_ops():
    """Both families answer sepico_fast.dispatch.resolve_impl(op, impl, device, dtype): CPU
    inputs take torch, names a family lacks are refused in the same words, unknown ops say so."""
    cpu = torch.device("cpu")
    for op in validation.TRITON_OPS + _dispatch.CUDA_OPS:
        assert resolve_impl(op, None, cpu, torch.float32) == "torch"
        assert resolve_impl(op, "torch", cpu) == "torch"
        with pytest.raises(ValueError, match="impl must be None or one of"):
            resolve_impl(op, "fast", cpu)
    with pytest.raises(ValueError, match="has no kernel for classmix; available impls: torch, cuda"):
        resolve_impl("classmix", "triton", cpu)
    with pytest.raises(ValueError, match="has no kernel for class_moments; available impls: torch, triton"):
        resolve_impl("class_moments", "cuda", cpu)
    with pytest.raises(KeyError, match="no implementation choice registered for op 'nope'"):
        resolve_impl("nope", None, cpu)
