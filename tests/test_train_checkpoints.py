"""Checkpoint files: weights_only loading, independent latest.pt, checksums and
the --resume auto fallback, stale temp files, a full disk; resume config rules."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest
import torch

from sepico_fast.train import run_checkpoints
from sepico_fast.train.config import HARMLESS_FIELDS, INVOCATION_FIELDS, TrainConfig, make_config, resumed_config
from sepico_fast.train.resume import resolve_resume


def _state(it: int, cfg: TrainConfig | None = None) -> dict:
    cfg = cfg or make_config({"proj_dim": 16})
    g = torch.Generator().manual_seed(it)
    return {"state_dict": {"model.w": torch.randn(64, generator=g)},
            "meta": {"iter": it, "config": cfg.to_dict(), "format": run_checkpoints.FORMAT},
            "rng": run_checkpoints.rng_state()}


def _damage(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state
    run_checkpoints.atomic_save({"rng": run_checkpoints.rng_state()}, tmp_path / "r.pt")
    want = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    run_checkpoints.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_our_checkpoint_is_a_pretrained_file(tmp_path):
    """--pretrained (load_official, weights_only=True) reads this project's own checkpoints,
    as the trainer writes them: ``snapshot()`` of a real step context (optimizer state, class
    statistics, RNG states, counters, meta), not a hand-built dict."""
    from sepico_fast.checkpoint import load_pretrained
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.ddp import DistInfo
    from sepico_fast.train.runner import _step_context

    cfg = make_config({"proj_dim": 16, "variant": "bank", "memory_length": 3})
    ctx, _ = _step_context(cfg, torch.device("cpu"), DistInfo(), tmp_path, load_pretrained=False)
    with torch.no_grad():
        for p in ctx.student.parameters():
            p.add_(0.25)  # not the initial weights
        ctx.teacher.load_state_dict(ctx.student.state_dict())
    ctx.stats.update(torch.randn(8, 16), torch.arange(8) % 3)
    state = run_checkpoints.snapshot(ctx, 3, world_size=1, schedule={"ddp_schedule": "steps"})
    assert {"optimizer", "class_stats", "rng", "counters"} <= set(state) and state["meta"]["world_size"] == 1
    path = run_checkpoints.save_checkpoint(tmp_path, state, 3)
    for name in ("iter_000003.pt", "latest.pt"):
        loaded = build_segmentor(cfg.arch, 19, 16)
        load_pretrained(loaded, str(tmp_path / name), verbose=False)
        for (k, a), b in zip(ctx.student.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (name, k)
    assert path.name == "iter_000003.pt"


def test_latest_is_an_independent_copy_with_checksums(tmp_path):
    path = run_checkpoints.save_checkpoint(tmp_path, _state(4), 4)
    latest = tmp_path / "latest.pt"
    assert os.stat(path).st_ino != os.stat(latest).st_ino and os.stat(path).st_nlink == 1
    for p in (path, latest):
        digest, name = (p.parent / (p.name + ".sha256")).read_text().split()
        assert name == p.name and digest == hashlib.sha256(p.read_bytes()).hexdigest()
    _damage(latest)
    assert run_checkpoints.load_checkpoint(path)["meta"]["iter"] == 4  # the other file is untouched
    with pytest.raises(run_checkpoints.CheckpointError, match="latest.pt: checksum differs"):
        run_checkpoints.load_checkpoint(latest)
    (tmp_path / "latest.pt.sha256").unlink()  # no checksum (a flipped byte in tensor data would load):
    latest.write_bytes(latest.read_bytes()[:-300])  # a truncated file still fails the load test
    with pytest.raises(run_checkpoints.CheckpointError, match="not a loadable checkpoint"):
        run_checkpoints.load_checkpoint(latest)
    old = tmp_path / "format1.pt"
    torch.save({"state_dict": {}, "meta": {"iter": 1}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(run_checkpoints.CheckpointError, match=r"format1.pt: holds a numpy\S+ object, which torch.load\(weights_only=True\) refuses"):
        run_checkpoints.load_checkpoint(old)
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(run_checkpoints.CheckpointError, match="notes.pt"):
        run_checkpoints.load_checkpoint(tmp_path / "notes.pt")


def test_resume_auto_falls_back_to_newest_intact(tmp_path, capsys):
    cfg0 = make_config({"proj_dim": 16, "work_dir": str(tmp_path)})
    for it in (2, 4, 6):
        run_checkpoints.save_checkpoint(tmp_path, _state(it, cfg0), it, keep=3)
    _damage(tmp_path / "iter_000006.pt")
    _damage(tmp_path / "latest.pt")
    cfg = make_config({"resume": "auto", "work_dir": str(tmp_path)})
    _, ckpt, path = resolve_resume(cfg)
    assert path.name == "iter_000004.pt" and ckpt["meta"]["iter"] == 4
    err = capsys.readouterr().err
    assert "warning" in err and "iter_000006.pt" in err and "latest.pt" in err and "iteration 4" in err
    _damage(tmp_path / "iter_000004.pt")
    _damage(tmp_path / "iter_000002.pt")
    with pytest.raises(SystemExit, match="no intact checkpoint"):
        resolve_resume(cfg)
    with pytest.raises(SystemExit, match="--resume: .*iter_000002.pt: checksum"):
        resolve_resume(make_config({"resume": str(tmp_path / "iter_000002.pt")}))


def test_resume_auto_without_checkpoint_says_so(tmp_path, capsys):
    cfg = make_config({"resume": "auto", "work_dir": str(tmp_path / "new")})
    out_cfg, ckpt, path = resolve_resume(cfg)
    assert ckpt is None and path is None and out_cfg is cfg
    assert "no checkpoint in" in capsys.readouterr().out


def test_stale_temp_files_are_removed(tmp_path):
    stale = [tmp_path / ".iter_000002.pt.tmp99999", tmp_path / ".latest.pt.tmp12", tmp_path / ".latest.pt.sha256.tmp7"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    keep = [tmp_path / "notes.tmp1", tmp_path / ".iter_000002.pt.tmp" f"{os.getpid()}"]
    for p in keep:
        p.write_bytes(b"y")
    assert sorted(run_checkpoints.remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in keep)


def test_full_disk_is_one_line_with_path_and_bytes(tmp_path, monkeypatch):
    """The write goes to /dev/full (every write fails with ENOSPC, as on a full disk)."""
    monkeypatch.setattr(run_checkpoints, "_open_for_writing", lambda path: open("/dev/full", "wb"))
    state = {"state_dict": {"w": torch.zeros(1 << 16)}, "meta": {"iter": 1}}
    with pytest.raises(run_checkpoints.CheckpointWriteError) as exc:
        run_checkpoints.save_checkpoint(tmp_path, state, 1)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "iter_000001.pt") in msg and "no space left" in msg
    assert int(msg.split("needs about ")[1].split()[0]) >= (1 << 16) * 4
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


# ----------------------------------------------------------------------------- resume config

def _saved(**kw) -> dict:
    return make_config(dict({"proj_dim": 16}, **kw)).to_dict()


def test_resume_restores_the_checkpoints_config(tmp_path):
    saved = make_config({"iters": 60, "work_dir": str(tmp_path)}, preset="daformer_gta2cs").to_dict()
    ckpt = tmp_path / "iter_000020.pt"
    ckpt.write_bytes(b"")
    cfg = make_config({"resume": str(ckpt)})  # a bare command line + --resume
    out, applied = resumed_config(saved, cfg, ckpt)
    assert out.iters == 60 and out.preset == "daformer_gta2cs" and out.arch == "daformer_mitb5"
    assert out.source == "gta" and out.proj_dim == 512 and applied == []
    assert out.work_dir == str(tmp_path)  # --resume PATH without --work-dir: the checkpoint's folder


def test_resume_refuses_method_changes_and_applies_harmless_ones(tmp_path):
    saved = _saved(variant="dist", seed=1, log_interval=50)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    cfg = make_config({"resume": str(ckpt), "arch": "daformer_tiny", "variant": "bank", "proj_dim": 32,
                       "seed": 3, "log_interval": 5})
    with pytest.raises(ValueError) as exc:
        resumed_config(saved, cfg, ckpt)
    msg = str(exc.value)
    for part in ("--arch dlv2_tiny -> daformer_tiny", "--variant dist -> bank", "--proj-dim 16 -> 32",
                 "--seed 1 -> 3", "--resume-override"):
        assert part in msg
    assert "--log-interval" not in msg and "\n" not in msg
    out, applied = resumed_config(saved, make_config({"resume": str(ckpt), "log_interval": 5}), ckpt)
    assert out.log_interval == 5 and applied == ["--log-interval 50 -> 5"] and out.seed == 1
    forced, applied = resumed_config(saved, make_config({"resume": str(ckpt), "seed": 3,
                                                         "resume_override": True}), ckpt)
    assert forced.seed == 3 and applied == ["--seed 1 -> 3"]


def test_every_field_not_listed_harmless_is_refused(tmp_path):
    """New fields (other helpers add some) default to method-changing: refused on resume."""
    import dataclasses

    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    saved = _saved()
    probes = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 0.5 if v else 0.5,
              str: None, list: None}
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        if f.name in HARMLESS_FIELDS | INVOCATION_FIELDS or f.name == "preset":
            continue
        value = saved[f.name]
        change = probes.get(type(value))
        if change is None:
            continue  # strings / lists are covered by the choice flags above and the test before
        with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} "):
            resumed_config(saved, _explicit(saved, f.name, change(value), ckpt), ckpt)
        checked += 1
    assert checked > 25


def _explicit(saved: dict, name: str, value, ckpt) -> TrainConfig:
    cfg = make_config(dict({k: v for k, v in saved.items() if k in ("proj_dim",)}, resume=str(ckpt)))
    setattr(cfg, name, value)
    cfg.explicit = cfg.explicit | {name}
    return cfg


@pytest.mark.parametrize("schedule", ["samples", "steps"])
def test_resume_refuses_another_world_size(tmp_path, monkeypatch, capsys, schedule):
    """A checkpoint of 2 processes resumed by 1 (WORLD_SIZE unset) or 4: refused in one line
    naming both numbers, in both schedule modes; --resume-override continues with a warning."""
    cfg0 = make_config({"proj_dim": 16, "work_dir": str(tmp_path), "ddp_schedule": schedule})
    state = _state(6, cfg0)
    state["meta"].update(world_size=2, schedule={"ddp_schedule": schedule, "world_size": 2})
    run_checkpoints.save_checkpoint(tmp_path, state, 6)
    for world in ("1", "4"):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(SystemExit) as exc:
            resolve_resume(make_config({"resume": "auto", "work_dir": str(tmp_path)}))
        msg = str(exc.value)
        assert f"world size 2 -> {world}" in msg and "--resume-override" in msg and "\n" not in msg
        assert msg.startswith("--resume: ") and f"--ddp-schedule {schedule}" in msg
    out, ckpt, _ = resolve_resume(make_config({"resume": "auto", "work_dir": str(tmp_path), "resume_override": True}))
    assert ckpt["meta"]["iter"] == 6 and out.ddp_schedule == schedule
    assert "warning: --resume-override: world size 2 -> 4" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_resume(make_config({"resume": "auto", "work_dir": str(tmp_path)}))[1]["meta"]["iter"] == 6


def test_resume_from_an_older_iteration_moves_the_newer_history_aside(tmp_path):
    """Run A saves 2 and 4; run B resumes from 2 and saves 3: without moving iter 4 away,
    retention (by number) deleted B's source and --resume auto took A's iter 4 over B's 3."""
    cfg = make_config({"proj_dim": 16, "work_dir": str(tmp_path)})
    for it in (2, 4):
        run_checkpoints.save_checkpoint(tmp_path, _state(it, cfg), it, keep=2)
    moved = run_checkpoints.supersede_newer(tmp_path, 2, source=tmp_path / "iter_000002.pt")
    sup = tmp_path / "superseded"
    assert sorted(p.name for p in moved) == ["iter_000004.pt", "latest.pt"]  # latest.pt was a copy of 4
    assert sorted(p.name for p in sup.iterdir()) == ["iter_000004.pt", "iter_000004.pt.sha256", "latest.pt",
                                                     "latest.pt.sha256"]
    assert run_checkpoints.load_checkpoint(sup / "iter_000004.pt")["meta"]["iter"] == 4  # intact, checksum included
    run_checkpoints.save_checkpoint(tmp_path, _state(3, cfg), 3, keep=2)
    assert sorted(p.name for p in run_checkpoints.iteration_files(tmp_path)) == ["iter_000002.pt", "iter_000003.pt"]
    path, ckpt, skipped = run_checkpoints.load_newest_intact(tmp_path)
    assert path.name == "iter_000003.pt" and ckpt["meta"]["iter"] == 3 and not skipped
    run_checkpoints.save_checkpoint(tmp_path, _state(5, cfg), 5, keep=3)
    again = run_checkpoints.supersede_newer(tmp_path, 3)  # names already in superseded/: a numbered folder
    assert [p.relative_to(tmp_path).as_posix() for p in again] == ["superseded/1/iter_000005.pt",
                                                                   "superseded/1/latest.pt"]
    assert run_checkpoints.supersede_newer(tmp_path, 3) == []


def test_cuda_rng_states_restored_only_for_devices_that_exist(monkeypatch):
    """A checkpoint from a 2-GPU machine resumed where 1 GPU is visible: only device 0 is
    set (set_rng_state_all indexed a generator that does not exist: IndexError)."""
    import torch.cuda.random as cuda_random

    calls = []

    def record(state, device="cuda"):
        calls.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", record)
    monkeypatch.setattr(cuda_random, "set_rng_state", record)
    state = {"torch": torch.get_rng_state(), "numpy": run_checkpoints.rng_state()["numpy"],
             "python": run_checkpoints.rng_state()["python"], "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    run_checkpoints.set_rng_state(state)
    assert calls == [0]


def test_docs_list_every_harmless_field():
    """docs/training.md names every setting a resume applies (the list and the docs drifted)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    training = (root / "docs" / "training.md").read_text()
    sections = {"docs/training.md": training.split("harmless settings (`config.HARMLESS_FIELDS`)")[1]
                .split("everything else")[0]}
    for where, text in sections.items():
        assert "log/eval/checkpoint/debug" in text and "intervals" in text, where
        for name in sorted(HARMLESS_FIELDS):
            if name.endswith("_interval"):
                assert name.split("_")[0] in ("log", "eval", "checkpoint", "debug"), name
                continue
            assert f"`--{name.replace('_', '-')}`" in text, (where, name)
