"""The torch.library registration: opcheck on every op and backend, and
torch.compile(fullgraph=True) through the public API."""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern import SparseWeight, SteerEntry, SteerTable

from conftest import IMPLS, random_basis

D, OUT = 8, 5
ops = torch.ops.steerkern
# opcheck's own use of torch.jit, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def full_table(gen):
    return SteerTable.from_entries([
        SteerEntry(directions=random_basis(2, D, gen), target=[0.5, -1.0], gain=0.7,
                   vector=torch.randn(D, generator=gen), alpha=0.3, scale=torch.rand(D, generator=gen) + 0.5,
                   shift=torch.randn(D, generator=gen), condition=torch.randn(D, generator=gen), threshold=-0.9,
                   preserve_norm=True),
        SteerEntry(vector=torch.randn(D, generator=gen)),
    ], D)


def op_args(name, gen, variant):
    """Representative positional args of torch.ops.steerkern.<name> (backend excluded)."""
    table = full_table(gen).tensors()
    h = torch.randn(2, 3, D, generator=gen)
    index = None if variant == "index_none" else torch.tensor([[0, 1, 2], [2, 1, 1]], dtype=torch.int32)
    wt = torch.randn(D, OUT, generator=gen)
    bias, col = torch.randn(OUT, generator=gen), torch.rand(D, generator=gen) + 0.5
    topk = 3 if variant == "topk" else -1
    if name == "steer":
        return (h, index, *table)
    if name == "add_steer_rmsnorm":
        residual = None if variant == "no_residual" else torch.randn(2, 3, D, generator=gen)
        return (h, residual, torch.rand(D, generator=gen) + 0.5, 1e-6, 0.0, index, *table)
    if name == "steer_":
        return (h, index, *table)
    if name == "add_steer_rmsnorm_":
        return (h, torch.randn(2, 3, D, generator=gen), torch.rand(D, generator=gen) + 0.5, 1e-6, 0.0,
                index, *table)
    if name == "sparse_linear":
        return (h, wt, bias, col, torch.tensor(0.4), topk)
    return (h, index, *table, wt, bias, col, torch.tensor(0.4), topk)


CASES = [
    ("steer", "index"), ("steer", "index_none"),
    ("add_steer_rmsnorm", "index"), ("add_steer_rmsnorm", "no_residual"),
    ("sparse_linear", "threshold"), ("sparse_linear", "topk"),
    ("steer_sparse_linear", "threshold"), ("steer_sparse_linear", "topk"),
    ("steer_", "index"), ("steer_", "index_none"), ("add_steer_rmsnorm_", "index"),
]


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(gen, name, variant, impl):
    torch.library.opcheck(getattr(ops, name), op_args(name, gen, variant), {"backend": impl})


@pytest.mark.parametrize("name", ["steer", "add_steer_rmsnorm", "sparse_linear", "steer_sparse_linear",
                                  "steer_", "add_steer_rmsnorm_"])
def test_opcheck_with_the_default_backend_argument(gen, name):
    # 'auto' is the schema default, which the dispatcher leaves out of the call
    torch.library.opcheck(getattr(ops, name), op_args(name, gen, "index"))


def model_step(h, residual, weight, table, index, sw, backend):
    """A decoder-layer-shaped chain of every public op."""
    r, y = steerkern.add_steer_rmsnorm(h, residual, weight, 1e-6, table=table, index=index, backend=backend)
    a = steerkern.steer(y, table, index, backend=backend)
    b = steerkern.sparse_linear(a, sw, threshold=0.3, backend=backend)
    c = steerkern.steer_sparse_linear(a, table, sw, index, topk=4, backend=backend)
    return r, b + c


def step_inputs(gen):
    h = torch.randn(2, 3, D, generator=gen)
    residual = torch.randn(2, 3, D, generator=gen)
    index = torch.tensor([[1, 0, 2], [2, 2, 1]], dtype=torch.int32)
    sw = SparseWeight.from_linear(torch.randn(OUT, D, generator=gen), torch.randn(OUT, generator=gen))
    return h, residual, torch.rand(D, generator=gen) + 0.5, full_table(gen), index, sw


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_compile_fullgraph_traces_the_public_api(gen, compiler, impl):
    h, residual, weight, table, index, sw = step_inputs(gen)
    torch._dynamo.reset()

    def step(h, residual, weight, index):
        return model_step(h, residual, weight, table, index, sw, impl)

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    for got, want in zip(compiled(h, residual, weight, index), step(h, residual, weight, index)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_the_in_place_ops(gen, compiler):
    h, residual, weight, table, index, sw = step_inputs(gen)
    torch._dynamo.reset()

    def step(h, residual):
        h, residual = h.clone(), residual.clone()
        steerkern.add_steer_rmsnorm_(h, residual, weight, 1e-6, table=table, index=index)
        steerkern.steer_(residual, table, index)
        return residual, h

    got = torch.compile(step, fullgraph=True, backend=compiler)(h, residual)
    for g, w in zip(got, step(h, residual)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compiled_code_sees_in_place_table_updates(gen):
    d = D
    table = SteerTable.addition(torch.ones(d), alpha=1.0)
    compiled = torch.compile(lambda h: steerkern.steer(h, table), fullgraph=True, backend="eager")
    h = torch.zeros(1, d)
    torch.testing.assert_close(compiled(h), torch.ones(1, d))
    table.alpha.fill_(-2.0)  # a new coefficient, no recompilation needed
    torch.testing.assert_close(compiled(h), torch.full((1, d), -2.0))


@pytest.mark.slow
def test_compile_with_inductor(gen):
    h, residual, weight, table, index, sw = step_inputs(gen)
    torch._dynamo.reset()

    def step(h, residual, weight, index):
        r, y = model_step(h, residual, weight, table, index, sw, "auto")
        return r * 2 + 1, torch.relu(y)  # something for inductor to fuse around the ops

    got = torch.compile(step, fullgraph=True, backend="inductor")(h, residual, weight, index)
    want = step(h, residual, weight, index)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
