"""pytest-benchmark cases for the C++ CPU kernels (small shapes).

Not part of the test suite (testpaths = tests); run them with

    python -m pytest bench/test_bench_ops_cpu.py --benchmark-enable

Each case first checks the kernel against the reference once, so a fast but
wrong kernel fails instead of being timed.  bench_ops_cpu.py is the full
benchmark with ratios to the memory bound.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import steerkern
from steerkern import SparseWeight, SteerEntry, SteerTable
from steerkern.kernels import cpu as cpu_kernels
from steerkern.ops import reference as R

pytestmark = pytest.mark.skipif(cpu_kernels._ext is None, reason="C++ CPU kernels not built")

D = 1024
IN, OUT = 1024, 2816


def _table(d: int) -> SteerTable:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(d, generator=g)
    return SteerTable.from_entries(
        [SteerEntry(directions=q / q.norm(), vector=torch.randn(d, generator=g), alpha=2.0)], d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_sparse_linear_decode(benchmark, dtype, sparsity):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(OUT, IN, generator=g) / IN ** 0.5
    sw = SparseWeight.from_linear(W, mode="wina", dtype=dtype)
    x = torch.randn(1, IN, generator=g).to(dtype)
    scores = x.float().abs() * sw.scale
    thr = torch.tensor(float(scores.quantile(sparsity)) if sparsity else 0.0)
    ext = cpu_kernels._ext
    want = R.sparse_linear(x, sw.weight_t, None, sw.scale, thr, -1, acc=torch.float64)
    got = ext.sparse_linear(x, sw.weight_t, None, sw.scale, thr, -1)
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)
    benchmark(ext.sparse_linear, x, sw.weight_t, None, sw.scale, thr, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_dense_matvec(benchmark, dtype):
    """The baseline: torch's dense matvec of the same nn.Linear weight."""
    W = torch.randn(OUT, IN).to(dtype)
    x = torch.randn(1, IN).to(dtype)
    benchmark(F.linear, x, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 512])
def test_steer(benchmark, dtype, tokens):
    table = _table(D)
    h = torch.randn(tokens, D).to(dtype)
    ext = cpu_kernels._ext
    got = ext.steer(h, None, *table.tensors())
    want = R.steer(h, None, *table.tensors(), acc=torch.float64)
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)
    benchmark(ext.steer, h, None, *table.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steer_public_api_one_token(benchmark, dtype):
    """Per-call cost through steerkern.steer (argument checks, dispatcher)."""
    table = _table(D)
    h = torch.randn(1, D).to(dtype)
    want = R.steer(h, None, *table.tensors(), acc=torch.float64)
    torch.testing.assert_close(steerkern.steer(h, table).double(), want.double(), rtol=2e-2, atol=2e-2)
    benchmark(steerkern.steer, h, table)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_steer_rmsnorm(benchmark, dtype):
    table = _table(D)
    x = torch.randn(512, D).to(dtype)
    res = torch.randn(512, D).to(dtype)
    w = (torch.rand(D) + 0.5).to(dtype)
    ext = cpu_kernels._ext
    r, y = ext.add_steer_rmsnorm(x, res, w, 1e-6, 0.0, None, *table.tensors())
    r64, y64 = R.add_steer_rmsnorm(x, res, w, 1e-6, 0.0, None, *table.tensors(), acc=torch.float64)
    torch.testing.assert_close(r.double(), r64.double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y64.double(), rtol=2e-2, atol=5e-2)
    benchmark(ext.add_steer_rmsnorm, x, res, w, 1e-6, 0.0, None, *table.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steer_in_place(benchmark, dtype):
    table = _table(D)
    h = torch.randn(512, D).to(dtype)
    ext = cpu_kernels._ext
    want = R.steer(h, None, *table.tensors(), acc=torch.float64)
    got = h.clone()
    ext.steer_(got, None, *table.tensors())
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)
    benchmark(ext.steer_, got, None, *table.tensors())  # steering again and again: the values stay finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cache", [48, 512])
@pytest.mark.parametrize("impl", ["steerkern", "sdpa"])
def test_decode_attention(benchmark, dtype, cache, impl):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 1, 64, generator=g).to(dtype)
    k = torch.randn(1, 4, cache, 64, generator=g).to(dtype)
    v = torch.randn(1, 4, cache, 64, generator=g).to(dtype)
    want = R.decode_attention(q.double(), k.double(), v.double(), 0.125)
    if impl == "steerkern":
        fn = lambda: cpu_kernels._ext.decode_attention(q, k, v, 0.125)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True).transpose(1, 2)  # noqa: E731
    torch.testing.assert_close(fn().double(), want, rtol=2e-2, atol=2e-2)
    benchmark(fn)
