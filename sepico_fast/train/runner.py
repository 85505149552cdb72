"""The training loop around ``train_step``: setup, the loop, the finish.

    run(cfg)  =  setup(cfg) -> TrainRun  ->  train_loop(run)  ->  finish(run)

Host syncs happen only in ``train_loop``'s logging block (every ``log_interval``
iterations: the accumulated losses and the skipped-step counter), at evaluations, at
checkpoints and when the debug pictures are written (every ``debug_interval``: their
tensors are read back); all but the log line are left out of the throughput window. A checkpoint is written before the evaluation of the same iteration; signals,
exceptions and bad files end the loop through ``faults`` (emergency checkpoint, one line);
``resume.resolve_resume`` restores a checkpoint's config before anything is built.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_pretrained_exists
from ..checkpoint import load_pretrained as load_pretrained_weights
from ..contrast import ClassStats
from ..data.io import DataFileError
from ..data.labels import CLASSES
from ..data.synthetic import SyntheticDataError
from ..device import choose_precision, resolve_device
from ..evaluate import (
    dark_zurich_class_weights,
    evaluate_model,
    group_lines,
    group_summary,
    iou_summary,
    reweighting_line,
    reweighting_record,
)
from ..models import build_segmentor, param_groups, resolved_decay_rule
from ..reporting import first_line, iou_table
from . import faults, run_checkpoints, workdir
from .config import TrainConfig
from .curves import update_curves
from .ddp import DistInfo, barrier, broadcast_module, init_distributed, shutdown
from .debug_images import save_debug_images
from .graphs import make_step
from .implementations import announce_implementations
from .logging import ProgressBar, ScalarWriter, truncate_scalars
from .profiling import Profiler
from .pseudo_diagnostics import PseudoDiagnostics
from .resume import resolve_resume, restore_checkpoint
from .schedule import ddp_schedule
from .step import StepContext, compile_passes, train_step
from .throughput import device_peak_tflops, flops_per_iteration
from .throughput import mfu as model_flops_utilisation
from .uda import log_frequency_class_weights, make_teacher


# ----------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------
def amp_setup(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None, description): ``--amp`` / ``--cpu-amp`` by
    ``sepico_fast.device.choose_precision`` (the rule ``evaluate --amp`` follows too)."""
    precision = choose_precision(device, cfg.amp, cfg.cpu_amp)
    if precision.grad_scaler:
        return precision.dtype, torch.amp.GradScaler("cuda"), precision.description + " + GradScaler"
    return precision.dtype, None, precision.description


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr_mult, layer_decay=cfg.layer_decay,
                          decay_rule=resolved_decay_rule(model, cfg.decay_rule))
    for g in groups:
        g["initial_lr"] = g["lr"]
    # fused: one kernel per step, and it honours a device-side found_inf flag (no sync).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=True, capturable=cfg.cuda_graphs and device.type == "cuda")


# ----------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """Everything ``setup`` builds and the loop and the finish use."""
    cfg: TrainConfig
    dist_info: DistInfo
    device: torch.device
    work_dir: Path
    ctx: StepContext
    amp_desc: str
    val_target: object
    writer: ScalarWriter
    loader: object
    start_it: int
    end_it: int
    last_eval: dict | None = None
    train_seconds: float = 0.0         # the loop's wall time, summed over the resumes (metrics.json)
    loop_t0: float | None = None       # when this process's loop started
    schedule: dict | None = None   # schedule.ddp_schedule record (config.json, metrics.json)
    done: int = 0                      # completed iterations the live state holds
    in_step: bool = False              # inside train_step: the live state is partial
    saved_at: int | None = None        # iteration of the newest checkpoint of this run
    stop: faults.StopOnSignal | None = None
    requested_cfg: TrainConfig | None = None  # before --ddp-schedule: what checkpoints store
    run_id: str = ""                   # kept through resumes; in every checkpoint (retention)

    @property
    def main(self) -> bool:
        return self.dist_info.is_main

    def snapshot(self, done: int, **meta) -> dict:
        """The checkpoint of the live state after ``done`` iterations: the requested config,
        the number of processes and the schedule record (a resume compares them)."""
        return run_checkpoints.snapshot(self.ctx, done, config=self.requested_cfg, world_size=self.dist_info.world_size,
                                schedule=self.schedule, counters={"train_seconds": self.loop_seconds()},
                                run_id=self.run_id, **meta)

    def loop_seconds(self) -> float:
        """Training-loop seconds so far: the checkpoint's (earlier processes) + this loop's."""
        return self.train_seconds + (time.perf_counter() - self.loop_t0 if self.loop_t0 is not None else 0.0)


def _work_dir(cfg: TrainConfig, dist_info: DistInfo, run_id: str = "", resuming: bool = False) -> Path:
    """Rank 0 creates (or, by default, draws) the folder, locks it for this run and checks that
    a new run finds no other run's files there; every rank gets rank 0's folder, or stops with
    its one-line refusal (printed by rank 0)."""
    work_dir, error = cfg.work_dir, None
    if dist_info.is_main:
        try:
            work_dir = str(_claim_work_dir(cfg, run_id, resuming))
        except SystemExit as stop:
            error = str(stop.code)
    if dist_info.enabled:  # every rank uses rank 0's (drawn) folder, or stops with it
        box = [work_dir, error]
        torch.distributed.broadcast_object_list(box, src=0)
        work_dir, error = box
    if error is not None:
        raise SystemExit(error if dist_info.is_main else 1)
    cfg.work_dir = str(work_dir)
    return Path(work_dir)


def _claim_work_dir(cfg: TrainConfig, run_id: str, resuming: bool) -> Path:
    """Rank 0: the folder made, locked and checked (``workdir``); SystemExit(one line) if not."""
    try:
        work_dir = Path(cfg.work_dir) if cfg.work_dir else workdir.default_work_dir(cfg)
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an existing file, a read-only or unreachable place
        raise SystemExit(f"--work-dir: cannot create the folder {cfg.work_dir or 'under work_dirs'} "
                         f"({type(err).__name__}: {err.strerror or first_line(err)})") from None
    _require_writable(work_dir, cfg)
    try:
        lock = workdir.RunLock.acquire(work_dir, run_id or workdir.new_run_id())
    except workdir.WorkDirBusy as busy:
        what = "--resume: the run in" if resuming else "--work-dir:"
        raise SystemExit(f"{what} {work_dir} is in use by a training run that is still alive ({busy}); wait for it "
                         "to end, stop it (Ctrl-C / kill PID writes a checkpoint), or give another --work-dir") \
            from None
    except OSError as err:  # a read-only folder
        raise SystemExit(f"--work-dir: cannot write the lock file {work_dir / workdir.LOCK_NAME} "
                         f"({type(err).__name__}: {err.strerror or first_line(err)})") from None
    if not resuming:
        found = workdir.prior_outputs(work_dir)
        if found and not cfg.overwrite:
            lock.release()
            raise SystemExit(workdir.refusal(work_dir, found))
        if found:
            print(f"--overwrite: moved the earlier run's files ({len(found)} entries) to "
                  f"{workdir.move_aside(work_dir)}; nothing deleted")
    stale = run_checkpoints.remove_stale_temp_files(work_dir)
    if stale:
        print(f"removed {len(stale)} stale temp file(s) of an interrupted checkpoint write in {work_dir}")
    return work_dir


def _require_dali(cfg: TrainConfig) -> None:
    """``--pipeline dali`` needs NVIDIA DALI: one line before any work when it does not import."""
    from ..data.loader import dali_available

    if cfg.pipeline == "dali" and not dali_available():
        raise SystemExit("--pipeline: dali requested but nvidia.dali does not import (pip install "
                         "nvidia-dali-cuda130, see docs/data.md); use --pipeline torch or auto")


def _require_writable(work_dir: Path, cfg: TrainConfig) -> None:
    """A read-only (or full) work dir is one line before anything is built: the run writes its
    checkpoints, logs and config.json there."""
    from ..evaluate import check_writable

    hint = ("; a resumed run writes its checkpoints there: copy the run folder to a writable place and "
            "--resume from the copy") if cfg.resume else "; pass --work-dir DIR in a writable place"
    check_writable(work_dir, "--work-dir", hint)


def _supersede_newer(work_dir: Path, start_it: int, ckpt_path: Path) -> None:
    """Checkpoints past the resumed iteration belong to the abandoned continuation: moved aside."""
    moved = run_checkpoints.supersede_newer(work_dir, start_it, source=ckpt_path)
    if moved:
        print(f"--resume: moved {', '.join(p.name for p in moved)} (past iteration {start_it}, from the run this "
              f"resume abandons) to {moved[0].parent}; not deleted")


def _datasets(cfg: TrainConfig):
    """(train_source, train_target, val_target); resolves ``--crop 0`` to the dataset default."""
    from ..data import build_datasets, dataset_defaults
    from ..data.cache import CacheError

    crop = tuple(cfg.crop) if min(cfg.crop) > 0 else None
    where = cfg.data_root or "$SEPICO_FAST_DATA or ./data"
    try:
        datasets = build_datasets(cfg.source, cfg.target, cfg.data_root or None, crop_size=crop,
                                  target_labels=cfg.pseudo_diagnostics, cache=cfg.cache)
        th, tw = datasets[1].resized_size(0)  # reads the first target image's header
    except CacheError as err:  # --cache png|jpeg asked for a cache that is not usable
        print(f"--cache: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except DataFileError as err:
        raise SystemExit(f"--data-root: {err} (data root {where}; fix or remove the file; python -m "
                         "sepico_fast.prepare DATASET ROOT --check lists every bad file)") from None
    except SyntheticDataError as err:  # a full disk or an unwritable cache folder
        raise SystemExit(f"synthetic data: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--data-root / --source / --target: cannot load {cfg.source} -> {cfg.target} "
                         f"from {where}: {err}") from None
    if crop is None:  # dataset default crop (synthetic pair)
        cfg.crop = list(dataset_defaults(cfg.source, cfg.target)["crop_size"])
    if cfg.crop_hw[0] > th or cfg.crop_hw[1] > tw:  # the target crop is cut from these images
        raise SystemExit(f"--crop: {cfg.crop_hw[0]} {cfg.crop_hw[1]} is larger than the {cfg.target} training "
                         f"images ({th}x{tw} after resizing); use at most {th} {tw}")
    return datasets


def _step_context(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, work_dir: Path,
                  load_pretrained: bool = True):
    """(StepContext with models, optimizer and statistics, precision description)."""
    amp_dtype, scaler, amp_desc = amp_setup(cfg, device)
    student = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim, drop_path_rate=cfg.drop_path_rate)
    if cfg.pretrained and load_pretrained:  # resuming: the checkpoint has the weights
        load_pretrained_weights(student, cfg.pretrained, verbose=dist_info.is_main)
    student = student.to(device)
    broadcast_module(student)
    teacher = make_teacher(student) if cfg.method == "sepico" else None
    optimizer = build_optimizer(cfg, student, device)
    stats = (ClassStats(cfg.num_classes, cfg.proj_dim, cfg.memory_length if cfg.variant == "bank" else 0,
                        device=device, deterministic=cfg.deterministic) if cfg.method == "sepico" else None)
    class_weight = log_frequency_class_weights().to(device) if (cfg.dark_zurich and cfg.dz_class_weight) else None
    profiler = Profiler(profile=cfg.profile and dist_info.is_main, nvtx=cfg.nvtx, device=device,
                        out_dir=work_dir / "profile", iters=cfg.profile_iters)
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, optimizer=optimizer, stats=stats, device=device,
                      amp_dtype=amp_dtype, scaler=scaler, class_weight=class_weight,
                      process_group=dist_info.group, world_size=dist_info.world_size, rank=dist_info.rank,
                      profiler=profiler)
    if cfg.pseudo_diagnostics:
        ctx.pseudo_diag = PseudoDiagnostics(cfg.num_classes, cfg.pseudo_threshold, device, cfg.ignore_rows())
    return ctx, amp_desc


def compile_step(ctx: StepContext, backend="inductor") -> None:
    """``--compile``: each model pass of the iteration with its loss (``step.ModelPasses``:
    teacher pseudo labels, teacher source features, student source / target / ClassMix
    loss) becomes one compiled graph, forward and backward; the student's ``predict`` is
    compiled on its own for evaluation. One graph per (pass, input shape, grad mode), all
    compiled in the first iterations (the source pass again at contrast start, the
    evaluation graph at the first evaluation) and never again. Compile times: bench/NOTES.md."""
    # Inductor's layout optimisation turns convolution inputs to channels_last: on the CPU
    # that makes oneDNN's weight gradients several times slower (bench/NOTES.md), so it is
    # off there; on CUDA channels_last is what cuDNN wants.
    options = {"layout_optimization": False} if (backend == "inductor" and ctx.device.type == "cpu") else None
    compile_passes(ctx, backend, options)
    ctx.student.predict = torch.compile(ctx.student.predict, dynamic=False, backend=backend, options=options)


def setup(cfg: TrainConfig) -> TrainRun:
    """Resume config, process group, work dir, data, models, optimizer, statistics, loader."""
    from ..data import TrainLoader

    cfg, ckpt, ckpt_path = resolve_resume(cfg)  # before any work: the checkpoint's config
    _require_dali(cfg)
    _check_stop_at(cfg, ckpt, ckpt_path)
    run_id = str((ckpt or {}).get("meta", {}).get("run_id") or workdir.new_run_id())
    if ckpt is None and cfg.pretrained:  # a missing weights file: one line, before the data is opened
        check_pretrained_exists(cfg.pretrained, cfg.arch)
    requested_cfg = cfg
    dist_info = init_distributed(resolve_device(cfg.device).type, cfg.ddp_timeout)
    cfg, schedule = ddp_schedule(cfg, dist_info.world_size)  # --ddp-schedule samples: counts / N
    device = resolve_device(cfg.device, dist_info.local_rank)
    # --resume auto without a checkpoint yet: the first start (or a restart before the first
    # checkpoint) of the run that command names; its folder is its own.
    work_dir = _work_dir(cfg, dist_info, run_id, resuming=bool(cfg.resume))
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_source, train_target, val_target = _datasets(cfg)
    # Resolved on the run's config above; under --ddp-schedule samples that is a copy, and the
    # requested config is what config.json and the checkpoints store.
    requested_cfg.work_dir, requested_cfg.crop = cfg.work_dir, list(cfg.crop)
    ctx, amp_desc = _step_context(cfg, device, dist_info, work_dir, load_pretrained=ckpt is None)

    start_it, seconds_before = 0, 0.0
    if ckpt is not None:
        start_it = restore_checkpoint(ctx, ckpt, ckpt_path, device)
        seconds_before = float((ckpt.get("counters") or {}).get("train_seconds", 0.0))
        del ckpt
        if start_it > cfg.iters:  # only with --resume-override and another world size
            raise SystemExit(f"--resume: {ckpt_path} is at iteration {start_it}, past the {cfg.iters} iterations "
                             f"of this run (--ddp-schedule {cfg.ddp_schedule}, {dist_info.world_size} process(es))")
        if dist_info.is_main:
            print(f"resumed from {ckpt_path} at iteration {start_it}")
            _supersede_newer(work_dir, start_it, ckpt_path)
    if dist_info.is_main and cfg.resume:  # log rows past the resumed iteration: the abandoned continuation
        dropped = truncate_scalars(work_dir, start_it)
        if dropped:
            print(f"--resume: moved {dropped} row(s) of scalars.jsonl past iteration {start_it} (from the run this "
                  f"resume abandons) to {work_dir / 'superseded' / 'scalars.jsonl'}; not deleted")
    if cfg.compile:
        compile_step(ctx)
    if dist_info.is_main:
        (work_dir / "config.json").write_text(
            json.dumps({**requested_cfg.to_dict(), "schedule": schedule}, indent=2) + "\n")
    writer = ScalarWriter(work_dir, enabled=dist_info.is_main)
    loader = TrainLoader(train_source, train_target, cfg.batch_size, cfg.seed, start_iter=start_it,
                         pipeline=cfg.pipeline, device=device, rank=dist_info.rank,
                         world_size=dist_info.world_size, num_workers=None if cfg.num_workers < 0 else cfg.num_workers)
    if dist_info.is_main:
        _announce_data(cfg, loader, train_source, train_target)
    end_it = min(cfg.stop_at, cfg.iters) if cfg.stop_at else cfg.iters
    if dist_info.is_main:
        method = cfg.method + (f"/{cfg.variant}" if cfg.method == "sepico" else "")
        print(f"sepico_fast.train: {method} {cfg.arch} {cfg.source}->{cfg.target} "
              f"iters={cfg.iters} batch={cfg.batch_size}x{dist_info.world_size} "
              f"ddp_schedule={cfg.ddp_schedule} crop={cfg.crop_hw} "
              f"device={device} precision={amp_desc} work_dir={work_dir}")
    announce_implementations(cfg, device, main=dist_info.is_main)
    return TrainRun(cfg=cfg, dist_info=dist_info, device=device, work_dir=work_dir, ctx=ctx, amp_desc=amp_desc,
                    val_target=val_target, writer=writer, loader=loader, start_it=start_it, end_it=end_it,
                    schedule=schedule, requested_cfg=requested_cfg, done=start_it, train_seconds=seconds_before,
                    saved_at=start_it if ckpt_path is not None else None, run_id=run_id)


def _check_stop_at(cfg: TrainConfig, ckpt: dict | None, ckpt_path) -> None:
    """--stop-at at or below the checkpoint's iteration would train nothing: one line, status 2."""
    if ckpt is None or not cfg.stop_at:
        return
    it = int(ckpt["meta"]["iter"])
    if cfg.stop_at <= it:
        if os.environ.get("RANK", "0") == "0":  # before the process group: one line from rank 0
            print(f"sepico_fast.train: --stop-at: {cfg.stop_at} is not past iteration {it} of {ckpt_path}, so "
                  f"nothing would be trained; give a larger --stop-at, or none to run to --iters {cfg.iters}",
                  file=sys.stderr)
        raise SystemExit(2)


def _announce_data(cfg: TrainConfig, loader, train_source, train_target) -> None:
    """One line: pipeline, workers (and where their number came from), caches read; then the
    cache notes (a cache found but not used, and why)."""
    from ..data.loader import usable_cpus

    workers = f"{loader.num_workers} worker{'s' if loader.num_workers != 1 else ''}"
    if cfg.num_workers < 0:
        workers += (" (--num-workers -1: data held in memory)" if loader.num_workers == 0 else
                    f" (--num-workers -1: from {usable_cpus()} usable CPUs)")
    caches = ", ".join(f"{ds.name} {ds.cache or 'originals'}" for ds in (train_source, train_target))
    print(f"data: {loader.pipeline} pipeline, {workers}; reading {caches} (--cache {cfg.cache})")
    for ds in (train_source, train_target):
        if ds.cache_note and (ds.cache is None or cfg.cache == "auto"):
            print(f"data: {ds.cache_note}")


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class _LogWindow:
    """Loss sums and timing since the last log line; time spent in ``paused()`` (evaluations,
    checkpoints, debug pictures, the one-time FLOP count) is left out of the window's
    seconds, its iterations still count. ``data_wait``: seconds the loop spent blocked in
    ``next(loader)`` (host clock only: no device sync). Each loss is averaged
    over the iterations that produced it (the contrast losses start at ``contrast_start``,
    which need not be a multiple of ``log_interval``)."""

    def __init__(self, start_it: int):
        self.acc: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.reset(start_it)

    def reset(self, it: int) -> None:
        self.acc, self.count = {}, {}
        self.t0, self.it0, self.excluded = time.perf_counter(), it, 0.0
        self.data_wait = 0.0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.acc[k] = self.acc[k] + v if k in self.acc else v.clone()
            self.count[k] = self.count.get(k, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        """Per-loss averages, still on the device (read by the log line's one sync)."""
        return {k: self.acc[k].float() / self.count[k] for k in sorted(self.acc)}

    @contextlib.contextmanager
    def paused(self, device: torch.device):
        if device.type == "cuda":  # the iterations queued so far belong to the window
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0 - self.excluded, 1e-9)


def _log(run: TrainRun, window: _LogWindow, done: int, bar: ProgressBar | None, flops_iter, peak) -> None:
    """The only host sync of the loop: losses and the skipped-step counter, read together.

    ``flops_iter``: ``throughput.IterationFlops`` (per rank) or None. MFU is one rank's
    FLOP rate over one device's peak; images/s counts every rank's images.
    """
    cfg, ctx = run.cfg, run.ctx
    world = run.dist_info.world_size
    means = window.means()
    names = list(means)
    values = torch.stack([means[k] for k in names] + [ctx.skipped.float()]).tolist()
    skipped = int(values.pop())
    seconds = window.seconds()
    iters = done - window.it0
    ips = iters * cfg.batch_size * world * (2 if cfg.method == "sepico" else 1) / seconds
    scalars = {k: v for k, v in zip(names, values)}
    # float(): the lr is a device tensor with --cuda-graphs
    scalars.update(lr=float(ctx.optimizer.param_groups[0]["lr"]), images_per_s=ips, skipped_steps=skipped)
    # Fraction of the window's wall time the loop waited for a batch (as torchtitan's
    # data_loading(%) and timm's data time): near 0 when the input pipeline keeps up.
    data_wait = min(window.data_wait / seconds, 1.0)
    scalars["data_wait"] = data_wait
    mfu = None
    if flops_iter is not None:
        flops = flops_iter.between(window.it0, done)
        scalars["tflops_per_s"] = flops / seconds / 1e12
        mfu = model_flops_utilisation(flops, seconds, peak)
        if mfu is not None:
            scalars["mfu"] = mfu
    if run.main:
        loss_txt = " ".join(f"{k}={v:.4f}" for k, v in zip(names, values))
        bar.update(done, f"{ips:.1f} img/s | data wait {100 * data_wait:.0f}% | "
                         f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                         f"{loss_txt} | skipped {skipped}")
        run.writer.write(done, scalars)
    if skipped > cfg.max_skipped_steps:
        raise faults.NonFiniteLimit(
            f"{skipped} optimizer steps were skipped because losses/gradients were NaN or Inf "
            f"(limit --max-skipped-steps {cfg.max_skipped_steps}); lower --lr, check the data, or try "
            "without --amp")
    window.reset(done)


def train_loop(run: TrainRun) -> None:
    """Iterations ``start_it .. end_it - 1`` with logging, checkpoints and evaluations; a
    signal or an exception ends it through ``faults.emergency_stop``."""
    run.stop = faults.StopOnSignal(run.dist_info.control_group, run.dist_info.world_size)
    with run.stop:
        try:
            _iterations(run)
        except BaseException as exc:  # noqa: BLE001 - re-raised, or replaced by RunStopped
            stop = faults.emergency_stop(run, exc)
            if stop is exc:
                raise
            raise stop from exc


def _iterations(run: TrainRun) -> None:
    cfg, ctx = run.cfg, run.ctx
    profiler = ctx.profiler
    batches = iter(run.loader)
    bar = ProgressBar(cfg.iters, run.start_it) if run.main else None
    window = _LogWindow(run.start_it)
    flops_iter, flops_known, peak = None, False, device_peak_tflops(run.device)  # None is also an answer
    run.loop_t0 = time.perf_counter()
    step = make_step(ctx) if cfg.cuda_graphs else train_step  # --cuda-graphs: train/graphs.py
    for it in range(run.start_it, run.end_it):
        t_data = time.perf_counter()
        with profiler.phase("data"):
            src, tgt = next(batches)
        window.data_wait += time.perf_counter() - t_data
        if not flops_known:  # once, on the first batch's target size; not training time
            with window.paused(run.device):
                flops_iter, flops_known = flops_per_iteration(cfg, tuple(tgt["img"].shape[-2:])), True
        debug = run.main and cfg.debug_interval > 0 and it % cfg.debug_interval == 0 and cfg.method == "sepico"
        run.in_step = True
        out = step(ctx, src, tgt, it, debug=debug)
        run.in_step, run.done = False, it + 1
        profiler.step()
        window.add(out["losses"])
        if debug:  # a host sync (the pictures are read back): outside the window's seconds
            with window.paused(run.device):
                save_debug_images(out["debug"], run.work_dir / "debug" / f"iter_{it:06d}.png")
        done = it + 1
        if done % cfg.log_interval == 0 or done == run.end_it:
            if ctx.pseudo_diag is not None:
                ctx.pseudo_diag.stage()  # device -> host copy queued before _log's sync
            _log(run, window, done, bar, flops_iter, peak)
            if ctx.pseudo_diag is not None and run.main:
                run.writer.write(done, ctx.pseudo_diag.collect())
        if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == run.end_it:
            with window.paused(run.device):  # writing files is not training time either
                _checkpoint(run, done)  # before the evaluation: a bad validation file loses nothing
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.iters:
            with window.paused(run.device):  # evaluation time is not training time
                run.last_eval = _evaluate(run, done)
        if run.stop.requested() and done < run.end_it:
            raise faults.Interrupted(run.stop.signum)
    profiler.finish()
    run.train_seconds, run.loop_t0 = run.loop_seconds(), None


def _checkpoint(run: TrainRun, done: int) -> None:
    if run.main:
        run_checkpoints.save_checkpoint(run.work_dir, run.snapshot(done), done, run.cfg.keep_checkpoints)
    run.saved_at = done
    barrier()


def _evaluate(run: TrainRun, it: int) -> dict | None:
    """Student evaluation on rank 0 (others wait at the barrier)."""
    from ..data import val_loader

    cfg, ctx, result = run.cfg, run.ctx, None
    if run.main:
        report: dict = {}
        groups: dict = {}  # ACDC: one confusion matrix per condition
        reweight = cfg.dz_test_reweight and cfg.target != "acdc"  # ACDC's *_rgb_anon.png are not Dark Zurich
        weights = dark_zurich_class_weights() if reweight else None  # only *_rgb_anon.png images
        cm = evaluate_model(ctx.student, val_loader(run.val_target, run.device), cfg.num_classes,
                            device=run.device, amp_dtype=ctx.amp_dtype, max_images=cfg.eval_max_images,
                            test_class_weight=weights, report=report, groups=groups)
        result = iou_summary(cm)
        if groups:
            result["per_condition"] = group_summary(groups)
        result.update(reweighting_record(reweight, report))
        print()
        if cfg.target == "darkzurich":  # the rule only concerns Dark Zurich images
            print(reweighting_line(result))
        print(iou_table([v / 100.0 for v in result["per_class_iou"]], CLASSES, title=cfg.target))
        if groups:
            print(group_lines(result["per_condition"]))
        run.writer.write(it, {"val/miou": result["miou"]})
        if ctx.pseudo_diag is not None:
            _pseudo_table(run, it)
        update_curves(run.work_dir, _curves_title(cfg))
    barrier()
    return result


def _pseudo_table(run: TrainRun, it: int) -> None:
    """--pseudo-diagnostics: the per-class table since the previous evaluation (console and file)."""
    diag = run.ctx.pseudo_diag
    diag.stage()
    scalars = diag.collect(sync=True)  # counts since the last log line
    if scalars:
        run.writer.write(it, scalars)
    table = diag.table(title=f"{run.cfg.target} train, up to iteration {it}")
    print(table)
    with open(run.work_dir / "pseudo_diagnostics.txt", "a") as fh:
        fh.write(table + "\n\n")


def _curves_title(cfg: TrainConfig) -> str:
    method = cfg.method + (f"/{cfg.variant}" if cfg.method == "sepico" else "")
    return f"{method} {cfg.arch} {cfg.source}->{cfg.target} seed {cfg.seed}"


# ----------------------------------------------------------------------------------------
# The finish
# ----------------------------------------------------------------------------------------
def finish(run: TrainRun) -> dict:
    """Final evaluation and metrics.json (or the --stop-at note); closes the process group."""
    cfg = run.cfg
    try:
        if run.end_it < cfg.iters:
            if run.main:
                print(f"stopped after iteration {run.end_it} (--stop-at); resume with --resume auto "
                      f"--work-dir {shlex.quote(str(run.work_dir))}")
                update_curves(run.work_dir, _curves_title(cfg))
            return {"stopped_at": run.end_it}
        try:
            run.last_eval = _evaluate(run, cfg.iters)
        except DataFileError as exc:  # the final checkpoint is already written
            ckpt = run.work_dir / f"iter_{cfg.iters:06d}.pt"
            raise faults.RunStopped(f"error: {exc} (training finished, checkpoint {ckpt}; fix the file, then "
                                    f"python -m sepico_fast.evaluate --checkpoint {shlex.quote(str(ckpt))})",
                                    1) from None
        metrics = dict(run.last_eval or {})
        metrics.update(iters=cfg.iters, train_seconds=round(run.train_seconds, 2), method=cfg.method,
                       variant=cfg.variant, arch=cfg.arch, seed=cfg.seed, source=cfg.source, target=cfg.target,
                       precision=run.amp_desc, skipped_steps=int(run.ctx.skipped.item()), schedule=run.schedule)
        if run.main:
            (run.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print(f"metrics: {run.work_dir / 'metrics.json'}")
        return metrics
    finally:
        run.writer.close()
        barrier()
        shutdown()
        workdir.release_all()


def run(cfg: TrainConfig) -> dict:
    """Train with ``cfg``; returns the final metrics dict (also written to metrics.json).
    Raises ``faults.RunStopped`` (one-line message, exit status) when stopped early. The work
    dir is locked from the start of ``setup`` to the return (``workdir``)."""
    try:
        state = setup(cfg)
        try:
            train_loop(state)
        except BaseException:
            state.writer.close()
            shutdown()
            raise
        return finish(state)
    finally:
        workdir.release_all()
