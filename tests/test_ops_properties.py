"""Property-based tests: random shapes, values and tables.

Every available kernel backend against the reference, and the spec's own
properties (ablation is idempotent and leaves nothing to project, norm
preservation keeps norms, index-0 rows pass through) on every implementation.
Bounded: a few dozen examples each, tiny ones for the Triton interpreter.
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

import steerkern  # noqa: E402
from steerkern import SparseWeight, SteerTable  # noqa: E402
from steerkern.ops import reference as R  # noqa: E402

from conftest import (  # noqa: E402
    COMPONENTS, DTYPES, assert_bit_exact, check_add_steer_rmsnorm, check_sparse_linear, check_steer,
    check_steer_sparse_linear, cycling_index, interpreted, make_table, random_basis, robust_conditions,
    score_of, stable_threshold_rows, stable_topk_rows,
)


def budget(impl: str, n: int = 30) -> settings:
    return settings(max_examples=8 if interpreted(impl) else n, deadline=None)


def limits(impl: str):
    """(max rows, max width) for this implementation."""
    return (4, 24) if interpreted(impl) else (12, 48)


def _index(lead, K, gen, mode):
    return None if mode == "none" else cycling_index(lead, K, gen)


@st.composite
def steer_cases(draw, impl):
    max_rows, max_d = limits(impl)
    d = draw(st.integers(1, max_d))
    return dict(
        rows=draw(st.integers(0, max_rows)), d=d, K=draw(st.integers(1, 3)), k=draw(st.integers(0, min(3, d))),
        components=tuple(sorted(draw(st.sets(st.sampled_from(COMPONENTS), min_size=1)))),
        ablation=draw(st.booleans()), dtype=draw(st.sampled_from(list(DTYPES.values()))),
        magnitude=draw(st.sampled_from([1e-2, 1.0, 1e2])), index=draw(st.sampled_from(["per_row", "none"])),
        zero_row=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_steer_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    table = make_table(c["d"], gen, K=c["K"], k=c["k"], components=c["components"], ablation=c["ablation"],
                       magnitude=c["magnitude"])
    h = (torch.randn(c["rows"], c["d"], generator=gen) * c["magnitude"]).to(c["dtype"])
    if c["zero_row"] and c["rows"]:
        h[0] = 0
    index = _index((c["rows"],), c["K"], gen, c["index"])
    robust_conditions(h, table)
    return h, table, index


def pre_norm_ratio(h, table, index):
    """Per row: ||steered row before the norm rescale|| / ||h|| (1 for a zero h)."""
    parts = list(table.tensors())
    parts[-1] = None
    pre = R.steer(h.double(), index, *parts, acc=torch.float64).double().norm(dim=1)
    n_in = h.double().norm(dim=1)
    return torch.where(n_in > 0, pre / n_in.clamp_min(1e-300), torch.ones_like(n_in))


def well_conditioned(h, table, index):
    """Norm preservation divides by the norm of the steered row: leave out rows
    steered to nearly nothing, where any rounding picks the direction (exactly
    nothing is fine: the spec leaves it at zero)."""
    if table.preserve_norm is None or h.shape[0] == 0:
        return True
    ratio = pre_norm_ratio(h, table, index)
    return bool(((ratio >= 1e-3) | (ratio == 0)).all())


def test_steer_backends_match_reference(backend):
    @budget(backend)
    @given(steer_cases(backend))
    def check(c):
        h, table, index = build_steer_case(c)
        assume(well_conditioned(h, table, index))
        out = steerkern.steer(h, table, index, backend=backend)
        check_steer(out, h, table, index, f"steer[{backend}] {c}")

    check()


def test_add_steer_rmsnorm_backends_match_reference(backend):
    @budget(backend, 20)
    @given(steer_cases(backend), st.booleans(), st.sampled_from([0.0, 1.0]), st.sampled_from([1e-6, 1e-2]))
    def check(c, with_residual, offset, eps):
        x, table, index = build_steer_case(c)
        gen = torch.Generator().manual_seed(c["seed"] + 1)
        residual = (torch.randn(x.shape, generator=gen) * c["magnitude"]).to(x.dtype) if with_residual else None
        summed = x if residual is None else (x.float() + residual.float()).to(x.dtype)
        robust_conditions(summed, table)
        assume(well_conditioned(summed, table, index))
        weight = torch.rand(c["d"], generator=gen) + 0.5
        r, y = steerkern.add_steer_rmsnorm(x, residual, weight, eps, table=table, index=index,
                                           weight_offset=offset, backend=backend)
        check_add_steer_rmsnorm(r, y, x, residual, weight, eps, offset, table, index,
                                f"add_steer_rmsnorm[{backend}] {c}")

    check()


@st.composite
def sparse_cases(draw, impl):
    max_rows, max_in = limits(impl)
    n_in = draw(st.integers(1, max_in))
    return dict(
        rows=draw(st.integers(0, max_rows)), n_in=n_in, n_out=draw(st.integers(1, max_in)),
        dtype=draw(st.sampled_from(list(DTYPES.values()))), wdtype=draw(st.sampled_from(list(DTYPES.values()))),
        mode=draw(st.sampled_from(["teal", "wina"])), bias=draw(st.booleans()),
        # threshold at a quantile of the scores (it may equal one exactly), or topk
        quantile=draw(st.one_of(st.none(), st.floats(0.0, 1.0))), topk=draw(st.integers(0, n_in)),
        zeros=draw(st.booleans()), nan=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_sparse_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    W = torch.randn(c["n_out"], c["n_in"], generator=gen) * (torch.rand(c["n_in"], generator=gen) + 0.25)
    b = torch.randn(c["n_out"], generator=gen).to(c["wdtype"]) if c["bias"] else None
    sw = SparseWeight.from_linear(W, b, mode=c["mode"], dtype=c["wdtype"])
    x = torch.randn(c["rows"], c["n_in"], generator=gen)
    if c["zeros"]:
        x[torch.rand(x.shape, generator=gen) < 0.3] = 0.0
    if c["nan"] and x.numel():
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = math.nan
    x = x.to(c["dtype"])
    if c["quantile"] is None:
        return x, sw, 0.0, c["topk"]
    s = score_of(x, sw.scale).flatten()
    s = s[torch.isfinite(s)]
    t = float(torch.quantile(s.double(), c["quantile"])) if s.numel() else 0.5
    return x, sw, float(torch.tensor(t, dtype=torch.float32)), None


def test_sparse_linear_backends_match_reference(backend):
    @budget(backend, 40)
    @given(sparse_cases(backend))
    def check(c):
        x, sw, threshold, topk = build_sparse_case(c)
        y = steerkern.sparse_linear(x, sw, threshold=threshold, topk=topk, backend=backend)
        check_sparse_linear(y, x, sw, torch.tensor(threshold), -1 if topk is None else topk,
                            f"sparse_linear[{backend}] {c}")

    check()


def test_steer_sparse_linear_backends_match_reference(backend):
    @budget(backend, 20)
    @given(steer_cases(backend), st.sampled_from(["teal", "wina"]), st.integers(1, 24), st.floats(0.0, 1.0),
           st.booleans())
    def check(c, mode, n_out, q, use_topk):
        h, table, index = build_steer_case(c)
        assume(well_conditioned(h, table, index))
        gen = torch.Generator().manual_seed(c["seed"] + 2)
        sw = SparseWeight.from_linear(torch.randn(n_out, c["d"], generator=gen), torch.randn(n_out, generator=gen),
                                      mode=mode)
        steered = R.steer(h, index, *table.tensors(), acc=torch.float64)
        score = score_of(steered, sw.scale)
        if use_topk:
            threshold, topk = 0.0, round(q * c["d"])
            keep = stable_topk_rows(score, topk, h.dtype)
        else:
            threshold = float(torch.quantile(score.double().flatten(), q)) * 1.001 if score.numel() else 1.0
            topk = None
            keep = stable_threshold_rows(score, threshold, h.dtype)
        assume(h.shape[0] == 0 or bool(keep.any()))
        y = steerkern.steer_sparse_linear(h, table, sw, index, threshold=threshold, topk=topk, backend=backend)
        check_steer_sparse_linear(y, h, table, index, sw, torch.tensor(threshold), -1 if topk is None else topk,
                                  f"steer_sparse_linear[{backend}] {c}", keep_rows=keep)

    check()


# ------------------------------------------------------------------ the spec's own properties


@st.composite
def ablation_cases(draw, impl):
    max_rows, max_d = limits(impl)
    d = draw(st.integers(2, max_d))
    return dict(rows=draw(st.integers(1, max_rows)), d=d, k=draw(st.integers(1, d - 1)),
                magnitude=draw(st.sampled_from([1e-2, 1.0, 1e2])), seed=draw(st.integers(0, 2**31 - 1)))


def _ablation(c):
    gen = torch.Generator().manual_seed(c["seed"])
    Q = random_basis(c["k"], c["d"], gen)
    return torch.randn(c["rows"], c["d"], generator=gen) * c["magnitude"], Q, SteerTable.ablation(Q)


def test_ablation_is_idempotent(impl):
    @budget(impl, 25)
    @given(ablation_cases(impl))
    def check(c):
        h, Q, table = _ablation(c)
        once = steerkern.steer(h, table, backend=impl)
        twice = steerkern.steer(once, table, backend=impl)
        err = (twice.double() - once.double()).norm(dim=1)
        assert bool((err <= 1e-5 * h.double().norm(dim=1)).all()), f"{impl}: {err} for {c}"

    check()


def test_ablating_then_projecting_gives_zero(impl):
    @budget(impl, 25)
    @given(ablation_cases(impl))
    def check(c):
        h, Q, table = _ablation(c)
        left = steerkern.steer(h, table, backend=impl).double() @ Q.double().T
        bound = 1e-5 * h.double().norm(dim=1, keepdim=True)
        assert bool((left.abs() <= bound).all()), f"{impl}: Q^T h' = {left} for {c}"

    check()


def test_norm_preservation_keeps_row_norms(impl):
    @budget(impl, 25)
    @given(steer_cases(impl))
    def check(c):
        c = {**c, "components": tuple(sorted(set(c["components"]) | {"preserve_norm"})), "dtype": torch.float32}
        h, table, index = build_steer_case(c)
        table.preserve_norm.fill_(1)
        assume(well_conditioned(h, table, index))
        out = steerkern.steer(h, table, index, backend=impl)
        n_in, n_out = h.double().norm(dim=1), out.double().norm(dim=1)
        rescaled = pre_norm_ratio(h, table, index) > 0  # a row steered to exactly 0 stays 0
        err = (n_out - n_in).abs()[rescaled]
        assert bool((err <= 1e-5 * n_in[rescaled]).all()), f"{impl}: norms {n_out} vs {n_in} for {c}"

    check()


def test_index_zero_rows_pass_through_unchanged(impl):
    @budget(impl, 25)
    @given(steer_cases(impl), st.booleans())
    def check(c, specials):
        h, table, index = build_steer_case({**c, "index": "per_row"})
        if specials and h.numel():
            h.view(-1)[:3] = torch.tensor([math.nan, math.inf, -0.0])[: h.numel()].to(h.dtype)
        out = steerkern.steer(h, table, index, backend=impl)
        off = index == 0
        assert_bit_exact(out[off], h[off], f"{impl}: index-0 rows for {c}")

    check()


def test_threshold_zero_and_full_topk_are_the_dense_layer(impl):
    @budget(impl, 25)
    @given(sparse_cases(impl))
    def check(c):
        c = {**c, "dtype": torch.float32, "zeros": False, "nan": False}
        x, sw, _, _ = build_sparse_case(c)
        x = torch.where(x == 0, torch.ones_like(x), x)
        wt = sw.weight_t.double()
        dense = x.double() @ wt + (0 if sw.bias is None else sw.bias.double())
        scale = x.double().abs() @ wt.abs() + (0 if sw.bias is None else sw.bias.double().abs())
        for kwargs in ({"threshold": 0.0}, {"topk": sw.in_features}):
            y = steerkern.sparse_linear(x, sw, backend=impl, **kwargs)
            assert bool(((y.double() - dense).abs() <= 1e-5 * scale).all()), f"{impl} {kwargs} for {c}"

    check()
