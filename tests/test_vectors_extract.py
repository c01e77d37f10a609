"""Extraction of steering vectors against straightforward references.

The references run each prompt alone through the model with
``output_hidden_states=True`` (HF's own hidden states, not steerkern's hooks),
pick token positions by re-tokenizing, and compute each method from its
textbook definition (eigendecomposition for PCA, Newton's method for the
logistic probe).  fp32 activations of a padded batch and of a lone prompt
agree to rounding: we allow 1e-5 relative to the activations' scale.
"""
from __future__ import annotations

import pytest
import torch

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)
from steerkern.vectors.probe import group_folds
from steerkern.vectors import (METHODS, VectorSet, collect_activations, compute_direction, cross_val_accuracy,
                               extract, fit_logistic, read_prompts)


WORDS = ("i like love hate the cat dog sun rain happy sad day night good bad you we they are is very not so a "
         "it tell me about story help kill steal give").split()
POSITIVE = ["i like the cat", "we love the sun so very", "you are happy", "tell me a good story",
            "they help you"]
NEGATIVE = ["i hate the cat", "we hate the rain", "you are sad not happy", "tell me a bad story",
            "they steal it"]


def word_tokenizer():
    """A word-level fast tokenizer over WORDS with a small chat template (no network)."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<user>": 4, "<assistant>": 5}
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) <= M.VOCAB
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>"])
    t.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> <assistant>{% endif %}")
    return t


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert"])
def family_model(request):
    return request.param, M.build(request.param)


def reference_activations(model, tok, prompts, layers, site, position, chat_template=False):
    """``{layer: [n, d]}``: one prompt at a time, HF hidden states, positions by re-tokenizing."""
    out = {layer: [] for layer in layers}
    for text in prompts:
        if chat_template:
            s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True)
            end = s.rfind(text) + len(text)
            ids = tok(s, add_special_tokens=False, return_tensors="pt")
            n_instr = len(tok(s[:end], add_special_tokens=False)["input_ids"])
        else:
            ids = tok(text, return_tensors="pt")
            n_instr = None
        hs = model(**ids, output_hidden_states=True).hidden_states
        for layer in layers:
            h = hs[layer + 1 if site == "post_mlp" else layer][0].double()
            out[layer].append(h[-1] if position == "last" else h.mean(0) if position == "mean"
                              else h[n_instr:].mean(0))
    return {layer: torch.stack(v) for layer, v in out.items()}


def assert_close_scaled(got, want, rtol=1e-5):
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= rtol * max(scale, 1.0), f"max error {err:.3e} vs scale {scale:.3e}"


# ---- activations ----------------------------------------------------------------

@pytest.mark.parametrize("position", ["last", "mean"])
@pytest.mark.parametrize("site", ["post_mlp", "pre"])
def test_activations_equal_lone_prompt_hidden_states(family_model, tok, site, position):
    family, model = family_model
    # HF ties hidden_states[-1] to the final-normed output: the last layer's post_mlp has no HF reference
    layers = list(range(M.LAYERS - 1)) if site == "post_mlp" else list(range(M.LAYERS))
    prompts = POSITIVE + NEGATIVE  # lengths differ, so batches of 3 are padded
    acts = collect_activations(model, tok, prompts, layers, site=site, position=position, batch_size=3,
                               progress=False)
    assert sorted(acts) == layers
    want = reference_activations(model, tok, prompts, layers, site, position)
    for layer in layers:
        assert acts[layer].shape == (len(prompts), M.HIDDEN) and acts[layer].dtype == torch.float32
        assert_close_scaled(acts[layer], want[layer])


def test_after_instruction_reads_the_generation_prompt(tok):
    model = M.build("llama")
    acts = collect_activations(model, tok, POSITIVE, [0, 1], position="after_instruction", chat_template=True,
                               batch_size=2, progress=False)
    want = reference_activations(model, tok, POSITIVE, [0, 1], "post_mlp", "after_instruction",
                                 chat_template=True)
    for layer in (0, 1):
        assert_close_scaled(acts[layer], want[layer])
    # "<assistant> <assistant>" are two tokens: the mean of two differs from the last one
    last = collect_activations(model, tok, POSITIVE, [1], position="last", chat_template=True, progress=False)
    assert not torch.allclose(last[1], acts[1])


def test_after_instruction_with_a_suffix(tok):
    model = M.build("llama")
    acts = collect_activations(model, tok, POSITIVE[:2], [1], position="after_instruction",
                               suffix=" tell me", progress=False)
    for i, text in enumerate(POSITIVE[:2]):
        full = tok(text + " tell me", return_tensors="pt")
        h = model(**full, output_hidden_states=True).hidden_states[2][0]
        assert_close_scaled(acts[1][i], h[-2:].double().mean(0))


def test_after_instruction_needs_tokens_after_the_prompt(tok):
    with pytest.raises(ValueError, match="no token after its instruction"):
        collect_activations(M.build("llama"), tok, POSITIVE, [0], position="after_instruction", progress=False)


def test_collection_stops_early_and_leaves_no_hooks(tok):
    model = M.build("llama")
    collect_activations(model, tok, POSITIVE, [0], progress=False)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(position="first"), "position"), (dict(site="post_attn"), "site"), (dict(layers=[3]), "layers"),
    (dict(batch_size=0), "batch_size"), (dict(prompts=[]), "prompts"), (dict(prompts=[""]), "prompts"),
])
def test_collection_rejects_bad_arguments(tok, kwargs, match):
    model = M.build("llama")
    prompts = kwargs.pop("prompts", POSITIVE)
    with pytest.raises(ValueError, match=match):
        collect_activations(model, tok, prompts, kwargs.pop("layers", None), progress=False, **kwargs)


# ---- methods ----------------------------------------------------------------------

def _oriented(v, p, n):
    return v if float((p @ v).mean() - (n @ v).mean()) >= 0 else -v


def _top_eigvec(x):
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return evecs[:, -1]


def _newton_logistic(x, y, l2, iters=50):
    """Reference probe: Newton's method on mean BCE + l2 |w|^2 over centered x."""
    z = torch.cat([x - x.mean(0), torch.ones(len(x), 1, dtype=x.dtype)], 1)
    theta = torch.zeros(z.shape[1], dtype=x.dtype)
    reg = torch.full((z.shape[1],), 2 * l2, dtype=x.dtype)
    reg[-1] = 0.0
    for _ in range(iters):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (p - y) / len(y) + reg * theta
        hess = (z.T * (p * (1 - p))) @ z / len(y) + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta[:-1], theta[-1]


def reference_direction(p, n, method, paired, l2=1e-2):
    p, n = p.double(), n.double()
    if method == "mean_diff":
        return p.mean(0) - n.mean(0)
    if method == "pca_diff":
        v = _top_eigvec(p - n)
    elif method == "pca_center":
        if paired:
            c = (p + n) / 2
            x = torch.cat([p - c, n - c])
        else:
            x = torch.cat([p, n])
            x = x - x.mean(0)
        v = _top_eigvec(x)
    else:
        w, _ = _newton_logistic(torch.cat([p, n]), torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).double(), l2)
        v = w / w.norm()
    return _oriented(v, p, n)


@pytest.mark.parametrize("method, paired", [(m, p) for m in METHODS for p in (True, False)
                                             if (m, p) != ("pca_diff", False)])  # needs pairs: own test
def test_compute_direction_matches_reference(method, paired):
    g = torch.Generator().manual_seed(3)
    d = 24
    shift = torch.randn(d, generator=g)
    p = torch.randn(12, d, generator=g) + 0.8 * shift
    n = torch.randn(12 if paired else 9, d, generator=g)
    got = compute_direction(p, n, method, paired=paired).double()
    want = reference_direction(p, n, method, paired)
    if method != "mean_diff":
        assert abs(float(got.norm()) - 1.0) < 1e-6
    tol = 1e-4 if method == "probe" else 1e-5  # L-BFGS stops at its tolerance; Newton is exact
    assert_close_scaled(got, want, rtol=tol)


def test_pca_diff_needs_pairs():
    with pytest.raises(ValueError, match="paired"):
        compute_direction(torch.randn(4, 3), torch.randn(5, 3), "pca_diff")
    with pytest.raises(ValueError, match="method"):
        compute_direction(torch.randn(4, 3), torch.randn(4, 3), "ica")


@pytest.mark.parametrize("method", METHODS)
def test_extract_equals_reference_pipeline(tok, method):
    model = M.build("qwen2")
    vs = extract(model, tok, POSITIVE, NEGATIVE, method=method, layers=[0, 1], position="mean", batch_size=4,
                 progress=False, model_id="tiny-qwen2")
    assert isinstance(vs, VectorSet)
    assert (vs.layers, vs.method, vs.hidden_size, vs.num_layers) == ([0, 1], method, M.HIDDEN, M.LAYERS)
    assert (vs.model_id, vs.model_type, vs.site) == ("tiny-qwen2", "qwen2", "post_mlp")
    assert vs.metadata["position"] == "mean" and vs.metadata["paired"] is True
    p = reference_activations(model, tok, POSITIVE, [0, 1], "post_mlp", "mean")
    n = reference_activations(model, tok, NEGATIVE, [0, 1], "post_mlp", "mean")
    for layer in (0, 1):
        assert_close_scaled(vs[layer], reference_direction(p[layer], n[layer], method, True), rtol=1e-4)


def test_extract_orders_positives_above_negatives(tok):
    vs = extract(M.build("llama"), tok, POSITIVE, NEGATIVE, method="pca_center", progress=False)
    acts = collect_activations(M.build("llama"), tok, POSITIVE + NEGATIVE, progress=False)
    for layer, v in vs:
        proj = acts[layer] @ v
        assert float(proj[:5].mean()) > float(proj[5:].mean())
        assert vs.metadata["separation"][str(layer)] > 0


def test_unpaired_prompts(tok):
    vs = extract(M.build("llama"), tok, POSITIVE, NEGATIVE[:3], method="mean_diff", layers=[1], progress=False)
    assert vs.metadata["paired"] is False and vs.metadata["n_negative"] == 3
    with pytest.raises(ValueError, match="paired"):
        extract(M.build("llama"), tok, POSITIVE, NEGATIVE[:3], method="pca_diff", progress=False)


# ---- the probe -----------------------------------------------------------------

def test_logistic_probe_is_the_regularized_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = ((x[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)) > 0).double()
    probe = fit_logistic(x, y, l2=0.05)
    w, b = _newton_logistic(x, y, 0.05)
    assert torch.allclose(probe.weight, w, atol=1e-6) and abs(probe.bias - float(b)) < 1e-6


def test_probe_on_equal_class_means_is_constant():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    x = torch.cat([a, 2 * a.mean(0) - a])  # reflected: same mean, different rows
    y = torch.cat([torch.ones(20), torch.zeros(20)])
    probe = fit_logistic(x, y)
    assert float(probe.weight.abs().max()) < 1e-8


def test_cross_validation_keeps_groups_together():
    groups = torch.arange(15).repeat_interleave(2)
    masks = group_folds(groups, 4, seed=3)
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(30, dtype=torch.long))  # each row tested once
    for m in masks:
        assert torch.equal(m[0::2], m[1::2])  # twins together
    with pytest.raises(ValueError, match="folds"):
        group_folds(groups, 16)


def test_cross_validation_accuracy_is_the_mean_over_folds():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.7 * torch.randn(24, generator=g, dtype=torch.float64) > 0).double()
    want = []
    for m in group_folds(torch.arange(24), 3, seed=5):
        # each fold scored with the Newton reference probe, not with fit_logistic itself
        w, b = _newton_logistic(x[~m], y[~m], 1e-2)
        pred = (x[m] - x[~m].mean(0)) @ w + b > 0
        want.append(float((pred == (y[m] > 0.5)).double().mean()))
    assert cross_val_accuracy(x, y, folds=3, seed=5) == pytest.approx(sum(want) / 3)


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nfirst line\n\n  second\\nline  \n")
    assert read_prompts(f) == ["first line", "second\nline"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
