"""Hugging Face SegFormer encoders and safetensors files through load_official / --pretrained.

The reference is transformers' own SegFormer (4.x, the layout of the nvidia/mit-b* hub files),
built from a local SegformerConfig with random weights: nothing is downloaded.
"""
import logging

import pytest
import torch
from torch import nn

from sepico_fast.checkpoint import is_safetensors_file, load_official, read_checkpoint
from sepico_fast.models import build_segmentor
from sepico_fast.models.mit import MIT_CONFIGS

transformers = pytest.importorskip("transformers", reason="transformers (test extra, 4.x) is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

HF_EPS = 1e-5  # every LayerNorm of transformers' SegFormer uses the nn.LayerNorm default


@pytest.fixture(autouse=True)
def one_thread():
    """These models run hundreds of tiny float64 ops: on a busy 2-core CPU two intra-op
    threads make them about 4x slower than one (measured: MiT-B5 test 45 s vs 11 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(variant: str, num_labels: int = 7):
    c = MIT_CONFIGS[variant]
    return transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=list(c.depths), sr_ratios=list(c.sr_ratios),
        hidden_sizes=list(c.widths), patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        num_attention_heads=list(c.num_heads), mlp_ratios=[c.mlp_ratio] * 4, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


def hf_classifier(variant: str, seed: int = 0):
    """SegformerForImageClassification with every parameter randomised (biases and LayerNorm
    affine too, so that a wrong mapping of any of them shows)."""
    torch.manual_seed(seed)
    model = transformers.SegformerForImageClassification(hf_config(variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def set_layernorm_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def relative_diffs(ref, ours, x):
    """max |ours - ref| / max |ref| for each of the four stage outputs."""
    with torch.no_grad():
        got = ours.backbone(x)
    assert len(ref) == len(got) == 4
    out = []
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        out.append(float((r - g).abs().max() / r.abs().max()))
    return out


@pytest.mark.parametrize("variant", ["b0", "b5"])
def test_hf_encoder_matches_our_backbone_in_float64(variant):
    hf = hf_classifier(variant).double()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
    # Built on meta and materialised uninitialised: every backbone tensor is then loaded
    # (the heads are not used here), which skips minutes of random init for B5.
    with torch.device("meta"):
        ours = build_segmentor(f"daformer_mit{variant}")
    ours = ours.to_empty(device="cpu").eval()
    report = load_official(ours, hf.state_dict())
    del hf
    assert report.kind == "backbone" and report.layout == "huggingface"
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight"] and report.unexpected == []
    assert report.loaded == len(ours.backbone.state_dict())
    ours.double()
    real_eps = relative_diffs(ref, ours, x)
    set_layernorm_eps(ours.backbone, HF_EPS)
    same_eps = relative_diffs(ref, ours, x)
    print(f"\nMiT-{variant.upper()} vs transformers, float64, 64x64, max |diff| / max |ref| per stage: "
          f"eps matched {['%.1e' % d for d in same_eps]}; our eps (1e-6 in block/stage norms) "
          f"{['%.1e' % d for d in real_eps]}")
    assert max(same_eps) <= 1e-10
    # At the real eps the only difference left is 1e-6 vs 1e-5 inside 10 + 2·depth LayerNorms.
    assert 0 < max(real_eps) < 1e-2


def test_hub_files_safetensors_bin_folder_and_encoder_only(tmp_path, caplog):
    hf = hf_classifier("tiny")
    want = None
    for safe in (True, False):
        folder = tmp_path / ("safe" if safe else "bin")
        hf.save_pretrained(folder, safe_serialization=safe)
        name = "model.safetensors" if safe else "pytorch_model.bin"
        assert (folder / name).is_file() and is_safetensors_file(folder / name) == safe
        for path in (folder / name, folder):
            model = build_segmentor("daformer_tiny")
            with caplog.at_level(logging.INFO, logger="sepico_fast.checkpoint"):
                report = load_official(model, path)
            assert report.layout == "huggingface" and report.random_init == ["decode_head", "auxiliary_head"]
            assert "huggingface layout" in caplog.text
            sd = model.backbone.state_dict()
            want = want or sd
            assert all(torch.equal(sd[k], want[k]) for k in want)
    # SegformerModel (no classifier) writes encoder.* keys.
    base = transformers.SegformerModel(hf_config("tiny"))
    base.encoder.load_state_dict(hf.segformer.encoder.state_dict())
    keys = list(base.state_dict())
    assert keys[0].startswith("encoder.patch_embeddings.0.")
    model = build_segmentor("daformer_tiny")
    report = load_official(model, base.state_dict())
    assert report.ignored == [] and all(torch.equal(model.backbone.state_dict()[k], want[k]) for k in want)


def test_hf_mapping_places_query_key_value_as_q_and_kv():
    hf = hf_classifier("tiny")
    model = build_segmentor("daformer_tiny")
    load_official(model, hf.state_dict())
    blk_hf = hf.segformer.encoder.block[2][0]
    blk = model.backbone.block3[0]
    att = blk_hf.attention.self
    assert torch.equal(blk.attn.q.weight, att.query.weight)
    assert torch.equal(blk.attn.kv.weight, torch.cat([att.key.weight, att.value.weight]))
    assert torch.equal(blk.attn.kv.bias, torch.cat([att.key.bias, att.value.bias]))
    assert torch.equal(blk.attn.norm.bias, att.layer_norm.bias)
    assert torch.equal(blk.attn.proj.weight, blk_hf.attention.output.dense.weight)
    assert torch.equal(blk.mlp.fc2.bias, blk_hf.mlp.dense2.bias)
    assert torch.equal(model.backbone.norm3.weight, hf.segformer.encoder.layer_norm[2].weight)
    assert torch.equal(model.backbone.patch_embed4.norm.weight,
                       hf.segformer.encoder.patch_embeddings[3].layer_norm.weight)


def test_hf_files_fail_strictly_with_clear_errors():
    sd = hf_classifier("tiny").state_dict()
    missing = {k: v for k, v in sd.items() if k != "segformer.encoder.block.1.0.mlp.dense1.bias"}
    with pytest.raises(ValueError, match=r"daformer_tiny backbone: 1 missing keys.*block2\.0\.mlp\.fc1\.bias"):
        load_official(build_segmentor("daformer_tiny"), missing)
    no_value = {k: v for k, v in sd.items() if k != "segformer.encoder.block.0.0.attention.self.value.weight"}
    with pytest.raises(ValueError, match=r"not part of the transformers 4\.x layout.*block1\.0\.attn\.kv\.weight"):
        load_official(build_segmentor("daformer_tiny"), no_value)
    renamed = dict(sd)
    renamed["segformer.encoder.block.0.0.attention.self.qkv.weight"] = renamed.pop(
        "segformer.encoder.block.0.0.attention.self.query.weight")
    with pytest.raises(ValueError, match=r"1 encoder keys .*attention\.self\.qkv\.weight"):
        load_official(build_segmentor("daformer_tiny"), renamed)
    with pytest.raises(ValueError, match=r"shape mismatches.*matches the daformer_mitb0 backbone layout"):
        load_official(build_segmentor("daformer_tiny"), hf_classifier("b0").state_dict())
    with pytest.raises(ValueError, match=r"SegFormer \(MiT\) encoder but dlv2_tiny has a ResNetV1c backbone"):
        load_official(build_segmentor("dlv2_tiny"), sd)


def test_safetensors_segmentor_file_and_weights_only_reading(tmp_path):
    torch.manual_seed(3)
    src = build_segmentor("dlv2_tiny")
    path = tmp_path / "weights.bin"  # recognised by content, not by name
    safetensors_torch.save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert is_safetensors_file(path)
    target = build_segmentor("dlv2_tiny")
    assert load_official(target, path).kind == "segmentor"
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), src.state_dict().values()))
    # numeric numpy arrays (e.g. an RNG state) are read with weights_only=True ...
    import numpy as np

    ckpt = tmp_path / "train.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
                "rng": {"numpy": np.random.get_state()}}, ckpt)
    assert isinstance(read_checkpoint(ckpt)["rng"]["numpy"][1], np.ndarray)
    assert load_official(build_segmentor("dlv2_tiny"), ckpt).kind == "segmentor"
    # ... other pickled objects are refused with a message naming real remedies only.
    bad = tmp_path / "pickled.pt"
    torch.save({"state_dict": src.state_dict(), "obj": logging.Formatter()}, bad)
    with pytest.raises(ValueError) as err:
        read_checkpoint(bad)
    msg = str(err.value)
    assert "as weights only" in msg and "logging.Formatter" in msg and "weights_only=False) from Python" in msg
    assert "\n" not in msg and "pass weights_only=False" not in msg
    assert "obj" in read_checkpoint(bad, weights_only=False)


def test_evaluate_reads_safetensors_and_names_a_bad_file(tmp_path):
    from sepico_fast.evaluate import main

    torch.manual_seed(0)
    model = build_segmentor("dlv2_tiny")
    path = tmp_path / "student.safetensors"
    safetensors_torch.save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    result = main(["--checkpoint", str(path), "--arch", "dlv2_tiny", "--dataset", "synthetic", "--max-images", "1"])
    assert 0 <= result["miou"] <= 100
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^--checkpoint: could not read .*junk\.pt: not a torch\.save or "
                                         r"safetensors file, or damaged \(UnpicklingError"):
        main(["--checkpoint", str(junk), "--arch", "dlv2_tiny"])


def test_trainer_pretrained_flag_loads_a_hub_folder_into_student_and_teacher(tmp_path, capsys):
    from sepico_fast.train.config import make_config
    from sepico_fast.train.ddp import DistInfo
    from sepico_fast.train.runner import _step_context

    hf = hf_classifier("tiny")
    hf.save_pretrained(tmp_path / "mit-tiny")
    cfg = make_config(dict(arch="daformer_tiny", pretrained=str(tmp_path / "mit-tiny"), proj_dim=16))
    ctx, _ = _step_context(cfg, torch.device("cpu"), DistInfo(), tmp_path)
    assert "pretrained: " in capsys.readouterr().out
    want = build_segmentor("daformer_tiny")
    load_official(want, hf.state_dict())
    for model in (ctx.student, ctx.teacher):
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.backbone.state_dict().items())
