"""Streaming histograms of activation scores, and thresholds read from them.

A site's score is ``|x_i|`` (TEAL) or ``|x_i| * ||W[:, i]||_2`` (WINA).  The
histogram has log-spaced bins (``BINS_PER_OCTAVE`` per power of two), so its
memory is fixed however much text is seen, and its relative resolution is
the same for tiny and large scores.  A threshold for sparsity ``s`` is the
``s`` quantile, interpolated inside its bin; the count below it is exact up to
the mass of that one bin.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

BINS_PER_OCTAVE = 64
LOG2_LO = -40.0  # scores below 2**LOG2_LO (and exact zeros) share the first bin
LOG2_HI = 24.0


class ScoreHistogram:
    """Counts of non-negative scores in log2-spaced bins."""

    def __init__(self, device=None) -> None:
        self.nbins = int((LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE)
        self.counts = torch.zeros(self.nbins, dtype=torch.float64, device=device)
        self.nan = 0  # NaN scores always stay active (see reference.sparse_mask)

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.nan

    def add(self, scores: Tensor) -> None:
        s = scores.detach().reshape(-1).float()
        finite = ~torch.isnan(s)
        self.nan += int((~finite).sum())
        s = s[finite]
        if s.numel() == 0:
            return
        pos = ((torch.log2(s) - LOG2_LO) * BINS_PER_OCTAVE).floor()
        # log2(0) = -inf lands in bin 0, +inf in the last bin
        idx = pos.nan_to_num(0.0, posinf=self.nbins - 1, neginf=0.0).clamp(0, self.nbins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.nbins).to(self.counts)

    def _edge(self, k: float) -> float:
        return 2.0 ** (LOG2_LO + k / BINS_PER_OCTAVE)

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
        cum = torch.cumsum(self.counts, 0)
        k = int(torch.searchsorted(cum, torch.tensor(want, dtype=cum.dtype, device=cum.device)))
        if k >= self.nbins:  # only NaNs remain above: every number is dropped
            return math.inf
        below = float(cum[k - 1]) if k > 0 else 0.0
        frac = (want - below) / max(float(self.counts[k]), 1.0)
        if k == 0:
            return self._edge(0) * frac  # zeros and underflow: linear, reaches 0
        return self._edge(k + min(max(frac, 0.0), 1.0))

    def fraction_at_most(self, t: float) -> float:
        """The fraction of scores ``<= t`` (interpolated inside t's bin)."""
        total = self.total
        if total == 0:
            return 0.0
        if t <= 0:
            return 0.0  # exact zeros share bin 0 with underflow: not counted alone
        pos = (math.log2(t) - LOG2_LO) * BINS_PER_OCTAVE
        if pos >= self.nbins:
            return float(self.counts.sum()) / total
        if pos < 0:
            return 0.0
        k = int(math.floor(pos))
        below = float(self.counts[:k].sum())
        return (below + (pos - k) * float(self.counts[k])) / total

    def merge(self, other: "ScoreHistogram") -> None:
        self.counts += other.counts.to(self.counts.device)
        self.nan += other.nan
