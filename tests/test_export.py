"""python -m sepico_fast.export: ONNX (run with onnxruntime) and TorchScript files give the
PyTorch inference logits at image sizes and batch sizes other than the traced ones."""
import pytest
import torch
import torch.nn.functional as F

from sepico_fast.export import main
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.run_checkpoints import atomic_save, prefixed


def _checkpoint(tmp_path, arch):
    """A training-format checkpoint of a tiny model whose BN running statistics are not the
    defaults (so an export in training mode would show)."""
    torch.manual_seed(0)
    cfg = make_config({"arch": arch, "proj_dim": 16, "crop": [64, 64]})
    model = build_segmentor(arch, 19, 16)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = atomic_save({"state_dict": prefixed("model.", model.state_dict()),
                        "meta": {"iter": 0, "config": cfg.to_dict()}}, tmp_path / "latest.pt")
    return path, model.eval()


def _reference(model, x, upsample=True):
    """What the export must compute: eval-mode predict, bilinear to the input size."""
    with torch.no_grad():
        logits = model.decode(model.extract(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False) if upsample else logits


SIZES = [(1, 96, 64), (3, 64, 160)]


def _assert_close(got, ref):
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("arch, exporter", [("dlv2_tiny", "dynamo"), ("daformer_tiny", "legacy"),
                                            ("dinov2_tiny", "legacy"), ("dinov2_tiny", "dynamo")])
def test_onnx_file_runs_in_onnxruntime_at_any_size(tmp_path, arch, exporter):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (export extra) is not installed")
    pytest.importorskip("onnx", reason="onnx (export extra) is not installed")
    ckpt, model = _checkpoint(tmp_path, arch)
    result = main(["--checkpoint", str(ckpt), "--format", "onnx", "--onnx-exporter", exporter])
    assert result["out"] == str(tmp_path / "latest.onnx") and result["check_rel_diff"] < 1e-5
    sess = ort.InferenceSession(result["out"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
    g = torch.Generator().manual_seed(1)
    for b, h, w in SIZES:
        x = torch.randn(b, 3, h, w, generator=g)
        _assert_close(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), _reference(model, x))


def test_torchscript_file_at_any_size_and_native_stride(tmp_path):
    ckpt, model = _checkpoint(tmp_path, "daformer_tiny")
    out = tmp_path / "model.ts.pt"
    main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)])
    main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "stride.ts.pt"),
          "--native-stride"])
    full, stride = torch.jit.load(str(out)), torch.jit.load(str(tmp_path / "stride.ts.pt"))
    g = torch.Generator().manual_seed(2)
    for b, h, w in SIZES:
        x = torch.randn(b, 3, h, w, generator=g)
        with torch.no_grad():
            _assert_close(full(x), _reference(model, x))
            _assert_close(stride(x), _reference(model, x, upsample=False))
    assert stride(torch.zeros(1, 3, 64, 96)).shape == (1, 19, 16, 24)


def test_export_errors_name_the_flag(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model = build_segmentor("dlv2_tiny")
    bare = tmp_path / "bare.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    with pytest.raises(SystemExit, match=r"^--checkpoint: .*no training config: name the architecture \(--arch\)"):
        main(["--checkpoint", str(bare), "--format", "torchscript"])
    out = main(["--checkpoint", str(bare), "--format", "torchscript", "--arch", "dlv2_tiny", "--size", "64", "64",
                "--out", str(tmp_path / "b.ts.pt")])
    assert out["arch"] == "dlv2_tiny" and out["check_rel_diff"] < 1e-5
    with pytest.raises(SystemExit, match="--checkpoint: file"):
        main(["--checkpoint", str(tmp_path / "nope.pt"), "--format", "onnx"])


def test_unresolved_crop_zero_traces_at_the_dataset_default(tmp_path):
    """crop [0, 0] in the checkpoint's config: traced at the pair's default crop (it stopped
    with a misleading '--size: ... got [0, 0]')."""
    cfg = make_config({"proj_dim": 16}).to_dict()
    cfg["crop"] = [0, 0]
    model = build_segmentor("dlv2_tiny", 19, 16)
    ckpt = atomic_save({"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg}},
                       tmp_path / "latest.pt")
    out = main(["--checkpoint", str(ckpt), "--format", "torchscript"])
    assert out["check_rel_diff"] < 1e-5 and out["out"] == str(tmp_path / "latest.ts.pt")
