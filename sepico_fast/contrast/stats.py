"""Per-class feature statistics (method §4): mean, diagonal variance, count and FIFO bank.

The batch moments are segment sums over the N pixels (``index_add_`` or a one-hot
matmul), so an update reads N x A features about twice and never builds the N x C x A
tensors of the upstream formulation (method §9). The variance is the centred second
moment Σ (z - m_c)^2 of the batch, computed after the class means are known, so it does
not suffer the cancellation of E[z^2] - E[z]^2 in float32; batches, ranks and the
running state are combined with Chan's exact merge.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..dispatch import check_impl, resolve_impl
from .validation import check_features, check_ignore_index, check_labels, triton_kernel


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_moments_torch(feat: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        ignore_index: int = 255, deterministic: bool = False):
    """Per-class count, mean and centred second moment of one batch.

    For class c with pixel set S_c (labels == c; ``ignore_index`` and nothing else is
    skipped, the caller validates the label range):

        count_c = |S_c|,   mean_c = Σ_{i∈S_c} z_i / count_c,   m2_c = Σ_{i∈S_c} (z_i - mean_c)^2

    (mean and m2 are 0 for an absent class). Outputs are float32, or float64 when
    ``feat`` is float64. ``deterministic=True`` replaces the scatter-adds (atomics on
    CUDA) with one-hot matmuls, whose summation order is fixed.
    """
    n, dim = feat.shape
    dtype = _compute_dtype(feat.dtype)
    # Ignore pixels go to an extra trash segment C, so no boolean indexing (host sync).
    seg = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels).long()
    with torch.no_grad(), torch.autocast(feat.device.type, enabled=False):
        x = feat.detach().to(dtype)
        if deterministic:
            onehot = torch.zeros(n, num_classes + 1, dtype=dtype, device=feat.device)
            onehot.scatter_(1, seg[:, None], 1.0)
            count = onehot.sum(0)
            total = onehot.t() @ x
        else:
            count = torch.zeros(num_classes + 1, dtype=dtype, device=feat.device)
            count.index_add_(0, seg, torch.ones(n, dtype=dtype, device=feat.device))
            total = torch.zeros(num_classes + 1, dim, dtype=dtype, device=feat.device)
            total.index_add_(0, seg, x)
        mean = total / count.clamp_min(1.0)[:, None]
        # (m_{y_i} - z_i)^2 in one N x A buffer: the gathered class mean, updated in place.
        sq = mean.index_select(0, seg)
        sq.sub_(x).square_()
        if deterministic:
            m2 = onehot.t() @ sq
        else:
            m2 = torch.zeros(num_classes + 1, dim, dtype=dtype, device=feat.device)
            m2.index_add_(0, seg, sq)
    return count[:num_classes], mean[:num_classes], m2[:num_classes]


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan merge of R partial moments stacked on dim 0: [R,C], [R,C,A], [R,C,A] -> [C], [C,A], [C,A].

        K = Σ_r k_r,  M = Σ_r k_r m_r / K,  M2 = Σ_r m2_r + Σ_r k_r (m_r - M)^2
    """
    total = count.sum(0)
    w = count / total.clamp_min(1.0)  # [R, C]; 0 where the class is absent everywhere
    merged_mean = (w[..., None] * mean).sum(0)
    spread = count[..., None] * (mean - merged_mean) ** 2
    return total, merged_mean, (m2 + spread).sum(0)


def _distributed_group(process_group):
    """The group to combine over, or None for a single process."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_gather_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, process_group):
    """Combine the batch moments of every rank (same result, same order, on every rank)."""
    world = dist.get_world_size(process_group)
    if world == 1:
        return count, mean, m2
    packed = torch.cat([count[:, None], mean, m2], dim=1).contiguous()  # [C, 1 + 2A]
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=process_group)
    stacked = torch.stack(gathered)  # [R, C, 1 + 2A], rank order
    dim = mean.shape[1]
    return merge_moments(stacked[..., 0], stacked[..., 1:1 + dim], stacked[..., 1 + dim:])


def merge_batch(count, mean, var, k, m, m2):
    """The method §4 update of (count n, mean μ, var σ²) by batch (k, m, m2), in the given order:

        w = k / (k + n)  (0 when both are 0),  v = m2 / k
        σ² <- (1 - w) σ² + w v + w (1 - w) (μ - m)²
        μ  <- (1 - w) μ + w m
        n  <- n + k

    A pure function (returns the new tensors) so that it can be compiled or reused.
    """
    v = m2 / k.clamp_min(1.0)[:, None]
    total = k + count
    w = torch.where(total > 0, k / total.clamp_min(1.0), torch.zeros_like(k))[:, None]
    var = (1 - w) * var + w * v + w * (1 - w) * (mean - m) ** 2
    mean = (1 - w) * mean + w * m
    return count + k, mean, var


class ClassStats:
    """Running per-class mean, diagonal population variance, pixel count and FIFO bank.

    State (``dtype``, float32 by default whatever the feature dtype; float64 is offered
    for exactness tests): ``mean [C,A]``, ``var [C,A]``, ``count [C]``, and when
    ``memory_length`` M > 0 a bank ``bank [C,M,A]`` with ``bank_len [C]`` int64 (rows
    0..bank_len-1 valid, oldest first). Each bank starts with one zero row
    (bank_len = 1, upstream quirk) that stays until M newer rows push it out.

    ``count`` is float32 like upstream: it is exact up to 2^24 pixels per class; past
    that the merge weight k/(k+n) is still computed to float32 precision.
    """

    def __init__(self, num_classes: int, dim: int, memory_length: int = 0, device=None,
                 impl: str | None = None, *, dtype: torch.dtype = torch.float32,
                 ignore_index: int = 255, deterministic: bool = False):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(memory_length, int) or memory_length < 0:
            raise ValueError(f"memory_length must be an int >= 0, got {memory_length!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        check_ignore_index(ignore_index, num_classes)
        check_impl("class_moments", impl)  # rejects unknown names early
        self.num_classes = num_classes
        self.dim = dim
        self.memory_length = memory_length
        self.impl = impl
        self.dtype = dtype
        self.ignore_index = ignore_index
        self.deterministic = deterministic
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.mean = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        self.var = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        self.count = torch.zeros(num_classes, dtype=dtype, device=device)
        self.bank = torch.zeros(num_classes, memory_length, dim, dtype=dtype, device=device)
        self.bank_len = torch.full((num_classes,), 1 if memory_length else 0, dtype=torch.int64,
                                   device=device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def batch_moments(self, feat: torch.Tensor, labels: torch.Tensor):
        """count [C], mean [C,A], m2 [C,A] of one batch in the state dtype (no validation)."""
        impl = resolve_impl("class_moments", self.impl, feat.device, dtype=feat.dtype)
        deterministic = self.deterministic or torch.are_deterministic_algorithms_enabled()
        if impl == "triton":
            fn = triton_kernel("class_moments")
            count, mean, m2 = fn(feat, labels, self.num_classes, self.ignore_index,
                                 deterministic=deterministic)
        else:
            x = feat.double() if self.dtype == torch.float64 else feat
            count, mean, m2 = class_moments_torch(x, labels, self.num_classes, self.ignore_index,
                                                  deterministic=deterministic)
        return count.to(self.dtype), mean.to(self.dtype), m2.to(self.dtype)

    @torch.no_grad()
    def update(self, feat: torch.Tensor, labels: torch.Tensor, process_group=None,
               labels_checked: bool = False) -> None:
        """Merge one batch of prepared features into the state (method §4), no host sync.

        Under torch.distributed (initialised with world size > 1, or an explicit
        ``process_group``) the batch moments of all ranks are gathered and merged first,
        so every rank ends with identical statistics.
        """
        check_features(feat)
        if feat.shape[1] != self.dim:
            raise ValueError(f"feat must have {self.dim} columns (ClassStats dim), got {feat.shape[1]}")
        if feat.device != self.device:
            raise ValueError(f"feat is on {feat.device} but the statistics are on {self.device}")
        # labels_checked: made by prepare_contrast, values checked there (7 launches fewer)
        check_labels(labels, feat, self.num_classes, self.ignore_index, values=not labels_checked)

        k, m, m2 = self.batch_moments(feat.detach(), labels)
        group = _distributed_group(process_group)
        if group is not None:
            k, m, m2 = all_gather_moments(k, m, m2, group)
        self._merge(k, m, m2)

    # True: updates write into the existing tensors (a captured CUDA graph replays them in place)
    inplace = False

    def _merge(self, k: torch.Tensor, m: torch.Tensor, m2: torch.Tensor) -> None:
        count, mean, var = merge_batch(self.count, self.mean, self.var, k, m, m2)
        if self.inplace:
            self.count.copy_(count)
            self.mean.copy_(mean)
            self.var.copy_(var)
        else:
            self.count, self.mean, self.var = count, mean, var
        if self.memory_length:
            self._push(m, k > 0)

    def _push(self, rows: torch.Tensor, push: torch.Tensor) -> None:
        """FIFO push of rows[c] into bank c for every c with push[c]; a full bank drops row 0."""
        length = self.memory_length
        full = self.bank_len >= length
        shift = (push & full)[:, None, None]
        bank = torch.where(shift, torch.roll(self.bank, -1, dims=1), self.bank)
        slot = torch.where(full, torch.full_like(self.bank_len, length - 1), self.bank_len)
        classes = torch.arange(self.num_classes, device=self.device)
        current = bank[classes, slot]
        bank[classes, slot] = torch.where(push[:, None], rows, current)
        bank_len = torch.where(push, (self.bank_len + 1).clamp_max(length), self.bank_len)
        if self.inplace:
            self.bank.copy_(bank)
            self.bank_len.copy_(bank_len)
        else:
            self.bank, self.bank_len = bank, bank_len

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone(),
                "bank": self.bank.clone(), "bank_len": self.bank_len.clone()}

    def load_state_dict(self, state: dict) -> None:
        c, a, length = self.num_classes, self.dim, self.memory_length
        shapes = {"mean": (c, a), "var": (c, a), "count": (c,), "bank": (c, length, a),
                  "bank_len": (c,)}
        for key, shape in shapes.items():
            if key not in state:
                raise ValueError(f"ClassStats state_dict is missing '{key}'")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"ClassStats state_dict['{key}'] must have shape {shape}, "
                                 f"got {tuple(state[key].shape)}")
        for key in ("mean", "var", "count", "bank"):
            setattr(self, key, state[key].detach().to(self.device, self.dtype).clone())
        self.bank_len = state["bank_len"].detach().to(self.device, torch.int64).clone()

    def to(self, device) -> "ClassStats":
        for key in ("mean", "var", "count", "bank", "bank_len"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def __repr__(self) -> str:
        return (f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, "
                f"memory_length={self.memory_length}, dtype={self.dtype}, device={self.device})")
