"""Every kernel backend that runs on CPU tensors against the reference.

fp32 must agree with the fp64 reference to 1e-5 relative to the row's
magnitude; bf16/fp16 may err at most twice as much as torch itself does in
that dtype (see conftest).  Shapes include the awkward ones: d = 1, d not a
multiple of 8, no rows, one row, more than 8 rows (the prefill path) and a
leading shape [2, 3].
"""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern import SteerTable
from steerkern.ops import reference as R

from conftest import (
    flat_index, make_weight, rows_of, KERNEL_BACKENDS,
    COMPONENTS, DTYPES, assert_bit_exact, best_topk, check_add_steer_rmsnorm, check_sparse_linear,
    check_steer, check_steer_sparse_linear, cycling_index, fit_shape, make_table, robust_conditions,
    robust_threshold, score_of, stable_threshold_rows, stable_topk_rows,
)

dtypes = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
weight_dtypes = pytest.mark.parametrize("wdtype", list(DTYPES.values()), ids=[f"w_{k}" for k in DTYPES])

# (leading shape, d): what the kernels must get right beyond the easy case
SHAPES = [
    pytest.param((1,), 32, id="1row_d32"),
    pytest.param((4,), 13, id="4rows_d13"),
    pytest.param((3,), 1, id="3rows_d1"),
    pytest.param((2,), 67, id="2rows_d67"),
    pytest.param((0,), 16, id="0rows"),
    pytest.param((17,), 40, id="17rows_prefill"),
    pytest.param((2, 3), 24, id="lead2x3_d24"),
]
# (leading shape, in, out) for the sparse ops
SPARSE_SHAPES = [
    pytest.param((1,), 32, 16, id="1row_in32_out16"),
    pytest.param((3,), 13, 7, id="3rows_in13_out7"),
    pytest.param((2,), 1, 3, id="2rows_in1_out3"),
    pytest.param((2,), 67, 33, id="2rows_in67_out33"),
    pytest.param((3,), 8, 1, id="3rows_in8_out1"),
    pytest.param((0,), 16, 8, id="0rows"),
    pytest.param((17,), 40, 24, id="17rows_prefill"),
    pytest.param((2, 3), 24, 10, id="lead2x3_in24_out10"),
]

TABLE_KINDS = {
    "ablation": dict(components=("projection",), ablation=True),
    "clamp_partial_gain": dict(components=("projection",)),
    "addition": dict(components=("addition",)),
    "affine": dict(components=("affine",)),
    "condition": dict(components=("condition", "addition")),
    "preserve_norm": dict(components=("projection", "addition", "preserve_norm")),
    "everything_3_entries": dict(components=COMPONENTS, K=3),
}






# ------------------------------------------------------------------ steer


def run_steer(backend, h, table, index, what):
    out = steerkern.steer(h, table, index, backend=backend)
    assert out.shape == h.shape, what
    h2, idx = rows_of(h), flat_index(index)
    check_steer(rows_of(out), h2, table, idx, what)
    if idx is not None:
        off = idx == 0
        assert_bit_exact(rows_of(out)[off], h2[off], f"{what}: index-0 rows")


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_steer_matches_reference_across_shapes(backend, gen, dtype, lead, d):
    lead, d = fit_shape(backend, lead, d)
    table = make_table(d, gen, K=3)
    h = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    run_steer(backend, h, table, cycling_index(lead, 3, gen), f"steer[{backend}] {dtype} {lead}x{d}")


@dtypes
@pytest.mark.parametrize("kind", list(TABLE_KINDS))
def test_steer_matches_reference_for_each_component(backend, gen, dtype, kind):
    d = 19
    table = make_table(d, gen, **TABLE_KINDS[kind])
    h = torch.randn(4, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    run_steer(backend, h, table, cycling_index((4,), table.size, gen), f"steer[{backend}] {kind} {dtype}")


@dtypes
def test_steer_index_none_uses_the_first_entry(backend, gen, dtype):
    d = 21
    table = make_table(d, gen, K=2)
    h = torch.randn(3, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    run_steer(backend, h, table, None, f"steer[{backend}] index=None {dtype}")


@dtypes
def test_steer_with_an_empty_basis(backend, gen, dtype):
    d = 12
    table = SteerTable(d, basis=torch.zeros(2, 0, d), target=torch.zeros(2, 0), gain=torch.ones(2),
                       vec=torch.randn(2, d, generator=gen), alpha=torch.tensor([0.5, -1.0]))
    h = torch.randn(3, d, generator=gen).to(dtype)
    run_steer(backend, h, table, torch.tensor([1, 2, 0], dtype=torch.int32), f"steer[{backend}] k=0 {dtype}")


@dtypes
def test_steer_index_zero_rows_pass_through_bit_exact_even_nan(backend, gen, dtype):
    d = 10
    table = make_table(d, gen, K=2)
    h = torch.randn(4, d, generator=gen).to(dtype)
    h[0, 1], h[2, 5] = float("nan"), float("inf")
    index = torch.tensor([0, 1, 0, 2], dtype=torch.int32)
    out = steerkern.steer(h, table, index, backend=backend)
    assert_bit_exact(out[[0, 2]], h[[0, 2]], f"steer[{backend}] index-0 rows")


@pytest.mark.parametrize("magnitude", [1e-3, 1e3], ids=["tiny_values", "large_values"])
def test_steer_fp32_holds_at_other_magnitudes(backend, gen, magnitude):
    d = 33
    table = make_table(d, gen, K=2, magnitude=magnitude)
    h = torch.randn(4, d, generator=gen) * magnitude
    robust_conditions(h, table)
    run_steer(backend, h, table, cycling_index((4,), 2, gen), f"steer[{backend}] magnitude {magnitude:g}")


# ------------------------------------------------------------------ add_steer_rmsnorm


def run_add_steer_rmsnorm(backend, x, residual, weight, eps, table, index, weight_offset, what):
    r, y = steerkern.add_steer_rmsnorm(x, residual, weight, eps, table=table, index=index,
                                       weight_offset=weight_offset, backend=backend)
    assert r.shape == x.shape and y.shape == x.shape, what
    check_add_steer_rmsnorm(rows_of(r), rows_of(y), rows_of(x), None if residual is None else rows_of(residual),
                            weight, eps, weight_offset, table, flat_index(index), what)


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_add_steer_rmsnorm_matches_reference_across_shapes(backend, gen, dtype, lead, d):
    lead, d = fit_shape(backend, lead, d)
    table = make_table(d, gen, K=3)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    residual = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions((x.float() + residual.float()).to(dtype), table)
    weight = torch.rand(d, generator=gen) + 0.5
    run_add_steer_rmsnorm(backend, x, residual, weight, 1e-6, table, cycling_index(lead, 3, gen), 0.0,
                            f"add_steer_rmsnorm[{backend}] {dtype} {lead}x{d}")


VARIANTS = ["no_residual", "gemma_weight_offset", "weight_in_x_dtype", "index_none", "no_table", "eps_large"]


@dtypes
@pytest.mark.parametrize("variant", VARIANTS)
def test_add_steer_rmsnorm_variants(backend, gen, dtype, variant):
    d, eps, offset = 26, 1e-6, 0.0
    table = make_table(d, gen, K=2)
    x = torch.randn(3, d, generator=gen).to(dtype)
    residual = None if variant == "no_residual" else torch.randn(3, d, generator=gen).to(dtype)
    weight = torch.rand(d, generator=gen) + 0.5
    index = None if variant == "index_none" else cycling_index((3,), 2, gen)
    if variant == "gemma_weight_offset":
        weight, offset = torch.randn(d, generator=gen) * 0.1, 1.0
    if variant == "weight_in_x_dtype":
        weight = weight.to(dtype)
    if variant == "no_table":
        table, index = None, None
    if variant == "eps_large":
        eps = 0.5
    if table is not None:
        robust_conditions(x if residual is None else (x.float() + residual.float()).to(dtype), table)
    run_add_steer_rmsnorm(backend, x, residual, weight, eps, table, index, offset,
                            f"add_steer_rmsnorm[{backend}] {variant} {dtype}")


# ------------------------------------------------------------------ in place


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_steer_in_place_writes_what_steer_returns(backend, gen, dtype, lead, d):
    lead, d = fit_shape(backend, lead, d)
    table = make_table(d, gen, K=3)
    h = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    index = cycling_index(lead, 3, gen)
    h_in = h.clone()
    out = steerkern.steer_(h, table, index, backend=backend)
    assert out is h
    what = f"steer_[{backend}] {dtype} {lead}x{d}"
    check_steer(rows_of(h), rows_of(h_in), table, flat_index(index), what)
    assert_bit_exact(h, steerkern.steer(h_in, table, index, backend=backend), f"{what}: vs steer")


@dtypes
def test_steer_in_place_writes_through_a_strided_view(backend, gen, dtype):
    table = make_table(12, gen, K=1)
    base = torch.randn(12, 6, generator=gen).to(dtype)
    h = base.T  # [6, 12], not contiguous
    robust_conditions(h.contiguous(), table)
    want = steerkern.steer(h.contiguous(), table, backend=backend)
    steerkern.steer_(h, table, backend=backend)
    assert_bit_exact(base.T, want, f"steer_[{backend}] strided {dtype}")


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_add_steer_rmsnorm_in_place_writes_r_to_residual_and_y_to_x(backend, gen, dtype, lead, d):
    lead, d = fit_shape(backend, lead, d)
    table = make_table(d, gen, K=3)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    residual = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions((x.float() + residual.float()).to(dtype), table)
    weight = torch.rand(d, generator=gen) + 0.5
    index = cycling_index(lead, 3, gen)
    x_in, res_in = x.clone(), residual.clone()
    r, y = steerkern.add_steer_rmsnorm_(x, residual, weight, 1e-6, table=table, index=index, backend=backend)
    assert r is residual and y is x
    what = f"add_steer_rmsnorm_[{backend}] {dtype} {lead}x{d}"
    check_add_steer_rmsnorm(rows_of(residual), rows_of(x), rows_of(x_in), rows_of(res_in), weight, 1e-6, 0.0,
                            table, flat_index(index), what)
    r2, y2 = steerkern.add_steer_rmsnorm(x_in, res_in, weight, 1e-6, table=table, index=index, backend=backend)
    assert_bit_exact(residual, r2, f"{what}: r vs add_steer_rmsnorm")
    assert_bit_exact(x, y2, f"{what}: y vs add_steer_rmsnorm")


# ------------------------------------------------------------------ sparse_linear

SPARSE_MODES = ["teal_threshold", "wina_threshold", "teal_topk", "wina_topk"]




def sparsity_for(mode, score, dtype):
    """(threshold, topk) for the mode, placed where rounding cannot move decisions."""
    if mode.endswith("threshold"):
        return robust_threshold(score), None
    return 0.0, best_topk(score, dtype)


def run_sparse_linear(backend, x, sw, threshold, topk, what):
    y = steerkern.sparse_linear(x, sw, threshold=threshold, topk=topk, backend=backend)
    assert y.shape == (*x.shape[:-1], sw.out_features), what
    check_sparse_linear(rows_of(y), rows_of(x), sw, torch.tensor(threshold, dtype=torch.float32),
                        -1 if topk is None else topk, what)


@dtypes
@weight_dtypes
@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_sparse_linear_matches_reference_for_each_dtype_pair(backend, gen, dtype, wdtype, mode):
    n_in, n_out = 37, 19
    sw = make_weight(gen, n_in, n_out, wdtype, mode)
    x = torch.randn(3, n_in, generator=gen).to(dtype)
    threshold, topk = sparsity_for(mode, score_of(x, sw.scale), dtype)
    run_sparse_linear(backend, x, sw, threshold, topk, f"sparse_linear[{backend}] {mode} x {dtype} w {wdtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["wina_threshold", "teal_topk"])
@pytest.mark.parametrize("lead, n_in, n_out", SPARSE_SHAPES)
def test_sparse_linear_matches_reference_across_shapes(backend, gen, dtype, mode, lead, n_in, n_out):
    lead, n_in, n_out = fit_shape(backend, lead, n_in, n_out)
    sw = make_weight(gen, n_in, n_out, dtype, mode)
    x = torch.randn(*lead, n_in, generator=gen).to(dtype)
    threshold, topk = sparsity_for(mode, score_of(rows_of(x), sw.scale), dtype)
    run_sparse_linear(backend, x, sw, threshold, topk,
                        f"sparse_linear[{backend}] {mode} {dtype} {lead}x{n_in}->{n_out}")


@pytest.fixture
def two_threads():
    """The C++ kernel splits narrow layers over inputs only with 2+ threads."""
    if "cpu" not in KERNEL_BACKENDS:
        pytest.skip("C++ CPU backend not built")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_cpu_sparse_linear_narrow_layers_split_over_inputs_match_reference(gen, two_threads, dtype, rows):
    # 2048 x 256: a thread's column slice of a W^T row is short, so the C++
    # kernel splits the inputs over the threads and adds partial sums
    sw = make_weight(gen, 2048, 256, dtype, "wina")
    x = torch.randn(rows, 2048, generator=gen).to(dtype)
    threshold = robust_threshold(score_of(x, sw.scale))
    run_sparse_linear("cpu", x, sw, threshold, None,
                      f"sparse_linear split-K {dtype} {rows} rows")


@pytest.fixture(params=["avx512bf16", "avx512", "avx2+fma", "portable"])
def instruction_set(request):
    """Each instruction set of the C++ kernels this machine can run, in turn."""
    if "cpu" not in KERNEL_BACKENDS:
        pytest.skip("C++ CPU backend not built")
    from steerkern.kernels import cpu as cpu_kernels
    ext = cpu_kernels._ext
    before = ext.cpu_capability()
    got = ext.set_capability(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param} (the kernels would use {got})")
        yield got
    finally:
        ext.set_capability(before)


@pytest.mark.parametrize("xdtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                            (torch.float32, torch.float32)], ids=["x_bf16_w_bf16", "x_fp32_w_bf16", "fp32"])
@pytest.mark.parametrize("rows, n_in, n_out", [(1, 45, 100), (3, 45, 100), (9, 45, 100), (2, 2048, 256)],
                         ids=["1row", "3rows", "9rows", "split_inputs"])
def test_cpu_sparse_linear_each_instruction_set_matches_reference(gen, two_threads, instruction_set, xdtype,
                                                                  wdtype, rows, n_in, n_out):
    # n_in odd: an odd count of active rows (a last row without a partner in
    # the bf16 pair pass); n_out = 3 blocks of 32 columns and a tail of 4
    sw = make_weight(gen, n_in, n_out, wdtype, "wina")
    x = torch.randn(rows, n_in, generator=gen).to(xdtype)
    for threshold in (0.0, robust_threshold(score_of(x, sw.scale))):
        run_sparse_linear("cpu", x, sw, threshold, None,
                          f"sparse_linear[{instruction_set}] x {xdtype} w {wdtype} {rows}x{n_in}->{n_out} t={threshold}")


@pytest.mark.parametrize("rows, n_in, n_out", [(1, 45, 100), (5, 301, 4096), (3, 2048, 256)],
                         ids=["1row", "5rows_split_columns", "3rows_split_inputs"])
def test_cpu_bf16_dot_product_pass_is_bit_identical_to_the_widening_pass(gen, two_threads, rows, n_in, n_out):
    # vdpbf16ps adds its two exact products one after the other in row order,
    # so it must reproduce the AVX-512 widening FMAs bit for bit
    from steerkern.kernels import cpu as cpu_kernels
    ext = cpu_kernels._ext
    before = ext.cpu_capability()
    try:
        if ext.set_capability("avx512bf16") != "avx512bf16":
            pytest.skip("this CPU has no AVX512-BF16")
        sw = make_weight(gen, n_in, n_out, torch.bfloat16, "wina")
        x = torch.randn(rows, n_in, generator=gen).to(torch.bfloat16)
        threshold = robust_threshold(score_of(x, sw.scale))
        for t in (0.0, threshold):
            dot = steerkern.sparse_linear(x, sw, threshold=t, backend="cpu")
            ext.set_capability("avx512")
            widen = steerkern.sparse_linear(x, sw, threshold=t, backend="cpu")
            ext.set_capability("avx512bf16")
            assert_bit_exact(dot, widen, f"avx512bf16 vs avx512, {rows}x{n_in}->{n_out}, t={t}")
    finally:
        ext.set_capability(before)


@pytest.mark.parametrize("n_out", [256, 4096], ids=["split_inputs", "split_columns"])
def test_cpu_sparse_linear_batched_rows_equal_each_row_alone_bit_for_bit(gen, two_threads, n_out):
    sw = make_weight(gen, 2048, n_out, torch.bfloat16, "wina")
    x = torch.randn(5, 2048, generator=gen).to(torch.bfloat16)
    threshold = robust_threshold(score_of(x, sw.scale))
    together = steerkern.sparse_linear(x, sw, threshold=threshold, backend="cpu")
    for r in range(5):
        alone = steerkern.sparse_linear(x[r:r + 1], sw, threshold=threshold, backend="cpu")
        assert_bit_exact(together[r:r + 1], alone,
                         f"row {r} of 5 vs alone, out={n_out}")


def _x_with(case, gen, n_in):
    x = torch.randn(4, n_in, generator=gen)
    if case == "zeros_in_x":
        x[:, ::3] = 0.0
    if case == "nan_in_threshold_mode":
        x[1, 4] = float("nan")
    if case == "nan_ranks_first_in_topk":
        x[2, 7] = float("nan")
    if case == "topk_ties_lower_index_wins":
        x = torch.round(x * 2) / 2  # many equal magnitudes
    return x


EDGE_CASES = {
    # case: (threshold, topk, bias)
    "threshold0_is_dense": (0.0, None, True),
    "zeros_in_x": (0.0, None, True),
    "topk_all_is_dense": (0.0, "all", True),
    "topk0_gives_bias_only": (0.0, 0, True),
    "huge_threshold_gives_bias_only": (1e30, None, True),
    "full_sparsity_without_bias_is_zero": (1e30, None, False),
    "no_bias": (0.5, None, False),
    "nan_in_threshold_mode": (0.5, None, True),
    "nan_ranks_first_in_topk": (0.0, 3, True),
    "topk_ties_lower_index_wins": (0.0, 5, True),
}


@dtypes
@pytest.mark.parametrize("mode", ["teal", "wina"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_sparse_linear_edge_cases(backend, gen, dtype, mode, case):
    n_in, n_out = 16, 6
    threshold, topk, bias = EDGE_CASES[case]
    topk = n_in if topk == "all" else topk
    sw = make_weight(gen, n_in, n_out, torch.float32, mode, bias=bias)
    x = _x_with(case, gen, n_in).to(dtype)
    run_sparse_linear(backend, x, sw, threshold, topk, f"sparse_linear[{backend}] {case} {mode} {dtype}")


def test_sparse_linear_rows_get_their_own_topk_masks(backend, gen):
    n_in = 12
    sw = make_weight(gen, n_in, 5, torch.float32, "teal")
    x = torch.full((3, n_in), 0.01)
    x[0, 1], x[1, 6], x[2, 11] = 5.0, -4.0, 3.0
    y = steerkern.sparse_linear(x, sw, topk=1, backend=backend)
    for r, i in enumerate((1, 6, 11)):
        expected = x[r, i].double() * sw.weight_t[i].double() + sw.bias.double()
        torch.testing.assert_close(y[r].double(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ steer_sparse_linear


def run_steer_sparse_linear(backend, h, table, index, sw, mode, what):
    h2, idx = rows_of(h), flat_index(index)
    tensors = table.tensors() if table is not None else (None,) * len(SteerTable.tensor_names())
    score = score_of(R.steer(h2, idx, *tensors, acc=torch.float64), sw.scale)
    threshold, topk = sparsity_for(mode, score, h.dtype)
    k = -1 if topk is None else topk
    keep = (stable_threshold_rows(score, threshold, h.dtype) if topk is None
            else stable_topk_rows(score, k, h.dtype))
    assert h2.shape[0] == 0 or bool(keep.any()), f"{what}: every row's decisions are fragile; change the seed"
    y = steerkern.steer_sparse_linear(h, table, sw, index, threshold=threshold, topk=topk, backend=backend)
    assert y.shape == (*h.shape[:-1], sw.out_features), what
    check_steer_sparse_linear(rows_of(y), h2, table, idx, sw, torch.tensor(threshold, dtype=torch.float32), k,
                              what, keep_rows=keep)


@dtypes
@weight_dtypes
@pytest.mark.parametrize("mode", ["wina_threshold", "teal_topk"])
def test_steer_sparse_linear_matches_reference_for_each_dtype_pair(backend, gen, dtype, wdtype, mode):
    d, n_out = 29, 11
    table = make_table(d, gen, K=3)
    sw = make_weight(gen, d, n_out, wdtype, mode)
    h = torch.randn(4, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    run_steer_sparse_linear(backend, h, table, cycling_index((4,), 3, gen), sw, mode,
                              f"steer_sparse_linear[{backend}] {mode} h {dtype} w {wdtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead, d, n_out", SPARSE_SHAPES)
def test_steer_sparse_linear_matches_reference_across_shapes(backend, gen, dtype, lead, d, n_out):
    lead, d, n_out = fit_shape(backend, lead, d, n_out)
    table = make_table(d, gen, K=2)
    sw = make_weight(gen, d, n_out, dtype, "wina_threshold")
    h = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    run_steer_sparse_linear(backend, h, table, cycling_index(lead, 2, gen), sw, "wina_threshold",
                              f"steer_sparse_linear[{backend}] {dtype} {lead}x{d}->{n_out}")


@pytest.mark.parametrize("variant", ["index_none", "no_table", "no_bias_topk"])
def test_steer_sparse_linear_variants(backend, gen, variant):
    d = 20
    table = make_table(d, gen, K=2)
    sw = make_weight(gen, d, 7, torch.float32, "wina_topk" if variant == "no_bias_topk" else "wina_threshold",
                     bias=variant != "no_bias_topk")
    h = torch.randn(3, d, generator=gen)
    robust_conditions(h, table)
    index = cycling_index((3,), 2, gen)
    if variant == "index_none":
        index = None
    if variant == "no_table":
        table, index = None, None
    mode = "wina_topk" if variant == "no_bias_topk" else "wina_threshold"
    run_steer_sparse_linear(backend, h, table, index, sw, mode, f"steer_sparse_linear[{backend}] {variant}")


@pytest.mark.parametrize("sparsity", [{"threshold": 1e30}, {"topk": 0}], ids=["huge_threshold", "topk0"])
def test_steer_sparse_linear_at_full_sparsity_gives_the_bias_only(backend, gen, sparsity):
    d = 9
    table = make_table(d, gen, K=1)
    sw = make_weight(gen, d, 4, torch.float32, "wina")
    h = torch.randn(2, d, generator=gen)
    y = steerkern.steer_sparse_linear(h, table, sw, **sparsity, backend=backend)
    assert torch.equal(y, sw.bias.expand(2, 4))
