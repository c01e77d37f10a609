"""The request format of per-request steering (no vLLM needed)."""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern.integrations.vllm.spec import SteeringLibrary, fingerprint, has_steering

L, D = 4, 8


@pytest.fixture
def lib():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=g)
    return SteeringLibrary(
        vectors={"b": torch.randn(D, generator=g), "a": torch.randn(L, D, generator=g)},
        plans={"abl": steerkern.SteeringPlan.ablate((u / u.norm())[None], layers=[1])})


def test_vector_names_are_sorted_and_indexable(lib):
    assert lib.vector_names == ["a", "b"]
    by_name = lib.parse({"steer_vectors": "b"}, L, D)[0].entry.vector
    by_index = lib.parse({"steer_vectors": 1}, L, D)[0].entry.vector
    assert torch.equal(by_name, lib.vectors["b"]) and torch.equal(by_index, by_name)


def test_named_vectors_are_summed_with_their_coefficients(lib):
    (iv,) = lib.parse({"steer_vectors": ["a", "b"], "steer_coefs": [2.0, -0.5], "steer_layers": [0, 3],
                       "steer_site": "post_attn", "steer_positions": 3}, L, D)
    want = 2.0 * lib.vectors["a"] + (-0.5) * lib.vectors["b"][None, :]
    assert torch.allclose(iv.entry.vector, want) and iv.entry.alpha == 1.0
    assert (iv.layers, iv.site, iv.positions) == ([0, 3], "post_attn", 3)


def test_one_coefficient_applies_to_every_vector(lib):
    (iv,) = lib.parse({"steer_vectors": ["b", "b"], "steer_coefs": 3.0}, L, D)
    assert torch.allclose(iv.entry.vector, 6.0 * lib.vectors["b"])


def test_inline_vector_adds_to_the_named_ones(lib):
    inline = [float(i) for i in range(D)]
    (iv,) = lib.parse({"steer_vectors": "b", "steer_vector": inline}, L, D)
    assert torch.allclose(iv.entry.vector, lib.vectors["b"] + torch.tensor(inline))


def test_plan_interventions_run_before_the_vectors(lib):
    ivs = lib.parse({"steer_plan": "abl", "steer_vectors": "b"}, L, D)
    assert len(ivs) == 4  # ablation at three sites, then the vector
    assert all(iv.entry.directions is not None for iv in ivs[:3]) and ivs[3].entry.vector is not None
    assert lib.parse({"steer_plan": 0}, L, D)[0].layers == [1]


def test_requests_without_steer_keys_are_not_steered(lib):
    assert not has_steering(None) and not has_steering({"other": 1})
    assert lib.parse({"other": 1}, L, D) == []


@pytest.mark.parametrize("args, message", [
    ({"steer_vectors": "zzz"}, r"steer_vectors\[0\]: unknown vector 'zzz'; registered vectors: \['a', 'b'\]"),
    ({"steer_vectors": 2}, r"index 2 out of range"),
    ({"steer_vectors": []}, "at least one"),
    ({"steer_vector": [1.0] * (D + 1)}, f"expected {D} numbers"),
    ({"steer_vector": ["x"] * D}, r"steer_vector\[0\]: expected a number"),
    ({"steer_vectors": "b", "steer_coefs": [1.0, 2.0]}, "steer_coefs: expected 1 or 1"),
    ({"steer_vectors": "b", "steer_coefs": float("nan")}, "finite"),
    ({"steer_vectors": "b", "steer_layers": [L]}, r"steer_layers: expected layer indices in \[0, 4\)"),
    ({"steer_vectors": "b", "steer_site": "mid"}, "steer_site"),
    ({"steer_vectors": "b", "steer_positions": "later"}, "steer_positions"),
    ({"steer_vectors": "b", "steer_positions": -1}, "steer_positions"),
    ({"steer_layers": [1]}, "without steer_vectors"),
    ({"steer_plan": "nope"}, "unknown plan 'nope'"),
    ({"steer_plan": 3}, "index 3 out of range"),
    ({"steer_vectr": "b"}, "unknown steering key"),
])
def test_bad_requests_name_the_key(lib, args, message):
    with pytest.raises(ValueError, match=message):
        lib.parse(args, L, D)


def test_vectors_for_another_model_are_rejected(lib):
    with pytest.raises(ValueError, match=r"shape \[4, 8\], expected \[16\]"):
        lib.parse({"steer_vectors": "a"}, L, 16)
    with pytest.raises(ValueError, match="hidden size"):
        lib.parse({"steer_plan": "abl"}, L, 16)


def test_fingerprint_depends_on_steering_only():
    a = fingerprint({"steer_vectors": ["x"], "steer_coefs": [1.0], "other": 1})
    assert a == fingerprint({"steer_coefs": [1.0], "steer_vectors": ["x"]})
    assert a != fingerprint({"steer_vectors": ["x"], "steer_coefs": [1.5]})


def test_library_loads_files_named_by_the_config(tmp_path, lib):
    from safetensors.torch import save_file

    save_file(lib.vectors, str(tmp_path / "v.safetensors"))
    lib.plans["abl"].save(tmp_path / "abl.safetensors")
    loaded = SteeringLibrary.from_config({"steerkern": {"vectors": str(tmp_path / "v.safetensors"),
                                                        "plans": f"x={tmp_path / 'abl.safetensors'}"}})
    assert loaded.vector_names == ["a", "b"] and loaded.plan_names == ["x"]
    assert torch.equal(loaded.vectors["a"], lib.vectors["a"])


def test_library_rejects_bad_vectors(tmp_path):
    with pytest.raises(ValueError, match=r"vectors\['v'\]: expected shape"):
        SteeringLibrary(vectors={"v": torch.zeros(2, 2, 2)})
    with pytest.raises(ValueError, match="NaN"):
        SteeringLibrary(vectors={"v": torch.tensor([float("nan")])})
    with pytest.raises(ValueError, match="no such file"):
        SteeringLibrary.from_config({"steerkern": {"vectors": str(tmp_path / "missing.safetensors")}})
