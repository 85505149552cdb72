"""DINOv2 encoders against transformers' Dinov2Model, Hugging Face files, the pyramid and the segmentor.

The reference is transformers' own DINOv2 (4.x, the layout of the facebook/dinov2-* hub files),
built from local configs with random weights: nothing is downloaded.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.checkpoint import load_official
from sepico_fast.models import ARCHS, build_segmentor
from sepico_fast.models.dinov2 import DINOV2_CONFIGS, DinoV2Config, DinoVisionTransformer, resample_matrix

transformers = pytest.importorskip("transformers", reason="transformers (test extra, 4.x) is not installed")
pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

TOL = 1e-5  # fp32: max |ours - transformers| / max |transformers| per hidden state


def hf_model(cfg: DinoV2Config, seed: int = 0):
    common = dict(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  mlp_ratio=cfg.mlp_ratio, image_size=cfg.pos_grid * cfg.patch_size, patch_size=cfg.patch_size,
                  layerscale_value=0.5, attn_implementation="eager")
    torch.manual_seed(seed)
    if cfg.num_registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    with torch.no_grad():  # random values everywhere (zero biases / unit norms would hide mistakes)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ours_from(hf, cfg: DinoV2Config) -> DinoVisionTransformer:
    model = build_segmentor("dinov2_tiny")  # the loader needs a segmentor; swap in this backbone
    model.backbone = DinoVisionTransformer(cfg, drop_path_rate=0.0)
    report = load_official(model, hf.state_dict())
    assert report.layout == "huggingface" and report.kind == "backbone"
    assert report.ignored == ["embeddings.mask_token"] and report.unexpected == []
    return model.backbone.eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(56, 56), (42, 70), (28, 28)])
def test_hidden_states_equal_transformers(registers, size):
    """Every hidden state, random weights, fp32: at the native position grid (28x28: 2x2) and
    with the position embeddings interpolated to a square and a non-square grid."""
    cfg = DinoV2Config(48, 3, 3, pos_grid=2, num_registers=registers)
    hf = hf_model(cfg)
    ours = ours_from(hf, cfg)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        got = ours.hidden_states(x)
    want = list(ref.hidden_states) + [ref.last_hidden_state]
    assert len(got) == len(want) == cfg.depth + 2
    diffs = [rel(g, w) for g, w in zip(got, want)]
    assert all(g.shape == w.shape for g, w in zip(got, want))
    assert max(diffs) < TOL, diffs


def test_pyramid_levels_are_normed_block_outputs_resampled():
    cfg = DinoV2Config(48, 4, 3, pos_grid=3)
    hf = hf_model(cfg, seed=1)
    ours = ours_from(hf, cfg)
    assert cfg.out_indices == (0, 1, 2, 3) and DINOV2_CONFIGS["vitl14"].out_indices == (5, 11, 17, 23)
    assert DINOV2_CONFIGS["vitb14"].out_indices == (2, 5, 8, 11)
    x = torch.randn(1, 3, 56, 84)  # multiples of 14: no padding; strides 4..32 -> ceil sizes
    with torch.no_grad():
        levels = ours(x)
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert [tuple(t.shape[2:]) for t in levels] == [(14, 21), (7, 11), (4, 6), (2, 3)]
    norm = hf.layernorm
    for level, (t, s) in enumerate(zip(levels, (4, 8, 16, 32))):
        tokens = norm(ref[cfg.out_indices[level] + 1])[:, 1:].reshape(1, 4, 6, -1)
        mh = resample_matrix(t.shape[2], s, 4, 0)
        mw = resample_matrix(t.shape[3], s, 6, 0)
        want = torch.einsum("Hh,bhwc,Ww->bcHW", mh, tokens, mw)
        assert rel(t, want) < TOL
    # Stride 4 from stride 14 upsamples: plain bilinear of the token map (align_corners=False)
    # wherever the cell centre lies inside the token grid.
    tokens = norm(ref[1])[:, 1:].reshape(1, 4, 6, -1).permute(0, 3, 1, 2)
    bil = F.interpolate(tokens, scale_factor=3.5, mode="bilinear", align_corners=False)
    assert rel(levels[0][..., 2:-2, 2:-2], bil[..., 2:-2, 2:-2]) < TOL


def test_resample_matrix_rows_and_padding_alignment():
    m = resample_matrix(32, 4, 10, 6)  # 128 px padded to 140 (6 before): 32 cells of 4 px
    assert torch.allclose(m.sum(1), torch.ones(32))
    # a ramp in pixel units sampled at token centres is reproduced at cell centres (linear filter)
    tok_centres = torch.arange(10) * 14 + 7 - 6.0
    cell_centres = torch.arange(32) * 4 + 2.0
    inside = (cell_centres >= tok_centres[0]) & (cell_centres <= tok_centres[-1])
    assert torch.allclose((m @ tok_centres)[inside], cell_centres[inside], atol=1e-4)
    down = resample_matrix(4, 32, 10, 6)  # stride 32: a triangle over several tokens
    assert (down > 0).sum(1).min() >= 4 and torch.allclose(down.sum(1), torch.ones(4))


@pytest.mark.parametrize("size", [(128, 128), (100, 75), (33, 47)])
def test_any_input_size_is_padded_and_read_back(size):
    model = build_segmentor("dinov2_tiny", proj_dim=16).eval()
    h, w = size
    with torch.no_grad():
        feats = model.extract(torch.randn(1, 3, h, w))
        logits, emb = model(torch.randn(1, 3, h, w))
    assert [tuple(f.shape[2:]) for f in feats] == [(-(-h // s), -(-w // s)) for s in (4, 8, 16, 32)]
    assert logits.shape[2:] == feats[0].shape[2:] and emb.shape[1] == 16
    assert torch.isfinite(logits).all()


def test_segmentor_structure_and_param_counts():
    for arch in [a for a in ARCHS if a.startswith("dinov2_")]:
        with torch.device("meta"):
            model = build_segmentor(arch)
        cfg = model.backbone.config
        assert model.output_stride == 4 and model.backbone.widths == (cfg.dim,) * 4
        keys = list(model.backbone.state_dict())
        assert ("register_tokens" in keys) == arch.endswith("_reg")
        assert f"blocks.{cfg.depth - 1}.ls2.gamma" in keys
    # the hub configs (image 518, patch 14): transformers' count less the unused mask token
    for arch, (dim, depth, heads) in (("dinov2_vitb14", (768, 12, 12)), ("dinov2_vitl14", (1024, 24, 16))):
        with torch.device("meta"):
            ours = build_segmentor(arch).backbone
            ref = transformers.Dinov2Model(transformers.Dinov2Config(
                image_size=518, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads))
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) - dim
    assert sum(p.numel() for p in ours.parameters()) == 304_367_616  # ViT-L/14


def test_hub_folder_safetensors_and_bin_load_strictly(tmp_path, caplog):
    cfg = DINOV2_CONFIGS["tiny"]
    hf = hf_model(cfg, seed=2)
    want = None
    for safe in (True, False):
        folder = tmp_path / ("safe" if safe else "bin")
        hf.save_pretrained(folder, safe_serialization=safe)
        name = "model.safetensors" if safe else "pytorch_model.bin"
        for path in (folder / name, folder):
            model = build_segmentor("dinov2_tiny")
            with caplog.at_level(logging.INFO, logger="sepico_fast.checkpoint"):
                report = load_official(model, path)
            assert report.layout == "huggingface" and report.random_init == ["decode_head", "auxiliary_head"]
            assert report.loaded == len(model.backbone.state_dict())
            sd = model.backbone.state_dict()
            want = want or sd
            assert all(torch.equal(sd[k], want[k]) for k in want)
    blk = hf.encoder.layer[1]
    got = model.backbone.blocks[1]
    att = blk.attention.attention
    assert torch.equal(got.attn.qkv.weight, torch.cat([att.query.weight, att.key.weight, att.value.weight]))
    assert torch.equal(got.ls2.gamma, blk.layer_scale2.lambda1)
    assert torch.equal(model.backbone.pos_embed, hf.embeddings.position_embeddings)
    # a classification model's file (dinov2.* + classifier.*) loads the same encoder
    cls = transformers.Dinov2ForImageClassification(hf.config)
    cls.dinov2.load_state_dict(hf.state_dict())
    model = build_segmentor("dinov2_tiny")
    report = load_official(model, cls.state_dict())
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight", "dinov2.embeddings.mask_token"]
    assert all(torch.equal(model.backbone.state_dict()[k], want[k]) for k in want)


def test_hf_dinov2_files_fail_with_one_clear_line():
    sd = hf_model(DINOV2_CONFIGS["tiny"]).state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.2.mlp.fc1.bias"}
    with pytest.raises(ValueError, match=r"dinov2_tiny backbone: 1 missing keys.*blocks\.2\.mlp\.fc1\.bias"):
        load_official(build_segmentor("dinov2_tiny"), missing)
    no_key = {k: v for k, v in sd.items() if k != "encoder.layer.0.attention.attention.key.weight"}
    with pytest.raises(ValueError, match=r"not part of the transformers 4\.x Dinov2Model layout.*blocks\.0\.attn\.qkv"):
        load_official(build_segmentor("dinov2_tiny"), no_key)
    swiglu = dict(sd)
    swiglu["encoder.layer.0.mlp.weights_in.weight"] = swiglu.pop("encoder.layer.0.mlp.fc1.weight")
    with pytest.raises(ValueError, match=r"1 encoder keys .*mlp\.weights_in\.weight"):
        load_official(build_segmentor("dinov2_tiny"), swiglu)
    with pytest.raises(ValueError, match=r"shape mismatches.*pos_embed") as err:
        load_official(build_segmentor("dinov2_tiny"), hf_model(DinoV2Config(64, 4, 2, pos_grid=3)).state_dict())
    assert "\n" not in str(err.value)
    reg = hf_model(DinoV2Config(64, 4, 2, pos_grid=10, num_registers=4)).state_dict()
    with pytest.raises(ValueError, match=r"1 keys not in this architecture.*register_tokens"):
        load_official(build_segmentor("dinov2_tiny"), reg)
    with pytest.raises(ValueError, match=r"DINOv2 encoder but daformer_tiny has a MixVisionTransformer backbone"):
        load_official(build_segmentor("daformer_tiny"), sd)


def test_train_mode_drop_path_and_grads_reach_every_parameter():
    torch.manual_seed(0)
    model = build_segmentor("dinov2_tiny", proj_dim=16, drop_path_rate=0.5).train()
    x = torch.randn(2, 3, 64, 64)
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.equal(a, b)
    model.set_stochastic(False)
    with torch.no_grad():
        c, _ = model(x)
        d, _ = model(x)
    # BN in train mode uses batch statistics; with the same batch, same result
    assert torch.equal(c, d)
    model.set_stochastic(True).zero_grad()
    logits, emb = model(x)
    (logits.square().mean() + emb.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- training recipe
def _groups_by_param(groups):
    return {id(p): (g["lr_mult"], g["decay_mult"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_vit_param_groups_layer_decay_and_no_decay_on_norms_biases_tokens():
    from sepico_fast.models import param_groups, resolved_decay_rule, vit_layer_id

    model = build_segmentor("dinov2_tiny", proj_dim=16)
    assert resolved_decay_rule(model) == "vit" and resolved_decay_rule(build_segmentor("dlv2_tiny")) == "upstream"
    groups = param_groups(model, lr=1.0, weight_decay=0.05, head_lr_mult=10.0, layer_decay=0.5, decay_rule="vit")
    by = _groups_by_param(groups)
    depth = model.backbone.config.depth  # 4
    named = dict(model.named_parameters())
    assert len(by) == len(named)
    expect = {
        "backbone.cls_token": (0.5 ** 5, 0.0), "backbone.pos_embed": (0.5 ** 5, 0.0),
        "backbone.patch_embed.proj.weight": (0.5 ** 5, 1.0), "backbone.patch_embed.proj.bias": (0.5 ** 5, 0.0),
        "backbone.blocks.0.attn.qkv.weight": (0.5 ** 4, 1.0), "backbone.blocks.0.ls1.gamma": (0.5 ** 4, 0.0),
        "backbone.blocks.3.norm2.weight": (0.5, 0.0), "backbone.blocks.3.mlp.fc2.weight": (0.5, 1.0),
        "backbone.norm.weight": (1.0, 0.0),
        "decode_head.conv_seg.weight": (10.0, 1.0), "decode_head.conv_seg.bias": (10.0, 0.0),
        "auxiliary_head.convs.0.bn.weight": (10.0, 0.0), "auxiliary_head.convs.1.conv.weight": (10.0, 1.0),
    }
    for name, (lr_mult, decay_mult) in expect.items():
        got = by[id(named[name])]
        assert got[:2] == (pytest.approx(lr_mult), decay_mult), name
        assert got[2] == pytest.approx(lr_mult) and got[3] == pytest.approx(0.05 * decay_mult)
    assert vit_layer_id("register_tokens", depth) == 0 and vit_layer_id("blocks.2.attn.proj.bias", depth) == 3
    # Every weight matrix / kernel decays, nothing with <= 1 dimension does.
    for name, p in named.items():
        token = name.split(".")[1] in ("cls_token", "pos_embed", "register_tokens")
        assert by[id(p)][1] == (0.0 if p.ndim <= 1 or token else 1.0), name
    # layer_decay 1.0: one lr for the whole backbone
    plain = _groups_by_param(param_groups(model, 1.0, 0.05, decay_rule="vit"))
    assert {plain[id(p)][0] for n, p in named.items() if n.startswith("backbone.")} == {1.0}
    with pytest.raises(ValueError, match="DINOv2"):
        param_groups(build_segmentor("daformer_tiny"), 1.0, 0.01, layer_decay=0.9)


def test_recipe_flags_presets_and_optimizer(tmp_path):
    from sepico_fast.train.config import PRESETS, make_config, parse_args
    from sepico_fast.train.runner import build_optimizer

    for name, arch, decay in (("dinov2b_gta2cs", "dinov2_vitb14", 0.7), ("dinov2l_gta2cs", "dinov2_vitl14", 0.8)):
        cfg = make_config(preset=name)
        assert (cfg.arch, cfg.layer_decay, cfg.decay_rule, cfg.weight_decay) == (arch, decay, "vit", 0.05)
        assert cfg.crop == [640, 640] and cfg.pretrained.startswith("pretrained/dinov2-")
    assert {"dinov2b_gta2cs", "dinov2l_gta2cs"} <= set(PRESETS)
    cfg = make_config(dict(arch="dinov2_tiny", layer_decay=0.75, proj_dim=16))
    model = build_segmentor("dinov2_tiny", proj_dim=16)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    mults = sorted({g["lr_mult"] for g in opt.param_groups})
    assert mults == pytest.approx(sorted({0.75 ** k for k in range(0, 6)} | {cfg.head_lr_mult}))
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    # bad values: one line naming the flag, exit status 2
    for argv, msg in ((["--arch", "dlv2_tiny", "--layer-decay", "0.8"], "--layer-decay: layer-wise lr decay is for dinov2_"),
                      (["--arch", "dinov2_tiny", "--layer-decay", "0"], "--layer-decay: must be in (0, 1]"),
                      (["--decay-rule", "none"], "--decay-rule")):
        with pytest.raises(SystemExit) as err:
            parse_args(argv)
        assert err.value.code == 2
    # upstream rule on a ViT is allowed (explicit choice); crop: multiples of 4, padded to 14 inside
    assert make_config(dict(arch="dinov2_tiny", decay_rule="upstream", crop=[100, 100])).crop == [100, 100]
    with pytest.raises(ValueError, match=r"--crop: each side must be a multiple of 4"):
        make_config(dict(arch="dinov2_tiny", crop=[98, 98]))
