"""library.hot: the direct call on the patched models' hot path must compute
exactly what the custom op computes, and must not be used where autograd or
torch.compile needs to see the op."""
import pytest
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



def _mixed_table(d):
    from steerkern import SteerEntry
    g = torch.Generator().manual_seed(d)
    q = torch.linalg.qr(torch.randn(d, 2, generator=g)).Q.T.contiguous()
    return SteerTable.from_entries([
        SteerEntry(directions=q, vector=torch.randn(d, generator=g), alpha=0.7),
        SteerEntry(scale=torch.rand(d, generator=g) + 0.5, shift=torch.randn(d, generator=g),
                   condition=torch.randn(d, generator=g), threshold=0.0, preserve_norm=True),
    ], d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 3, 13), (4, 40)], ids=["decode", "odd_d", "rows"])
def test_fused_add_steer_equals_the_add_then_steer_bit_for_bit(dtype, shape):
    # the post-MLP site's one-call form: steer(residual + x), the sum rounded
    # to the dtype first, as an unfused `residual + x` is
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        residual = torch.randn(*shape, generator=g).to(dtype)
        x = torch.randn(*shape, generator=g).to(dtype)
        d = shape[-1]
        table = _mixed_table(d)
        fused = library.add_steer_kernel(residual, x)
        if fused is None:
            pytest.skip("the C++ CPU kernels are not built")
        rows = residual.numel() // d
        index = torch.arange(rows, dtype=torch.int32) % 3  # 0 (none), entry 1, entry 2
        for ix in (index, None):
            expected = (residual + x).reshape(-1, d).clone()
            library.steer_rows_(expected, ix, table.tensors())
            got = fused(residual, x, ix, *table.tensors())
            assert got.shape == residual.shape and got.dtype == dtype
            assert torch.equal(got.reshape(-1, d).view(torch.int16 if dtype != torch.float32 else torch.int32),
                               expected.view(torch.int16 if dtype != torch.float32 else torch.int32))
        # an empty table: just the add
        assert torch.equal(fused(residual, x, None, *([None] * 10)), residual + x)


def test_fused_add_steer_is_not_used_where_it_does_not_apply():
    residual = torch.randn(2, 16)
    with torch.no_grad():
        if library.add_steer_kernel(residual, torch.randn(2, 16)) is None:
            pytest.skip("the C++ CPU kernels are not built")
        assert library.add_steer_kernel(residual, torch.randn(1, 16)) is None  # would broadcast
        assert library.add_steer_kernel(residual, torch.randn(2, 16).bfloat16()) is None
        assert library.add_steer_kernel(residual, torch.randn(16, 2).T) is None  # not contiguous
        assert library.add_steer_kernel(residual, torch.randn(2, 16), backend="reference") is None
    with torch.enable_grad():
        assert library.add_steer_kernel(residual, torch.randn(2, 16)) is None


def test_fused_add_steer_kernel_rejects_mismatched_operands():
    from steerkern.kernels import cpu as cpu_kernels
    if cpu_kernels._ext is None:
        pytest.skip("the C++ CPU kernels are not built")
    with pytest.raises(RuntimeError, match="x: expected a contiguous CPU"):
        cpu_kernels._ext.add_steer(torch.randn(2, 16), torch.randn(3, 16), None, *([None] * 10))
