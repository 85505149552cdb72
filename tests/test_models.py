"""Segmentor structure, numerics and training-friendliness (method §2, docs/models.md "Upstream layouts").

Big architectures (MiT-B5, ResNet-101) are only built on the meta device; forward passes run
on the tiny variants, MiT-B0 and ResNet-50 at small inputs.
"""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.models import build_segmentor, param_groups

# Upstream state-dict layouts (key, dtype, shape per line), see docs/models.md.
REF = Path(__file__).resolve().parent / "data"
KEY_FILES = ["daformer_mitb0", "daformer_mitb5", "dlv2_r50", "dlv2_r101"]
UPSTREAM_PARAMS = {"daformer_mitb5": 85_550_035, "daformer_mitb0": 7_032_947,
                 "dlv2_r101": 49_168_300, "dlv2_r50": 30_176_172}


def read_layout(name):
    rows = []
    for line in (REF / f"keys_{name}.txt").read_text().splitlines():
        key, dtype, shape = line.split()
        rows.append((key, dtype, () if shape == "scalar" else tuple(int(s) for s in shape.split(","))))
    return rows


def meta_model(arch, **kw):
    with torch.device("meta"):
        return build_segmentor(arch, **kw)


def layout(model):
    return [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("arch", KEY_FILES)
def test_state_dict_layout_equals_upstream_key_file(arch):
    model = meta_model(arch)
    assert layout(model) == read_layout(arch)  # names, order, dtypes, shapes
    assert sum(p.numel() for p in model.parameters()) == UPSTREAM_PARAMS[arch]


@pytest.mark.parametrize("variant,depths", [("b1", (2, 2, 2, 2)), ("b2", (3, 4, 6, 3)),
                                            ("b3", (3, 4, 18, 3))])
def test_mit_b1_to_b3_follow_the_b5_layout(variant, depths):
    """B1..B3 have B5's widths with fewer blocks per stage: their layout is B5's with blocks cut."""
    b5 = read_layout("daformer_mitb5")
    kept = []
    for key, dtype, shape in b5:
        m = re.match(r"backbone\.block(\d)\.(\d+)\.", key)
        if m is None or int(m.group(2)) < depths[int(m.group(1)) - 1]:
            kept.append((key, dtype, shape))
    assert layout(meta_model(f"daformer_mit{variant}")) == kept


def test_mit_b4_depths():
    bb = meta_model("daformer_mitb4").backbone
    assert [len(getattr(bb, f"block{s}")) for s in range(1, 5)] == [3, 8, 27, 3]
    assert bb.widths == (64, 128, 320, 512)


def test_tiny_variants_have_upstream_structure():
    tiny = layout(meta_model("daformer_tiny"))
    b0 = read_layout("daformer_mitb0")
    # Same module structure as B0 with one block per stage.
    strip = lambda rows: [re.sub(r"\d+", "#", k) for k, _, _ in rows]  # noqa: E731
    assert sorted(set(strip(tiny))) == sorted(set(strip(b0)))
    assert dict((k, s) for k, _, s in tiny)["decode_head.conv_seg.weight"] == (19, 64, 1, 1)
    r50 = read_layout("dlv2_r50")
    assert sorted(set(strip(layout(meta_model("dlv2_tiny"))))) == sorted(set(strip(r50)))


def test_unknown_arch_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_segmentor("daformer_mitb9")
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentor("daformer_tiny", num_classes=0)
    with pytest.raises(ValueError, match="proj_dim"):
        build_segmentor("daformer_tiny", proj_dim=-1)
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_segmentor("daformer_tiny", drop_path_rate=1.5)


def test_mit_norm_eps_and_drop_path_schedule():
    model = meta_model("daformer_mitb5")
    bb = model.backbone
    for name, m in bb.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            want = 1e-5 if (name.startswith("patch_embed") or name.endswith("attn.norm")) else 1e-6
            assert m.eps == want, name
    rates = [blk.drop_path.drop_prob for s in range(1, 5) for blk in getattr(bb, f"block{s}")]
    assert len(rates) == 52 and rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * i / 51 for i in range(52)], abs=1e-7)


def test_resnet_contract_dilation_and_strides():
    bb = meta_model("dlv2_r101").backbone
    conv2 = {n: (m.stride[0], m.dilation[0], m.padding[0])
             for n, m in bb.named_modules() if n.endswith("conv2")}
    assert conv2["layer1.0.conv2"] == (1, 1, 1)
    assert conv2["layer2.0.conv2"] == (2, 1, 1)
    assert conv2["layer3.0.conv2"] == (1, 1, 1) and conv2["layer3.22.conv2"] == (1, 2, 2)
    assert conv2["layer4.0.conv2"] == (1, 2, 2) and conv2["layer4.2.conv2"] == (1, 4, 4)
    assert [m.stride[0] for m in bb.stem if isinstance(m, torch.nn.Conv2d)] == [2, 1, 1]


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("arch,size", [("daformer_tiny", (64, 96)), ("dlv2_tiny", (64, 96)),
                                       ("daformer_mitb0", (64, 64)), ("dlv2_r50", (48, 48))])
def test_output_shapes_and_head_api(arch, size):
    model = build_segmentor(arch, num_classes=7, proj_dim=24).eval()
    h, w = size
    img = torch.randn(2, 3, h, w)
    stride = 4 if arch.startswith("daformer") else 8
    with torch.no_grad():
        seg, proj = model(img)
        feats = model.extract(img)
        assert len(feats) == 4
        torch.testing.assert_close(model.decode(feats), seg)
        torch.testing.assert_close(model.project(feats), proj)
        torch.testing.assert_close(model.predict(img), seg)
    assert seg.shape == (2, 7, h // stride, w // stride)
    assert proj.shape == (2, 24, h // stride, w // stride)
    assert model.output_stride == stride
    norms = proj.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    assert (proj >= 0).all()  # last ReLU before the normalisation
    widths = [f.shape[1] for f in feats]
    assert widths == list(model.backbone.widths)


def test_odd_input_size_daformer():
    model = build_segmentor("daformer_tiny").eval()
    with torch.no_grad():
        seg, proj = model(torch.randn(1, 3, 70, 90))
    assert seg.shape[2:] == (math.ceil(70 / 4), math.ceil(90 / 4)) == proj.shape[2:]


def test_predict_does_not_run_projection_head():
    model = build_segmentor("daformer_tiny").eval()
    calls = []
    model.auxiliary_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.predict(torch.randn(1, 3, 32, 32))
    assert calls == []


@pytest.mark.parametrize("arch", ["daformer_tiny", "dlv2_tiny", "dinov2_tiny"])
def test_autocast_bf16_close_to_fp32(arch):
    """bf16 autocast: logits within 5% relative (Frobenius) of fp32, embeddings cos > 0.99."""
    model = build_segmentor(arch).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        seg32, proj32 = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seg16, proj16 = model(img)
    assert seg16.dtype == torch.bfloat16 and proj16.dtype == torch.bfloat16
    rel = (seg16.float() - seg32).norm() / seg32.norm()
    assert rel < 5e-2, rel
    cos = (proj16.float() * proj32).sum(1)
    assert cos.min() > 0.99, cos.min()


@pytest.mark.parametrize("arch", ["daformer_tiny", "dlv2_tiny", "dinov2_tiny"])
def test_channels_last_gives_same_result(arch):
    model = build_segmentor(arch).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(img)
        model = model.to(memory_format=torch.channels_last)
        out = model(img.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_train_mode_is_stochastic_eval_is_not_and_all_params_get_grads():
    model = build_segmentor("daformer_tiny", drop_path_rate=0.5)
    img = torch.randn(2, 3, 64, 64)
    a = model(img)[0]
    b = model(img)[0]
    assert not torch.allclose(a, b)  # drop-path + Dropout2d active
    (a.square().mean() + model(img)[1].mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(img)[0], model(img)[0])


def test_set_stochastic_false_keeps_bn_training_but_drops_no_paths():
    model = build_segmentor("daformer_tiny", drop_path_rate=0.5).set_stochastic(False)
    model.train()
    assert model.training and model.decode_head.fuse_layer.bottleneck.bn.training
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(img)[0], model(img)[0]
    torch.testing.assert_close(a, b)  # deterministic: no dropout, no drop-path
    bn = model.decode_head.fuse_layer.bottleneck.bn
    assert int(bn.num_batches_tracked) == 2  # BN still used batch statistics
    model.set_stochastic(True)
    assert model.decode_head.dropout.training and model.backbone.block1[0].drop_path.training


@pytest.mark.parametrize("arch", ["daformer_tiny", "dlv2_tiny", "dinov2_tiny"])
def test_dynamo_traces_without_graph_breaks(arch):
    import torch._dynamo

    torch._dynamo.reset()
    model = build_segmentor(arch).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


# ----------------------------------------------------------------------------- numerics
# Functional re-statements of docs/models.md ("Upstream layouts"), written from the text only and
# fed with the model's state dict: they check the module wiring (head split, kv split,
# eps, resize order, branch order, dilations) independently of the module code.

def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _lin(x, sd, key):
    return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])


def _bn(x, sd, key):  # eval-mode BN
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"],
                        sd[key + ".weight"], sd[key + ".bias"], False, 0.0, 1e-5)


def _conv_module(x, sd, key, **kw):
    return F.relu(_bn(F.conv2d(x, sd[key + ".conv.weight"], **kw), sd, key + ".bn"))


def ref_mit(img, sd, heads, srs, depths):
    outs, x = [], img
    for s in range(1, 5):
        p = f"backbone.patch_embed{s}"
        x = F.conv2d(x, sd[p + ".proj.weight"], sd[p + ".proj.bias"],
                     stride=4 if s == 1 else 2, padding=3 if s == 1 else 1)
        b, c, h, w = x.shape
        t = _ln(x.flatten(2).transpose(1, 2), sd, p + ".norm", 1e-5)
        nh, sr = heads[s - 1], srs[s - 1]
        for i in range(depths[s - 1]):
            k = f"backbone.block{s}.{i}"
            y = _ln(t, sd, k + ".norm1", 1e-6)
            q = _lin(y, sd, k + ".attn.q")
            src = y
            if sr > 1:
                grid = y.transpose(1, 2).reshape(b, c, h, w)
                grid = F.conv2d(grid, sd[k + ".attn.sr.weight"], sd[k + ".attn.sr.bias"], stride=sr)
                src = _ln(grid.flatten(2).transpose(1, 2), sd, k + ".attn.norm", 1e-5)
            kv = _lin(src, sd, k + ".attn.kv")
            key, val = kv[..., :c], kv[..., c:]
            d = c // nh
            att = []
            for j in range(nh):  # heads = contiguous channel slices
                qj, kj, vj = (z[..., j * d:(j + 1) * d] for z in (q, key, val))
                att.append(torch.softmax(qj @ kj.transpose(1, 2) / math.sqrt(d), -1) @ vj)
            t = t + _lin(torch.cat(att, -1), sd, k + ".attn.proj")
            y = _lin(_ln(t, sd, k + ".norm2", 1e-6), sd, k + ".mlp.fc1")
            y = F.conv2d(y.transpose(1, 2).reshape(b, -1, h, w), sd[k + ".mlp.dwconv.dwconv.weight"],
                         sd[k + ".mlp.dwconv.dwconv.bias"], padding=1, groups=y.shape[-1])
            y = y.flatten(2).transpose(1, 2)
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # exact GELU
            t = t + _lin(y, sd, k + ".mlp.fc2")
        t = _ln(t, sd, f"backbone.norm{s}", 1e-6)
        x = t.transpose(1, 2).reshape(b, c, h, w)
        outs.append(x)
    return outs


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def ref_daformer_head(feats, sd):
    size = feats[0].shape[2:]
    emb = []
    for i, f in enumerate(feats):
        e = _lin(f.flatten(2).transpose(1, 2), sd, f"decode_head.embed_layers.{i}.proj")
        e = e.transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:])
        emb.append(_resize(e, size) if e.shape[2:] != size else e)
    x = torch.cat(emb, 1)
    p = "decode_head.fuse_layer.aspp_modules"
    branches = [_conv_module(x, sd, p + ".0")]
    for j, d in zip((1, 2, 3), (6, 12, 18)):
        y = _conv_module(x, sd, f"{p}.{j}.depthwise_conv", padding=d, dilation=d, groups=x.shape[1])
        branches.append(_conv_module(y, sd, f"{p}.{j}.pointwise_conv"))
    x = _conv_module(torch.cat(branches, 1), sd, "decode_head.fuse_layer.bottleneck", padding=1)
    return F.conv2d(x, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def ref_proj_head(feats, sd, resize_concat):
    if resize_concat:
        x = torch.cat([_resize(f, feats[0].shape[2:]) for f in feats], 1)
    else:
        x = feats[3]
    x = _conv_module(_conv_module(x, sd, "auxiliary_head.convs.0"), sd, "auxiliary_head.convs.1")
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def ref_resnet(img, sd, blocks):
    x = img
    for i, stride in zip((0, 3, 6), (2, 1, 1)):
        x = F.relu(_bn(F.conv2d(x, sd[f"backbone.stem.{i}.weight"], stride=stride, padding=1),
                       sd, f"backbone.stem.{i + 1}"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for layer, (n, stride, dil) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4)), start=1):
        for i in range(n):
            k = f"backbone.layer{layer}.{i}"
            d = max(dil // 2, 1) if i == 0 else dil
            s = stride if i == 0 else 1
            y = F.relu(_bn(F.conv2d(x, sd[k + ".conv1.weight"]), sd, k + ".bn1"))
            y = F.relu(_bn(F.conv2d(y, sd[k + ".conv2.weight"], stride=s, padding=d, dilation=d), sd, k + ".bn2"))
            y = _bn(F.conv2d(y, sd[k + ".conv3.weight"]), sd, k + ".bn3")
            if k + ".downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[k + ".downsample.0.weight"], stride=s), sd, k + ".downsample.1")
            x = F.relu(y + x)
        outs.append(x)
    return outs


def ref_dlv2_head(feats, sd):
    return sum(F.conv2d(feats[3], sd[f"decode_head.aspp_modules.{j}.conv.weight"],
                        sd[f"decode_head.aspp_modules.{j}.conv.bias"], padding=d, dilation=d)
               for j, d in enumerate((6, 12, 18, 24)))


def _randomise_bn_stats(model):
    """Non-trivial running statistics and affine BN terms so the eval-mode BN path is tested."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("arch,heads,depths", [("daformer_tiny", (1, 1, 2, 4), (1, 1, 1, 1)),
                                               ("daformer_mitb0", (1, 2, 5, 8), (2, 2, 2, 2))])
def test_daformer_matches_functional_reference(arch, heads, depths):
    model = build_segmentor(arch).eval()
    _randomise_bn_stats(model)
    sd = model.state_dict()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        seg, proj = model(img)
        feats = ref_mit(img, sd, heads, (8, 4, 2, 1), depths)
        for a, b in zip(model.extract(img), feats):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seg, ref_daformer_head(feats, sd), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(proj, ref_proj_head(feats, sd, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,blocks", [("dlv2_tiny", (1, 1, 1, 1)), ("dlv2_r50", (3, 4, 6, 3))])
def test_dlv2_matches_functional_reference(arch, blocks):
    model = build_segmentor(arch).eval()
    _randomise_bn_stats(model)
    sd = model.state_dict()
    img = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        seg, proj = model(img)
        feats = ref_resnet(img, sd, blocks)
        for a, b in zip(model.extract(img), feats):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seg, ref_dlv2_head(feats, sd), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(proj, ref_proj_head(feats, sd, False), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- optimizer groups

def test_param_groups_daformer():
    model = build_segmentor("daformer_tiny")
    groups = param_groups(model, lr=6e-5, weight_decay=0.01)
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen = [name_of[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(name_of.values())  # every parameter exactly once
    for g in groups:
        for p in g["params"]:
            n = name_of[id(p)]
            head = n.startswith(("decode_head.", "auxiliary_head."))
            assert g["lr"] == pytest.approx(6e-4 if head else 6e-5), n
            no_decay = not head and "norm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), n
    decayless = {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "backbone.block1.0.attn.norm.weight" in decayless
    assert "backbone.patch_embed2.norm.bias" in decayless and "backbone.norm4.weight" in decayless
    assert "backbone.block1.0.attn.q.weight" not in decayless
    # Usable by AdamW as is.
    torch.optim.AdamW(groups, lr=6e-5, betas=(0.9, 0.999))


def test_param_groups_dlv2_decays_resnet_bn():
    model = build_segmentor("dlv2_tiny")
    groups = param_groups(model, lr=1.0, weight_decay=0.5, head_lr_mult=3.0)
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(1.0, 0.5), (3.0, 0.5)}


# ----------------------------------------------------------------------------- FLOP counter

def test_flop_counts_match_closed_form_and_cli_prints(capsys):
    from sepico_fast.models.__main__ import main
    from sepico_fast.models.flops import model_cost

    # ProjHead = two 1x1 convs: 2 FLOPs per multiply-add, per output pixel.
    c = model_cost("dlv2_tiny", 64, 64)
    assert c.flops_proj == 2 * (512 * 512 + 512 * 512) * 8 * 8
    c = model_cost("daformer_tiny", 64, 64)
    assert c.flops_proj == 2 * (240 * 60 + 60 * 512) * 16 * 16
    # DLV2 head: four 3x3 convs 512 -> 19 at stride 8.
    assert model_cost("dlv2_tiny", 64, 64).flops_decode == 4 * 2 * 19 * 512 * 9 * 8 * 8
    assert c.params == sum(p.numel() for p in build_segmentor("daformer_tiny").parameters())
    assert c.flops_infer == c.flops_backbone + c.flops_decode > 0
    main(["daformer_tiny", "--size", "64", "64"])
    out = capsys.readouterr().out
    assert "| daformer_tiny | 708,843 |" in out and "2 FLOPs" in out
    with pytest.raises(SystemExit):
        main(["resnet9000"])
