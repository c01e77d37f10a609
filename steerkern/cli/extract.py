"""``steerkern extract``: steering vectors from contrastive prompt files.

    steerkern extract --model MODEL --positive POS.txt --negative NEG.txt \\
        --method mean_diff -o out.safetensors|out.gguf

Prompt files hold one prompt per line (``#`` comments and blank lines are
skipped).  A ``.gguf`` output is a llama.cpp control vector; since llama.cpp
cannot steer block 0's output, layer 0 is left out of it.
"""
from __future__ import annotations

import os


def register(sub) -> None:
    from ..vectors.extract import METHODS, POSITIONS

    p = sub.add_parser("extract", help="extract steering vectors from positive/negative prompt files")
    p.add_argument("--model", required=True, help="a transformers model directory or hub id")
    p.add_argument("--positive", required=True, metavar="FILE", help="prompts showing the concept")
    p.add_argument("--negative", required=True, metavar="FILE", help="prompts without it (line i pairs with "
                   "line i of --positive when the counts match)")
    p.add_argument("--method", default="mean_diff", choices=METHODS)
    p.add_argument("--layers", default="all", help="'all', or comma-separated indices and ranges: 4,8-12")
    p.add_argument("--site", default="post_mlp", choices=("post_mlp", "pre"),
                   help="read the block output (post_mlp, what llama.cpp steers) or its input (pre)")
    p.add_argument("--position", default="last", choices=POSITIONS)
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user turn")
    p.add_argument("--system", default=None, help="system prompt, with --chat-template")
    p.add_argument("--suffix", default="", help="text appended to every prompt")
    p.add_argument("--unpaired", action="store_true", help="do not pair prompts even if the counts match")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--normalize", action="store_true", help="scale every vector to unit norm")
    p.add_argument("-o", "--output", required=True, help="out.safetensors or out.gguf")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_layers(spec: str, num_layers: int):
    """``"all"`` or ``"4,8-12"`` -> a sorted list of layer indices."""
    if spec.strip() == "all":
        return list(range(num_layers))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"--layers: cannot parse {part!r}; expected e.g. 'all' or '4,8-12'") from None
    bad = sorted(x for x in out if not 0 <= x < num_layers)
    if bad or not out:
        raise ValueError(f"--layers: {bad or spec!r} out of range; the model has layers 0..{num_layers - 1}")
    return sorted(out)


def run(args) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ..vectors import extract, io, read_prompts
    from ..vectors.extract import _config_layers

    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in (".safetensors", ".gguf"):
        raise ValueError(f"-o: expected a .safetensors or .gguf file name, got {args.output!r}")
    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    layers = parse_layers(args.layers, _config_layers(model))
    if suffix == ".gguf":
        # llama.cpp steers block outputs 1..L-1: post_mlp of layer 0, and pre of
        # layers 0 (the embeddings) and 1 (block 0's output), have no slot
        lost = [x for x in ((0,) if args.site == "post_mlp" else (0, 1)) if x in layers]
        for x in lost:
            layers.remove(x)
        if lost:
            print(f"note: layers {lost} left out: a llama.cpp control vector cannot steer the embeddings "
                  "or block 0's output")
        if not layers:
            raise ValueError("--layers: nothing left to write to a GGUF control vector")
    vs = extract(model, tokenizer, positive, negative, method=args.method, layers=layers, site=args.site,
                 position=args.position, paired=False if args.unpaired else None,
                 chat_template=args.chat_template, system_prompt=args.system, suffix=args.suffix,
                 batch_size=args.batch_size, max_length=args.max_length, progress=not args.quiet,
                 model_id=args.model)
    if args.normalize:
        vs = vs.normalized()
    io.save(vs, args.output)
    sep = vs.metadata.get("separation", {})
    best = max(sep, key=lambda k: sep[k] if sep[k] is not None else float("-inf")) if sep else None
    print(f"wrote {vs} to {args.output}")
    if best is not None:
        print(f"best-separated layer: {best} (Cohen's d {sep[best]:.2f} along its vector)")
    return 0
