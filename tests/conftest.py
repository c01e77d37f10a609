"""Shared fixtures and helpers for the op-layer tests.

The reference backend (steerkern.ops.reference) is the oracle.  Every kernel
backend that can run on CPU tensors here ("cpu" once the C++ extension is
built, "triton" under TRITON_INTERPRET=1) is compared with it:

* fp32 results must agree with the fp64 reference to 1e-5 relative to the
  magnitude of the terms they are made of (``*_scale`` below);
* bf16/fp16 results follow the flash-attention rule: the backend's max error
  against the fp64 reference is at most twice the max error of the reference
  computed in that dtype (plus a tiny floor for exact results).

Decisions (masks, conditions) are exact in the spec, so cases whose decisions
sit within rounding of a threshold are built away from it or left out, and the
helpers say so.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch

# Without a GPU, run the Triton kernels in the CPU interpreter so that the one
# test command covers them as well.  It has to be set before triton decorates
# the kernels, i.e. before steerkern is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Models load from local folders only: never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from steerkern import SparseWeight, backends
from steerkern.ops import reference as R
from steerkern.ops.table import SteerTable

FP32_RTOL = 1e-5
LOW_PRECISION_FLOOR = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

KERNEL_BACKENDS = [b for b in ("cpu", "triton") if backends.available(b, "cpu")]
IMPLS = ["reference", *KERNEL_BACKENDS]
NO_BACKEND_REASON = (
    "no kernel backend serves CPU tensors here (cpu: the C++ extension is not built; "
    "triton: needs TRITON_INTERPRET=1); the reference alone is the oracle, nothing to compare"
)


def pytest_configure(config):
    # NaN/inf test inputs make the Triton interpreter's numpy arithmetic warn
    config.addinivalue_line("filterwarnings",
                            "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(params=KERNEL_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(reason=NO_BACKEND_REASON))],
                ids=lambda b: str(b))
def backend(request):
    """Each kernel backend available for CPU tensors."""
    return request.param


@pytest.fixture(params=IMPLS)
def impl(request):
    """The reference and each available kernel backend."""
    return request.param


def interpreted(backend: str) -> bool:
    """The Triton interpreter is slow: such tests keep their grids tiny."""
    return backend == "triton"


def fit_shape(backend: str, lead: Sequence[int], d: int, *more: int):
    """Shrink a case for the Triton interpreter (rows <= 4, sizes <= 64).

    Returns the (lead, d, *more) to use, or skips the case (rows > 8 is the
    prefill path, too slow to interpret)."""
    if not interpreted(backend):
        return (tuple(lead), d, *more)
    rows = 1
    for n in lead:
        rows *= n
    if rows > 8:
        pytest.skip("prefill-sized case: too slow for the Triton interpreter")
    if rows > 4:
        lead = (2, 2) if len(lead) == 2 else (4,)
    shrink = lambda n: 61 if n > 64 else n  # noqa: E731 - still not a multiple of 8
    return (tuple(lead), shrink(d), *(shrink(n) for n in more))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------- data


def random_basis(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` orthonormal rows in R^d (QR in fp64, independent of steerkern)."""
    if k == 0:
        return torch.zeros(0, d)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T.to(torch.float32).contiguous()


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v / v.norm(dim=-1, keepdim=True)).float()


COMPONENTS = ("projection", "addition", "affine", "condition", "preserve_norm")


def make_table(d: int, gen: torch.Generator, K: int = 1, k: int = 2,
               components: Sequence[str] = COMPONENTS, ablation: bool = False,
               magnitude: float = 1.0) -> SteerTable:
    """A random table of ``K`` entries with the given components.

    ``ablation=True`` makes the projection plain directional ablation (c = 0,
    lam = 1); otherwise targets and gains are random (a partial clamp).
    """
    k = min(k, d)
    parts: Dict[str, torch.Tensor] = {}
    if "projection" in components:
        parts["basis"] = torch.stack([random_basis(k, d, gen) for _ in range(K)]).contiguous()
        if ablation:
            parts["target"] = torch.zeros(K, k)
            parts["gain"] = torch.ones(K)
        else:
            parts["target"] = torch.randn(K, k, generator=gen) * magnitude
            parts["gain"] = torch.rand(K, generator=gen) * 0.9 + 0.3
    if "addition" in components:
        parts["vec"] = torch.randn(K, d, generator=gen) * magnitude
        parts["alpha"] = torch.rand(K, generator=gen) * 4 - 2
    if "affine" in components:
        parts["scale"] = torch.rand(K, d, generator=gen) + 0.5
        parts["shift"] = torch.randn(K, d, generator=gen) * 0.1 * magnitude
    if "condition" in components:
        parts["cond_dir"] = unit(torch.randn(K, d, generator=gen)).contiguous()
        parts["cond_threshold"] = torch.zeros(K)
    if "preserve_norm" in components:
        parts["preserve_norm"] = torch.tensor([(e + 1) % 2 for e in range(K)], dtype=torch.uint8)
    return SteerTable(hidden_size=d, **parts)


def cycling_index(lead: Sequence[int], K: int, gen: torch.Generator) -> torch.Tensor:
    """int32 index of shape ``lead`` that uses every entry 1..K and 0 (no steering)."""
    rows = 1
    for n in lead:
        rows *= n
    flat = (torch.arange(rows) + 1) % (K + 1)
    flat = flat[torch.randperm(rows, generator=gen)] if rows > 1 else flat
    return flat.to(torch.int32).reshape(tuple(lead))


def robust_conditions(h: torch.Tensor, table: SteerTable, margin: float = 1e-3) -> None:
    """Move each entry's cos threshold into the widest gap between the rows'
    cosines, so no row's decision sits within rounding of it (in place).
    The gap is taken below the median cosine, so most rows are steered."""
    if table.cond_dir is None:
        return
    x = h.reshape(-1, h.shape[-1]).double()
    norm = x.norm(dim=1)
    for e in range(table.size):
        cos = torch.where(norm > 0, (x @ table.cond_dir[e].double()) / norm.clamp_min(1e-300),
                          torch.zeros_like(norm))
        pts = torch.sort(torch.cat([cos, torch.tensor([-1.0, 1.0], dtype=torch.float64)])).values
        gaps = pts[1:] - pts[:-1]
        if cos.numel():
            low = pts[1:] <= cos.median()
            if bool((gaps[low] > 2 * margin).any()):
                gaps = torch.where(low, gaps, torch.zeros_like(gaps))
        i = int(torch.argmax(gaps))
        assert float(gaps[i]) > 2 * margin, "cannot place a robust condition threshold"
        table.cond_threshold[e] = float((pts[i] + pts[i + 1]) / 2)


# --------------------------------------------------------------------------- magnitudes


def _entry(index: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.ones(rows, dtype=torch.long) if index is None else index.reshape(-1).long()


def steer_scale(h2: torch.Tensor, table: SteerTable, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Per row ``[rows, 1]``: the size of the terms a steered row is built from,
    which bounds the rounding error an fp32 kernel makes on it."""
    x = h2.double()
    n_in = x.norm(dim=1)
    entry = _entry(index, x.shape[0])
    out = n_in.clone()
    pre = None
    if table.preserve_norm is not None:
        parts = list(table.tensors())
        parts[-1] = None  # the same steering without the final rescale
        pre = R.steer(x, None if index is None else index.reshape(-1), *parts, acc=torch.float64)
        n_pre = pre.double().norm(dim=1)
    for e in range(table.size):
        t = n_in.clone()
        if table.basis is not None:
            t = t + table.gain[e].abs().double() * (table.target[e].double().norm() + n_in)
        if table.vec is not None:
            t = t + table.alpha[e].abs().double() * table.vec[e].double().norm()
        if table.scale is not None:
            t = t * table.scale[e].abs().max().double()
        if table.shift is not None:
            t = t + table.shift[e].abs().max().double()
        if pre is not None and bool(table.preserve_norm[e]):
            t = t * torch.where(n_pre > 0, n_in / n_pre.clamp_min(1e-300), torch.ones_like(n_in)).clamp_min(1.0)
        out = torch.where(entry == e + 1, t, out)
    return out[:, None]


def rmsnorm_scale(r_scale: torch.Tensor, r_golden: torch.Tensor, weight: torch.Tensor, eps: float,
                  weight_offset: float) -> torch.Tensor:
    """Per row: what an error of ``r_scale`` in r becomes after the RMSNorm."""
    r = r_golden.double()
    rstd = torch.rsqrt(r.pow(2).mean(dim=1, keepdim=True) + eps)
    return (r_scale + r.abs().amax(dim=1, keepdim=True)) * rstd * \
        (weight.double() + weight_offset).abs().max()


def sparse_scale(x2: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                 x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per output element: ``|m * x| @ |W^T| + |b|`` (plus, for a steered x
    known to ``x_scale`` per row, that error carried through W)."""
    wt = weight_t.double()
    s = torch.where(mask, x2.double().abs(), torch.zeros((), dtype=torch.float64)) @ wt.abs()
    if bias is not None:
        s = s + bias.double().abs()
    if x_scale is not None:
        s = s + x_scale * wt.norm(dim=0)
    return s


# --------------------------------------------------------------------------- comparisons


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def _abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return torch.where(a == b, torch.zeros_like(a), (a - b).abs())  # equal infs count as exact


def _where(mask: torch.Tensor, n: int = 8) -> str:
    idx = mask.nonzero().tolist()
    more = f" (+{len(idx) - n} more)" if len(idx) > n else ""
    return f"{[tuple(i) for i in idx[:n]]}{more}"


def _check_nans(actual: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    na, ng = torch.isnan(actual), torch.isnan(golden)
    if not torch.equal(na, ng):
        raise AssertionError(f"{what}: NaN where the reference has none at {_where(na & ~ng)}; "
                             f"missing NaN at {_where(ng & ~na)}")


def assert_close_scaled(actual: torch.Tensor, golden: torch.Tensor, scale: torch.Tensor,
                        what: str, rtol: float = FP32_RTOL) -> None:
    """``|actual - golden| <= rtol * scale`` elementwise (scale broadcasts)."""
    assert actual.shape == golden.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    a, g = _as_rows(actual), _as_rows(golden)
    _check_nans(a, g, what)
    err = _abs_err(a, g).nan_to_num(0.0)
    tol = (rtol * scale.double()).expand_as(err)
    bad = err > tol
    if bool(bad.any()):
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond {rtol:g} relative, at (row, col) "
            f"{_where(bad)}; first: got {float(a[i])!r}, expected {float(g[i])!r}, "
            f"|err| {float(err[i]):.3e} > tol {float(tol[i]):.3e}")


def assert_within_torch_error(actual: torch.Tensor, golden: torch.Tensor, torch_lowp: torch.Tensor,
                              what: str, floor: float = LOW_PRECISION_FLOOR) -> None:
    """The flash-attention rule: max |actual - golden| <= 2 max |torch_lowp - golden| + floor."""
    assert actual.shape == golden.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    a, g, t = _as_rows(actual), _as_rows(golden), _as_rows(torch_lowp)
    _check_nans(a, g, what)
    err = _abs_err(a, g).nan_to_num(0.0)
    base_err = _abs_err(t, g).nan_to_num(0.0)
    base = float(base_err.max()) if base_err.numel() else 0.0
    bound = 2 * base + floor
    bad = err > bound
    if bool(bad.any()):
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: max error {float(err.max()):.3e} exceeds 2 x torch's own {a.dtype} error "
            f"({base:.3e}) + {floor:g}; {int(bad.sum())} elements at (row, col) {_where(bad)}; "
            f"first: got {float(a[i])!r}, expected {float(g[i])!r}")


def check_output(actual: torch.Tensor, exact: torch.Tensor, torch_lowp: Callable[[], torch.Tensor],
                 scale: Callable[[], torch.Tensor], what: str, keep_rows: Optional[torch.Tensor] = None) -> None:
    """Compare one output with the reference by the rule of its dtype.

    ``exact`` is the reference computed in fp64 and not rounded at the end
    (what a kernel's single final rounding should land next to);
    ``torch_lowp()`` is the reference computed in ``actual.dtype``;
    ``scale()`` gives the fp32 tolerance scale; ``keep_rows`` (bool per row)
    leaves out rows whose decisions are fragile."""
    dtype = actual.dtype
    a, g = _as_rows(actual), _as_rows(exact)
    if dtype == torch.float32:
        s = scale().expand_as(g)
        if keep_rows is not None:
            a, g, s = a[keep_rows], g[keep_rows], s[keep_rows]
        assert_close_scaled(a, g, s, what)
    else:
        t = _as_rows(torch_lowp())
        if keep_rows is not None:
            a, g, t = a[keep_rows], g[keep_rows], t[keep_rows]
        assert_within_torch_error(a, g, t, what)


# --------------------------------------------------------------------------- op oracles
# Each takes the op's outputs and its 2-D row inputs (index flattened int32 or
# None, table as a SteerTable or None).  The fp64 golden is the reference fed
# fp64 rows, so that it skips the final rounding; decisions are the same, as
# the reference takes them from the fp32 view of the input.


def _table_tensors(table: Optional[SteerTable]) -> tuple:
    return (None,) * len(SteerTable.tensor_names()) if table is None else table.tensors()


def check_steer(out, h2, table, idx, what):
    assert out.shape == h2.shape and out.dtype == h2.dtype, f"{what}: got {out.dtype} {tuple(out.shape)}"
    t = _table_tensors(table)
    check_output(out, R.steer(h2.double(), idx, *t, acc=torch.float64),
                 lambda: R.steer(h2, idx, *t, acc=h2.dtype), lambda: steer_scale(h2, table, idx), what)


def check_add_steer_rmsnorm(r, y, x2, res2, weight, eps, weight_offset, table, idx, what):
    for name, o in (("r", r), ("y", y)):
        assert o.shape == x2.shape and o.dtype == x2.dtype, f"{what}: {name} is {o.dtype} {tuple(o.shape)}"
    t = _table_tensors(table)
    summed = x2 if res2 is None else (x2.float() + res2.float()).to(x2.dtype)  # the spec rounds the sum
    r_round = R.steer(summed, idx, *t, acc=torch.float64)  # the r that y is taken from, per the spec
    r_scale = (steer_scale(summed, table, idx) if table is not None
               else summed.double().norm(dim=1, keepdim=True))

    def lowp(i):
        return lambda: R.add_steer_rmsnorm(x2, res2, weight, eps, weight_offset, idx, *t, acc=x2.dtype)[i]

    check_output(r, R.steer(summed.double(), idx, *t, acc=torch.float64), lowp(0), lambda: r_scale, f"{what}: r")
    check_output(y, R.rms_norm(r_round.double(), weight, eps, weight_offset, acc=torch.float64), lowp(1),
                 lambda: rmsnorm_scale(r_scale, r_round, weight, eps, weight_offset), f"{what}: y")


def check_sparse_linear(y, x2, sw, threshold: torch.Tensor, topk: int, what):
    assert y.shape == (x2.shape[0], sw.out_features) and y.dtype == x2.dtype, f"{what}: got {y.dtype} {tuple(y.shape)}"
    mask = R.sparse_mask(x2, sw.scale, threshold, topk)
    args = (sw.weight_t, sw.bias, sw.scale, threshold, topk)
    check_output(y, R.sparse_linear(x2.double(), *args, acc=torch.float64),
                 lambda: R.sparse_linear(x2, *args, acc=x2.dtype),
                 lambda: sparse_scale(x2, sw.weight_t, sw.bias, mask), what)


def check_steer_sparse_linear(y, h2, table, idx, sw, threshold: torch.Tensor, topk: int, what, keep_rows=None):
    assert y.shape == (h2.shape[0], sw.out_features) and y.dtype == h2.dtype, f"{what}: got {y.dtype} {tuple(y.shape)}"
    t = _table_tensors(table)
    steered = R.steer(h2, idx, *t, acc=torch.float64)  # rounded to h's dtype, as the spec says
    mask = R.sparse_mask(steered, sw.scale, threshold, topk)
    args = (sw.weight_t, sw.bias, sw.scale, threshold, topk)
    s_scale = (steer_scale(h2, table, idx) if table is not None
               else h2.double().abs().amax(dim=1, keepdim=True))
    check_output(y, R.sparse_linear(steered.double(), *args, acc=torch.float64),
                 lambda: R.steer_sparse_linear(h2, idx, *t, *args, acc=h2.dtype),
                 lambda: sparse_scale(steered, sw.weight_t, sw.bias, mask, x_scale=s_scale), what, keep_rows)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bit-exact comparisons (NaN included)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    diff = bits(actual) != bits(expected)
    if bool(diff.any()):
        raise AssertionError(f"{what}: not bit-exact at {_where(diff)}")


# --------------------------------------------------------------------------- sparse decisions


def score_of(x2: torch.Tensor, col_scale: Optional[torch.Tensor]) -> torch.Tensor:
    s = x2.float().abs()
    return s if col_scale is None else s * col_scale.float()


def _band(a: torch.Tensor, dtype: torch.dtype, row_max: torch.Tensor) -> torch.Tensor:
    # a value rounded to `dtype` may land one ulp away in another backend, and
    # an fp32 accumulation differs by ~1e-7 of the row's size
    return 2 * torch.finfo(dtype).eps * a + 1e-6 * row_max


def robust_threshold(score: torch.Tensor) -> float:
    """A threshold in the widest relative gap among the middle half of the
    scores, so that about half the inputs stay active."""
    v = torch.sort(score.double().flatten()).values
    v = v[torch.isfinite(v)]
    if v.numel() < 2:
        return 0.5 * float(v.max()) if v.numel() else 1.0
    lo, hi = v.numel() // 4, max(v.numel() * 3 // 4, v.numel() // 4 + 1)
    a, b = v[lo:hi], v[lo + 1:hi + 1]
    i = int(torch.argmax((b - a) / b.clamp_min(1e-30)))
    return float((a[i] + b[i]) / 2)


def stable_threshold_rows(score: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose threshold decisions cannot flip by rounding (bool per row)."""
    s = score.double()
    row_max = s.nan_to_num(0.0).amax(dim=1, keepdim=True)
    fragile = ((s - t).abs() <= _band(s, dtype, row_max)) & torch.isfinite(s)
    return ~fragile.any(dim=1)


def stable_topk_rows(score: torch.Tensor, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose top-k set cannot change by rounding (bool per row)."""
    rows, n = score.shape
    if topk <= 0 or topk >= n or rows == 0:
        return torch.ones(rows, dtype=torch.bool)
    s = torch.sort(score.double(), dim=1, descending=True).values
    a, b = s[:, topk - 1], s[:, topk]
    row_max = s[:, :1].nan_to_num(0.0)[:, 0]
    gap = a - b
    return ~((gap > 0) & (gap <= _band(a, dtype, row_max)) | ((gap == 0) & (a != 0)))


def best_topk(score: torch.Tensor, dtype: torch.dtype) -> int:
    """The k near in/2 for which the most rows have a robust top-k boundary."""
    n = score.shape[1]
    if n < 2:
        return n
    ks = sorted(range(1, n), key=lambda k: abs(k - n / 2))
    return max(ks, key=lambda k: int(stable_topk_rows(score, k, dtype).sum()))


def require_cpu_ext() -> bool:
    return os.environ.get("STEERKERN_REQUIRE_CPU_EXT", "") == "1"


# --------------------------------------------------------------------------- hypothesis

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("steerkern", deadline=None, max_examples=30, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("steerkern")
except ImportError:  # the property tests skip themselves
    pass


# ------------------------------------------------- shared case builders

def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, d]``."""
    return t.reshape(-1, t.shape[-1])


def flat_index(index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-row index flattened to int32, as the kernels receive it."""
    return None if index is None else index.reshape(-1).to(torch.int32)


def make_weight(gen, n_in, n_out, wdtype, mode, bias=True):
    """A random prepared weight; ``mode`` is ``wina``/``teal`` (or ``wina_topk`` etc.)."""
    W = torch.randn(n_out, n_in, generator=gen) / math.sqrt(max(n_in, 1))
    W = W * (torch.rand(n_in, generator=gen) * 2 + 0.25)  # unequal column norms, so WINA differs from TEAL
    b = torch.randn(n_out, generator=gen).to(wdtype) if bias else None
    return SparseWeight.from_linear(W, b, mode=mode.split("_")[0], dtype=wdtype)

