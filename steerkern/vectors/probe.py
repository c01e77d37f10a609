"""A small L2-regularized logistic-regression probe in torch (no sklearn).

It minimizes ``mean(BCE(w . (x - mu) + b, y)) + l2 * ||w||^2`` over ``w, b``
in fp64 with full-batch L-BFGS; ``mu`` is the training mean.  The loss is
convex, so the fit is the unique optimum whatever the start.  One consequence
matters to concept erasure: when the two classes have equal means, ``w = 0``
is a stationary point, hence the optimum, and the probe predicts a constant.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass
class LogisticProbe:
    weight: Tensor  # [d] fp64
    bias: float
    mean: Tensor    # [d] fp64, the training mean

    def logits(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) @ self.weight + self.bias

    def predict(self, x: Tensor) -> Tensor:
        """bool ``[n]``: True for the positive class."""
        return self.logits(x) > 0

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == (torch.as_tensor(y) > 0.5)).double().mean())

    @property
    def direction(self) -> Tensor:
        """The unit normal of the decision boundary, pointing to the positive class."""
        n = self.weight.norm()
        return self.weight / n if float(n) > 0 else self.weight


def fit_logistic(x: Tensor, y: Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> LogisticProbe:
    """Fit a probe on ``x`` ``[n, d]`` with labels ``y`` ``[n]`` in {0, 1}."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x: expected shape [n, d] with n >= 2, got {list(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y: expected shape [{x.shape[0]}] (one label per row of x), got {list(y.shape)}")
    yd = y.double()
    if not bool(((yd == 0) | (yd == 1)).all()):
        raise ValueError("y: labels must be 0 or 1")
    if l2 < 0:
        raise ValueError(f"l2: must be >= 0, got {l2}")
    xd = x.detach().double()
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("x: contains NaN or inf")
    mu = xd.mean(0)
    z = xd - mu
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yd) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(w.detach(), float(b.detach()), mu)


def cross_val_accuracy(x: Tensor, y: Tensor, *, folds: int = 5, groups: Optional[Tensor] = None,
                       l2: float = 1e-2, seed: int = 0) -> float:
    """Mean held-out accuracy of :func:`fit_logistic` over ``folds`` folds.

    ``groups`` (int ``[n]``) keeps rows of one group in the same fold, e.g. the
    two members of a contrastive pair, so a probe is never tested on the twin
    of a row it was trained on.
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    groups = torch.arange(x.shape[0]) if groups is None else torch.as_tensor(groups)
    if groups.shape != (x.shape[0],):
        raise ValueError(f"groups: expected shape [{x.shape[0]}] (one group per row of x), got {list(groups.shape)}")
    accs = []
    for test in group_folds(groups, folds, seed):
        probe = fit_logistic(x[~test], y[~test], l2=l2)
        accs.append(probe.accuracy(x[test], y[test]))
    return sum(accs) / len(accs)


def group_folds(groups: Tensor, folds: int, seed: int = 0):
    """``folds`` bool test masks over the rows: the groups, shuffled with
    ``seed``, dealt round-robin, so every group lies in exactly one fold."""
    groups = torch.as_tensor(groups)
    uniq = torch.unique(groups)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= len(uniq):
        raise ValueError(f"folds: expected 2..{len(uniq)} (the number of groups), got {folds!r}")
    order = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(groups, order[f::folds]) for f in range(folds)]
