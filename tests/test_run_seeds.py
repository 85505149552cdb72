"""scripts/run_seeds.py reuses a finished run only for the same full command."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_seeds.py"


def _load():
    spec = importlib.util.spec_from_file_location("run_seeds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cache_is_keyed_on_the_full_command(tmp_path, monkeypatch):
    mod = _load()
    calls = []

    def fake_run(cmd, stdout=None, stderr=None):  # a training run that writes its metrics
        calls.append(cmd)
        work_dir = Path(cmd[cmd.index("--work-dir") + 1])
        miou = 10.0 + len(calls)
        (work_dir / "metrics.json").write_text(json.dumps({"miou": miou}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    out = tmp_path / "sweep"
    argv = ["--methods", "sepico", "--seeds", "0", "--out", str(out), "--"]
    first = mod.main(argv + ["--iters", "60"])
    assert len(calls) == 1 and first["sepico"][0]["miou"] == 11.0
    again = mod.main(argv + ["--iters", "60"])  # same command: reused
    assert len(calls) == 1 and again["sepico"][0]["miou"] == 11.0
    changed = mod.main(argv + ["--iters", "80"])  # a flag after -- changed: run again
    assert len(calls) == 2 and changed["sepico"][0]["miou"] == 12.0
    assert calls[1][-2:] == ["--iters", "80"]
    aside = [p for p in tmp_path.joinpath("sweep").iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and json.loads((aside[0] / "metrics.json").read_text())["miou"] == 11.0
    (out / "sepico_s0" / "metrics.json").write_text(json.dumps({"miou": 1.0}))  # no command recorded
    assert mod.main(argv + ["--iters", "80"])["sepico"][0]["miou"] == 13.0 and len(calls) == 3
