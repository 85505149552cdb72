"""Run several seeds of one or more training methods and tabulate the target mIoU.

    python scripts/run_seeds.py                                  # synthetic: source_only vs sepico, seeds 0 1 2
    python scripts/run_seeds.py --preset daformer_gta2cs --methods sepico --seeds 76 77 78 -- --data-root data

Runs are sequential (each one uses every core), each in ``<out>/<method>_s<seed>``. A run
is reused only when its ``metrics.json`` records exactly the training command this sweep
would run now (every flag, also those after ``--``), so an interrupted sweep can be
restarted; a run of another command is moved aside to ``<dir>.replaced-<UTC time>`` and
run again. Everything after ``--`` is passed to ``python -m sepico_fast.train`` unchanged.
Writes ``<out>/results.json`` and ``<out>/results.md`` (mean ± sample std over seeds, percent).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cached(work_dir: Path, command: list[str]) -> dict | None:
    """The metrics of a finished run of exactly ``command`` in ``work_dir``, else None; a
    finished run of another command (or of an unrecorded one) is moved aside."""
    metrics = work_dir / "metrics.json"
    if not metrics.exists():
        return None
    old = json.loads(metrics.read_text())
    if old.get("command") == command:
        return old
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    aside = work_dir.with_name(f"{work_dir.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        aside, n = work_dir.with_name(f"{work_dir.name}.replaced-{stamp}-{n}"), n + 1
    print(f"  {work_dir}: finished with another command ({' '.join(old.get('command') or ['not recorded'])}); "
          f"moved to {aside}, running again", flush=True)
    work_dir.rename(aside)
    return None


def run_one(preset: str, method: str, seed: int, work_dir: Path, extra: list[str]) -> dict:
    metrics = work_dir / "metrics.json"
    args = ["-m", "sepico_fast.train", "--preset", preset, "--method", method, "--seed", str(seed),
            "--work-dir", str(work_dir), *extra]
    hit = cached(work_dir, args)  # the key: the whole command but the interpreter's path
    if hit is not None:
        return hit
    cmd = [sys.executable, *args]
    print("$", " ".join(cmd), flush=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(work_dir / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not metrics.exists():
        raise SystemExit(f"run failed ({proc.returncode}): see {work_dir / 'stdout.log'}")
    out = json.loads(metrics.read_text())
    out["wall_seconds"] = round(time.time() - t0, 1)
    out["command"] = args
    metrics.write_text(json.dumps(out, indent=2) + "\n")
    print(f"  {method} seed {seed}: mIoU {out['miou']:.2f} % ({out['wall_seconds']:.0f} s)", flush=True)
    return out


def summarize(results: dict[str, dict[int, dict]]) -> str:
    lines = ["| method | seeds | target mIoU % per seed | mean ± std |", "|---|---|---|---|"]
    for method, runs in results.items():
        vals = [runs[s]["miou"] for s in sorted(runs)]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {method} | {', '.join(map(str, sorted(runs)))} | "
                     f"{', '.join(f'{v:.2f}' for v in vals)} | {statistics.mean(vals):.2f} ± {std:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--methods", nargs="+", default=["source_only", "sepico"], choices=["source_only", "sepico"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default: work_dirs/seeds_<preset>")
    args = p.parse_args(argv)
    out = Path(args.out or f"work_dirs/seeds_{args.preset}")
    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    for seed in args.seeds:          # interleave methods so a cut-short sweep stays comparable
        for method in args.methods:
            results[method][seed] = run_one(args.preset, method, seed, out / f"{method}_s{seed}", extra)
            table = summarize({m: r for m, r in results.items() if r})
            (out / "results.md").write_text(table + "\n")
            (out / "results.json").write_text(json.dumps(
                {m: {str(s): r for s, r in runs.items()} for m, runs in results.items()}, indent=2) + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
