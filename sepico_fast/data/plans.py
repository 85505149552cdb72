"""Per-sample random generators and plans, shared by both training input pipelines.

Sample ``slot`` of the batch of iteration ``t`` on DDP rank ``rank`` draws all of its random
decisions from ``sample_rng(seed, t, slot, rank, stream)``; ``loader.py`` (PyTorch workers)
and ``dali_pipeline.py`` (DALI) both render the plans drawn here, which is why this lives
in a module of its own that neither of them owns.
"""
from __future__ import annotations

import numpy as np

SOURCE_STREAM, TARGET_STREAM = 0, 1


def sample_rng(seed: int, t: int, slot: int, rank: int, stream: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, iteration, slot, rank, stream)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(rank), int(t), int(slot),
                                                                        int(stream)])))


def plan_sample(train_source, train_target, seed: int, t: int, slot: int, rank: int):
    """(source plan, target plan) of one training sample."""
    return (train_source.plan(sample_rng(seed, t, slot, rank, SOURCE_STREAM)),
            train_target.plan(sample_rng(seed, t, slot, rank, TARGET_STREAM)))
