"""A paper preset without its ImageNet weights stops before any work with ONE line saying
where the weights are expected and how to get them (the presets' default paths are where
the documented downloads put them: docs/models.md, "Pretrained weights")."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepico_fast.checkpoint import RESNET101_V1C_URL, check_pretrained_exists
from sepico_fast.train.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset, path, how", [
    ("daformer_gta2cs", "pretrained/mit-b5", "'hf download nvidia/mit-b5 --local-dir pretrained/mit-b5'"),
    ("dlv2_gta2cs", "pretrained/resnet101_v1c.pth", f"({RESNET101_V1C_URL}) to pretrained/resnet101_v1c.pth"),
])
def test_preset_without_weights_says_where_and_how_in_one_line(tmp_path, preset, path, how):
    assert PRESETS[preset]["pretrained"] == path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "sepico_fast.train", "--preset", preset,
                           "--data-root", "no_data", "--work-dir", "run", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"--pretrained: {path} not found (relative to {tmp_path}); "), lines[0]
    assert how in lines[0] and lines[0].endswith("see docs/models.md"), lines[0]
    assert not (tmp_path / "run").exists()  # before any work: no run folder, no data opened


def test_empty_folder_and_other_archs(tmp_path, capsys):
    (tmp_path / "mit-b0").mkdir()
    with pytest.raises(SystemExit) as exc:
        check_pretrained_exists(str(tmp_path / "mit-b0"), "daformer_mitb0")
    line = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in line
    assert "folder holds no model.safetensors or pytorch_model.bin" in line
    assert f"hf download nvidia/mit-b0 --local-dir {tmp_path / 'mit-b0'}" in line
    with pytest.raises(SystemExit):
        check_pretrained_exists(str(tmp_path / "mit_b5.pth"), "daformer_mitb5")
    line = capsys.readouterr().err.strip()
    assert "--local-dir pretrained/mit-b5', then pass --pretrained pretrained/mit-b5" in line
    with pytest.raises(SystemExit):
        check_pretrained_exists(str(tmp_path / "x.pt"), "dlv2_tiny")
    assert "--pretrained '' to start from random weights" in capsys.readouterr().err
    (tmp_path / "ok.pt").write_bytes(b"")
    check_pretrained_exists(str(tmp_path / "ok.pt"), "dlv2_tiny")  # present: the loader judges it
