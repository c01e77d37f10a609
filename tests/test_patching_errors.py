"""Bad input gets a ValueError before anything is touched; the registry's
refusals and its generic fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import steerkern
from steerkern import Intervention, SparsityPlan, SteerEntry, SteeringPlan
from steerkern.patching import registry

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (type(m), dict(m.__dict__.get("_forward_pre_hooks", {})), "forward" in m.__dict__)
             for n, m in model.named_modules()},
            {n: id(p) for n, p in model.named_parameters()})


def assert_same(model, snap):
    state, mods, params = snapshot(model)
    assert mods == snap[1] and params == snap[2]
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)


def bad_cases():
    v = torch.randn(M.HIDDEN)
    return {
        "vector size": (dict(steering=SteeringPlan.add(torch.randn(M.HIDDEN + 1))), "hidden size"),
        "layer out of range": (dict(steering=SteeringPlan.add(v, layers=[M.LAYERS])), "out of range"),
        "plan for more layers": (dict(steering=SteeringPlan.add(v, num_layers=M.LAYERS + 2)), "layers"),
        "per-layer vectors for another model": (dict(steering=SteeringPlan.add(torch.randn(5, M.HIDDEN))),
                                                r"\[3, 48\]"),
        "plan for another model": (dict(steering=SteeringPlan.add(v, model="org/other-model")), "other-model"),
        "sparsity for more layers": (dict(sparsity=SparsityPlan.uniform(0.1, M.LAYERS + 1)), "layers"),
        "backend cannot serve the device": (dict(steering=SteeringPlan.add(v), backend="cuda"), "cuda"),
        "unknown backend": (dict(steering=SteeringPlan.add(v), backend="fast"), "backend"),
        "not a plan": (dict(steering={"vector": v}), "SteeringPlan"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_input_is_refused_before_anything_is_touched(case):
    kwargs, match = bad_cases()[case]
    model = M.build("llama")
    model.config._name_or_path = "org/tiny-llama"
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        steerkern.patch(model, **kwargs)
    assert_same(model, snap)


def test_bad_repatch_leaves_the_old_patch_in_place():
    model = M.build("llama")
    ids = M.input_ids()
    steerkern.patch(model, SteeringPlan.add(torch.randn(M.HIDDEN)), SparsityPlan.uniform(0.05, M.LAYERS))
    want = model(ids).logits
    snap = snapshot(model)
    with pytest.raises(ValueError):
        steerkern.patch(model, SteeringPlan.add(torch.randn(7)))
    assert_same(model, snap)
    assert torch.equal(model(ids).logits, want)
    steerkern.unpatch(model)


def test_post_attn_on_parallel_residual_is_refused():
    model = M.build("gpt_neox")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="parallel residual"):
        steerkern.patch(model, SteeringPlan.add(torch.randn(M.HIDDEN), site="post_attn"))
    assert_same(model, snap)


def test_fused_projection_with_unequal_thresholds_is_refused():
    model = M.build("gpt_neox")  # query_key_value interleaves q, k, v per head
    plan = SparsityPlan({0: {"q_proj": 0.1, "k_proj": 0.2, "v_proj": 0.1}})
    with pytest.raises(ValueError, match="must be equal"):
        steerkern.patch(model, sparsity=plan)
    with pytest.raises(ValueError, match="all of them or none"):
        steerkern.patch(model, sparsity=SparsityPlan({0: {"q_proj": 0.1}}))


def test_plan_validation_names_the_argument():
    with pytest.raises(ValueError, match="site"):
        Intervention(SteerEntry(vector=[1.0, 2.0]), site="middle")
    with pytest.raises(ValueError, match="positions"):
        Intervention(SteerEntry(vector=[1.0, 2.0]), positions="later")
    with pytest.raises(ValueError, match="orthonormal"):
        Intervention(SteerEntry(directions=[[1.0, 1.0]]))
    with pytest.raises(ValueError, match="coefficients"):
        Intervention(SteerEntry(vector=[1.0, 2.0]), layers=[0, 1], coefficients=[1.0])
    with pytest.raises(ValueError, match="unknown projection"):
        SparsityPlan({0: {"qkv": 0.1}})
    with pytest.raises(ValueError, match=">= 0"):
        SparsityPlan({0: {"q_proj": -1.0}})


class Mystery(nn.Module):
    """An architecture steerkern does not know, with a findable list of layers."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery", "hidden_size": 8})()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_unknown_architecture_error_lists_supported_families():
    model = Mystery()
    with pytest.raises(ValueError) as err:
        steerkern.patch(model, SteeringPlan.add(torch.randn(8), site="post_attn"))
    for name in registry.supported():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="sparsity"):
        steerkern.patch(model, sparsity=SparsityPlan.uniform(0.1, 2))


def test_generic_fallback_steers_the_residual_stream():
    model = Mystery()
    x = torch.randn(3, 8)
    v = torch.randn(8)
    want = model.layers[1](model.layers[0](x) + 0.5 * v)
    with steerkern.patch(model, SteeringPlan.add(v, 0.5, layers=[0], site="post_mlp")):
        torch.testing.assert_close(model(x), want)
    assert torch.equal(model(x), model.layers[1](model.layers[0](x)))


def test_registry_names_canonical_projections_only():
    from steerkern.plan import PROJECTIONS

    for fam in registry.FAMILIES:
        for _, names in fam.projections:
            assert set(names) <= set(PROJECTIONS), fam.name
