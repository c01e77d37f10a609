"""Which backend runs an op: per call, use_backend, STEERKERN_BACKEND, then the
device's default order; an explicit choice that cannot serve is an error."""
from __future__ import annotations

import threading

import pytest
import torch

import steerkern
from steerkern import SparseWeight, SteerTable, backends
from steerkern.ops import reference as R

from conftest import require_cpu_ext

D = 6


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def fresh_selection_memo():
    # tests below swap implementations in and out of the registry by hand,
    # behind register()'s back, so the memo of choices is cleared around each
    backends._SELECTED.clear()
    yield
    backends._SELECTED.clear()


@pytest.fixture
def spy(monkeypatch):
    """A fake 'triton' backend that serves CPU and records the ops it runs
    (triton is never in the CPU default order, so only explicit choices reach it)."""
    calls = []
    for op in backends.OPS:
        ref = getattr(R, op)

        def fn(*args, _op=op, _ref=ref):
            calls.append(_op)
            return _ref(*args)

        monkeypatch.setitem(backends._IMPLS, (op, "triton"), fn)
    monkeypatch.setitem(backends._SERVES, "triton", lambda device_type: device_type == "cpu")
    return calls


def default_cpu_backend():
    return "cpu" if backends.available("cpu", "cpu") else "reference"


def call_every_op(backend="auto"):
    h = torch.randn(2, D)
    table = SteerTable.addition(torch.ones(D))
    sw = SparseWeight.from_linear(torch.randn(3, D))
    steerkern.steer(h, table, backend=backend)
    steerkern.add_steer_rmsnorm(h, None, torch.ones(D), 1e-6, table=table, backend=backend)
    steerkern.sparse_linear(h, sw, backend=backend)
    steerkern.steer_sparse_linear(h, table, sw, backend=backend)
    steerkern.steer_(h.clone(), table, backend=backend)
    steerkern.add_steer_rmsnorm_(h.clone(), h.clone(), torch.ones(D), 1e-6, table=table, backend=backend)


def test_ci_requires_the_cpu_extension():
    if not require_cpu_ext():
        pytest.skip("STEERKERN_REQUIRE_CPU_EXT=1 is not set")
    from steerkern.kernels import cpu

    assert backends.available("cpu", "cpu"), (
        "STEERKERN_REQUIRE_CPU_EXT=1 but the C++ CPU backend is not loaded: "
        + backends._UNAVAILABLE.get("cpu", "unknown reason"))
    assert cpu._ext is not None and cpu.capability


@pytest.mark.parametrize("op", backends.OPS)
def test_the_default_on_cpu_is_the_cpu_kernels_else_the_reference(op):
    assert backends.choose(op, "cpu") == default_cpu_backend()


@pytest.mark.parametrize("op", backends.OPS)
def test_without_cuda_kernels_cuda_tensors_fall_back_in_order(monkeypatch, op):
    monkeypatch.setitem(backends._SERVES, "cuda", lambda device_type: False)
    monkeypatch.setitem(backends._SERVES, "triton", lambda device_type: device_type == "cuda")
    monkeypatch.setitem(backends._IMPLS, (op, "triton"), getattr(R, op))
    assert backends.choose(op, "cuda") == "triton"
    monkeypatch.setitem(backends._SERVES, "triton", lambda device_type: False)
    assert backends.choose(op, "cuda") == "reference"


def test_the_env_var_names_one_backend_for_every_op(monkeypatch, spy):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert all(backends.choose(op, "cpu") == "triton" for op in backends.OPS)
    call_every_op()
    assert spy == list(backends.OPS)


def test_the_env_var_is_case_and_space_tolerant(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "  Reference ")
    assert backends.choose("steer", "cpu") == "reference"


def test_the_env_var_per_op_form_picks_each_ops_backend(monkeypatch, spy):
    monkeypatch.setenv(backends.ENV_VAR, "steer=triton, sparse_linear=reference,")
    assert backends.choose("steer", "cpu") == "triton"
    assert backends.choose("sparse_linear", "cpu") == "reference"
    assert backends.choose("add_steer_rmsnorm", "cpu") == default_cpu_backend()
    call_every_op()
    assert spy == ["steer"]


@pytest.mark.parametrize("value, message", [
    ("bogus", "STEERKERN_BACKEND: unknown backend 'bogus'"),
    ("steer=bogus", "STEERKERN_BACKEND: unknown backend 'bogus'"),
    ("ablate=reference", "STEERKERN_BACKEND: unknown op 'ablate'"),
    ("steer=reference,cpu", "STEERKERN_BACKEND: expected 'op=backend' pairs"),
    ("steer=reference,sparse_linear=trtion", "STEERKERN_BACKEND: unknown backend 'trtion'"),
], ids=["unknown_backend", "per_op_unknown_backend", "unknown_op", "missing_equals", "typo_for_another_op"])
def test_a_bad_env_var_is_a_value_error(monkeypatch, value, message):
    monkeypatch.setenv(backends.ENV_VAR, value)
    with pytest.raises(ValueError, match=message):
        steerkern.steer(torch.randn(2, D), SteerTable.addition(torch.ones(D)))


def test_use_backend_runs_every_op_in_the_block_there(spy):
    with steerkern.use_backend("triton"):
        assert backends.choose("steer", "cpu") == "triton"
        call_every_op()
    assert spy == list(backends.OPS)
    assert backends.choose("steer", "cpu") == default_cpu_backend()


def test_use_backend_nests_and_restores():
    with steerkern.use_backend("reference"):
        with steerkern.use_backend("cuda"):
            assert backends._explicit("steer", "auto") == "cuda"
        assert backends.choose("steer", "cpu") == "reference"
    assert backends._explicit("steer", "auto") is None


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with steerkern.use_backend("reference"):
            raise RuntimeError("inside")
    assert backends._explicit("steer", "auto") is None


def test_use_backend_is_local_to_its_thread():
    seen = []
    with steerkern.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(backends._explicit("steer", "auto")))
        t.start()
        t.join()
    assert seen == [None]


def test_use_backend_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fast'"):
        with steerkern.use_backend("fast"):
            pass


def test_the_call_argument_beats_the_context_which_beats_the_env_var(monkeypatch, spy):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")  # would fail on CPU tensors if it were used
    with steerkern.use_backend("triton"):
        assert backends.choose("steer", "cpu") == "triton"
        assert backends.choose("steer", "cpu", "reference") == "reference"
        steerkern.steer(torch.randn(2, D), SteerTable.addition(torch.ones(D)), backend="reference")
    assert spy == []


def test_a_per_call_backend_is_used(spy):
    steerkern.steer(torch.randn(2, D), SteerTable.addition(torch.ones(D)), backend="triton")
    assert spy == ["steer"]


@pytest.mark.parametrize("how", ["call", "context", "env"])
def test_an_explicit_backend_that_cannot_serve_the_device_is_an_error(monkeypatch, how):
    h, table = torch.randn(2, D), SteerTable.addition(torch.ones(D))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        if how == "call":
            steerkern.steer(h, table, backend="cuda")
        elif how == "context":
            with steerkern.use_backend("cuda"):
                steerkern.steer(h, table)
        else:
            monkeypatch.setenv(backends.ENV_VAR, "cuda")
            steerkern.steer(h, table)


def test_triton_on_cpu_tensors_without_the_interpreter_is_an_error(monkeypatch):
    # what triton's own check says outside the interpreter (tests run inside it)
    monkeypatch.setitem(backends._SERVES, "triton", lambda device_type: device_type == "cuda")
    with pytest.raises(ValueError, match="backend 'triton'"):
        steerkern.steer(torch.randn(2, D), SteerTable.addition(torch.ones(D)), backend="triton")


def test_an_unknown_per_call_backend_is_an_error():
    with pytest.raises(ValueError, match=r"steer\(backend=...\): unknown backend 'gpu'"):
        steerkern.steer(torch.randn(2, D), SteerTable.addition(torch.ones(D)), backend="gpu")


def test_the_default_backend_argument_reaches_the_kernels_intact():
    # the dispatcher drops a trailing argument equal to its default, so the
    # op layer must not mistake the last table tensor for `backend`
    d = 4
    table = SteerTable.from_entries([steerkern.SteerEntry(vector=torch.full((d,), 5.0), preserve_norm=True)], d)
    h = torch.randn(3, d)
    with steerkern.use_backend("reference"):
        out = steerkern.steer(h, table)
    torch.testing.assert_close(out.norm(dim=1), h.norm(dim=1))
    sw = SparseWeight.from_linear(torch.randn(2, d))
    torch.testing.assert_close(steerkern.sparse_linear(h, sw), h @ sw.weight_t)


def test_report_lists_every_op_and_the_backend_it_uses():
    text = steerkern.backend_report()
    lines = text.splitlines()
    assert lines[0].split() == ["op", "cpu", "cuda"]
    for op in backends.OPS:
        row = next(line for line in lines if line.split()[0] == op)
        assert row.split()[1] == default_cpu_backend()
    if not backends.available("cpu", "cpu"):
        assert "cpu backend unavailable:" in text


def test_report_shows_a_bad_env_var_as_an_error(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    assert "error: STEERKERN_BACKEND: unknown backend 'nope'" in steerkern.backend_report(("cpu",))


@pytest.mark.parametrize("args, message", [
    (("ablate", "reference", print), "unknown op 'ablate'"),
    (("steer", "fast", print), "unknown backend 'fast'"),
], ids=["unknown_op", "unknown_backend"])
def test_register_rejects_unknown_names(args, message):
    with pytest.raises(ValueError, match=message):
        backends.register(*args)


def test_a_backend_marked_unavailable_says_why(monkeypatch):
    monkeypatch.setitem(backends._UNAVAILABLE, "triton", "no triton here (test)")
    monkeypatch.setitem(backends._SERVES, "triton", lambda device_type: False)
    monkeypatch.setitem(backends._IMPLS, ("steer", "triton"), R.steer)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run steer on cpu: no triton here \(test\)"):
        backends.choose("steer", "cpu", "triton")
    assert "triton backend unavailable: no triton here (test)" in backends.report()


def test_derived_ops_come_with_every_backend_that_has_their_parts():
    for backend in backends.BACKENDS:
        for derived, bases in backends.DERIVED_FROM.items():
            if all((b, backend) in backends._IMPLS for b in bases):
                assert (derived, backend) in backends._IMPLS, (derived, backend)


def test_the_cpu_kernels_have_their_own_in_place_and_fused_ops():
    if not backends.available("cpu", "cpu"):
        pytest.skip("C++ CPU backend not built")
    assert not backends.is_derived("steer_", "cpu")
    assert not backends.is_derived("add_steer_rmsnorm_", "cpu")
    assert not backends.is_derived("steer_sparse_linear", "cpu")
    if backends.available("triton", "cpu"):
        assert backends.is_derived("steer_sparse_linear", "triton")


def test_the_memoized_choice_follows_the_env_var_and_use_backend(monkeypatch):
    first = backends.select("steer", "cpu")
    assert first is backends._IMPLS[("steer", default_cpu_backend())]
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("steer", "cpu") is backends._IMPLS[("steer", "reference")]
    monkeypatch.delenv(backends.ENV_VAR)
    with steerkern.use_backend("reference"):
        assert backends.select("steer", "cpu") is backends._IMPLS[("steer", "reference")]
    assert backends.select("steer", "cpu") is first
