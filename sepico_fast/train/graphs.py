"""``--cuda-graphs``: the iteration after contrast start replays as one captured CUDA graph.

Why hand-written ``torch.cuda.CUDAGraph`` capture and not ``torch.compile(mode=
"reduce-overhead")``: the iteration holds three backward passes, the optimizer step and
the teacher EMA; ``reduce-overhead`` graphs only what dynamo compiles (forward and
backward of each compiled function, one graph each, with copies of inputs into static
buffers at every call) and never the optimizer or the EMA, so an iteration would still
launch several graphs plus hundreds of eager ops. The PyTorch documentation's
"whole-network capture" (forward, backward and ``optimizer.step`` in one graph) is what a
user expects for a static-shape training step, and it composes with eager mode and with
the Triton kernels without a compiler (docs/training.md, "CUDA graphs").

What makes one iteration replayable (the "static" step, ``train_step`` with
``ctx.static`` set):

* every per-iteration host decision is data in a device tensor, written before the
  replay by ``StaticInputs.prepare`` from the iteration's host RNG (the same draws as
  eager mode: jitter on/off, blur on/off, jitter orders): the strong augmentation is
  branch-free (``augment.static_augment``: all four jitter ops at each of the four positions,
  the drawn one selected by ``gather``; jitter and blur always computed, kept with
  ``torch.where``), so its op sequence does not depend on the draws;
* the jitter factors and σ are always drawn (eager mode draws them only when used), so
  the device random stream differs from eager mode's; it is still a pure function of
  (seed, iteration, rank): the iteration's generator and torch's global generator are
  re-seeded before each replay, and resuming replays the same draws;
* the learning rate is a device tensor (capturable fused AdamW), filled before the replay;
  the EMA weight is constant from ``ema_constant_from`` on (α_t = α), the first iteration
  the graph may hold;
* class statistics are updated in place (``ClassStats.inplace``), gradients and the
  optimizer state live in the graph's private memory pool, sized by the capture.

Iterations that run eagerly (each reason logged once, INFO, logger
``sepico_fast.train``): before contrast start / a constant EMA weight (eager step);
on the CPU, with DDP, an fp16 GradScaler, ``--compile``, ``--pseudo-diagnostics``,
debug-picture steps and the first ``WARMUP`` graph-ready iterations (the static step,
eagerly, so the numbers are those of the graph). Evaluation never runs in a graph.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from .. import augment
from .schedule import lr_factor

logger = logging.getLogger("sepico_fast.train")

WARMUP = 3  # eager static iterations before the capture (lazy state, Triton compilation, cuDNN choices)


def ema_constant_from(alpha: float) -> int:
    """First iteration whose EMA weight α_t = min(1 − 1/(t+1), α) equals α."""
    it = max(1, math.ceil(1.0 / max(1.0 - alpha, 1e-12)) - 2)
    while min(1.0 - 1.0 / (it + 1), alpha) != alpha:
        it += 1
    while it > 1 and min(1.0 - 1.0 / it, alpha) == alpha:
        it -= 1
    return it


def static_from(cfg) -> int:
    """First iteration of the static (graph-ready) step."""
    return max(cfg.contrast_start, ema_constant_from(cfg.ema_alpha), 1)


@dataclass
class StaticInputs:
    """Device tensors the static step reads instead of host decisions.

    ``flags`` [2] bool: jitter, blur. ``orders`` [2 + B, 4] int64: the jitter order of the
    source call, the target call and each mixed sample. ``lr`` one 0-d tensor per
    optimizer group. ``generator``: the iteration's device generator (re-seeded)."""
    flags: torch.Tensor
    orders: torch.Tensor
    generator: torch.Generator

    @classmethod
    def build(cls, batch: int, device: torch.device) -> "StaticInputs":
        device = torch.device(device)
        return cls(flags=torch.zeros(2, dtype=torch.bool, device=device),
                   orders=torch.zeros(2 + batch, 4, dtype=torch.int64, device=device),
                   generator=torch.Generator(device=device))

    def prepare(self, ctx, it: int) -> None:
        """Seed the generators, write the iteration's decisions and learning rate (outside
        the graph: one host→device copy from pinned memory, one fill per group)."""
        from .step import iteration_seed

        cfg = ctx.cfg
        s = iteration_seed(cfg.seed, it, ctx.rank)
        torch.manual_seed(s)
        self.generator.manual_seed(s)
        rng = random.Random(s)
        strong = augment.draw_strong_params(rng, cfg.color_jitter_strength, cfg.color_jitter_p, cfg.blur)
        orders = [augment.draw_jitter_order(rng) for _ in range(self.orders.shape[0])]
        values = [int(strong.jitter), int(strong.blur)] + [k for o in orders for k in o]
        staged = torch.tensor(values, dtype=torch.int64)
        dev = self.flags.device
        if dev.type == "cuda":  # a fresh pinned block: the caching host allocator keeps it until the copy ran
            staged = staged.pin_memory().to(dev, non_blocking=True)
        self.flags.copy_(staged[:2].bool())
        self.orders.copy_(staged[2:].view_as(self.orders))
        factor = lr_factor(it, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.poly_power)
        for group in ctx.optimizer.param_groups:
            lr = group["initial_lr"] * factor
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


# ----------------------------------------------------------------------------------------
# The step function the runner calls
# ----------------------------------------------------------------------------------------
class GraphStep:
    """``step(ctx, src, tgt, it, debug)``: eager before ``static_from(cfg)``, the static step
    from there on, captured once and replayed on CUDA (see the module docstring)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.start = static_from(ctx.cfg)
        self.graph = None
        self.outputs = None
        self.static_src = self.static_tgt = None
        self.warm = 0
        self._said: set[str] = set()
        self._capture_blocked = self._capture_reason()

    def _say(self, why: str) -> None:
        if why not in self._said:
            self._said.add(why)
            logger.info("--cuda-graphs: %s", why)

    def _capture_reason(self) -> str | None:
        ctx = self.ctx
        if ctx.device.type != "cuda":
            return "no CUDA device: the graph-ready step runs eagerly"
        if ctx.world_size > 1:
            return "DDP all-reduce is not captured: the graph-ready step runs eagerly"
        if ctx.scaler is not None:
            return "fp16 GradScaler steps are not captured (use bf16): the graph-ready step runs eagerly"
        if ctx.cfg.compile:
            return "not captured together with --compile: the graph-ready step runs eagerly"
        if ctx.pseudo_diag is not None:
            return "--pseudo-diagnostics is not captured: the graph-ready step runs eagerly"
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return "this PyTorch cannot capture a custom generator: the graph-ready step runs eagerly"
        return None

    def _ensure_static(self, src: dict) -> None:
        ctx = self.ctx
        if ctx.static is None:
            ctx.static = StaticInputs.build(src["img"].shape[0], ctx.device)
            if ctx.stats is not None:
                ctx.stats.inplace = True
            if self._capture_blocked is None:  # capturable AdamW reads the lr from the device
                for group in ctx.optimizer.param_groups:
                    if not isinstance(group["lr"], torch.Tensor):
                        group["lr"] = torch.tensor(float(group["lr"]), device=ctx.device)

    def __call__(self, ctx, src: dict, tgt: dict, it: int, debug: bool = False) -> dict:
        from .step import train_step

        if it < self.start:
            self._say(f"iterations before {self.start} (contrast start, constant EMA weight) run eagerly")
            return train_step(ctx, src, tgt, it, debug=debug)
        self._ensure_static(src)
        ctx.static.prepare(ctx, it)
        if self._capture_blocked is not None or debug:
            self._say(self._capture_blocked or "debug-picture steps run the graph-ready step eagerly")
            return train_step(ctx, src, tgt, it, debug=debug)
        if self.static_src is None:  # the graph's input buffers
            self.static_src = {k: v.clone() for k, v in src.items() if isinstance(v, torch.Tensor)}
            self.static_tgt = {k: v.clone() for k, v in tgt.items() if isinstance(v, torch.Tensor)}
        for static, new in ((self.static_src, src), (self.static_tgt, tgt)):
            for k, buf in static.items():
                buf.copy_(new[k], non_blocking=True)
        if self.warm < WARMUP:  # eagerly on a side stream, as the capture will run
            self.warm += 1
            self._say(f"the first {WARMUP} graph-ready iterations run eagerly (warm-up), then one capture")
            side = torch.cuda.Stream(device=ctx.device)
            side.wait_stream(torch.cuda.current_stream(ctx.device))
            with torch.cuda.stream(side):
                out = train_step(ctx, self.static_src, self.static_tgt, it)
            torch.cuda.current_stream(ctx.device).wait_stream(side)
            return out
        if self.graph is None:
            self._capture(it)
        self.graph.replay()
        return self.outputs

    def _capture(self, it: int) -> None:
        """Record iteration ``it`` (recording runs nothing), then re-seed for its replay."""
        from .step import train_step

        ctx = self.ctx
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(ctx.static.generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(ctx.device)
        with torch.cuda.graph(graph):
            self.outputs = train_step(ctx, self.static_src, self.static_tgt, it)
        self.graph = graph
        ctx.static.prepare(ctx, it)  # the capture advanced the generators' offsets
        logger.info("--cuda-graphs: iteration %d captured; later iterations replay it", it)


def make_step(ctx):
    """The runner's step function: ``train_step`` itself, or a ``GraphStep`` with --cuda-graphs."""
    from .step import train_step

    if not getattr(ctx.cfg, "cuda_graphs", False):
        return train_step
    return GraphStep(ctx)
