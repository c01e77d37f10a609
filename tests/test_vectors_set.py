"""VectorSet: validation, arithmetic and composition against per-layer dict
math, site conversion, and plans that steer a model as forward hooks would."""
from __future__ import annotations

import pytest
import torch

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)
import steerkern
from steerkern.vectors import VectorSet, compose


def rand_set(layers, d=6, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return VectorSet({layer: torch.randn(d, generator=g) for layer in layers}, **kw)


def as_dict(vs):
    return {layer: v.clone() for layer, v in vs}


def test_vectors_are_fp32_cpu_sorted():
    vs = VectorSet({3: torch.ones(4, dtype=torch.float64), 1: [1, 2, 3, 4]}, model_id="m", method="mean_diff")
    assert vs.layers == [1, 3] and vs.hidden_size == 4
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for _, v in vs)
    assert torch.equal(vs.to_tensor(), torch.tensor([[1.0, 2, 3, 4], [1, 1, 1, 1]]))
    assert torch.equal(vs.dense(5)[2], torch.zeros(4)) and torch.equal(vs.dense(5)[3], torch.ones(4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(vectors={0: torch.ones(3), 1: torch.ones(4)}), "vectors"),
    (dict(vectors={-1: torch.ones(3)}), "layer index"),
    (dict(vectors={0: torch.tensor([1.0, float("nan")])}), "NaN"),
    (dict(vectors={0: torch.ones(2, 2)}), r"shape \[d\]"),
    (dict(vectors={0: torch.ones(3)}, hidden_size=4), "vectors"),
    (dict(vectors={5: torch.ones(3)}, num_layers=4), "out of range"),
    (dict(vectors={0: torch.ones(3)}, site="middle"), "site"),
    (dict(vectors={}), "empty"),
    (dict(vectors=[torch.ones(3)]), "mapping"),
])
def test_bad_sets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorSet(**kwargs)


def test_arithmetic_is_per_layer_on_the_union():
    a, b = rand_set([1, 2, 3], seed=1), rand_set([2, 3, 4], seed=2)
    da, db = as_dict(a), as_dict(b)
    layers = sorted(set(da) | set(db))
    z = torch.zeros(6)
    for got, want in [
        (a + b, {k: da.get(k, z) + db.get(k, z) for k in layers}),
        (a - b, {k: da.get(k, z) - db.get(k, z) for k in layers}),
        (2.5 * a, {k: 2.5 * v for k, v in da.items()}),
        (a * 2.5, {k: 2.5 * v for k, v in da.items()}),
        (-a, {k: -v for k, v in da.items()}),
        (a / 4, {k: v / 4 for k, v in da.items()}),
    ]:
        assert got.layers == sorted(want)
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-6)


def test_compose_with_per_layer_coefficients():
    a, b = rand_set([0, 1, 2], seed=3), rand_set([1, 2], seed=4)
    out = compose([(a, {0: 1.0, 2: -0.5}), (b, 2.0)])
    assert out.layers == [0, 1, 2]
    assert torch.allclose(out[0], a[0])
    assert torch.allclose(out[1], 2.0 * b[1])  # a's layer 1 is not named: dropped
    assert torch.allclose(out[2], -0.5 * a[2] + 2.0 * b[2])
    with pytest.raises(KeyError):
        a.scaled({7: 1.0})
    with pytest.raises(ValueError, match="terms"):
        compose([])
    with pytest.raises(ValueError, match="must be finite"):
        a.scaled(float("inf"))


def test_mismatched_sets_do_not_combine():
    with pytest.raises(ValueError, match="hidden size"):
        rand_set([0], d=4) + rand_set([0], d=5)
    with pytest.raises(ValueError, match="site"):
        rand_set([1]) + rand_set([1], site="pre")
    with pytest.warns(UserWarning, match="different models"):
        rand_set([0], model_id="a") + rand_set([0], model_id="b")


def test_normalized_direction_cosine_select():
    a = rand_set([0, 1, 2], seed=5)
    n = a.normalized()
    assert all(abs(v - 1) < 1e-6 for v in n.norms().values())
    assert torch.allclose(a.direction(1), n[1])
    assert a.select([2]).layers == [2]
    assert a.cosine(2 * a) == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})
    with pytest.raises(ValueError, match="zero"):
        VectorSet({0: torch.zeros(3)}).direction(0)


def test_site_conversion_shifts_layers():
    a = rand_set([1, 2], num_layers=4)
    pre = a.at_site("pre")
    assert pre.site == "pre" and pre.layers == [2, 3] and torch.equal(pre[2], a[1])
    assert pre.at_site("post_mlp") == a
    with pytest.raises(ValueError, match="embeddings"):
        rand_set([0], site="pre").at_site("post_mlp")
    with pytest.raises(ValueError, match="final block"):
        rand_set([3], num_layers=4).at_site("pre")


def test_from_tensor_round_trip():
    t = torch.randn(3, 5)
    vs = VectorSet.from_tensor(t, [4, 7, 9], method="probe")
    assert vs.layers == [4, 7, 9] and torch.equal(vs.to_tensor(), t)
    with pytest.raises(ValueError, match="layers"):
        VectorSet.from_tensor(t, [1, 1, 2])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plan_adds_each_layer_vector_at_its_site(family):
    model = M.build(family)
    ids = M.input_ids()
    vs = rand_set([0, 2], d=M.HIDDEN, seed=6, num_layers=M.LAYERS)
    plan = vs.to_plan(alpha=0.7)
    handles = M.hook_reference(model, family, plan)
    want = model(ids).logits
    for h in handles:
        h.remove()
    with steerkern.patch(model, steering=plan):
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # the reference is not trivially equal to the base model
    assert (model(ids).logits - want).abs().max() > 1e-3


def test_ablation_plan_ablates_one_direction_everywhere():
    model = M.build("llama")
    ids = M.input_ids()
    vs = rand_set([1], d=M.HIDDEN, seed=7)
    plan = vs.ablation_plan()
    assert {iv.site for iv in plan.interventions} == {"pre", "post_attn", "post_mlp"}
    handles = M.hook_reference(model, "llama", plan)
    want = model(ids).logits
    for h in handles:
        h.remove()
    with steerkern.patch(model, steering=plan):
        assert torch.allclose(model(ids).logits, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer"):
        rand_set([0, 1], d=M.HIDDEN).ablation_plan()
