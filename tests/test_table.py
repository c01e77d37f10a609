"""SteerTable, SteerEntry, SparseWeight and orthonormalize: plain data,
validated once when built."""
from __future__ import annotations

import math

import pytest
import torch

import steerkern
from steerkern import SparseWeight, SteerEntry, SteerTable, orthonormalize
from steerkern.ops import library

D = 6


# ------------------------------------------------------------------ orthonormalize


def test_orthonormalize_gives_orthonormal_rows_spanning_the_same_space(gen):
    dirs = torch.randn(3, 10, generator=gen)
    q = orthonormalize(dirs)
    assert q.shape == (3, 10) and q.dtype == torch.float32 and q.is_contiguous()
    q = q.double()
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # each original direction is its own projection onto the span
    d = dirs.double()
    torch.testing.assert_close((d @ q.T) @ q, d, atol=1e-5, rtol=0)


def test_orthonormalize_is_gram_schmidt_with_positive_signs(gen):
    dirs = torch.randn(2, 7, generator=gen).double()
    e1 = dirs[0] / dirs[0].norm()
    v = dirs[1] - (dirs[1] @ e1) * e1
    e2 = v / v.norm()
    torch.testing.assert_close(orthonormalize(dirs).double(), torch.stack([e1, e2]), atol=1e-6, rtol=0)


def test_orthonormalize_accepts_one_direction(gen):
    v = torch.randn(5, generator=gen)
    torch.testing.assert_close(orthonormalize(v), (v / v.norm())[None])


@pytest.mark.parametrize("dirs", [torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]), torch.zeros(1, 3),
                                  torch.randn(4, 3), torch.zeros(0, 3)],
                         ids=["dependent", "zero", "more_than_d", "empty"])
def test_orthonormalize_rejects_degenerate_directions(dirs):
    with pytest.raises(ValueError, match="directions"):
        orthonormalize(dirs)


def test_orthonormalize_rejects_nan():
    with pytest.raises(ValueError, match="directions: contains NaN or inf"):
        orthonormalize(torch.tensor([[1.0, math.nan]]))


# ------------------------------------------------------------------ from_entries


def test_from_entries_packs_the_kernel_layout():
    q = torch.eye(D)[:2]
    table = SteerTable.from_entries([
        SteerEntry(directions=q, target=[1.0, 2.0], gain=0.5),
        SteerEntry(vector=torch.ones(D), alpha=3.0, preserve_norm=True),
        SteerEntry(scale=torch.full((D,), 2.0), condition=torch.full((D,), 2.0), threshold=0.25),
    ], D)
    assert table.size == 3 and table.hidden_size == D
    assert table.basis.shape == (3, 2, D) and torch.equal(table.basis[0], q)
    # entries without a component get its identity
    assert not bool(table.basis[1:].any()) and torch.equal(table.gain, torch.tensor([0.5, 0.0, 0.0]))
    assert torch.equal(table.target, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(table.alpha, torch.tensor([0.0, 3.0, 0.0])) and not bool(table.vec[0].any())
    assert torch.equal(table.scale[:2], torch.ones(2, D)) and table.shift is None
    assert torch.equal(table.cond_threshold, torch.tensor([-math.inf, -math.inf, 0.25]))
    torch.testing.assert_close(table.cond_dir[2], torch.full((D,), 1 / math.sqrt(D)))  # normalized
    assert torch.equal(table.preserve_norm, torch.tensor([0, 1, 0], dtype=torch.uint8))
    for t in table.tensors():
        assert t is None or (t.is_contiguous() and t.dtype in (torch.float32, torch.uint8))


def test_padding_entries_with_identities_leaves_their_rows_as_if_alone(gen):
    # entry 2 only adds a vector: the padding (zero basis, scale 1, threshold
    # -inf) must not change what it does
    v = torch.randn(D, generator=gen)
    table = SteerTable.from_entries([
        SteerEntry(directions=torch.eye(D)[:3], scale=torch.rand(D, generator=gen) + 0.5,
                   condition=torch.ones(D), threshold=0.9),
        SteerEntry(vector=v, alpha=0.5),
    ], D)
    h = torch.randn(4, D, generator=gen)
    out = steerkern.steer(h, table, torch.full((4,), 2, dtype=torch.int32), backend="reference")
    torch.testing.assert_close(out, h + 0.5 * v)


def test_entries_may_have_different_numbers_of_directions():
    table = SteerTable.from_entries([SteerEntry(directions=torch.eye(D)[:1]),
                                     SteerEntry(directions=torch.eye(D)[1:4])], D)
    assert table.basis.shape == (2, 3, D)
    assert not bool(table.basis[0, 1:].any())


def test_ablation_and_addition_shortcuts():
    q = torch.eye(D)[:2]
    a = SteerTable.ablation(q)
    assert torch.equal(a.basis[0], q) and torch.equal(a.gain, torch.ones(1)) and not bool(a.target.any())
    b = SteerTable.addition(torch.arange(float(D)), alpha=2.5)
    assert torch.equal(b.vec[0], torch.arange(float(D))) and torch.equal(b.alpha, torch.tensor([2.5]))
    assert b.basis is None and b.size == 1


@pytest.mark.parametrize("entries, message", [
    ([], r"entries: expected at least one SteerEntry"),
    ([SteerEntry()], r"entries: no entry has any component"),
    ([SteerEntry(target=[1.0])], r"entries\[0\]\.target: given without directions"),
    ([SteerEntry(directions=torch.eye(D)[:2], target=[1.0])], r"entries\[0\]\.target: expected shape \[2\]"),
    ([SteerEntry(vector=torch.ones(D)), SteerEntry(vector=torch.ones(D + 1))],
     r"entries\[1\]\.vector: expected shape \[6\]"),
    ([SteerEntry(directions=torch.eye(D + 1)[:1])], r"entries\[0\]\.directions: expected shape \[k, 6\]"),
    ([SteerEntry(vector=torch.ones(D), condition=torch.zeros(D))], r"entries\[0\]\.condition: is the zero vector"),
    ([SteerEntry(vector=torch.ones(D), alpha="big")], r"entries\[0\]\.alpha: expected a number"),
], ids=["empty", "no_component", "target_alone", "target_length", "vector_length", "directions_width",
        "zero_condition", "alpha_not_a_number"])
def test_from_entries_rejects_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        SteerTable.from_entries(entries, D)


# ------------------------------------------------------------------ direct construction


def ok_parts():
    return dict(basis=torch.eye(D)[None, :2].contiguous(), target=torch.zeros(1, 2), gain=torch.ones(1),
                vec=torch.ones(1, D), alpha=torch.ones(1))


@pytest.mark.parametrize("change, message", [
    (dict(basis=None, gain=None), "basis and target must be given together"),
    (dict(alpha=None), "vec and alpha must be given together"),
    (dict(vec=torch.ones(1, D, dtype=torch.float64)), r"vec: expected dtype torch.float32"),
    (dict(vec=torch.ones(1, 2 * D)[:, ::2]), "vec: expected a contiguous tensor"),
    (dict(vec=torch.ones(2, D), alpha=torch.ones(2)), r"expected 1 entries \(dim 0\)"),
    (dict(vec=torch.ones(1, D + 1)), r"vec: expected shape \[1, 6\]"),
    (dict(target=torch.zeros(1, 3)), r"target: expected shape \[1, 2\]"),
    (dict(preserve_norm=torch.ones(1)), "preserve_norm: expected dtype torch.uint8"),
    (dict(cond_dir=torch.ones(1, D), cond_threshold=torch.zeros(1)), "cond_dir: every row must have unit norm"),
    (dict(cond_dir=torch.eye(D)[None, 0].contiguous(), cond_threshold=torch.tensor([math.nan])),
     "cond_threshold: contains NaN"),
    (dict(vec=[[1.0] * D]), "vec: expected a tensor"),
    (dict(alpha=torch.tensor(1.0)), "alpha: expected a tensor with an entry dimension"),
], ids=["basis_without_gain", "vec_without_alpha", "fp64", "non_contiguous", "entry_count", "vec_width",
        "target_width", "preserve_norm_dtype", "cond_not_unit", "nan_cond_threshold", "list_not_tensor", "0d_tensor"])
def test_steer_table_validates_at_construction(change, message):
    parts = {**ok_parts(), **change}
    with pytest.raises(ValueError, match=message):
        SteerTable(D, **parts)


@pytest.mark.parametrize("hidden_size", [0, -3, 2.0, "6"])
def test_hidden_size_must_be_a_positive_int(hidden_size):
    with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
        SteerTable(hidden_size, vec=torch.ones(1, 6), alpha=torch.ones(1))


def test_a_table_needs_a_component():
    with pytest.raises(ValueError, match="no component given"):
        SteerTable(D)


def test_an_infinite_condition_threshold_is_allowed():
    table = SteerTable(D, cond_dir=torch.eye(D)[None, 0].contiguous(), cond_threshold=torch.tensor([-math.inf]),
                       vec=torch.ones(1, D), alpha=torch.ones(1))
    assert table.size == 1


def test_tensor_names_follow_the_op_schema():
    assert ", ".join(f"Tensor? {n}" for n in ["index", *SteerTable.tensor_names()]) == library._STEER_ARGS


def test_to_moves_every_tensor_and_keeps_the_values():
    table = SteerTable.from_entries([SteerEntry(directions=torch.eye(D)[:1], vector=torch.ones(D),
                                                preserve_norm=True)], D)
    moved = table.to("cpu")
    assert moved.device == torch.device("cpu") and moved.hidden_size == D
    for a, b in zip(table.tensors(), moved.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)


def test_table_tensors_may_be_edited_in_place_between_calls(gen):
    table = SteerTable.addition(torch.ones(D), alpha=1.0)
    h = torch.randn(2, D, generator=gen)
    before = steerkern.steer(h, table, backend="reference")
    table.alpha.mul_(3.0)
    after = steerkern.steer(h, table, backend="reference")
    torch.testing.assert_close(after - h, 3 * (before - h))


# ------------------------------------------------------------------ SparseWeight


def test_from_linear_wina_stores_w_transposed_and_the_column_norms(gen):
    W, b = torch.randn(4, 7, generator=gen), torch.randn(4, generator=gen)
    sw = SparseWeight.from_linear(W, b, mode="wina")
    assert sw.weight_t.is_contiguous() and torch.equal(sw.weight_t, W.T)
    expected = torch.sqrt((W.double() ** 2).sum(dim=0))
    torch.testing.assert_close(sw.scale.double(), expected)
    assert sw.scale.dtype == torch.float32 and torch.equal(sw.bias, b)
    assert (sw.in_features, sw.out_features) == (7, 4)
    assert sw.nbytes == (28 + 4 + 7) * 4


def test_from_linear_teal_has_no_scale_and_may_convert_the_dtype(gen):
    W = torch.randn(3, 5, generator=gen)
    sw = SparseWeight.from_linear(W, mode="teal", dtype=torch.bfloat16)
    assert sw.scale is None and sw.bias is None
    assert sw.weight_t.dtype == torch.bfloat16 and torch.equal(sw.weight_t, W.T.to(torch.bfloat16))


def test_from_linear_takes_wina_column_norms_before_converting(gen):
    W = torch.randn(3, 5, generator=gen)
    sw = SparseWeight.from_linear(W, dtype=torch.float16)
    torch.testing.assert_close(sw.scale, W.norm(dim=0))


def test_from_linear_detaches_a_parameter(gen):
    lin = torch.nn.Linear(5, 3)
    sw = SparseWeight.from_linear(lin.weight, lin.bias)
    assert not sw.weight_t.requires_grad and not sw.bias.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.randn(3, 5), mode="dense"), "mode: expected 'wina' or 'teal'"),
    (dict(weight=torch.randn(5)), r"weight: expected a 2-D tensor \[out, in\]"),
], ids=["bad_mode", "1d_weight"])
def test_from_linear_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseWeight.from_linear(**kwargs)


@pytest.mark.parametrize("parts, message", [
    (dict(weight_t=torch.randn(5)), r"weight_t: expected a 2-D tensor"),
    (dict(weight_t=torch.ones(5, 3, dtype=torch.int32)), "weight_t: dtype"),
    (dict(weight_t=torch.randn(3, 5).T), "weight_t: expected a contiguous"),
    (dict(weight_t=torch.randn(5, 3), bias=torch.randn(5)), r"bias: expected shape \[3\]"),
    (dict(weight_t=torch.randn(5, 3), scale=torch.rand(3)), r"scale: expected fp32 shape \[5\]"),
    (dict(weight_t=torch.randn(5, 3), scale=torch.rand(5, dtype=torch.float64)), "scale: expected fp32"),
], ids=["1d", "integer", "non_contiguous", "bias_shape", "scale_shape", "scale_dtype"])
def test_sparse_weight_validates_at_construction(parts, message):
    with pytest.raises(ValueError, match=message):
        SparseWeight(**parts)


def test_entry_components_must_be_numbers():
    with pytest.raises(ValueError, match=r"entries\[0\]\.vector"):
        SteerTable.from_entries([SteerEntry(vector=torch.ones(16, dtype=torch.bool))], 16)
    with pytest.raises(ValueError, match=r"entries\[0\]\.vector"):
        SteerTable.from_entries([SteerEntry(vector="sixteen")], 16)


def test_large_cpu_layouts_are_huge_page_backed_and_hold_the_weight():
    from steerkern.ops.table import layout_tensor

    w = torch.randn(600, 1000)  # W^T of 2.4 MB in fp32: above the 2 MiB cut
    sw = SparseWeight.from_linear(w)
    assert torch.equal(sw.weight_t, w.T) and sw.weight_t.is_contiguous()
    small = layout_tensor((4, 4), torch.bfloat16, "cpu")
    assert small.shape == (4, 4) and small.dtype == torch.bfloat16
    big = layout_tensor((1024, 1024), torch.float32, "cpu")
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        assert big.data_ptr() % (2 << 20) == 0  # starts on a huge-page boundary
    del sw, big  # the mapping goes with its last tensor
