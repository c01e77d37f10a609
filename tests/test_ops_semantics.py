"""The spec of each op, checked on the reference backend against math written
here independently (fp64 formulas, unfused torch compositions)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import steerkern
from steerkern import SparseWeight, SteerEntry, SteerTable

from conftest import assert_bit_exact, random_basis, unit

TOL = 1e-5


@pytest.fixture(autouse=True)
def reference_only():
    # the public API with its default backend argument, pinned to the spec
    with steerkern.use_backend("reference"):
        yield


def close(actual, expected, scale=None, tol=TOL):
    """|actual - expected| <= tol * scale, scale defaulting to max |expected| (and 1)."""
    expected = expected.double()
    if scale is None:
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = (actual.double() - expected).abs()
    bad = err > tol * scale
    assert not bool(bad.any()), f"mismatch at {bad.nonzero()[:8].tolist()}: max err {float(err.max()):.3e}"


# ------------------------------------------------------------------ steer: projection


def test_ablation_removes_the_component(gen):
    d, k = 24, 3
    Q = random_basis(k, d, gen)
    h = torch.randn(5, d, generator=gen)
    out = steerkern.steer(h, SteerTable.ablation(Q))
    close(out.double() @ Q.double().T, torch.zeros(5, k))  # Q^T h' = 0
    Qd, hd = Q.double(), h.double()
    close(out, hd - (hd @ Qd.T) @ Qd)  # h - Q Q^T h


def test_clamp_with_unit_gain_sets_the_coefficients_to_the_target(gen):
    d = 16
    Q = random_basis(2, d, gen)
    c = torch.tensor([1.5, -0.25])
    h = torch.randn(4, d, generator=gen)
    out = steerkern.steer(h, SteerTable.from_entries([SteerEntry(directions=Q, target=c, gain=1.0)], d))
    close(out.double() @ Q.double().T, c.double().expand(4, 2))
    # the orthogonal complement is untouched
    P = torch.eye(d, dtype=torch.float64) - Q.double().T @ Q.double()
    close(out.double() @ P, h.double() @ P)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75])
def test_partial_gain_moves_the_coefficients_part_way(gen, lam):
    d = 12
    Q = random_basis(2, d, gen)
    c = torch.tensor([2.0, -1.0])
    h = torch.randn(3, d, generator=gen)
    out = steerkern.steer(h, SteerTable.from_entries([SteerEntry(directions=Q, target=c, gain=lam)], d))
    before = h.double() @ Q.double().T
    close(out.double() @ Q.double().T, (1 - lam) * before + lam * c.double())
    close(out, h.double() + lam * (c.double() - before) @ Q.double())


def test_zero_padding_rows_of_the_basis_change_nothing(gen):
    d = 10
    q = random_basis(1, d, gen)
    padded = torch.cat([q, torch.zeros(2, d)])[None].contiguous()
    table = SteerTable(d, basis=padded, target=torch.zeros(1, 3), gain=torch.ones(1))
    h = torch.randn(3, d, generator=gen)
    close(steerkern.steer(h, table), steerkern.steer(h, SteerTable.ablation(q)))


def test_an_empty_basis_leaves_rows_unchanged(gen):
    d = 8
    table = SteerTable(d, basis=torch.zeros(1, 0, d), target=torch.zeros(1, 0), gain=torch.ones(1))
    h = torch.randn(3, d, generator=gen)
    assert_bit_exact(steerkern.steer(h, table), h, "k = 0")


# ------------------------------------------------------------------ steer: other steps


def test_addition_adds_alpha_times_the_vector(gen):
    d = 9
    v = torch.randn(d, generator=gen)
    h = torch.randn(4, d, generator=gen)
    out = steerkern.steer(h, SteerTable.addition(v, alpha=-1.75))
    close(out, h.double() - 1.75 * v.double())


def test_affine_map_is_scale_times_h_plus_shift(gen):
    d = 7
    w, b = torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen)
    h = torch.randn(3, d, generator=gen)
    out = steerkern.steer(h, SteerTable.from_entries([SteerEntry(scale=w, shift=b)], d))
    close(out, w.double() * h.double() + b.double())


def test_affine_map_defaults_are_scale_one_and_shift_zero(gen):
    d = 7
    w, b = torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen)
    h = torch.randn(3, d, generator=gen)
    close(steerkern.steer(h, SteerTable.from_entries([SteerEntry(scale=w)], d)), w.double() * h.double())
    close(steerkern.steer(h, SteerTable.from_entries([SteerEntry(shift=b)], d)), h.double() + b.double())


def test_norm_preservation_keeps_each_row_norm(gen):
    d = 16
    v = torch.randn(d, generator=gen) * 3
    h = torch.randn(5, d, generator=gen)
    out = steerkern.steer(h, SteerTable.from_entries([SteerEntry(vector=v, preserve_norm=True)], d))
    close(out.double().norm(dim=1), h.double().norm(dim=1))
    # and the direction is that of the unnormalized result
    close(unit(out), unit(h.double() + v.double()))


def test_norm_preservation_leaves_a_zero_result_at_zero():
    d = 2
    Q = torch.eye(d)  # ablating every direction gives exactly 0
    table = SteerTable.from_entries([SteerEntry(directions=Q, preserve_norm=True)], d)
    out = steerkern.steer(torch.tensor([[3.0, -4.0]]), table)
    assert torch.equal(out, torch.zeros(1, d))


def test_steps_apply_in_order_projection_addition_affine_norm(gen):
    d = 11
    Q = random_basis(2, d, gen)
    c, lam = torch.tensor([0.5, -1.0]), 0.6
    v, alpha = torch.randn(d, generator=gen), 0.8
    w, b = torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen)
    entry = SteerEntry(directions=Q, target=c, gain=lam, vector=v, alpha=alpha, scale=w, shift=b,
                       preserve_norm=True)
    h = torch.randn(4, d, generator=gen)
    out = steerkern.steer(h, SteerTable.from_entries([entry], d))
    x, Qd = h.double(), Q.double()
    y = x + lam * (c.double() - x @ Qd.T) @ Qd
    y = y + alpha * v.double()
    y = w.double() * y + b.double()
    y = y * (x.norm(dim=1, keepdim=True) / y.norm(dim=1, keepdim=True))
    close(out, y)


# ------------------------------------------------------------------ steer: condition and index


def test_condition_steers_only_rows_whose_cosine_exceeds_the_threshold(gen):
    d = 8
    u = unit(torch.randn(d, generator=gen))
    v = torch.randn(d, generator=gen)
    along = 2.0 * u + 0.1 * torch.randn(d, generator=gen)   # cos near 1
    against = -2.0 * u + 0.1 * torch.randn(d, generator=gen)  # cos near -1
    h = torch.stack([along, against])
    table = SteerTable.from_entries([SteerEntry(vector=v, condition=u, threshold=0.5)], d)
    out = steerkern.steer(h, table)
    close(out[0], along.double() + v.double())
    assert_bit_exact(out[1], against, "row below the threshold")


def test_condition_is_strictly_greater_than_the_threshold():
    d = 4
    u = torch.tensor([1.0, 0.0, 0.0, 0.0])
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # cos exactly 1
    table = SteerTable.from_entries([SteerEntry(vector=torch.ones(d), condition=u, threshold=1.0)], d)
    assert_bit_exact(steerkern.steer(h, table), h, "cos == threshold")


@pytest.mark.parametrize("threshold, steered", [(-0.5, True), (0.0, False)], ids=["thr-0.5_steers", "thr0_does_not"])
def test_a_zero_row_has_cosine_zero(threshold, steered):
    d = 5
    v = torch.arange(1.0, d + 1)
    table = SteerTable.from_entries([SteerEntry(vector=v, condition=torch.ones(d), threshold=threshold)], d)
    out = steerkern.steer(torch.zeros(1, d), table)
    assert torch.equal(out[0], v if steered else torch.zeros(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_index_zero_rows_are_returned_bit_exact(gen, dtype):
    d = 13
    table = SteerTable.from_entries([SteerEntry(directions=random_basis(2, d, gen), vector=torch.randn(d),
                                                scale=torch.rand(d) + 0.5, preserve_norm=True)], d)
    h = torch.randn(6, d, generator=gen).to(dtype)
    h[1, 3] = float("nan")  # even a NaN row passes through untouched
    index = torch.tensor([0, 0, 1, 0, 1, 0], dtype=torch.int32)
    out = steerkern.steer(h, table, index)
    keep = index == 0
    assert_bit_exact(out[keep], h[keep], "index-0 rows")
    assert not torch.equal(out[~keep], h[~keep])


def test_index_none_uses_the_first_entry(gen):
    d = 6
    v1, v2 = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    table = SteerTable.from_entries([SteerEntry(vector=v1), SteerEntry(vector=v2)], d)
    h = torch.randn(3, d, generator=gen)
    close(steerkern.steer(h, table), h.double() + v1.double())
    ones = torch.ones(3, dtype=torch.int32)
    assert torch.equal(steerkern.steer(h, table), steerkern.steer(h, table, ones))


def test_a_multi_entry_table_steers_each_row_by_its_own_entry(gen):
    d = 10
    Q = random_basis(2, d, gen)
    v = torch.randn(d, generator=gen)
    w = torch.rand(d, generator=gen) + 0.5
    table = SteerTable.from_entries([SteerEntry(directions=Q), SteerEntry(vector=v, alpha=2.0),
                                     SteerEntry(scale=w)], d)
    h = torch.randn(2, 3, d, generator=gen)  # leading shape [2, 3]
    index = torch.tensor([[1, 2, 3], [0, 3, 1]], dtype=torch.int64)
    out = steerkern.steer(h, table, index)
    assert out.shape == h.shape
    x, Qd = h.double(), Q.double()
    expected = {0: lambda r: r, 1: lambda r: r - (r @ Qd.T) @ Qd, 2: lambda r: r + 2.0 * v.double(),
                3: lambda r: w.double() * r}
    for i in range(2):
        for j in range(3):
            close(out[i, j], expected[int(index[i, j])](x[i, j]))


def test_without_a_table_steer_returns_h(gen):
    h = torch.randn(2, 4, generator=gen)
    assert steerkern.steer(h, None) is h


# ------------------------------------------------------------------ add_steer_rmsnorm


class LlamaRMSNorm(torch.nn.Module):
    """RMSNorm as Llama writes it, for the unfused composition."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GemmaRMSNorm(torch.nn.Module):
    """Gemma stores weight - 1 and scales by (1 + weight) in fp32."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def test_add_steer_rmsnorm_matches_the_unfused_llama_composition(gen):
    d, eps = 32, 1e-6
    table = SteerTable.from_entries([SteerEntry(directions=random_basis(2, d, gen),
                                                vector=torch.randn(d, generator=gen), alpha=0.5)], d)
    x, res = torch.randn(2, 3, d, generator=gen), torch.randn(2, 3, d, generator=gen)
    weight = torch.rand(d, generator=gen) + 0.5
    r, y = steerkern.add_steer_rmsnorm(x, res, weight, eps, table=table)
    r_unfused = steerkern.steer(x + res, table)
    close(r, r_unfused)
    # and against the math itself, not only the op the reference calls
    s, Q = (x + res).double(), table.basis[0].double()
    close(r, s - (s @ Q.T) @ Q + 0.5 * table.vec[0].double())
    close(y, LlamaRMSNorm(weight, eps)(r_unfused))


def test_add_steer_rmsnorm_weight_offset_is_gemma_style(gen):
    d, eps = 24, 1e-6
    table = SteerTable.addition(torch.randn(d, generator=gen), alpha=0.3)
    x, res = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)
    stored = torch.randn(d, generator=gen) * 0.1  # weight - 1
    r, y = steerkern.add_steer_rmsnorm(x, res, stored, eps, table=table, weight_offset=1.0)
    close(y, GemmaRMSNorm(stored, eps)(steerkern.steer(x + res, table)))


def test_add_steer_rmsnorm_in_fp64_formula(gen):
    d, eps = 20, 1e-5
    x, res = torch.randn(3, d, generator=gen), torch.randn(3, d, generator=gen)
    v = torch.randn(d, generator=gen)
    weight = torch.rand(d, generator=gen) + 0.5
    r, y = steerkern.add_steer_rmsnorm(x, res, weight, eps, table=SteerTable.addition(v))
    rr = (x + res).double() + v.double()
    close(r, rr)
    close(y, rr / torch.sqrt(rr.pow(2).mean(1, keepdim=True) + eps) * weight.double())


def test_add_steer_rmsnorm_without_residual_steers_x(gen):
    d, eps = 16, 1e-6
    table = SteerTable.addition(torch.randn(d, generator=gen))
    x = torch.randn(3, d, generator=gen)
    weight = torch.rand(d, generator=gen) + 0.5
    r, y = steerkern.add_steer_rmsnorm(x, None, weight, eps, table=table)
    assert torch.equal(r, steerkern.steer(x, table))
    close(r, x.double() + table.vec[0].double())
    close(y, LlamaRMSNorm(weight, eps)(r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_add_steer_rmsnorm_rounds_the_sum_like_an_unfused_add(gen, dtype):
    d = 16
    x, res = torch.randn(5, d, generator=gen).to(dtype), torch.randn(5, d, generator=gen).to(dtype)
    table = SteerTable.addition(torch.randn(d, generator=gen))
    index = torch.zeros(5, dtype=torch.int32)  # no steering: r is exactly x + residual
    r, _ = steerkern.add_steer_rmsnorm(x, res, torch.ones(d, dtype=dtype), 1e-6, table=table, index=index)
    assert_bit_exact(r, x + res, "r = x + residual")


def test_add_steer_rmsnorm_without_a_table_is_add_and_norm(gen):
    d, eps = 8, 1e-6
    x, res = torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen)
    weight = torch.rand(d, generator=gen) + 0.5
    r, y = steerkern.add_steer_rmsnorm(x, res, weight, eps)
    assert torch.equal(r, x + res)
    close(y, LlamaRMSNorm(weight, eps)(x + res))


# ------------------------------------------------------------------ sparse_linear


def linear_layer(gen, n_in, n_out, bias=True):
    W = torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=gen) if bias else None
    return W, b


def masked_dense(x, W, b, mask):
    y = torch.where(mask, x.double(), 0.0) @ W.double().T
    return y if b is None else y + b.double()


def test_sparse_linear_teal_keeps_inputs_whose_magnitude_exceeds_the_threshold(gen):
    W, b = linear_layer(gen, 32, 12)
    x = torch.randn(4, 32, generator=gen)
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), threshold=0.7)
    close(y, masked_dense(x, W, b, x.abs() > 0.7))


def test_sparse_linear_wina_scores_by_the_column_norms(gen):
    W, b = linear_layer(gen, 32, 12)
    W = W * torch.rand(32, generator=gen) * 3  # column norms that matter
    x = torch.randn(4, 32, generator=gen)
    col_norm = W.double().pow(2).sum(0).sqrt()
    t = float((x.double().abs() * col_norm).median())
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="wina"), threshold=t)
    mask = x.double().abs() * col_norm > t
    assert 0 < int(mask.sum()) < mask.numel()
    close(y, masked_dense(x, W, b, mask))


@pytest.mark.parametrize("mode", ["teal", "wina"])
def test_sparse_linear_threshold_zero_is_the_dense_layer(gen, mode):
    W, b = linear_layer(gen, 20, 9)
    x = torch.randn(3, 20, generator=gen)
    assert bool((x != 0).all())
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode=mode), threshold=0.0)
    close(y, F.linear(x.double(), W.double(), b.double()))


def test_sparse_linear_threshold_zero_drops_exact_zeros_only(gen):
    W, b = linear_layer(gen, 6, 3)
    x = torch.tensor([[0.0, 1.0, -2.0, 0.0, 3.0, -0.5]])
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), threshold=0.0)
    close(y, F.linear(x.double(), W.double(), b.double()))


def test_sparse_linear_topk_keeps_the_largest_scores(gen):
    W, b = linear_layer(gen, 16, 5)
    x = torch.randn(3, 16, generator=gen)
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), topk=4)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for r in range(3):
        for i in sorted(range(16), key=lambda i: -abs(float(x[r, i])))[:4]:
            mask[r, i] = True
    close(y, masked_dense(x, W, b, mask))


def test_sparse_linear_topk_ties_keep_the_lower_index(gen):
    W, b = linear_layer(gen, 6, 4)
    x = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0, 0.5]])  # |x| = 3 three times
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), topk=2)
    mask = torch.tensor([[False, True, True, False, False, False]])
    close(y, masked_dense(x, W, b, mask))


def test_sparse_linear_topk_ranks_nan_above_every_number(gen):
    W, b = linear_layer(gen, 4, 3)
    x = torch.tensor([[5.0, float("nan"), 1.0, 2.0]])
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), topk=1)
    assert bool(torch.isnan(y).all())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("how", ["topk0", "huge_threshold"])
def test_sparse_linear_at_full_sparsity_gives_the_bias_only(gen, how, bias):
    W, b = linear_layer(gen, 12, 5, bias=bias)
    x = torch.randn(3, 12, generator=gen) * 100
    kwargs = {"topk": 0} if how == "topk0" else {"threshold": 1e30}
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b), **kwargs)
    assert torch.equal(y, (b if bias else torch.zeros(5)).expand(3, 5))


def test_sparse_linear_nan_inputs_propagate_in_threshold_mode(gen):
    W, b = linear_layer(gen, 8, 4)
    x = torch.randn(3, 8, generator=gen)
    x[1, 2] = float("nan")
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b), threshold=0.5)
    assert bool(torch.isnan(y[1]).all())
    assert not bool(torch.isnan(y[[0, 2]]).any())


def test_sparse_linear_gives_each_row_its_own_mask(gen):
    W, b = linear_layer(gen, 5, 3)
    x = torch.tensor([[9.0, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 9.0]])
    y = steerkern.sparse_linear(x, SparseWeight.from_linear(W, b, mode="teal"), topk=1)
    close(y[0], 9.0 * W[:, 0].double() + b.double())
    close(y[1], 9.0 * W[:, 4].double() + b.double())


def test_sparse_linear_keeps_leading_dimensions_and_weight_dtype_may_differ(gen):
    W, b = linear_layer(gen, 8, 6)
    x = torch.randn(2, 3, 8, generator=gen)
    sw = SparseWeight.from_linear(W, b, mode="teal", dtype=torch.bfloat16)
    y = steerkern.sparse_linear(x, sw, threshold=0.3)
    assert y.shape == (2, 3, 6) and y.dtype == torch.float32
    close(y, masked_dense(x, sw.weight_t.T, b, x.abs() > 0.3))


# ------------------------------------------------------------------ steer_sparse_linear


@pytest.mark.parametrize("sparsity", [{"threshold": 0.4}, {"topk": 5}], ids=["threshold", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steer_sparse_linear_is_sparse_linear_of_steer(gen, impl, sparsity, dtype):
    # every backend: the reference's fused op is this very composition
    d = 14
    W, b = linear_layer(gen, d, 6)
    sw = SparseWeight.from_linear(W, b, mode="wina")
    table = SteerTable.from_entries([SteerEntry(directions=random_basis(2, d, gen), vector=torch.randn(d)),
                                     SteerEntry(scale=torch.rand(d) + 0.5)], d)
    h = torch.randn(2, 2, d, generator=gen).to(dtype)
    index = torch.tensor([[1, 0], [2, 1]], dtype=torch.int32)
    fused = steerkern.steer_sparse_linear(h, table, sw, index, backend=impl, **sparsity)
    unfused = steerkern.sparse_linear(steerkern.steer(h, table, index, backend=impl), sw, backend=impl,
                                      **sparsity)
    assert fused.shape == (2, 2, 6)
    assert_bit_exact(fused, unfused, "fused vs unfused")
