"""bench/merge_rows.py files the rows of a GPU check's bench.json under their bench, once."""
import json

import pytest

from bench.merge_rows import main, merge_rows


def _row(bench, impl, ms, date="2026-12-01T10:00:00+00:00"):
    return {"bench": bench, "impl": impl, "device": "NVIDIA H200", "commit": "abc1234", "date": date,
            "shape": {"N": 51200}, "median_ms": ms}


def test_rows_are_filed_per_bench_and_never_twice(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    old = _row("dist_contrast_fwd_bwd", "torch", 3.0, date="2026-11-01T00:00:00+00:00")
    (results / "dist_contrast_fwd_bwd.json").write_text(json.dumps([old]))
    rows = [_row("dist_contrast_fwd_bwd", "triton", 0.5), _row("class_stats_update", "triton", 0.2),
            _row("dist_contrast_fwd_bwd", "upstream", 9.0)]
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(rows))
    assert main([str(source), "--results", str(results)]) == 0
    assert "3 of 3 rows added" in capsys.readouterr().out
    dist = json.loads((results / "dist_contrast_fwd_bwd.json").read_text())
    assert [r["impl"] for r in dist] == ["torch", "triton", "upstream"] and dist[0] == old
    assert [r["impl"] for r in json.loads((results / "class_stats_update.json").read_text())] == ["triton"]
    assert merge_rows(rows, results) == {}, "merging the same file again adds nothing"
    assert len(json.loads((results / "dist_contrast_fwd_bwd.json").read_text())) == 3


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no 'bench' field"):
        merge_rows([{"impl": "torch"}], tmp_path)
    (tmp_path / "x.json").write_text('{"bench": "a"}')
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.json"), "--results", str(tmp_path)])
