"""Append the rows of a ``bench.json`` written by scripts/gpu_check.sh to bench/results/.

    python -m bench.merge_rows /path/to/bench.json              # -> bench/results/<bench>.json
    python -m bench.merge_rows bench.json --results OTHER_DIR

The GPU check records every row of its run into one file (the checkout's own records stay
untouched there); this files each row under its bench, as ``pytest bench/ --record`` would
have. A row already present (same bench, impl, device, commit, date and shape) is not
added twice, so merging the same file again changes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.record import RESULTS_DIR, append_row

_KEY_FIELDS = ("bench", "impl", "device", "commit", "date")


def _key(row: dict) -> str:
    return json.dumps([row.get(k) for k in _KEY_FIELDS] + [row.get("shape")], sort_keys=True)


def merge_rows(rows: list[dict], results_dir: Path) -> dict[str, int]:
    """Append the new ``rows`` to ``<results_dir>/<bench>.json``; rows added per bench."""
    added: dict[str, int] = {}
    for row in rows:
        if not isinstance(row, dict) or not row.get("bench"):
            raise ValueError(f"not a benchmark row (no 'bench' field): {str(row)[:120]}")
        path = Path(results_dir) / f"{row['bench']}.json"
        present = {_key(r) for r in json.loads(path.read_text())} if path.exists() else set()
        if _key(row) in present:
            continue
        append_row(row, results_dir)
        added[row["bench"]] = added.get(row["bench"], 0) + 1
    return added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", help="bench.json from scripts/gpu_check.sh (a JSON list of rows)")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of <bench>.json record files")
    args = p.parse_args(argv)
    try:
        rows = json.loads(Path(args.rows).read_text())
    except (OSError, ValueError) as exc:
        p.error(f"cannot read {args.rows}: {exc}")
    if not isinstance(rows, list):
        p.error(f"{args.rows}: expected a JSON list of rows, got {type(rows).__name__}")
    added = merge_rows(rows, Path(args.results))
    for bench, n in sorted(added.items()):
        print(f"{n} rows -> {Path(args.results) / (bench + '.json')}")
    print(f"{sum(added.values())} of {len(rows)} rows added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
