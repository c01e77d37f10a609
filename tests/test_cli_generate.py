"""``steerkern generate`` and ``steerkern demo`` (argument handling, a tiny local model)."""
from __future__ import annotations

import pytest
import torch

from steerkern.cli import build_parser, main
from steerkern.cli.generate import parse_layers

import models as M


def test_parse_layers():
    assert parse_layers("3") == [3]
    assert parse_layers("10-12") == [10, 11, 12]
    assert parse_layers("1,4-5") == [1, 4, 5]
    assert parse_layers(None) is None
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("5-2")


def test_subcommands_registered():
    parser = build_parser()
    assert parser.parse_args(["demo", "--skip-speed"]).command == "demo"
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "hi", "--vector", "v.safetensors",
                              "--alpha", "2", "--layers", "1-2", "--sparsity", "0.5"])
    assert args.alpha == 2.0 and args.layers == "1-2"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with MiniLM's tokenizer (vocab matched), saved to disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(M.minilm_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_generate_with_vector_and_ablation(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"v": torch.randn(32) * 5}, str(tmp_path / "v.safetensors"))
    save_file({"d": torch.randn(32)}, str(tmp_path / "d.safetensors"))
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "hello there", "--max-new-tokens", "5",
               "--vector", str(tmp_path / "v.safetensors"), "--alpha", "3", "--layers", "0-1",
               "--ablate", str(tmp_path / "d.safetensors"), "--compare"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[plain] hello there" in out and "[steerkern: steering] hello there" in out
    assert out.count("tokens/s") == 2


def test_generate_with_sparsity(tiny_model_dir, capsys):
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--prompt", "bb cc",
               "--max-new-tokens", "3", "--sparsity", "0.5"])
    assert rc == 0
    assert "steerkern: sparsity" in capsys.readouterr().out


def _same_text_as_plain(model_dir, capsys, label: str, *flags: str) -> None:
    """generate --compare with ``flags``: the patched run (``[label]``) prints
    the same greedy text as plain transformers."""
    rc = main(["generate", "--model", str(model_dir), "--prompt", "hello there", "--max-new-tokens", "4",
               *flags, "--compare"])
    out = capsys.readouterr().out
    assert rc == 0
    plain = next(line for line in out.splitlines() if line.startswith("[plain]"))
    ours = next(line for line in out.splitlines() if line.startswith(f"[{label}]"))
    assert plain.split("]", 1)[1] == ours.split("]", 1)[1]


def test_generate_with_the_lm_head_through_the_gemv_kernel_matches_plain(tiny_model_dir, capsys):
    _same_text_as_plain(tiny_model_dir, capsys, "steerkern: sparsity", "--lm-head", "0")


def test_generate_with_the_decode_attention_kernel_matches_plain(tiny_model_dir, capsys):
    _same_text_as_plain(tiny_model_dir, capsys, "steerkern: empty plan", "--attention", "kernel")  # fp32


def test_generate_refuses_a_negative_lm_head_threshold(tiny_model_dir, capsys):
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--lm-head", "-1"])
    assert rc == 2
    assert "--lm-head: expected a threshold >= 0" in capsys.readouterr().err


def test_generate_refuses_a_vector_of_the_wrong_size(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"v": torch.randn(31)}, str(tmp_path / "bad.safetensors"))
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--vector",
               str(tmp_path / "bad.safetensors")])
    assert rc == 2
    assert "hidden size" in capsys.readouterr().err


def test_demo_real_weights_part(capsys):
    assert main(["demo", "--skip-speed"]) == 0
    out = capsys.readouterr().out
    assert "REAL weights" in out and "mean change of similarity" in out
