"""Every flag of the trainer is checked where it is declared: each bad value (NaN, inf,
negative, zero, huge, a wrong word) is one line naming the flag and exit status 2 -- in
process through the real parser for speed, and once as a subprocess for the status and the
single line. Also the relations between flags and the environment switch of the debug checks."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sepico_fast.checkpoint import TRAINING_CONFIG_FIELDS
from sepico_fast.contrast import validation
from sepico_fast.train.config import RESUME_POLICIES, TrainConfig, parse_args

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)

# Free-text fields: a bad value each, or where it is refused instead (at run time).
TEXT_BAD = {"preset": ["nope"], "device": ["gpu0", "cuda:x"], "resume": ["no/such/file.pt"],
            "pretrained": ["-x"], "data_root": ["some/folder"]}  # data_root: the synthetic pair reads none
CHECKED_AT_RUN_TIME = {
    "work_dir": "tests/test_train_faults.py::test_bad_data_file_and_bad_work_dir_at_setup_are_one_line",
}
LIST_BAD = {"crop": [["4"], ["0", "5"], ["99999"], ["nan"], ["-8"]],
            "betas": [["nan", "0.9"], ["inf", "0.9"], ["1.5", "0.9"], ["-0.1", "0.9"], ["0.9"]]}


def _numeric_bad(f: dataclasses.Field) -> list[str]:
    """NaN, infinities, negative, zero and huge values the field's declared range excludes."""
    allowed = f.metadata["allowed"]
    candidates = ["nan", "inf", "-inf", "-1", "-1000", "0", "1e30", str(10**30)]
    if allowed.hi is not None:
        candidates.append(str(allowed.hi * 10 + 1))
    if allowed.lo is not None:
        candidates.append(str(allowed.lo - 1))
    out = []
    for text in candidates:
        if HINTS[f.name] is int:
            bad = not text.lstrip("-").isdigit() or not allowed.ok(int(text))  # "nan", "1e30": not integers
        else:
            bad = not allowed.ok(float(text))
        if bad:
            out.append(text)
    return sorted(set(out))


def bad_values() -> list[tuple[str, list[str]]]:
    cases = []
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        typ = HINTS[name]
        if "choices" in f.metadata:
            values = [["bogus"]]
        elif typ is bool:
            values = [["maybe"], ["2"]]
        elif typ in (int, float):
            values = [[v] for v in _numeric_bad(f)]
        elif typ is list:
            values = LIST_BAD[name]
        else:
            values = [[v] for v in TEXT_BAD.get(name, [])]
        for v in values:
            cases.append((name, [flag + "=" + v[0]] if len(v) == 1 and v[0].startswith("-") else [flag, *v]))
    return cases


CASES = bad_values()


def test_every_field_has_bad_values_and_a_declared_policy():
    covered = {name for name, _ in CASES} | set(CHECKED_AT_RUN_TIME)
    assert covered == set(FIELDS), sorted(set(FIELDS) - covered)
    for name, f in FIELDS.items():
        assert f.metadata["resume"] in RESUME_POLICIES, name
        if HINTS[name] in (int, float):
            assert "allowed" in f.metadata, f"{name}: declare its range with _f(..., allowed=Allowed(...))"
    assert TRAINING_CONFIG_FIELDS == set(FIELDS), (
        "add the new config field to sepico_fast.checkpoint.TRAINING_CONFIG_FIELDS: "
        f"{sorted(set(FIELDS) ^ TRAINING_CONFIG_FIELDS)}")


@pytest.mark.parametrize("name,argv", CASES, ids=[" ".join(a) for _, a in CASES])
def test_bad_value_is_one_line_naming_the_flag(name, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--" + name.replace("_", "-") in err, err


@pytest.mark.parametrize("argv,flag", [
    (["--contrast-start", "5000"], "--contrast-start"),                       # past --iters 2000
    (["--iters", "10", "--contrast-start", "11"], "--contrast-start"),
    (["--iters", "10", "--warmup-iters", "20"], "--warmup-iters"),
    (["--variant", "bank", "--memory-length", "0"], "--memory-length"),
    (["--num-classes", "5"], "--num-classes"),
    (["--data-root", "data"], "--data-root"),                                 # synthetic pair: generated
])
def test_relations_between_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and flag in err, err


def test_allowed_combinations_still_parse():
    # the defaults (contrast start 150, warm-up 75) with a short run: the usual quick test
    assert parse_args(["--iters", "10"]).iters == 10
    assert parse_args(["--variant", "dist", "--memory-length", "0"]).memory_length == 0
    assert parse_args(["--method", "source_only", "--iters", "5", "--contrast-start", "9"]).contrast_start == 9
    assert parse_args(["--pseudo-ignore-top", "-1", "--reg-weight", "-1"]).reg_weight == -1.0


def test_bad_flag_subprocess_exit_status_and_single_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sepico_fast.train", "--weight-decay", "nan"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "--weight-decay" in proc.stderr and "nan" in proc.stderr


def test_debug_checks_environment_switch(monkeypatch, capsys):
    for text, expected in (("1", True), ("true", True), ("YES", True), ("on", True), ("", False), ("0", False),
                           ("false", False), ("No", False), ("off", False)):
        assert validation.debug_checks_from_env({validation.DEBUG_CHECKS_ENV: text}) is expected, text
    env = dict(os.environ, SEPICO_FAST_DEBUG_CHECKS="false")
    code = "from sepico_fast.contrast import validation; print(validation.debug_checks())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    monkeypatch.setenv(validation.DEBUG_CHECKS_ENV, "maybe")
    with pytest.raises(SystemExit) as exc:
        parse_args([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "SEPICO_FAST_DEBUG_CHECKS" in err and "'maybe'" in err
