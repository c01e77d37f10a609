"""library.hot: the direct call on the patched models' hot path must compute
exactly what the custom op computes, and must not be used where autograd or
torch.compile needs to see the op."""
import torch

from steerkern import SparseWeight, SteerTable
from steerkern.ops import library


def _table(d):
    q = torch.linalg.qr(torch.randn(d, 2)).Q.T.contiguous()
    return SteerTable.ablation(q)


def test_direct_call_equals_the_custom_op_bit_for_bit():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16)
    table = _table(16)
    index = torch.tensor([[0, 1, 1, 0, 1]] * 3, dtype=torch.int32)
    direct = library.hot("steer", h)
    assert direct is not library.op("steer")
    assert torch.equal(direct(h, index, *table.tensors()), library.op("steer")(h, index, *table.tensors()))
    w = SparseWeight.from_linear(torch.randn(8, 16))
    t = torch.tensor(0.3)
    args = (h, w.weight_t, w.bias, w.scale, t, -1)
    assert torch.equal(library.hot("sparse_linear", h)(*args), library.op("sparse_linear")(*args))


def test_reference_backend_choice_reaches_the_direct_call():
    h = torch.randn(2, 16)
    table = _table(16)
    out = library.hot("steer", h)(h, None, *table.tensors(), backend="reference")
    assert torch.equal(out, library.op("steer")(h, None, *table.tensors(), backend="reference"))


def test_inputs_that_need_a_gradient_go_through_the_op():
    h = torch.randn(2, 16, requires_grad=True)
    with torch.enable_grad():  # explicit: the suite's grad mode is not ours to assume
        assert library.hot("steer", h) is library.op("steer")
    with torch.no_grad():
        assert library.hot("steer", h) is not library.op("steer")


def test_torch_compile_sees_the_op():
    table = _table(16)
    seen = []

    def f(h):
        fn = library.hot("steer", h)
        seen.append(fn is library.op("steer"))
        return fn(h, None, *table.tensors())

    h = torch.randn(2, 16)
    out = torch.compile(f, backend="eager", fullgraph=True)(h)
    assert seen and all(seen)
    assert torch.equal(out, library.op("steer")(h, None, *table.tensors()))

