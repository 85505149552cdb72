"""load_official: upstream key layouts, UDA/published/bare/backbone files, strict errors."""
import logging
from pathlib import Path

import pytest
import torch

from sepico_fast.checkpoint import LoadReport, load_official, load_pretrained, uda_state_dict
from sepico_fast.models import build_segmentor

# Upstream state-dict layouts (key, dtype, shape per line), see docs/models.md.
REF = Path(__file__).resolve().parent / "data"


def synthetic_checkpoint(name, device="cpu", seed=0):
    """A state dict with exactly the keys/dtypes/shapes of ``keys_<name>.txt`` and random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for line in (REF / f"keys_{name}.txt").read_text().splitlines():
        key, dtype, shape = line.split()
        shape = () if shape == "scalar" else tuple(int(s) for s in shape.split(","))
        if device == "meta":
            sd[key] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        elif dtype == "int64":
            sd[key] = torch.randint(0, 1000, shape, generator=gen)
        else:
            sd[key] = torch.randn(shape, generator=gen)
    return sd


def meta_model(arch):
    with torch.device("meta"):
        return build_segmentor(arch)


def assert_state_equal(model, sd, prefix=""):
    own = model.state_dict()
    assert len(own) == len(sd)
    for k, v in sd.items():
        assert torch.equal(own[prefix + k] if prefix else own[k], v), k


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(1)
    return build_segmentor("daformer_tiny"), build_segmentor("daformer_tiny")


# ----------------------------------------------------------------------------- upstream layouts

@pytest.mark.parametrize("arch", ["daformer_mitb0", "dlv2_r50"])
def test_synthetic_upstream_checkpoint_round_trip_values(arch, tmp_path):
    sd = synthetic_checkpoint(arch)
    model = build_segmentor(arch)
    path = tmp_path / "ckpt.pth"
    torch.save({"meta": {"iter": 40000, "CLASSES": ("road",)}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    report = load_official(model, path)
    assert report.kind == "segmentor" and report.loaded == len(sd)
    assert report.missing == report.unexpected == report.random_init == []
    assert_state_equal(model, sd)
    assert list(model.state_dict()) == list(sd)  # same order, so our saves match upstream files


@pytest.mark.parametrize("arch", ["daformer_mitb5", "dlv2_r101"])
def test_big_layouts_load_strictly_on_meta(arch):
    sd = synthetic_checkpoint(arch, device="meta")
    for prefix in ("model.", "ema_model."):
        uda = {f"model.{k}": v for k, v in sd.items()} | {f"ema_model.{k}": v for k, v in sd.items()}
        report = load_official(meta_model(arch), {"state_dict": uda}, prefix=prefix)
        assert report.kind == "uda" and report.loaded == len(sd) and len(report.ignored) == len(sd)


# ----------------------------------------------------------------------------- checkpoint kinds

def test_uda_checkpoint_loads_student_or_teacher(tiny_pair, tmp_path):
    student, teacher = tiny_pair
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {}, "state_dict": uda_state_dict(student, teacher), "optimizer": {}}, path)
    for prefix, want in (("model.", student), ("ema_model.", teacher)):
        target = build_segmentor("daformer_tiny")
        report = load_official(target, str(path), prefix=prefix)
        assert report.kind == "uda" and report.prefix == prefix
        assert report.loaded == len(want.state_dict()) and report.unexpected == []
        assert all(k.startswith("ema_model." if prefix == "model." else "model.") for k in report.ignored)
        assert_state_equal(target, want.state_dict())


def test_nested_model_and_ema_model_dicts(tiny_pair):
    student, teacher = tiny_pair
    ckpt = {"model": student.state_dict(), "ema_model": teacher.state_dict(), "optimizer": {"x": 1}}
    target = build_segmentor("daformer_tiny")
    assert load_official(target, ckpt, prefix="ema_model.").kind == "uda"
    assert_state_equal(target, teacher.state_dict())


def test_published_and_bare_and_wrapped_checkpoints(tiny_pair):
    student, _ = tiny_pair
    sd = student.state_dict()
    variants = {
        "published (model. prefix)": {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "bare": dict(sd),
        "DDP module.": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "DDP inside UDA": {f"model.module.{k}": v for k, v in sd.items()},
    }
    for what, ckpt in variants.items():
        target = build_segmentor("daformer_tiny")
        report = load_official(target, ckpt)
        assert report.kind == "segmentor", what
        assert report.missing == report.unexpected == [], what
        assert_state_equal(target, sd)
    with pytest.raises(ValueError, match="no teacher"):
        load_official(build_segmentor("daformer_tiny"), dict(sd), prefix="ema_model.")
    with pytest.raises(ValueError, match="published checkpoints hold the student"):
        load_official(build_segmentor("daformer_tiny"), variants["published (model. prefix)"],
                      prefix="ema_model.")


def test_load_pretrained_path_and_its_errors(tiny_pair, tmp_path, capsys):
    """``--pretrained``: loads a file and says what it loaded; a bad file is one line naming the flag."""
    student, _ = tiny_pair
    path = tmp_path / "seg.pth"
    torch.save({"state_dict": student.state_dict()}, path)
    target = build_segmentor("daformer_tiny")
    report = load_pretrained(target, path)
    assert_state_equal(target, student.state_dict())
    assert f"pretrained: {report.loaded} tensors (segmentor, upstream layout) from {path}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^--pretrained: checkpoint file not found: .*nope\.pth$"):
        load_pretrained(target, tmp_path / "nope.pth")
    with pytest.raises(SystemExit, match=r"^--pretrained: checkpoint does not fit dlv2_tiny"):
        load_pretrained(build_segmentor("dlv2_tiny"), path)


def test_models_never_import_checkpoint():
    """One-directional import graph: checkpoint -> models, never models -> checkpoint."""
    import ast

    root = Path(__file__).resolve().parents[1] / "sepico_fast" / "models"
    offenders = []
    for py in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "checkpoint" or n.endswith(".checkpoint") for n in names):
                offenders.append(f"{py.name}:{node.lineno}")
    assert offenders == []


# ----------------------------------------------------------------------------- ImageNet backbones

@pytest.mark.parametrize("layout", ["top", "state_dict", "model"])
def test_mit_imagenet_backbone_file(layout, tmp_path, caplog):
    source = build_segmentor("daformer_tiny")
    local = dict(source.backbone.state_dict())
    local["head.weight"] = torch.randn(1000, 128)  # NVlabs classifier, ignored
    local["head.bias"] = torch.randn(1000)
    ckpt = {"top": local, "state_dict": {"state_dict": local}, "model": {"model": local}}[layout]
    path = tmp_path / "mit_tiny.pth"
    torch.save(ckpt, path)
    target = build_segmentor("daformer_tiny")
    heads_before = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("backbone.")}
    with caplog.at_level(logging.INFO, logger="sepico_fast.checkpoint"):
        report = load_official(target, path)
    assert report.kind == "backbone"
    assert report.random_init == ["decode_head", "auxiliary_head"]
    assert sorted(report.ignored) == ["head.bias", "head.weight"] and report.unexpected == []
    assert "randomly initialised" in caplog.text
    assert_state_equal(target.backbone, source.backbone.state_dict())
    for k, v in heads_before.items():
        assert torch.equal(target.state_dict()[k], v), k


def test_resnet_v1c_backbone_file():
    source = build_segmentor("dlv2_r50")
    local = dict(source.backbone.state_dict())
    local["fc.weight"], local["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    target = build_segmentor("dlv2_r50")
    report = load_official(target, {"meta": {}, "state_dict": local})
    assert report.kind == "backbone" and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert "stem.0.weight" in local
    assert_state_equal(target.backbone, source.backbone.state_dict())


def test_backbone_file_without_bn_counters_loads():
    """Old ResNet files may lack num_batches_tracked (unused with BN momentum 0.1): tolerated."""
    source = build_segmentor("dlv2_tiny")
    local = {k: v for k, v in source.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    report = load_official(build_segmentor("dlv2_tiny"), local)
    assert report.kind == "backbone" and report.missing
    assert all(k.endswith("num_batches_tracked") for k in report.missing)


def test_backbone_file_of_another_variant_raises():
    b0_backbone = {k.removeprefix("backbone."): v for k, v in synthetic_checkpoint("daformer_mitb0").items()
                   if k.startswith("backbone.")}
    with pytest.raises(ValueError, match=r"daformer_tiny backbone.*shape mismatches.*matches the daformer_mitb0 backbone"):
        load_official(build_segmentor("daformer_tiny"), b0_backbone)
    r101 = {k.removeprefix("backbone."): v for k, v in synthetic_checkpoint("dlv2_r101", "meta").items()
            if k.startswith("backbone.")}
    with pytest.raises(ValueError, match=r"keys not in this architecture.*layer3\.6\."):
        load_official(meta_model("dlv2_r50"), r101)


# ----------------------------------------------------------------------------- bad checkpoints

def test_checkpoint_of_another_arch_raises_naming_mismatches():
    with pytest.raises(ValueError) as err:
        load_official(build_segmentor("daformer_tiny"), synthetic_checkpoint("daformer_mitb0"))
    msg = str(err.value)
    assert "does not fit daformer_tiny" in msg and "shape mismatches" in msg
    assert "backbone.patch_embed1.proj.weight: checkpoint (32, 3, 7, 7) vs model (16, 3, 7, 7)" in msg
    assert "matches the daformer_mitb0 layout" in msg
    # DeepLab checkpoint into DAFormer: mostly missing / foreign keys.
    with pytest.raises(ValueError, match=r"missing keys.*keys not in this architecture.*dlv2_r50"):
        load_official(meta_model("daformer_mitb5"), synthetic_checkpoint("dlv2_r50", "meta"))
    # ResNet-101 into ResNet-50: every needed key fits, the extra blocks must not be ignored.
    with pytest.raises(ValueError, match=r"keys not in this architecture.*backbone\.layer3\.6\..*dlv2_r101"):
        load_official(meta_model("dlv2_r50"), synthetic_checkpoint("dlv2_r101", "meta"))


def test_missing_key_and_wrong_shape_raise(tiny_pair):
    sd = dict(tiny_pair[0].state_dict())
    missing = dict(sd)
    del missing["decode_head.fuse_layer.bottleneck.bn.running_var"]
    with pytest.raises(ValueError, match=r"1 missing keys.*decode_head\.fuse_layer\.bottleneck\.bn\.running_var"):
        load_official(build_segmentor("daformer_tiny"), missing)
    report = load_official(build_segmentor("daformer_tiny"), missing, strict=False)
    assert report.missing == ["decode_head.fuse_layer.bottleneck.bn.running_var"]
    assert report.random_init == ["decode_head"]
    wrong = dict(sd)
    wrong["auxiliary_head.convs.1.conv.weight"] = torch.zeros(256, 60, 1, 1)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"auxiliary_head\.convs\.1\.conv\.weight: checkpoint \(256, 60, 1, 1\)"):
            load_official(build_segmentor("daformer_tiny"), wrong, strict=strict)
    classes = build_segmentor("daformer_tiny", num_classes=16)
    with pytest.raises(ValueError, match=r"conv_seg\.weight: checkpoint \(19, 64, 1, 1\) vs model \(16, 64, 1, 1\)"):
        load_official(classes, sd)


def test_unknown_extra_keys_are_reported_not_loaded(tiny_pair, caplog):
    sd = dict(tiny_pair[0].state_dict())
    sd["imnet_model.foo"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="sepico_fast.checkpoint"):
        report = load_official(build_segmentor("daformer_tiny"), sd)
    assert isinstance(report, LoadReport) and report.unexpected == ["imnet_model.foo"]
    assert "unexpected keys" in caplog.text and "1 e.g." in repr(report)


def test_bad_arguments(tmp_path):
    model = build_segmentor("daformer_tiny")
    with pytest.raises(FileNotFoundError):
        load_official(model, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="prefix must be one of"):
        load_official(model, {}, prefix="student.")
    with pytest.raises(ValueError, match="path or a dict"):
        load_official(model, [1, 2])
    with pytest.raises(ValueError, match="no tensors"):
        load_official(model, {"meta": {"iter": 1}})
    with pytest.raises(ValueError, match="segmentor with a .backbone"):
        load_official(torch.nn.Linear(2, 2), {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit the daformer_tiny backbone.*missing keys"):
        load_official(model, {"random.weight": torch.zeros(3)})
