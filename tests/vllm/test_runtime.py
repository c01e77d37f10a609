"""The worker-side steering runtime on a vLLM-shaped toy model (no vLLM needed).

The toy model has vLLM's structure: decoder layers that carry the stream as
``(hidden_states, residual)`` and fused ``norm(x, residual)`` calls.  The
reference is the same toy computed with the stream made explicit and each
row's steering added by hand.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from steerkern.integrations.vllm.runtime import RequestRow, SteeringRuntime, _row_range, install
from steerkern.integrations.vllm.spec import SteeringLibrary

L, D = 3, 16


class RMSNorm(nn.Module):
    """vLLM's calling convention: ``norm(x)`` or ``norm(x, residual) -> (normed, x + residual)``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6

    def _norm(self, r):
        return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight

    def forward(self, x, residual=None):
        if residual is None:
            return self._norm(x)
        r = x + residual
        return self._norm(r), r


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(D), RMSNorm(D)
        self.self_attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(L))
        self.norm = RMSNorm(D)

    def forward(self, positions, h):
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()

    def forward(self, positions, h):
        return self.model(positions, h)


def reference(toy, h, adds):
    """The toy's output with the stream explicit; ``adds[(layer, site)]`` is a
    ``[rows, d]`` tensor added to the stream there."""
    zero = torch.zeros_like(h)
    stream = h
    for i, layer in enumerate(toy.model.layers):
        stream = stream + adds.get((i, "pre"), zero)
        stream = stream + layer.self_attn(layer.input_layernorm._norm(stream))
        stream = stream + adds.get((i, "post_attn"), zero)
        stream = stream + layer.mlp(layer.post_attention_layernorm._norm(stream))
        stream = stream + adds.get((i, "post_mlp"), zero)
    return toy.model.norm._norm(stream)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    toy = Toy()
    g = torch.Generator().manual_seed(1)
    lib = SteeringLibrary(vectors={"u": torch.randn(D, generator=g), "w": torch.randn(L, D, generator=g)})
    rt = SteeringRuntime(lib, L, D, torch.device("cpu"))
    return toy, lib, rt


@pytest.mark.parametrize("rule", ["all", "prompt", "generated", 0, 3, 7, 50])
@pytest.mark.parametrize("first, count, prompt_len", [(0, 6, 6), (4, 5, 6), (6, 1, 6), (9, 1, 6), (0, 3, 8)])
def test_row_range_selects_exactly_the_rule_s_positions(rule, first, count, prompt_len):
    def steered(p):
        if isinstance(rule, int):
            return p >= rule
        return {"all": True, "prompt": p < prompt_len, "generated": p >= prompt_len}[rule]
    a, b = _row_range(rule, first, count, prompt_len)
    assert [a <= j < b for j in range(count)] == [steered(first + j) for j in range(count)]


@torch.no_grad()
def test_each_request_in_a_batch_gets_its_own_steering(setup):
    toy, lib, rt = setup
    h = torch.randn(9, D)
    with torch.no_grad():
        plain = toy(None, h)
    restore = install(toy, rt)
    # rows 0-3: request A (prefill of 4), rows 4-5: unsteered B, rows 6-8: request C (prefill 3)
    a = {"steer_vectors": ["u", "w"], "steer_coefs": [2.0, -1.0], "steer_layers": [0, 2]}
    c = {"steer_vectors": "u", "steer_coefs": 3.0, "steer_site": "post_mlp", "steer_positions": 1}
    d = {"steer_vectors": "w", "steer_site": "post_attn", "steer_layers": [1]}
    rows = [RequestRow("A", a, 0, 4, 0, 4), RequestRow("C", c, 6, 3, 0, 3), RequestRow("D", d, 4, 1, 5, 2)]
    rt.prepare(rows, 9)
    got = toy(None, h)
    rt.finish()
    adds = {}
    va = 2.0 * lib.vectors["u"] - lib.vectors["w"]
    for layer in (0, 2):
        adds[(layer, "pre")] = torch.zeros(9, D)
        adds[(layer, "pre")][0:4] = va[layer]
    for layer in range(L):
        adds[(layer, "post_mlp")] = torch.zeros(9, D)
        adds[(layer, "post_mlp")][7:9] = 3.0 * lib.vectors["u"]  # positions >= 1 of C
    adds[(1, "post_attn")] = torch.zeros(9, D)
    adds[(1, "post_attn")][4] = lib.vectors["w"][1]
    want = reference(toy, h, adds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[5], plain[5]), "the unsteered row must be bit-exact"
    restore()
    assert torch.equal(toy(None, h), plain)


@torch.no_grad()
def test_a_batch_without_steering_runs_the_original_code(setup):
    toy, lib, rt = setup
    h = torch.randn(4, D)
    plain = toy(None, h)
    install(toy, rt)
    assert rt.prepare([RequestRow("A", {"other": 1}, 0, 4, 0, 4)], 4) is None
    assert torch.equal(toy(None, h), plain)
    # a steered request whose positions select none of this step's rows
    assert rt.prepare([RequestRow("B", {"steer_vectors": "u", "steer_positions": "prompt"}, 0, 1, 9, 4)], 1) is None


@torch.no_grad()
def test_fully_steered_batch_uses_the_fused_path_and_matches(setup):
    toy, lib, rt = setup
    h = torch.randn(3, D)
    install(toy, rt)
    rows = [RequestRow(str(i), {"steer_vectors": "u", "steer_coefs": float(i + 1)}, i, 1, 5, 3) for i in range(3)]
    batch = rt.prepare(rows, 3)
    assert all(s.all_rows for steps in batch.steps.values() for s in steps)
    got = toy(None, h)
    coefs = torch.tensor([1.0, 2.0, 3.0])[:, None]
    adds = {(layer, "pre"): coefs * lib.vectors["u"] for layer in range(L)}
    torch.testing.assert_close(got, reference(toy, h, adds), rtol=1e-5, atol=1e-5)


def test_bad_request_reaching_a_worker_runs_unsteered(setup, caplog):
    toy, lib, rt = setup
    install(toy, rt)
    assert rt.prepare([RequestRow("X", {"steer_vectors": "nope"}, 0, 2, 0, 2)], 2) is None
    assert "runs unsteered" in caplog.text


def test_install_refuses_a_model_it_cannot_steer(setup):
    toy, lib, rt = setup
    with pytest.raises(ValueError, match="no list of decoder layers"):
        install(nn.Linear(2, 2), rt)
    toy.model.layers[1].post_attention_layernorm = nn.LayerNorm(D)
    with pytest.raises(ValueError, match=r"layers\[1\].post_attention_layernorm"):
        install(toy, rt)


def test_requests_asking_for_the_same_steering_share_its_compiled_tables(setup):
    _, _, rt = setup
    spec = {"steer_vectors": "u", "steer_coefs": 2.0}
    a = rt.compile_request("a", spec)
    assert rt.compile_request("b", dict(spec)) is a
    assert rt.compile_request("c", {"steer_vectors": "u", "steer_coefs": 3.0}) is not a


@torch.no_grad()
def test_a_new_batch_asking_for_the_same_steering_reuses_the_batch_tables_correctly(setup):
    toy, lib, rt = setup
    install(toy, rt)
    one, two = ({"steer_vectors": "u", "steer_coefs": c, "steer_site": "post_mlp"} for c in (1.0, 2.0))
    rt.prepare([RequestRow("A", one, 0, 2, 0, 2), RequestRow("B", two, 2, 2, 0, 2)], 4)
    first_tables = list(rt._tables.values())
    rt.finish()
    # new requests, in the other order: C asks what B asked, D what A asked
    h = torch.randn(4, D)
    rt.prepare([RequestRow("C", two, 0, 2, 0, 2), RequestRow("D", one, 2, 2, 0, 2)], 4)
    assert [id(t) for t in rt._tables.values()] == [id(t) for t in first_tables]
    got = toy(None, h)
    rt.finish()
    coef = torch.tensor([2.0, 2.0, 1.0, 1.0])[:, None]
    adds = {(layer, "post_mlp"): coef * lib.vectors["u"] for layer in range(L)}
    torch.testing.assert_close(got, reference(toy, h, adds), rtol=1e-5, atol=1e-5)
