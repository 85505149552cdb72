"""SePiCo training (method §5-7): ``python -m sepico_fast.train --amp``.

    config.py         TrainConfig dataclass, presets, generated CLI, validation
    step.py           train_step(): one iteration, top to bottom
    uda.py            EMA teacher, pseudo labels, Dark Zurich fusion, ClassMix classes
    schedule.py       warm-up + poly learning rate
    run_checkpoints.py  the run's checkpoints: atomic, verified (weights_only-loadable), snapshot / restore
    resume.py         --resume: newest intact checkpoint, the checkpoint's config, restore
    faults.py         signals, emergency checkpoints, one-line stops (RunStopped)
    workdir.py        one run, one folder: the work dir's lock, default names, another run's files
    profiling.py      NVTX ranges / torch.profiler per phase
    logging.py        progress bar, scalar logs (IoU tables: sepico_fast.reporting)
    ddp.py            torchrun / process-group helpers
    runner.py         setup(), train_loop(), finish(): logging, evaluation, checkpoints
    throughput.py     FLOP count of one iteration, device peaks (MFU)
"""
import os

# Before torch is first imported: how long idle OpenMP threads spin before sleeping. A short
# spin (libgomp, which Linux torch wheels use) was fastest on a quiet and on a busy CPU
# (measurements: docs/training.md, "CPU threads"). Values already in the environment
# (OMP_WAIT_POLICY or GOMP_SPINCOUNT) win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .config import PRESETS, TrainConfig, make_config, parse_args  # noqa: E402

__all__ = ["TrainConfig", "PRESETS", "make_config", "parse_args", "run"]


def run(cfg: TrainConfig) -> dict:
    from .runner import run as _run

    return _run(cfg)
