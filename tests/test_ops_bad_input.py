"""Bad input is a ValueError that names the argument, raised before any work.

And the C++ kernels, called directly past those checks, raise instead of
reading out of bounds."""
from __future__ import annotations

import math

import pytest
import torch

import steerkern
from steerkern import SparseWeight, SteerEntry, SteerTable, orthonormalize

D = 8


@pytest.fixture
def table():
    return SteerTable.from_entries([SteerEntry(directions=torch.eye(D)[:2], vector=torch.ones(D)),
                                    SteerEntry(vector=torch.arange(float(D)))], D)


@pytest.fixture
def weight():
    return SparseWeight.from_linear(torch.randn(5, D), torch.randn(5))



# ------------------------------------------------------------------ hidden states


@pytest.mark.parametrize("op", ["steer", "add_steer_rmsnorm", "steer_sparse_linear"])
def test_wrong_hidden_size_names_the_input(table, weight, op):
    bad = torch.randn(3, D + 1)
    with pytest.raises(ValueError, match=r"(h|x): expected shape \[\.\.\., 8\]"):
        if op == "steer":
            steerkern.steer(bad, table)
        elif op == "add_steer_rmsnorm":
            steerkern.add_steer_rmsnorm(bad, None, torch.ones(D + 1), 1e-6, table=table)
        else:
            steerkern.steer_sparse_linear(bad, table, weight)


def test_sparse_linear_wrong_in_features_names_x(weight):
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 8\]"):
        steerkern.sparse_linear(torch.randn(2, D - 1), weight)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool],
                         ids=["int32", "int64", "fp64", "bool"])
def test_unsupported_h_dtype_is_rejected(table, dtype):
    with pytest.raises(ValueError, match="h: dtype"):
        steerkern.steer(torch.ones(2, D, dtype=dtype), table)


def test_integer_x_is_rejected_by_sparse_linear(weight):
    with pytest.raises(ValueError, match="x: dtype"):
        steerkern.sparse_linear(torch.ones(2, D, dtype=torch.int64), weight)


@pytest.mark.parametrize("value", [3.0, [1.0, 2.0], None], ids=["float", "list", "None"])
def test_h_that_is_not_a_tensor_is_rejected(table, value):
    with pytest.raises(ValueError, match="h: expected a tensor"):
        steerkern.steer(value, table)


def test_zero_dim_h_is_rejected(table):
    with pytest.raises(ValueError, match="h: expected shape"):
        steerkern.steer(torch.tensor(1.0), table)


# ------------------------------------------------------------------ the table


@pytest.mark.parametrize("value", [{"vec": torch.ones(1, D)}, "ablate", torch.ones(1, D)],
                         ids=["dict", "str", "tensor"])
def test_a_table_that_is_not_a_steer_table_is_rejected(value):
    with pytest.raises(ValueError, match="table: expected a SteerTable"):
        steerkern.steer(torch.randn(2, D), value)


def test_a_non_orthonormal_basis_is_rejected_and_orthonormalize_helps():
    dirs = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="basis: .*not orthonormal.*orthonormalize"):
        SteerTable.from_entries([SteerEntry(directions=dirs)], D)
    table = SteerTable.from_entries([SteerEntry(directions=orthonormalize(dirs))], D)
    out = steerkern.steer(torch.randn(3, D), table, backend="reference")
    assert float(out[:, :2].abs().max()) < 1e-6  # the span of both directions is ablated


def test_an_unnormalized_direction_is_rejected():
    with pytest.raises(ValueError, match="basis"):
        SteerTable.ablation(torch.full((D,), 1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["vector", "scale", "shift", "condition"])
def test_non_finite_vectors_are_rejected(field, bad):
    v = torch.ones(D)
    v[3] = bad
    with pytest.raises(ValueError, match=rf"entries\[0\]\.{field}: contains NaN or inf"):
        SteerTable.from_entries([SteerEntry(**{field: v})], D)


@pytest.mark.parametrize("field", ["alpha", "gain"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_coefficients_are_rejected(field, bad):
    entry = SteerEntry(directions=torch.eye(D)[:1], vector=torch.ones(D), **{field: bad})
    with pytest.raises(ValueError, match=rf"entries\[0\]\.{field}: must be finite"):
        SteerTable.from_entries([entry], D)


def test_non_finite_directions_are_rejected():
    q = torch.eye(D)[:1].clone()
    q[0, 2] = math.nan
    with pytest.raises(ValueError, match="basis: contains NaN or inf"):
        SteerTable.from_entries([SteerEntry(directions=q)], D)


def test_a_nan_condition_threshold_is_rejected():
    with pytest.raises(ValueError, match=r"entries\[0\]\.threshold: is NaN"):
        SteerTable.from_entries([SteerEntry(vector=torch.ones(D), condition=torch.ones(D),
                                            threshold=math.nan)], D)


@pytest.mark.parametrize("name", ["vec", "scale", "shift"])
def test_a_table_tensor_with_nan_is_rejected(name):
    t = torch.ones(1, D)
    t[0, 0] = math.nan
    extra = {"alpha": torch.ones(1)} if name == "vec" else {}
    with pytest.raises(ValueError, match=f"{name}: contains NaN or inf"):
        SteerTable(D, **{name: t}, **extra)


def test_table_on_another_device_is_rejected(table):
    with pytest.raises(ValueError, match="table: on cpu, but h is on meta"):
        steerkern.steer(torch.empty(2, D, device="meta"), table)


# ------------------------------------------------------------------ index


@pytest.mark.parametrize("values", [[0, 3], [-1, 1], [5, 0]], ids=["beyond_table", "negative", "far_beyond"])
def test_an_index_outside_the_table_is_rejected(table, values):
    with pytest.raises(ValueError, match=r"index: values must lie in \[0, 2\]"):
        steerkern.steer(torch.randn(2, D), table, torch.tensor(values, dtype=torch.int32))


def test_a_float_index_is_rejected(table):
    with pytest.raises(ValueError, match="index: expected an integer tensor"):
        steerkern.steer(torch.randn(2, D), table, torch.tensor([0.0, 1.0]))


def test_an_index_of_the_wrong_shape_is_rejected(table):
    with pytest.raises(ValueError, match=r"index: expected shape \[2, 3\]"):
        steerkern.steer(torch.randn(2, 3, D), table, torch.ones(4, dtype=torch.int32))


def test_an_index_without_a_table_is_rejected():
    with pytest.raises(ValueError, match="index: given without a table"):
        steerkern.steer(torch.randn(2, D), None, torch.ones(2, dtype=torch.int32))


def test_an_index_on_another_device_is_rejected(table):
    with pytest.raises(ValueError, match="index: on meta"):
        steerkern.steer(torch.randn(2, D), table, torch.ones(2, dtype=torch.int32, device="meta"))


# ------------------------------------------------------------------ add_steer_rmsnorm


def test_residual_of_another_shape_is_rejected():
    with pytest.raises(ValueError, match="residual: expected shape"):
        steerkern.add_steer_rmsnorm(torch.randn(2, D), torch.randn(3, D), torch.ones(D), 1e-6)


def test_residual_of_another_dtype_is_rejected():
    with pytest.raises(ValueError, match="residual: expected torch.float32"):
        steerkern.add_steer_rmsnorm(torch.randn(2, D), torch.randn(2, D, dtype=torch.bfloat16),
                                    torch.ones(D), 1e-6)


def test_residual_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="residual: expected torch.float32 on cpu"):
        steerkern.add_steer_rmsnorm(torch.randn(2, D), torch.empty(2, D, device="meta"), torch.ones(D), 1e-6)


@pytest.mark.parametrize("w", [torch.ones(D + 1), torch.ones(1, D), torch.ones(D, dtype=torch.int64), "ones"],
                         ids=["wrong_size", "wrong_rank", "integer", "not_a_tensor"])
def test_a_bad_norm_weight_is_rejected(w):
    with pytest.raises(ValueError, match="weight: expected"):
        steerkern.add_steer_rmsnorm(torch.randn(2, D), None, w, 1e-6)


@pytest.mark.parametrize("eps", [-1e-6, math.nan, math.inf], ids=["negative", "nan", "inf"])
def test_a_bad_eps_is_rejected(eps):
    with pytest.raises(ValueError, match="eps: expected a finite number >= 0"):
        steerkern.add_steer_rmsnorm(torch.randn(2, D), None, torch.ones(D), eps)


# ------------------------------------------------------------------ sparse ops


@pytest.mark.parametrize("threshold", [-0.1, math.nan, torch.tensor(-1.0), torch.tensor(math.nan)],
                         ids=["negative", "nan", "negative_tensor", "nan_tensor"])
def test_a_negative_or_nan_threshold_is_rejected(weight, threshold):
    with pytest.raises(ValueError, match="threshold: must be >= 0 and not NaN"):
        steerkern.sparse_linear(torch.randn(2, D), weight, threshold=threshold)


@pytest.mark.parametrize("threshold", ["high", torch.ones(2)], ids=["string", "vector"])
def test_a_threshold_that_is_not_a_scalar_is_rejected(weight, threshold):
    with pytest.raises(ValueError, match="threshold: expected"):
        steerkern.sparse_linear(torch.randn(2, D), weight, threshold=threshold)


@pytest.mark.parametrize("topk", [-1, D + 1, 2.0, True], ids=["negative", "above_in", "float", "bool"])
@pytest.mark.parametrize("op", ["sparse_linear", "steer_sparse_linear"])
def test_topk_out_of_range_is_rejected(table, weight, topk, op):
    with pytest.raises(ValueError, match=r"topk: expected an int in \[0, 8\]"):
        if op == "sparse_linear":
            steerkern.sparse_linear(torch.randn(2, D), weight, topk=topk)
        else:
            steerkern.steer_sparse_linear(torch.randn(2, D), table, weight, topk=topk)


def test_a_weight_that_is_not_a_sparse_weight_is_rejected():
    with pytest.raises(ValueError, match="weight: expected a SparseWeight"):
        steerkern.sparse_linear(torch.randn(2, D), torch.randn(D, 5))


def test_a_weight_on_another_device_is_rejected(weight):
    with pytest.raises(ValueError, match="weight.weight_t: on cpu, but x is on meta"):
        steerkern.sparse_linear(torch.empty(2, D, device="meta"), weight)


def test_steer_sparse_linear_checks_its_table_too(weight, table):
    with pytest.raises(ValueError, match="index: values must lie"):
        steerkern.steer_sparse_linear(torch.randn(2, D), table, weight, torch.tensor([0, 9]))


# ------------------------------------------------------------------ the C++ kernels, called directly


def _cpu_ext():
    from steerkern.kernels import cpu

    if cpu._ext is None:
        pytest.skip("the C++ extension is not loaded")
    return cpu._ext


@pytest.mark.parametrize("bad", [3, -1, 1 << 20], ids=["beyond_table", "negative", "huge"])
def test_cpu_kernels_reject_a_bad_index_instead_of_crashing(table, weight, bad):
    ext = _cpu_ext()
    h = torch.randn(2, D)
    index = torch.tensor([1, bad], dtype=torch.int32)
    t = table.tensors()
    with pytest.raises(RuntimeError):
        ext.steer(h, index, *t)
    with pytest.raises(RuntimeError):
        ext.add_steer_rmsnorm(h, None, torch.ones(D), 1e-6, 0.0, index, *t)
    with pytest.raises(RuntimeError):
        ext.steer_sparse_linear(h, index, *t, weight.weight_t, weight.bias, weight.scale, torch.tensor(0.0), -1)


def test_the_cpu_op_rejects_a_bad_index_past_the_python_checks(table):
    _cpu_ext()
    h = torch.randn(2, D)
    with pytest.raises(RuntimeError):
        torch.ops.steerkern.steer(h, torch.tensor([0, 7], dtype=torch.int32), *table.tensors(), backend="cpu")


# ------------------------------------------------------------------ in-place ops


def test_in_place_rms_needs_a_residual(table):
    with pytest.raises(ValueError, match="residual: required by the in-place op"):
        steerkern.add_steer_rmsnorm_(torch.randn(2, D), None, torch.ones(D), 1e-6, table=table)


@pytest.mark.parametrize("alias", ["same", "overlapping"])
def test_in_place_rms_rejects_a_residual_sharing_memory_with_x(table, alias):
    buf = torch.randn(3 * D)
    x = buf[:2 * D].view(2, D)
    residual = x if alias == "same" else buf[D:].view(2, D)
    before = buf.clone()
    with pytest.raises(ValueError, match="residual: shares memory with x"):
        steerkern.add_steer_rmsnorm_(x, residual, torch.ones(D), 1e-6, table=table)
    assert torch.equal(buf, before)


def test_in_place_rms_accepts_halves_of_one_buffer(table):
    buf = torch.randn(4, D)
    x, residual = buf[:2], buf[2:]
    want_r, want_y = steerkern.add_steer_rmsnorm(x.clone(), residual.clone(), torch.ones(D), 1e-6, table=table)
    steerkern.add_steer_rmsnorm_(x, residual, torch.ones(D), 1e-6, table=table)
    assert torch.equal(buf[2:], want_r) and torch.equal(buf[:2], want_y)


def test_steer_in_place_rejects_an_expanded_view(table):
    row = torch.randn(D)
    with pytest.raises(ValueError, match="h: cannot be written in place: it is an expanded view"):
        steerkern.steer_(row.expand(3, D), table)


def test_in_place_steer_leaves_h_untouched_on_bad_input(table):
    h = torch.randn(2, D)
    before = h.clone()
    with pytest.raises(ValueError, match=r"index: values must lie in \[0, 2\]"):
        steerkern.steer_(h, table, torch.tensor([0, 3]))
    assert torch.equal(h, before)


def test_in_place_rms_leaves_both_untouched_on_bad_input(table):
    x, residual = torch.randn(2, D), torch.randn(2, D)
    before = x.clone(), residual.clone()
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        steerkern.add_steer_rmsnorm_(x, residual, torch.ones(D), math.nan, table=table)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])


def test_the_cpu_kernel_rejects_overlapping_in_place_buffers():
    from steerkern.kernels import cpu

    if cpu._ext is None:
        pytest.skip("C++ CPU backend not built")
    x = torch.randn(2, D)
    vec, alpha = torch.ones(1, D), torch.ones(1)
    with pytest.raises(RuntimeError, match="residual: must not overlap x"):
        cpu._ext.add_steer_rmsnorm_(x, x, torch.ones(D), 1e-6, 0.0, None, None, None, None, vec, alpha,
                                    None, None, None, None, None)
