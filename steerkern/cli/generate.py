"""``steerkern generate``: steered (and sparse) generation from the command line.

    steerkern generate --model PATH_OR_ID --prompt "..." \\
        [--vector FILE --alpha A --layers 10-14 --site post_mlp] [--ablate FILE] [--sparsity 0.5]
        [--lm-head 0]

Vector files are read with :func:`steerkern.vectors.io.load` (steerkern
safetensors, llama.cpp/repeng GGUF control vectors); a safetensors file
holding one plain tensor ``[d]`` or ``[num_layers, d]`` is accepted too.
Prints the text and the decode speed in tokens per second.
"""
from __future__ import annotations

import time
from typing import List, Optional

from ._common import DTYPE_NAMES, dtype_of


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with steering and/or sparse activation")
    p.add_argument("--model", required=True, help="a local model directory or a hub id")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--vector", help="steering vector file (safetensors or GGUF)")
    p.add_argument("--alpha", type=float, default=1.0, help="coefficient of the steering vector")
    p.add_argument("--layers", help="layers to steer: '12', '10-14' or '3,5,7' (default: the file's)")
    p.add_argument("--site", choices=("pre", "post_attn", "post_mlp"), default=None,
                   help="where the vector is added (default: the file's, else post_mlp)")
    p.add_argument("--positions", default="all", help="all, prompt, generated or an int N")
    p.add_argument("--ablate", help="direction file to ablate at every site of every layer")
    p.add_argument("--sparsity", type=float, help="target activation sparsity, e.g. 0.5 (calibrated now)")
    p.add_argument("--sparsity-plan", help="a saved SparsityPlan file (instead of --sparsity)")
    p.add_argument("--lm-head", type=float, default=None, metavar="T",
                   help="threshold for the LM head's input; 0 keeps it dense but runs it through "
                        "steerkern's GEMV kernel (faster decode on CPU); default: the plan's, else torch's")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="kernel backend (see `steerkern backends`)")
    p.add_argument("--attention", choices=("auto", "kernel", "model"), default="auto",
                   help="a decode step's attention: steerkern's kernel (CPU, fp32 inside), the model's own, "
                        "or auto (the kernel with sparsity, else the model's)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also generate without steerkern, for comparison")
    p.set_defaults(func=run)


def parse_layers(spec: Optional[str]) -> Optional[List[int]]:
    """'12' -> [12]; '10-14' -> [10..14]; '3,5,7' -> [3, 5, 7]."""
    if spec is None:
        return None
    out: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--layers: expected '12', '10-14' or '3,5,7', got {spec!r}") from None
    return out


def _positions(value: str):
    return int(value) if value.isdigit() else value


def load_vectors(path: str):
    """``{layer or None: vector}`` from a vector file; None means every layer."""
    from ..vectors import io as vio

    try:
        vs = vio.load(path)
        return {layer: v for layer, v in vs}, vs.site
    except ValueError:
        pass  # maybe a plain tensor file
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as err:
        raise ValueError(f"--vector: cannot read {path}: {err}") from None
    if len(tensors) != 1:
        raise ValueError(f"--vector: expected one tensor [d] or [num_layers, d] in {path}, got {list(tensors)}")
    t = next(iter(tensors.values())).float()
    if t.dim() == 1:
        return {None: t}, None
    if t.dim() == 2:
        return {i: t[i] for i in range(t.shape[0])}, None
    raise ValueError(f"--vector: expected a tensor [d] or [num_layers, d], got {list(t.shape)}")


def build_steering(args):
    import torch

    from ..ops.table import SteerEntry, orthonormalize
    from ..plan import Intervention, SteeringPlan

    layers = parse_layers(args.layers)
    positions = _positions(args.positions)
    ivs = []
    if args.vector:
        vecs, file_site = load_vectors(args.vector)
        site = args.site or file_site or "post_mlp"
        if None in vecs:
            ivs.append(Intervention(SteerEntry(vector=vecs[None], alpha=args.alpha), site, layers,
                                    positions=positions))
        else:
            chosen = [layer for layer in vecs if layers is None or layer in layers]
            if not chosen:
                raise ValueError(f"--layers: the vector file has layers {sorted(vecs)}, none of {layers}")
            ivs += [Intervention(SteerEntry(vector=vecs[layer], alpha=args.alpha), site, [layer],
                                 positions=positions) for layer in chosen]
    if args.ablate:
        vecs, _ = load_vectors(args.ablate)
        direction = next(iter(vecs.values())) if len(vecs) == 1 else vecs[sorted(vecs)[len(vecs) // 2]]
        q = orthonormalize(torch.as_tensor(direction)[None])
        ivs += SteeringPlan.ablate(q, layers=layers, positions=positions).interventions
    return SteeringPlan(ivs) if ivs else None


def run(args) -> int:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..patching import patch

    dtype = dtype_of(args.dtype)
    if args.sparsity is not None:
        from ..calibration.allocate import check_sparsity  # (torch: imported on use, not at --help)

        check_sparsity(args.sparsity, "--sparsity")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens: expected >= 1")
    if args.lm_head is not None and not 0.0 <= args.lm_head < float("inf"):
        raise ValueError(f"--lm-head: expected a threshold >= 0, got {args.lm_head}")
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    steering = build_steering(args)
    sparsity = None
    if args.sparsity_plan:
        from ..plan import SparsityPlan

        sparsity = SparsityPlan.load(args.sparsity_plan)
    elif args.sparsity:
        from ..calibration import calibrate, default_text_path, read_text, token_windows

        windows = token_windows(tok, read_text(default_text_path()), seq_len=64, max_windows=16)
        # calibrate on the steered activations: steering shifts the distribution
        sparsity = calibrate(model, windows.to(args.device), args.sparsity, progress=True,
                             steering=steering,
                             model_name=os.path.basename(args.model.rstrip("/")))
    if args.lm_head is not None:
        import dataclasses

        from ..plan import SparsityPlan

        sparsity = (SparsityPlan({}, lm_head=args.lm_head) if sparsity is None
                    else dataclasses.replace(sparsity, lm_head=args.lm_head))
    batch = tok(args.prompt, return_tensors="pt", padding=True)
    batch = {k: batch[k].to(args.device) for k in ("input_ids", "attention_mask")}

    def generate(label):
        torch.manual_seed(args.seed)
        kw = dict(do_sample=args.sample, temperature=args.temperature) if args.sample else dict(do_sample=False)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:]
        n = int((new != tok.pad_token_id).sum()) if tok.pad_token_id != tok.eos_token_id else new.numel()
        for prompt, row in zip(args.prompt, new):
            print(f"[{label}] {prompt}{tok.decode(row, skip_special_tokens=True)}")
        print(f"[{label}] {n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s (prefill included)")

    if args.compare:
        generate("plain")
    what = " + ".join(w for w, on in (("steering", steering), ("sparsity", sparsity)) if on) or "empty plan"
    with patch(model, steering, sparsity, backend=args.backend, attention=args.attention):
        generate(f"steerkern: {what}")
    return 0
