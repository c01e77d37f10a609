"""The Triton kernels under the CPU interpreter, against steerkern.ops.reference.

Run this file on its own, with the interpreter switched on before steerkern is
imported (the kernels are decorated at import):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpret.py -q

Without ``TRITON_INTERPRET=1`` the whole file is skipped.  The generic cases
(shapes, each steering component, sparse edge cases) live in
tests/test_ops_backends.py, which also runs the triton backend when the
interpreter is on; this file covers what is particular to the Triton kernels:
rows longer than one block, split-K with several splits, row groups and
output tiles, the dense fallback, the rounding on store, out-of-range indices
at kernel level and the registration.  Grids stay tiny (rows <= 4, sizes <= 64).
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set before steerkern is imported)", allow_module_level=True)
pytest.importorskip("triton")

import steerkern  # noqa: E402
from steerkern import SparseWeight, backends  # noqa: E402
from steerkern.kernels.triton import sparse_gemv, steer as steer_kernels  # noqa: E402

import conftest as oracle  # noqa: E402
from conftest import (  # noqa: E402
    DTYPES, assert_bit_exact, cycling_index, make_table, robust_conditions, robust_threshold, score_of,
)

dtypes = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240611)


@pytest.fixture
def long_rows(monkeypatch):
    """Force the multi-block path: rows longer than 16 loop over blocks of 16."""
    monkeypatch.setattr(steer_kernels, "MAX_ONE_BLOCK", 16)
    monkeypatch.setattr(steer_kernels, "LOOP_BLOCK", 16)


@pytest.fixture
def many_splits(monkeypatch):
    """Force several K splits, two x rows per program and 16-wide output tiles."""
    monkeypatch.setattr(sparse_gemv, "MIN_ROWS_PER_SPLIT", 8)
    monkeypatch.setattr(sparse_gemv, "PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(sparse_gemv, "MAX_ROWS_PER_PROGRAM", 2)
    monkeypatch.setattr(sparse_gemv, "BLOCK_N", 16)


def weight(gen, n_in, n_out, wdtype, mode="wina", bias=True):
    W = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    W = W * (torch.rand(n_in, generator=gen) * 2 + 0.25)
    b = torch.randn(n_out, generator=gen) if bias else None
    return SparseWeight.from_linear(W, b, mode=mode, dtype=wdtype)


def check_steer(h, table, index, what):
    out = steerkern.steer(h, table, index, backend="triton")
    oracle.check_steer(out, h, table, None if index is None else index.reshape(-1).to(torch.int32), what)
    return out


def check_sparse(x, sw, threshold, topk, what):
    y = steerkern.sparse_linear(x, sw, threshold=threshold, topk=topk, backend="triton")
    t = threshold if isinstance(threshold, torch.Tensor) else torch.tensor(float(threshold))
    oracle.check_sparse_linear(y, x, sw, t, -1 if topk is None else topk, what)
    return y


# ------------------------------------------------------------------ registration


def test_triton_serves_cpu_tensors_under_the_interpreter():
    assert backends.available("triton", "cpu")
    for op in backends.OPS:
        assert backends.choose(op, "cpu", "triton") == "triton"


# ------------------------------------------------------------------ steer / add_steer_rmsnorm


@dtypes
def test_steer_one_block_rows_match_reference(gen, dtype):
    d = 13
    table = make_table(d, gen, K=3)
    h = torch.randn(4, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    index = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    out = check_steer(h, table, index, f"steer one block {dtype}")
    assert_bit_exact(out[0], h[0], "index-0 row")


@dtypes
def test_steer_long_rows_loop_over_blocks(gen, dtype, long_rows):
    d = 45  # three blocks of 16, the last one partial
    table = make_table(d, gen, K=3, k=3)
    h = torch.randn(4, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    index = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    out = check_steer(h, table, index, f"steer long rows {dtype}")
    assert_bit_exact(out[1], h[1], "index-0 row")


def test_steer_d1_and_zero_rows(gen):
    table = make_table(1, gen, K=2, components=("addition", "affine", "preserve_norm"))
    h = torch.tensor([[2.0], [-3.0], [0.0]])
    check_steer(h, table, torch.tensor([1, 2, 1], dtype=torch.int32), "steer d=1")
    empty = steerkern.steer(torch.zeros(0, 7), make_table(7, gen), backend="triton")
    assert empty.shape == (0, 7)


def test_steer_zero_row_with_condition_and_norm_preservation(gen):
    d = 9
    table = make_table(d, gen, K=1, components=("condition", "addition", "preserve_norm"))
    table.cond_threshold[0] = -0.5  # cos of a zero row is 0 > -0.5: it is steered
    h = torch.zeros(2, d)
    h[1] = torch.randn(d, generator=gen)
    robust_conditions(h[1:], table)
    table.cond_threshold[0] = min(float(table.cond_threshold[0]), -0.01)
    check_steer(h, table, None, "steer zero row")


@pytest.mark.parametrize("op", ["steer", "add_steer_rmsnorm"])
def test_out_of_range_index_means_no_steering_at_kernel_level(gen, op):
    # the Python layer rejects such an index; a kernel cannot raise, so it leaves the row alone
    d = 11
    table = make_table(d, gen, K=2, components=("addition",))
    x = torch.randn(4, d, generator=gen).to(torch.bfloat16)
    index = torch.tensor([3, -1, 1000, 1], dtype=torch.int32)
    if op == "steer":
        out = steer_kernels.steer(x, index, *table.tensors())
        assert_bit_exact(out[:3], x[:3], "out-of-range rows")
        assert not torch.equal(out[3], x[3])
    else:
        res = torch.randn(4, d, generator=gen).to(torch.bfloat16)
        r, _ = steer_kernels.add_steer_rmsnorm(x, res, torch.ones(d), 1e-6, 0.0, index, *table.tensors())
        assert_bit_exact(r[:3], (x[:3].float() + res[:3].float()).to(torch.bfloat16), "out-of-range rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_residual_sum_is_rounded_to_nearest_even_like_torch(gen, dtype):
    # the interpreter truncates fp32 -> bf16; the kernel must round like torch
    d = 64
    x = torch.randn(4, d, generator=gen).to(dtype)
    res = (torch.randn(4, d, generator=gen) * 1e-2).to(dtype)
    table = make_table(d, gen, K=1, components=("addition",))
    r, _ = steerkern.add_steer_rmsnorm(x, res, torch.ones(d), 1e-6, table=table,
                                       index=torch.zeros(4, dtype=torch.int32), backend="triton")
    assert_bit_exact(r, (x.float() + res.float()).to(dtype), "x + residual")


def check_add_steer_rmsnorm(x, res, w, eps, offset, table, index, what):
    r, y = steerkern.add_steer_rmsnorm(x, res, w, eps, table=table, index=index, weight_offset=offset,
                                       backend="triton")
    oracle.check_add_steer_rmsnorm(r, y, x, res, w, eps, offset, table, index, what)
    s = x if res is None else (x.float() + res.float()).to(x.dtype)
    assert_bit_exact(r[index == 0], s[index == 0], f"{what}: index-0 rows")


@dtypes
@pytest.mark.parametrize("path", ["one_block", "long_rows"])
def test_add_steer_rmsnorm_matches_reference(gen, dtype, path, request):
    if path == "long_rows":
        request.getfixturevalue("long_rows")
    d = 37
    table = make_table(d, gen, K=2)
    x = torch.randn(4, d, generator=gen).to(dtype)
    res = torch.randn(4, d, generator=gen).to(dtype)
    robust_conditions((x.float() + res.float()).to(dtype), table)
    w = (torch.randn(d, generator=gen) * 0.1).to(torch.bfloat16)  # Gemma-style, another dtype
    index = torch.tensor([1, 0, 2, 1], dtype=torch.int32)
    check_add_steer_rmsnorm(x, res, w, 1e-6, 1.0, table, index, f"add_steer_rmsnorm {path} {dtype}")


def test_add_steer_rmsnorm_without_residual_long_rows(gen, long_rows):
    d = 33
    table = make_table(d, gen, K=2, components=("projection", "preserve_norm"))
    x = torch.randn(3, d, generator=gen)
    w = torch.rand(d, generator=gen) + 0.5
    check_add_steer_rmsnorm(x, None, w, 1e-5, 0.0, table, torch.tensor([1, 2, 0], dtype=torch.int32),
                            "add_steer_rmsnorm no residual")


# ------------------------------------------------------------------ sparse_linear


@dtypes
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_split_k_over_several_splits_row_groups_and_tiles(gen, many_splits, dtype, wdtype, mode):
    n_in, n_out = 61, 37
    sw = weight(gen, n_in, n_out, wdtype)
    x = torch.randn(4, n_in, generator=gen).to(dtype)
    score = score_of(x, sw.scale)
    if mode == "threshold":
        check_sparse(x, sw, robust_threshold(score), None, f"split-K threshold {dtype} w {wdtype}")
    else:
        x = (torch.round(x.float() * 2) / 2).to(dtype)  # ties: the lower index must win
        check_sparse(x, sw, 0.0, 20, f"split-K topk {dtype} w {wdtype}")


def test_rows_are_masked_on_their_own_within_the_union(gen, many_splits):
    # row r is large only on inputs i = r (mod 4): the union is dense, each row is not
    n_in, n_out = 40, 9
    sw = weight(gen, n_in, n_out, torch.float32, mode="teal")
    x = torch.randn(4, n_in, generator=gen) * 0.01
    for r in range(4):
        x[r, r::4] = torch.randn(len(range(r, n_in, 4)), generator=gen).sign() * (1 + torch.rand(1, generator=gen))
    y = steerkern.sparse_linear(x, sw, threshold=0.5, backend="triton")
    own = torch.where(x.abs() > 0.5, x, torch.zeros(())).double()
    expected = own @ sw.weight_t.double() + sw.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_nan_input_stays_active_and_nan_ranks_first_in_topk(gen):
    sw = weight(gen, 16, 6, torch.float32)
    x = torch.randn(3, 16, generator=gen)
    x[1, 4] = float("nan")
    y = steerkern.sparse_linear(x, sw, threshold=0.5, backend="triton")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    y = steerkern.sparse_linear(x, sw, topk=2, backend="triton")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


def test_threshold_is_read_from_the_device_tensor_each_call(gen):
    sw = weight(gen, 24, 5, torch.float32)
    x = torch.randn(2, 24, generator=gen)
    t = torch.tensor(0.0)
    for value in (robust_threshold(score_of(x, sw.scale)), 1e30):
        t.fill_(value)
        check_sparse(x, sw, t, None, f"threshold {value}")


def test_zero_rows_and_full_sparsity_give_shapes_and_bias(gen):
    sw = weight(gen, 8, 3, torch.float32)
    assert steerkern.sparse_linear(torch.zeros(0, 8), sw, backend="triton").shape == (0, 3)
    y = steerkern.sparse_linear(torch.randn(2, 8, generator=gen), sw, threshold=1e30, backend="triton")
    assert torch.equal(y, sw.bias.expand(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_fallback_above_the_crossover(gen, monkeypatch, dtype):
    monkeypatch.setattr(sparse_gemv, "DENSE_CROSSOVER", 2)
    sw = weight(gen, 20, 7, dtype)
    x = torch.randn(3, 20, generator=gen).to(dtype)
    check_sparse(x, sw, robust_threshold(score_of(x, sw.scale)), None, f"dense fallback {dtype}")
    check_sparse(x, sw, 0.0, 9, f"dense fallback topk {dtype}")


def test_mixed_dtypes_stay_on_the_kernel_above_the_crossover(gen, monkeypatch):
    def no_dense(*args):
        raise AssertionError("the dense fallback needs x and W in one dtype")

    monkeypatch.setattr(sparse_gemv, "DENSE_CROSSOVER", 1)
    monkeypatch.setattr(sparse_gemv, "_dense", no_dense)
    sw = weight(gen, 20, 7, torch.bfloat16)
    x = torch.randn(3, 20, generator=gen)
    check_sparse(x, sw, robust_threshold(score_of(x, sw.scale)), None, "mixed dtypes above crossover")


# ------------------------------------------------------------------ steer_sparse_linear


@dtypes
def test_steer_sparse_linear_matches_reference(gen, many_splits, dtype):
    d, n_out = 29, 11
    table = make_table(d, gen, K=2, components=("projection", "addition"))
    sw = weight(gen, d, n_out, dtype)
    h = torch.randn(4, d, generator=gen).to(dtype)
    index = cycling_index((4,), 2, gen)
    y = steerkern.steer_sparse_linear(h, table, sw, index, threshold=0.0, backend="triton")
    oracle.check_steer_sparse_linear(y, h, table, index, sw, torch.tensor(0.0), -1, f"steer_sparse_linear {dtype}")
