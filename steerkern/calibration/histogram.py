"""Streaming histograms of activation scores, and thresholds read from them.

A site's score is ``|x_i|`` (TEAL) or ``|x_i| * ||W[:, i]||_2`` (WINA).  The
bins are read straight from the fp32 bit pattern: the exponent and the top
``MANTISSA_BITS`` mantissa bits, i.e. 64 equal-width bins per power of two.
That costs a shift per score (no log), keeps memory fixed however much text
is seen, and gives every scale the same relative resolution (under 1.6%).
A threshold for sparsity ``s`` is the ``s`` quantile, interpolated linearly
inside its bin; the count below it is exact up to the mass of that one bin.
"""
from __future__ import annotations

import torch
from torch import Tensor

MANTISSA_BITS = 6  # 64 bins per octave
LOG2_LO = -40  # scores below 2**LOG2_LO (exact zeros included) share the first bin
LOG2_HI = 24   # scores from 2**LOG2_HI up (inf and NaN included) share the last bin
_SHIFT = 23 - MANTISSA_BITS
_BASE = (127 + LOG2_LO) << MANTISSA_BITS  # bin index of 2**LOG2_LO


def _bin_start(k: int) -> float:
    """The smallest score of bin ``k`` (bin 0 starts at 0)."""
    if k <= 0:
        return 0.0
    bits = torch.tensor((k + _BASE) << _SHIFT, dtype=torch.int32)
    return float(bits.view(torch.float32))


class ScoreHistogram:
    """Counts of non-negative fp32 scores in log-spaced bins."""

    def __init__(self, device=None) -> None:
        self.nbins = (LOG2_HI - LOG2_LO) << MANTISSA_BITS
        self.counts = torch.zeros(self.nbins, dtype=torch.int64, device=device)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, scores: Tensor) -> None:
        """Count ``scores`` (any shape, non-negative; NaN counts as the largest)."""
        bits = scores.detach().reshape(-1).float().contiguous().view(torch.int32)
        idx = ((bits >> _SHIFT) - _BASE).clamp_(0, self.nbins - 1)
        self.counts += torch.bincount(idx, minlength=self.nbins).to(self.counts.device)

    def threshold(self, sparsity: float) -> float:
        """The score ``t`` with a fraction ``sparsity`` of the scores ``<= t``."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
        total = self.total
        if total == 0:
            raise ValueError("histogram: no scores collected")
        if sparsity == 0.0:
            return 0.0
        want = sparsity * total
        cum = torch.cumsum(self.counts, 0).double().cpu()
        # the first bin whose cumulative count reaches ``want``
        k = min(int(torch.searchsorted(cum, torch.tensor([want], dtype=torch.float64))), self.nbins - 1)
        below = float(cum[k - 1]) if k > 0 else 0.0
        frac = min(max((want - below) / max(float(self.counts[k]), 1.0), 0.0), 1.0)
        lo = _bin_start(k)
        hi = _bin_start(k + 1) if k + 1 < self.nbins else 2.0 * lo
        return lo + frac * (hi - lo)
