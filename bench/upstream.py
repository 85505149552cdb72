"""The upstream formulation of the statistics update and of DistCL (method §9), as a baseline.

Written from the method description (docs/method.md) of what the original implementation does, so that
every benchmark can report "how much faster / leaner than upstream":

* ignore pixels are dropped with a boolean mask (a host sync) before anything else;
* the statistics update builds dense N x C x A tensors: the features broadcast against
  a one-hot label map, the per-class sums and the centred squares all at full N x C x A;
* DistCL runs as separate ops: the squared features, two matmuls, a gather of σ²_{y_i}
  as an N x A tensor, softmax cross-entropy, the variance term and the regulariser;
* BankCL (not described in docs/method.md: a direct separate-ops formulation, see its docstring).

Same mathematics as ``sepico_fast.contrast`` (the benchmark asserts it), not the same cost.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def drop_ignore(feat: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255):
    keep = labels != ignore_index
    return feat[keep], labels[keep]


class UpstreamStats:
    """Running class mean / diagonal variance / count, updated the dense way."""

    def __init__(self, num_classes: int, dim: int, device=None):
        self.num_classes = num_classes
        self.mean = torch.zeros(num_classes, dim, device=device)
        self.var = torch.zeros(num_classes, dim, device=device)
        self.count = torch.zeros(num_classes, device=device)

    @torch.no_grad()
    def update(self, feat: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        feat, labels = drop_ignore(feat.float(), labels, ignore_index)
        n, dim = feat.shape
        c = self.num_classes
        onehot = torch.zeros(n, c, device=feat.device)
        onehot.scatter_(1, labels.view(n, 1), 1.0)
        onehot_nca = onehot.view(n, c, 1).expand(n, c, dim)
        feat_nca = feat.view(n, 1, dim).expand(n, c, dim)
        by_class = feat_nca.mul(onehot_nca)  # N x C x A
        amount = onehot_nca.sum(0)
        amount[amount == 0] = 1
        batch_mean = by_class.sum(0) / amount
        centred = by_class - batch_mean.expand(n, c, dim).mul(onehot_nca)  # N x C x A
        batch_var = centred.pow(2).sum(0) / amount  # another N x C x A
        k = onehot.sum(0).view(c, 1).expand(c, dim)
        weight = k.div(k + self.count.view(c, 1).expand(c, dim))
        weight[weight != weight] = 0  # 0/0 for classes never seen
        extra = weight.mul(1 - weight).mul((self.mean - batch_mean).pow(2))
        self.var = self.var.mul(1 - weight) + batch_var.mul(weight) + extra
        self.mean = self.mean.mul(1 - weight) + batch_mean.mul(weight)
        self.count = self.count + onehot.sum(0)


def upstream_dist_contrast_loss(feat, labels, mean, var, temperature=100.0, ratio=1.0,
                                reg_weight=1.0, ignore_index=255):
    """DistCL as separate ops over the valid pixels, plus the regulariser (method §5)."""
    feat, labels = drop_ignore(feat, labels, ignore_index)
    mean, var = mean.detach(), var.detach()
    logits = feat.mm(mean.t())  # N x C
    sq = feat.pow(2)  # N x A
    spread = 0.5 * ratio * sq.mm(var.t()) / temperature  # N x C
    aug = (logits + spread) / temperature
    var_y = var[labels]  # N x A gather
    pos_term = 0.5 * ratio * (sq * var_y).sum(1) / temperature ** 2
    loss = F.cross_entropy(aug, labels) + pos_term.mean()
    if reg_weight:
        c = mean.shape[0]
        z_bar = feat.mean(0, keepdim=True)
        prob = F.softmax(z_bar.mm(mean.t()) / temperature, dim=1)
        loss = loss + reg_weight * torch.log(prob).sum() / (c * math.log(c))
    return loss



def upstream_bank_contrast_loss(feat, labels, bank, bank_len, temperature=100.0, mean=None,
                                reg_weight=1.0, ignore_index=255):
    """BankCL (method §5) as separate ops. method §9 does not describe upstream's BankCL, so
    this is the direct formulation in the style of the other baselines, not upstream's
    code: one class at a time (a boolean mask each, a host sync), the product of its
    pixels with every bank entry [n_c, C·M], the per-class means of the negatives, the
    ratio of the formula; plus the regulariser."""
    feat, labels = drop_ignore(feat, labels, ignore_index)
    c_all, m, _ = bank.shape
    bank = bank.detach()
    entry = (torch.arange(m, device=bank.device)[None, :] < bank_len[:, None]).float()  # [C, M]
    lens = bank_len.tolist()  # host sync
    total, count = feat.new_zeros(()), 0
    for c in range(c_all):
        zc = feat[labels == c]  # host sync
        if lens[c] == 0 or zc.shape[0] == 0:
            continue
        sims = zc.mm(bank.reshape(c_all * m, -1).t()).view(-1, c_all, m) / temperature
        pos = sims[:, c, :lens[c]]  # n_c x L_c
        neg_mean = (sims * entry).sum(2) / entry.sum(1).clamp_min(1.0)  # n_c x C
        others = [k for k in range(c_all) if k != c and lens[k] > 0]
        neg_sum = neg_mean[:, others].exp().sum(1, keepdim=True) if others else torch.zeros_like(pos[:, :1])
        total = total - torch.log(pos.exp() / (pos.exp() + neg_sum)).mean(1).sum()
        count += zc.shape[0]
    loss = total / max(count, 1)
    if reg_weight and mean is not None and feat.shape[0]:
        c = mean.shape[0]
        prob = F.softmax(feat.mean(0, keepdim=True).mm(mean.detach().t()) / temperature, dim=1)
        loss = loss + reg_weight * torch.log(prob).sum() / (c * math.log(c))
    return loss
