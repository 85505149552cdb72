"""Config, presets, schedule, EMA and error messages of the trainer."""
from __future__ import annotations

import pytest
import torch

from sepico_fast.train.config import PRESETS, TrainConfig, make_config, parse_args
from sepico_fast.train.schedule import lr_factor
from sepico_fast.train.uda import ema_update, fuse_day_night, log_frequency_class_weights, make_teacher


def test_defaults_presets_and_overrides():
    cfg = parse_args([])
    assert cfg.preset == "synthetic" and cfg.source == cfg.target == "synthetic" and not cfg.amp
    cfg = parse_args(["--amp", "--preset", "daformer_gta2cs", "--crop", "512x256", "--seed", "5", "--no-blur"])
    assert cfg.amp and cfg.arch == "daformer_mitb5" and cfg.crop == [512, 256] and cfg.seed == 5 and not cfg.blur
    assert cfg.iters == 40000 and cfg.contrast_start == 3000 and cfg.warmup_iters == 1500 and cfg.lr == 6e-5
    paper = {k for k in PRESETS if k != "synthetic" and not k.startswith("dinov2")}  # dinov2*: not the paper's
    assert paper == {f"{a}_{p}" for a in ("daformer", "dlv2") for p in ("gta2cs", "synthia2cs", "cs2dz", "cs2acdc")}
    assert PRESETS["daformer_cs2dz"]["seed"] == 42 and PRESETS["dlv2_cs2dz"]["iters"] == 60000
    assert PRESETS["dlv2_gta2cs"]["arch"] == "dlv2_r101" and PRESETS["daformer_gta2cs"]["seed"] == 76
    assert parse_args(["--crop", "96"]).crop == [96, 96]
    # GTA/SYNTHIA -> Cityscapes ignore 15 top / 120 bottom rows of a 640 crop, scaled for others
    assert make_config(preset="daformer_gta2cs").ignore_rows() == (15, 120)
    assert make_config({"crop": [320, 320]}, preset="dlv2_synthia2cs").ignore_rows() == (8, 60)
    assert make_config(preset="daformer_cs2dz").ignore_rows() == (0, 0)
    # Cityscapes -> ACDC: the DAFormer family's 512 crop, 40k iterations, seed 0; no ignored rows
    acdc = make_config(preset="daformer_cs2acdc")
    assert (acdc.source, acdc.target, acdc.crop, acdc.iters, acdc.seed) == ("cityscapes", "acdc", [512, 512], 40000, 0)
    assert acdc.ignore_rows() == (0, 0) and not acdc.dark_zurich
    assert make_config(preset="dlv2_cs2acdc").arch == "dlv2_r101"


@pytest.mark.parametrize("argv, flag", [
    (["--crop", "4"], "--crop"), (["--iters", "0"], "--iters"), (["--lr", "-1"], "--lr"),
    (["--ema-alpha", "1.5"], "--ema-alpha"), (["--source", "darkzurich", "--target", "cityscapes"], "--source"),
    (["--source", "acdc", "--target", "cityscapes"], "--source"),
    (["--source", "gta", "--target", "synthetic"], "--target"), (["--preset", "nope"], "--preset"),
    (["--device", "tpu"], "--device"), (["--betas", "0.9"], "--betas"),
    (["--crop", "129"], "--crop"), (["--arch", "daformer_tiny", "--crop", "130"], "--crop"),
    (["--arch", "resnet9000"], "--arch"), (["--seed", "-3"], "--seed"), (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    (["--ddp-timeout", "0"], "--ddp-timeout"), (["--resume", "/no/such/ckpt.pt"], "--resume"),
    (["--resume", "auto"], "--resume"),
])
def test_bad_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1  # one line, no usage dump


def test_crop_message_gives_the_allowed_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--crop", "129"])
    err = capsys.readouterr().err
    assert "multiple of 8" in err and "dlv2_tiny" in err and "128 or 136" in err
    assert parse_args(["--arch", "daformer_tiny", "--crop", "36"]).crop == [36, 36]  # stride 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA is not available" in err and "auto or cpu" in err


def test_help_shows_the_bare_run_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--preset synthetic" in out and "(default: dlv2_tiny)" in out and "(default: 128 128)" in out
    assert "(default: 2000)" in out and "--list-presets" in out


def test_dataclass_defaults_are_the_bare_run():
    import dataclasses

    bare, plain = parse_args([]), TrainConfig()
    assert dataclasses.asdict(bare) == dataclasses.asdict(plain) and PRESETS["synthetic"] == {}
    assert bare.explicit == frozenset() and parse_args(["--seed", "4"]).explicit == {"seed"}
    for name in (k for k in PRESETS if k != "synthetic"):  # paper values do not leak from the CPU default
        cfg = make_config(preset=name)
        assert (cfg.ema_alpha, cfg.pseudo_threshold, cfg.proj_dim, cfg.pipeline) == (0.999, 0.968, 512, "auto")
        crop = [512, 512] if cfg.target == "acdc" else [640, 640]  # ACDC at 960x540: the DAFormer family's crop
        assert (cfg.lr, cfg.warmup_iters, cfg.contrast_start, cfg.crop) == (6e-5, 1500, 3000, crop)


def test_resume_file_that_is_not_a_checkpoint(tmp_path):
    from sepico_fast.train.runner import run

    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="--resume: .*notes.pt: not a loadable checkpoint") as exc:
        run(make_config({"resume": str(notes), "work_dir": str(tmp_path / "wd")}))
    assert "\n" not in str(exc.value) and not (tmp_path / "wd").exists()  # before any work


@pytest.mark.parametrize("argv", [["--variant", "foo"], ["--method", "x"], ["--pipeline", "x"], ["--amp", "maybe"]])
def test_bad_choices_exit(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_make_config_value_error_names_field():
    with pytest.raises(ValueError, match="--batch-size"):
        make_config({"batch_size": 0})
    with pytest.raises(ValueError, match="unknown config field"):
        make_config({"bogus": 1})


def test_missing_dataset_gives_clear_error(tmp_path):
    from sepico_fast.train.runner import run
    cfg = make_config({"source": "gta", "target": "cityscapes", "data_root": str(tmp_path / "nowhere"),
                       "work_dir": str(tmp_path / "wd")})
    with pytest.raises(SystemExit) as exc:
        run(cfg)
    msg = str(exc.value)
    assert "--data-root" in msg and "nowhere" in msg


def test_schedule_warmup_and_poly():
    assert lr_factor(0, 100, 10, 1e-6) == pytest.approx(1e-6)
    # mmcv: warm-up scales the poly rate linearly from ratio to 1
    t = 5
    poly = 1 - t / 100
    assert lr_factor(t, 100, 10, 1e-6) == pytest.approx(poly * (1 - (1 - t / 10) * (1 - 1e-6)))
    assert lr_factor(10, 100, 10) == pytest.approx(0.9)
    assert lr_factor(100, 100, 10) == 0.0
    assert lr_factor(50, 100, 0, power=2.0) == pytest.approx(0.25)


def test_ema_copy_then_lerp():
    s = [torch.randn(3, 4), torch.randn(5)]
    t = [torch.zeros(3, 4), torch.zeros(5)]
    ema_update(t, s, 0, 0.999)
    assert all(torch.equal(a, b) for a, b in zip(t, s))
    old = [x.clone() for x in t]
    s2 = [x + 1 for x in s]
    ema_update(t, s2, 1, 0.999)  # alpha_1 = min(1 - 1/2, 0.999) = 0.5
    for a, o, n in zip(t, old, s2):
        torch.testing.assert_close(a, 0.5 * o + 0.5 * n)
    ema_update(t, s2, 5000, 0.999)  # alpha capped at 0.999


def test_teacher_has_no_grad_and_no_dropout_but_bn_trains():
    from sepico_fast.models import build_segmentor
    student = build_segmentor("daformer_tiny", 19, 16)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    drops = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)
             or "droppath" in type(m).__name__.lower()]
    assert bns and all(m.training for m in bns)
    assert drops and all(not m.training for m in drops)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(x), teacher.predict(x))  # no stochastic layers


def test_day_night_fusion():
    day = torch.softmax(torch.randn(1, 19, 4, 4), 1)
    night = torch.softmax(torch.randn(1, 19, 4, 4), 1)
    fused = fuse_day_night(day, night, None, 0.8)
    for c in range(19):
        if c < 5 or 8 <= c < 11:
            w = torch.where(day[:, c] > 0.4, 0.8, 0.2)
            torch.testing.assert_close(fused[:, c], w * day[:, c] + (1 - w) * night[:, c])
        else:
            torch.testing.assert_close(fused[:, c], night[:, c])
    w = log_frequency_class_weights()
    assert w.shape == (19,) and abs(float(w.mean()) - 1) < 1e-5 and abs(float(w.std()) - 0.05) < 1e-5
    assert w[18] > w[0]  # rare bicycle weighs more than road
