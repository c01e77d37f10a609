"""The triton and cuda backends on CUDA tensors, against steerkern.ops.reference.

The same rules as the CPU backends (tests/conftest.py): fp32 within 1e-5 of
the fp64 reference relative to the size of the terms, bf16/fp16 at most twice
torch's own error in that dtype; index-0 rows bit-exact.  Cases are built on
the CPU, run on the GPU, and compared on the CPU.  On top: decode and
prefill sizes of real models, the paths only a GPU takes (rows longer than
one Triton block, unaligned weights, the dense fallback), CUDA-graph capture
and replay with inputs changed in place, and no host synchronization inside
an op.  Skipped without a GPU.
"""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern import SparseWeight, backends
from steerkern.ops import library, reference as R

import conftest as oracle
from conftest import (
    flat_index, make_weight, rows_of,
    COMPONENTS, DTYPES, assert_bit_exact, best_topk, cycling_index, make_table, robust_conditions,
    robust_threshold, score_of, stable_threshold_rows, stable_topk_rows,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

dtypes = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
weight_dtypes = pytest.mark.parametrize("wdtype", list(DTYPES.values()), ids=[f"w_{k}" for k in DTYPES])
CUDA = torch.device("cuda")


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    name = request.param
    if not backends.available(name, "cuda"):
        why = backends._UNAVAILABLE.get(name, "not registered")
        pytest.fail(f"backend {name!r} cannot run on this GPU machine: {why}")
    return name


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


def gpu_weight(sw: SparseWeight) -> SparseWeight:
    move = lambda t: None if t is None else t.to(CUDA)  # noqa: E731
    return SparseWeight(move(sw.weight_t), move(sw.bias), move(sw.scale))








# ------------------------------------------------------------------ steer

SHAPES = [
    pytest.param((1,), 4096, id="decode_1x4096"),
    pytest.param((8,), 4096, id="decode_8x4096"),
    pytest.param((3,), 12288, id="long_rows_3x12288"),
    pytest.param((257,), 896, id="prefill_257x896"),
    pytest.param((4,), 13, id="4x13"),
    pytest.param((3,), 1, id="d1"),
    pytest.param((0,), 64, id="0rows"),
    pytest.param((2, 3), 24, id="lead2x3"),
]

TABLE_KINDS = {
    "ablation": dict(components=("projection",), ablation=True),
    "clamp": dict(components=("projection",), k=5),
    "addition": dict(components=("addition",)),
    "affine": dict(components=("affine",)),
    "condition": dict(components=("condition", "addition")),
    "preserve_norm": dict(components=("projection", "addition", "preserve_norm")),
    "everything_4_entries": dict(components=COMPONENTS, K=4, k=9),
}


def check_steer(backend, h, table, index, what):
    out = steerkern.steer(h.to(CUDA), table.to(CUDA), None if index is None else index.to(CUDA),
                          backend=backend).cpu()
    assert out.shape == h.shape, what
    h2, idx = rows_of(h), flat_index(index)
    oracle.check_steer(rows_of(out), h2, table, idx, what)
    if idx is not None:
        assert_bit_exact(rows_of(out)[idx == 0], h2[idx == 0], f"{what}: index-0 rows")


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_steer_matches_reference_across_shapes(backend, gen, dtype, lead, d):
    table = make_table(d, gen, K=3)
    h = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    check_steer(backend, h, table, cycling_index(lead, 3, gen), f"steer[{backend}] {dtype} {lead}x{d}")


@dtypes
@pytest.mark.parametrize("kind", list(TABLE_KINDS))
def test_steer_matches_reference_for_each_component(backend, gen, dtype, kind):
    d = 1000
    table = make_table(d, gen, **TABLE_KINDS[kind])
    h = torch.randn(6, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    check_steer(backend, h, table, cycling_index((6,), table.size, gen), f"steer[{backend}] {kind} {dtype}")


@dtypes
def test_steer_index_none_uses_the_first_entry(backend, gen, dtype):
    table = make_table(96, gen, K=2)
    h = torch.randn(5, 96, generator=gen).to(dtype)
    robust_conditions(h, table)
    check_steer(backend, h, table, None, f"steer[{backend}] index=None {dtype}")


@dtypes
def test_steer_index_zero_rows_pass_through_bit_exact_even_nan(backend, gen, dtype):
    d = 300
    table = make_table(d, gen, K=2)
    h = torch.randn(4, d, generator=gen).to(dtype)
    h[0, 1], h[2, 5] = float("nan"), float("inf")
    index = torch.tensor([0, 1, 0, 2], dtype=torch.int32)
    out = steerkern.steer(h.to(CUDA), table.to(CUDA), index.to(CUDA), backend=backend).cpu()
    assert_bit_exact(out[[0, 2]], h[[0, 2]], f"steer[{backend}] index-0 rows")


@pytest.mark.parametrize("op", ["steer", "add_steer_rmsnorm"])
def test_out_of_range_index_means_no_steering_at_kernel_level(backend, gen, op):
    d = 257
    table = make_table(d, gen, K=2, components=("addition",)).to(CUDA)
    x = torch.randn(4, d, generator=gen).to(torch.bfloat16).to(CUDA)
    index = torch.tensor([3, -1, 1000, 1], dtype=torch.int32, device=CUDA)
    fn = backends.select(op, "cuda", backend)
    if op == "steer":
        out = fn(x, index, *table.tensors())
        assert_bit_exact(out[:3].cpu(), x[:3].cpu(), "out-of-range rows")
    else:
        res = torch.randn(4, d, generator=gen).to(torch.bfloat16).to(CUDA)
        r, _ = fn(x, res, torch.ones(d, device=CUDA), 1e-6, 0.0, index, *table.tensors())
        assert_bit_exact(r[:3].cpu(), (x[:3].float() + res[:3].float()).to(torch.bfloat16).cpu(), "rows")


# ------------------------------------------------------------------ add_steer_rmsnorm


def check_add_steer_rmsnorm(backend, x, residual, weight, eps, table, index, weight_offset, what):
    move = lambda t: None if t is None else t.to(CUDA)  # noqa: E731
    r, y = steerkern.add_steer_rmsnorm(move(x), move(residual), move(weight), eps,
                                       table=None if table is None else table.to(CUDA), index=move(index),
                                       weight_offset=weight_offset, backend=backend)
    assert r.shape == x.shape and y.shape == x.shape, what
    x2, idx = rows_of(x), flat_index(index)
    res2 = None if residual is None else rows_of(residual)
    r, y = rows_of(r.cpu()), rows_of(y.cpu())
    oracle.check_add_steer_rmsnorm(r, y, x2, res2, weight, eps, weight_offset, table, idx, what)
    if idx is not None:
        summed = x2 if res2 is None else (x2.float() + res2.float()).to(x.dtype)
        assert_bit_exact(r[idx == 0], summed[idx == 0], f"{what}: index-0 rows")


@dtypes
@pytest.mark.parametrize("lead, d", SHAPES)
def test_add_steer_rmsnorm_matches_reference_across_shapes(backend, gen, dtype, lead, d):
    table = make_table(d, gen, K=3)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    residual = torch.randn(*lead, d, generator=gen).to(dtype)
    robust_conditions((x.float() + residual.float()).to(dtype), table)
    weight = torch.rand(d, generator=gen) + 0.5
    check_add_steer_rmsnorm(backend, x, residual, weight, 1e-6, table, cycling_index(lead, 3, gen), 0.0,
                            f"add_steer_rmsnorm[{backend}] {dtype} {lead}x{d}")


@dtypes
@pytest.mark.parametrize("d", [2048, 12288], ids=["d2048", "long_rows"])
def test_in_place_ops_write_what_the_out_of_place_ops_return(backend, gen, dtype, d):
    table = make_table(d, gen, K=2).to(CUDA)
    index = cycling_index((5,), 2, gen).to(CUDA)
    h = torch.randn(5, d, generator=gen).to(dtype).to(CUDA)
    want = steerkern.steer(h, table, index, backend=backend)
    steerkern.steer_(h, table, index, backend=backend)
    assert_bit_exact(h.cpu(), want.cpu(), f"steer_[{backend}] {dtype} d={d}")
    x, residual = h.clone(), torch.randn(5, d, generator=gen).to(dtype).to(CUDA)
    weight = (torch.rand(d, generator=gen) + 0.5).to(CUDA)
    r, y = steerkern.add_steer_rmsnorm(x, residual, weight, 1e-6, table=table, index=index, backend=backend)
    steerkern.add_steer_rmsnorm_(x, residual, weight, 1e-6, table=table, index=index, backend=backend)
    assert_bit_exact(residual.cpu(), r.cpu(), f"add_steer_rmsnorm_[{backend}] r")
    assert_bit_exact(x.cpu(), y.cpu(), f"add_steer_rmsnorm_[{backend}] y")


@dtypes
@pytest.mark.parametrize("variant", ["no_residual", "gemma_weight_offset", "weight_in_x_dtype", "index_none",
                                     "no_table", "long_rows"])
def test_add_steer_rmsnorm_variants(backend, gen, dtype, variant):
    d, eps, offset = 12288 if variant == "long_rows" else 2048, 1e-6, 0.0
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
    if table is not None:
        robust_conditions(x if residual is None else (x.float() + residual.float()).to(dtype), table)
    check_add_steer_rmsnorm(backend, x, residual, weight, eps, table, index, offset,
                            f"add_steer_rmsnorm[{backend}] {variant} {dtype}")


# ------------------------------------------------------------------ sparse_linear


def sparsity_for(mode, score, dtype):
    """(threshold, topk) placed where rounding cannot move decisions (large
    inputs: topk = in/3, and the caller keeps the rows whose boundary is robust)."""
    if mode.endswith("threshold"):
        return robust_threshold(score), None
    return 0.0, best_topk(score, dtype) if score.shape[1] <= 1024 else score.shape[1] // 3


def check_sparse_linear(backend, x, sw, threshold, topk, what, keep_rows=None):
    y = steerkern.sparse_linear(x.to(CUDA), gpu_weight(sw), threshold=threshold, topk=topk,
                                backend=backend).cpu()
    assert y.shape == (*x.shape[:-1], sw.out_features), what
    x2, y2 = rows_of(x), rows_of(y)
    t, k = torch.tensor(threshold, dtype=torch.float32), -1 if topk is None else topk
    if keep_rows is not None:  # leave out rows whose decisions sit within rounding of the boundary
        x2, y2 = x2[keep_rows], y2[keep_rows]
    oracle.check_sparse_linear(y2, x2, sw, t, k, what)


@dtypes
@weight_dtypes
@pytest.mark.parametrize("mode", ["teal_threshold", "wina_threshold", "teal_topk", "wina_topk"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_sparse_linear_decode_batches_for_each_dtype_pair(backend, gen, dtype, wdtype, mode, rows):
    n_in, n_out = 512, 384
    sw = make_weight(gen, n_in, n_out, wdtype, mode)
    x = torch.randn(rows, n_in, generator=gen).to(dtype)
    threshold, topk = sparsity_for(mode, score_of(x, sw.scale), dtype)
    check_sparse_linear(backend, x, sw, threshold, topk, f"sparse_linear[{backend}] {mode} {rows} rows "
                                                         f"x {dtype} w {wdtype}")


SPARSE_SHAPES = [
    pytest.param((1,), 4096, 4096, id="decode_1_4096x4096"),
    pytest.param((8,), 4096, 1024, id="decode_8_4096x1024"),
    pytest.param((4,), 14336, 512, id="down_proj_4_14336x512"),
    pytest.param((3,), 13, 7, id="3_13x7"),
    pytest.param((2,), 1, 3, id="in1"),
    pytest.param((3,), 67, 37, id="unaligned_out37"),
    pytest.param((3,), 8, 1, id="out1"),
    pytest.param((0,), 16, 8, id="0rows"),
    pytest.param((9,), 256, 128, id="9rows_dense_fallback"),
    pytest.param((64,), 512, 256, id="prefill_64"),
    pytest.param((2, 3), 24, 10, id="lead2x3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["wina_threshold", "teal_topk"])
@pytest.mark.parametrize("lead, n_in, n_out", SPARSE_SHAPES)
def test_sparse_linear_matches_reference_across_shapes(backend, gen, dtype, mode, lead, n_in, n_out):
    sw = make_weight(gen, n_in, n_out, dtype, mode)
    x = torch.randn(*lead, n_in, generator=gen).to(dtype)
    score = score_of(rows_of(x), sw.scale)
    threshold, topk = sparsity_for(mode, score, dtype)
    keep = (stable_threshold_rows(score, threshold, dtype) if topk is None
            else stable_topk_rows(score, topk, dtype))
    check_sparse_linear(backend, x, sw, threshold, topk,
                        f"sparse_linear[{backend}] {mode} {dtype} {lead}x{n_in}->{n_out}", keep_rows=keep)


def test_mixed_dtypes_in_a_prefill_stay_exact(backend, gen):
    # above the crossover with x fp32 and W bf16 there is no dense fallback: row groups of the kernel
    sw = make_weight(gen, 300, 70, torch.bfloat16, "wina")
    x = torch.randn(21, 300, generator=gen)
    check_sparse_linear(backend, x, sw, robust_threshold(score_of(x, sw.scale)), None,
                        f"sparse_linear[{backend}] mixed prefill")


def _x_with(case, gen, n_in):
    x = torch.randn(4, n_in, generator=gen)
    if case == "nan_in_threshold_mode":
        x[1, 4] = float("nan")
    if case == "nan_ranks_first_in_topk":
        x[2, 7] = float("nan")
    if case == "topk_ties_lower_index_wins":
        x = torch.round(x * 2) / 2
    return x


EDGE_CASES = {
    "threshold0_is_dense": (0.0, None, True),
    "topk_all_is_dense": (0.0, "all", True),
    "topk0_gives_bias_only": (0.0, 0, True),
    "huge_threshold_gives_bias_only": (1e30, None, True),
    "full_sparsity_without_bias_is_zero": (1e30, None, False),
    "nan_in_threshold_mode": (0.5, None, True),
    "nan_ranks_first_in_topk": (0.0, 3, True),
    "topk_ties_lower_index_wins": (0.0, 100, True),
}


@dtypes
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_sparse_linear_edge_cases(backend, gen, dtype, case):
    n_in, n_out = 256, 40
    threshold, topk, bias = EDGE_CASES[case]
    topk = n_in if topk == "all" else topk
    sw = make_weight(gen, n_in, n_out, torch.float32, "wina", bias=bias)
    x = _x_with(case, gen, n_in).to(dtype)
    check_sparse_linear(backend, x, sw, threshold, topk, f"sparse_linear[{backend}] {case} {dtype}")


def test_sparse_linear_rows_get_their_own_masks(backend, gen):
    n_in = 1024
    sw = make_weight(gen, n_in, 33, torch.float32, "teal")
    x = torch.full((4, n_in), 0.01)
    for r in range(4):
        x[r, r::4] = 1.0 + r
    y = steerkern.sparse_linear(x.to(CUDA), gpu_weight(sw), threshold=0.5, backend=backend).cpu()
    own = torch.where(x.abs() > 0.5, x, torch.zeros(())).double()
    torch.testing.assert_close(y.double(), own @ sw.weight_t.double() + sw.bias.double(), rtol=1e-5, atol=1e-5)


def test_sparse_linear_leaves_the_bias_alone(backend, gen):
    sw = gpu_weight(make_weight(gen, 64, 16, torch.float32, "wina"))
    before = sw.bias.clone()
    steerkern.sparse_linear(torch.randn(1, 64, device=CUDA), sw, threshold=0.1, backend=backend)
    assert torch.equal(sw.bias, before)


# ------------------------------------------------------------------ steer_sparse_linear


@dtypes
@weight_dtypes
@pytest.mark.parametrize("mode", ["wina_threshold", "teal_topk"])
@pytest.mark.parametrize("rows", [1, 4, 12])
def test_steer_sparse_linear_matches_reference(backend, gen, dtype, wdtype, mode, rows):
    d, n_out = 768, 200
    table = make_table(d, gen, K=3)
    sw = make_weight(gen, d, n_out, wdtype, mode)
    h = torch.randn(rows, d, generator=gen).to(dtype)
    robust_conditions(h, table)
    index = cycling_index((rows,), 3, gen)
    idx = flat_index(index)
    steered = R.steer(h, idx, *table.tensors(), acc=torch.float64)
    score = score_of(steered, sw.scale)
    threshold, topk = sparsity_for(mode, score, dtype)
    k = -1 if topk is None else topk
    keep = stable_threshold_rows(score, threshold, dtype) if topk is None else stable_topk_rows(score, k, dtype)
    y = steerkern.steer_sparse_linear(h.to(CUDA), table.to(CUDA), gpu_weight(sw), index.to(CUDA),
                                      threshold=threshold, topk=topk, backend=backend).cpu()
    oracle.check_steer_sparse_linear(y, h, table, idx, sw, torch.tensor(threshold, dtype=torch.float32), k,
                                     f"steer_sparse_linear[{backend}] {mode} {rows} rows h {dtype} w {wdtype}",
                                     keep_rows=keep)


# ------------------------------------------------------------------ graphs and synchronization


def _graph_case(gen, op, dtype=torch.bfloat16, rows=4, d=1024, n_out=512):
    """The op as a closure over static CUDA inputs, and a function that writes new inputs in place."""
    table = make_table(d, gen, K=2).to(CUDA)
    sw = gpu_weight(make_weight(gen, d, n_out, dtype, "wina"))
    h = torch.randn(rows, d, generator=gen).to(dtype).to(CUDA)
    res = torch.randn(rows, d, generator=gen).to(dtype).to(CUDA)
    w = (torch.rand(d, generator=gen) + 0.5).to(CUDA)
    index = torch.tensor([1, 0, 2, 1][:rows], dtype=torch.int32, device=CUDA)
    threshold = torch.tensor(0.5, device=CUDA)

    tab = table.tensors()

    def run(backend):
        # the torch ops themselves: the public functions check arguments on the host first
        if op == "steer":
            return library.op("steer")(h, index, *tab, backend=backend)
        if op == "add_steer_rmsnorm":
            return library.op("add_steer_rmsnorm")(h, res, w, 1e-6, 0.0, index, *tab, backend=backend)
        if op == "sparse_linear":
            return library.op("sparse_linear")(h, sw.weight_t, sw.bias, sw.scale, threshold, -1, backend=backend)
        if op == "sparse_linear_topk":
            return library.op("sparse_linear")(h, sw.weight_t, sw.bias, sw.scale, threshold, d // 3,
                                               backend=backend)
        return library.op("steer_sparse_linear")(h, index, *tab, sw.weight_t, sw.bias, sw.scale, threshold, -1,
                                                 backend=backend)

    def change_inputs():
        h.copy_(torch.randn(rows, d, generator=gen).to(dtype))
        index.copy_(torch.tensor([2, 1, 0, 2][:rows], dtype=torch.int32))
        threshold.fill_(0.25)

    return run, change_inputs


GRAPH_OPS = ["steer", "add_steer_rmsnorm", "sparse_linear", "sparse_linear_topk", "steer_sparse_linear"]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("op", GRAPH_OPS)
def test_ops_capture_in_a_cuda_graph_and_replay_with_new_inputs(backend, gen, op):
    run, change_inputs = _graph_case(gen, op)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile and allocate outside the capture
        for _ in range(2):
            run(backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _outputs(run(backend))
    change_inputs()
    graph.replay()
    torch.cuda.synchronize()
    eager = _outputs(run(backend))
    for got, want in zip(static, eager):
        if op.startswith("sparse") or op == "steer_sparse_linear":  # split-K atomics: order may differ
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        else:
            assert_bit_exact(got.cpu(), want.cpu(), f"{op}[{backend}] graph replay")


@pytest.mark.parametrize("op", GRAPH_OPS)
def test_ops_never_synchronize_with_the_host(backend, gen, op):
    run, _ = _graph_case(gen, op)
    run(backend)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
