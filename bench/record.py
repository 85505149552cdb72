"""Timing and result records shared by every benchmark in ``bench/``.

Each measurement becomes one JSON object carrying the device name, git commit and date so
that numbers from different machines are never mixed up. It is printed, collected for the
summary table ``pytest bench/`` prints at the end (``bench/conftest.py``), and appended to
``bench/results/<bench>.json`` (a JSON list, committed) only when recording is asked for:
``pytest bench/ --record`` or ``SEPICO_FAST_BENCH_RECORD=1``. A plain run changes no
tracked file.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_ENV = "SEPICO_FAST_BENCH_RECORD"
# Where recorded rows go instead of bench/results/ (scripts/gpu_check.sh collects its own
# run's rows there, so the checkout's records stay untouched).
RESULTS_DIR_ENV = "SEPICO_FAST_BENCH_RESULTS_DIR"
# Set by ``pytest --record`` (bench/conftest.py); the environment variable works without pytest.
RECORD = False
# Every row measured in this process, in order (the conftest prints them as one table).
SESSION_ROWS: list[dict] = []


def recording() -> bool:
    """Whether rows are appended to ``bench/results/`` (``--record`` or ``SEPICO_FAST_BENCH_RECORD=1``)."""
    return RECORD or os.environ.get(RECORD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def results_folder() -> Path:
    """The folder recorded rows are appended to: ``$SEPICO_FAST_BENCH_RESULTS_DIR`` or bench/results/."""
    return Path(os.environ.get(RESULTS_DIR_ENV, "").strip() or RESULTS_DIR)


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name: the first "model name" line of ``cpuinfo`` (Linux), else
    ``platform.processor()``, else ``platform.machine()``, else "unknown CPU"."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor().strip() or platform.machine().strip() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """GPU: its CUDA name. CPU: ``cpu (<model name>, <machine>, N cores, torch threads=T)``
    (the machine architecture is left out when it is all the model name says)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, machine = cpu_model(), platform.machine()
    parts = [model] + ([machine] if machine and machine != model else [])
    return f"cpu ({', '.join(parts)}, {os.cpu_count()} cores, torch threads={torch.get_num_threads()})"


COMMIT_ENV = "GPU_CHECK_COMMIT"


def git_commit() -> str:
    """``$GPU_CHECK_COMMIT`` when set (a tree copied without .git, e.g. onto the GPU
    machine by scripts/gpu_check.sh's caller), else ``git rev-parse --short HEAD``."""
    if os.environ.get(COMMIT_ENV, "").strip():
        return os.environ[COMMIT_ENV].strip()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn: Callable[[int], object], device: torch.device | str, *, warmup: int = 3,
                   repeats: int = 10, calls: int = 1) -> float:
    """Median time per call of ``fn(i)`` in milliseconds; ``i`` lets the caller rotate inputs.

    ``calls`` back-to-back calls are timed between one pair of CUDA events (or one
    ``perf_counter`` pair on the CPU) and the time divided by ``calls``. With ``calls=1``
    each call is timed alone and synchronised, so a microsecond kernel measures the launch
    latency and the synchronisation rather than the kernel; with many calls the launches
    overlap the work of the previous call, as in a training step.
    """
    device = torch.device(device)
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    i = warmup
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(i)
                i += 1
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(i)
                i += 1
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def calls_per_event(single_ms: float, target_ms: float = 2.0, max_calls: int = 200) -> int:
    """Back-to-back calls per timing so that one event pair spans about ``target_ms``."""
    if single_ms <= 0:
        return max_calls
    return max(1, min(max_calls, int(round(target_ms / single_ms))))


def graph_time_ms(fn: Callable[[int], object], device: torch.device | str, *, calls: int,
                  warmup: int = 3, repeats: int = 10) -> float:
    """Median time per call of ``calls`` calls of ``fn(i)`` captured in one CUDA graph and
    replayed: the device time without any launch overhead. Raises when ``fn`` cannot be
    captured (a host sync, a CPU tensor, ...); CUDA only."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, autotuning)
        for i in range(warmup):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(warmup + i)
    finally:
        # A failed capture (e.g. a host sync in fn) raises in torch.cuda.graph's __exit__
        # before it restores the stream: every later op would run on the capture stream.
        torch.cuda.set_stream(before)
    graph.replay()
    _sync(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def kernel_timings(fn: Callable[[int], object], device: torch.device | str, *, warmup: int = 3,
                   repeats: int = 10, graph: bool | str = True, target_ms: float = 2.0) -> dict:
    """The three times of one op, in ms per call (see the ``median_time_ms`` docstring):

    * ``single_call_ms``: one synchronised call per event pair (launch latency included);
    * ``median_ms``: ``calls_per_event`` back-to-back calls per event pair (the number a
      training step sees; GB/s and % of copy bandwidth use it);
    * ``graph_ms``: the same calls replayed from one CUDA graph (``None`` with
      ``graph_error`` saying why when not captured; pass a string as ``graph`` to give the
      reason for not trying, e.g. an op with host syncs).
    """
    device = torch.device(device)
    single = median_time_ms(fn, device, warmup=warmup, repeats=repeats)
    calls = calls_per_event(single, target_ms) if device.type == "cuda" else 1
    out = {"single_call_ms": round(single, 4), "calls_per_event": calls,
           "median_ms": single if calls == 1 else median_time_ms(fn, device, warmup=1,
                                                                  repeats=repeats, calls=calls),
           "graph_ms": None, "graph_error": None}
    if device.type != "cuda":
        out["graph_error"] = "CUDA graphs need a GPU"
    elif isinstance(graph, str) or not graph:
        out["graph_error"] = graph if isinstance(graph, str) else "not requested"
    else:
        try:
            out["graph_ms"] = round(graph_time_ms(fn, device, calls=calls, repeats=repeats), 4)
        except Exception as exc:  # noqa: BLE001 - any capture failure is reported, not fatal
            out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(device)
    return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak extra device memory of one call of ``fn`` (CUDA only; None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device | str) -> float:
    """Measured device copy bandwidth (bytes read + written per second), cached per device."""
    device = torch.device(device)
    key = str(device)
    if key not in _COPY_GBPS:
        n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        # 10 back-to-back copies per event pair: no per-call sync in the bandwidth either
        ms = median_time_ms(lambda i: dst.copy_(src), device, warmup=3, repeats=10,
                            calls=10 if device.type == "cuda" else 1)
        _COPY_GBPS[key] = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
    return _COPY_GBPS[key]


def record(bench: str, impl: str, device: torch.device | str, shape: dict, median_ms: float, *,
           bytes_moved: float | None = None, flops: float | None = None,
           peak_mem_mb: float | None = None, extra: dict | None = None) -> dict:
    """Print one result on one line, keep it for the summary table and, when
    :func:`recording`, append it to ``bench/results/<bench>.json``."""
    device = torch.device(device)
    gbps = bytes_moved / (median_ms * 1e-3) / 1e9 if bytes_moved else None
    roofline = 100.0 * gbps / copy_bandwidth_gbps(device) if gbps else None
    row = {
        "bench": bench,
        "impl": impl,
        "device": device_name(device),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": shape,
        "median_ms": round(median_ms, 4),
        "gbps": round(gbps, 2) if gbps else None,
        "tflops": round(flops / (median_ms * 1e-3) / 1e12, 3) if flops else None,
        "roofline_pct": round(roofline, 1) if roofline else None,
        "peak_mem_mb": round(peak_mem_mb, 2) if peak_mem_mb is not None else None,
    }
    if extra:
        row.update(extra)
    SESSION_ROWS.append(row)
    if recording():
        append_row(row)
    print(f"[bench] {bench:<24} {impl:<14} {json.dumps(shape):<40} {median_ms:9.3f} ms"
          + (f"  {gbps:8.1f} GB/s ({roofline:.0f}% of copy)" if gbps else "")
          + (f"  peak {peak_mem_mb:.1f} MB" if peak_mem_mb is not None else ""))
    return row


def append_row(row: dict, results_dir: Path | None = None) -> Path:
    """Append ``row`` to ``<results_dir>/<bench>.json`` atomically (default: ``bench/results/``,
    or ``$SEPICO_FAST_BENCH_RESULTS_DIR`` when set)."""
    folder = Path(results_dir) if results_dir else results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row['bench']}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _shape_key(row: dict) -> str:
    return json.dumps(row.get("shape"), sort_keys=True)


def speedup_vs_upstream(row: dict, rows: Sequence[dict]) -> float | None:
    """upstream ms / this row's ms for the upstream row of the same bench, device and shape
    (the latest one when several); None for upstream rows themselves or without one."""
    if row["impl"] == "upstream":
        return None
    match = [r for r in rows if r["impl"] == "upstream" and r["bench"] == row["bench"]
             and r["device"] == row["device"] and _shape_key(r) == _shape_key(row)]
    if not match or not row.get("median_ms"):
        return None
    return match[-1]["median_ms"] / row["median_ms"]


def _short_shape(shape) -> str:
    if not isinstance(shape, dict):
        return str(shape)
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in ("dtype",))


def summary_table(rows: Sequence[dict]) -> str:
    """One aligned text table of ``rows``: op, impl, device, shape, ms, GB/s, % roofline,
    speed-up vs the upstream formulation (× faster than upstream; n/a without an upstream row)."""
    if not rows:
        return "no benchmark rows measured"
    head = ("op", "impl", "device", "shape", "ms", "GB/s", "% roofline", "vs upstream")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    body = []
    for r in rows:
        speed = speedup_vs_upstream(r, rows)
        body.append((r["bench"], r["impl"], r["device"].split(" (")[0], _short_shape(r.get("shape")),
                     fmt(r.get("median_ms"), ".3f"), fmt(r.get("gbps"), ".1f"), fmt(r.get("roofline_pct"), ".1f"),
                     "upstream" if r["impl"] == "upstream" else ("n/a" if speed is None else f"{speed:.2f}x")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {4, 5, 6, 7}
    lines = []
    for i, line in enumerate([head, *body]):
        cells = [str(c).rjust(w) if j in right else str(c).ljust(w) for j, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cpu_peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak extra host memory of one call of ``fn``, from torch's CPU allocation events.

    Every profiler event carries the bytes its op itself allocated (frees are
    negative ``[memory]`` events); the running sum in start order peaks at the
    largest simultaneous footprint of tensors ``fn`` created.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


__all__: Sequence[str] = ["median_time_ms", "calls_per_event", "graph_time_ms", "kernel_timings",
                          "peak_memory_mb", "copy_bandwidth_gbps", "record", "device_name", "git_commit",
                          "cpu_peak_memory_mb", "recording", "results_folder", "append_row", "summary_table",
                          "speedup_vs_upstream", "SESSION_ROWS"]
