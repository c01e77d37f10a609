"""``steerkern extract`` end to end on a tiny saved model: the files it writes
hold what the Python API extracts."""
from __future__ import annotations

import pytest
import torch

import models as M
from steerkern.cli import main
from steerkern.cli.extract import parse_layers
from steerkern.vectors import extract, io
from test_vectors_extract import NEGATIVE, POSITIVE, word_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = M.build("llama")
    model.save_pretrained(d / "model")
    word_tokenizer().save_pretrained(d / "model")
    (d / "pos.txt").write_text("# positive\n" + "\n".join(POSITIVE) + "\n")
    (d / "neg.txt").write_text("\n".join(NEGATIVE) + "\n")
    return d


def test_extract_to_safetensors_and_gguf(saved, capsys):
    from transformers import AutoModel, AutoTokenizer

    args = ["extract", "--model", str(saved / "model"), "--positive", str(saved / "pos.txt"),
            "--negative", str(saved / "neg.txt"), "--method", "pca_diff", "--position", "mean", "--quiet"]
    assert main(args + ["-o", str(saved / "v.safetensors")]) == 0
    assert main(args + ["-o", str(saved / "v.gguf")]) == 0
    out = capsys.readouterr().out
    assert "layers [0] left out" in out and "best-separated layer" in out
    st, gg = io.load(saved / "v.safetensors"), io.load(saved / "v.gguf")
    model = AutoModel.from_pretrained(saved / "model").eval()
    with torch.no_grad():
        want = extract(model, AutoTokenizer.from_pretrained(saved / "model"), POSITIVE, NEGATIVE,
                       method="pca_diff", position="mean", progress=False)
    assert st.layers == [0, 1, 2] and gg.layers == [1, 2]
    assert st.method == "pca_diff" and st.model_type == "llama" and st.hidden_size == M.HIDDEN
    for layer in st.layers:
        assert torch.allclose(st[layer], want[layer], atol=1e-5)
    for layer in gg.layers:
        assert torch.equal(gg[layer], st[layer])


def test_cli_errors_exit_2(saved, capsys):
    base = ["extract", "--model", str(saved / "model"), "--positive", str(saved / "pos.txt"),
            "--negative", str(saved / "neg.txt"), "--quiet"]
    assert main(base + ["--layers", "7", "-o", str(saved / "x.safetensors")]) == 2
    assert "--layers" in capsys.readouterr().err
    assert main(base + ["-o", str(saved / "x.pt")]) == 2
    assert "-o" in capsys.readouterr().err
    assert main(base + ["--layers", "0", "-o", str(saved / "x.gguf")]) == 2


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3, 0-1", 4) == [0, 1, 3]
    for bad in ("4", "a", "1-x", ""):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 4)
