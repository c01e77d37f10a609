"""``steerkern calibrate``: derive a sparsity plan from calibration text.

    steerkern calibrate --model PATH --sparsity 0.5 [--data FILE] -o PLAN \\
        [--mode wina|teal] [--allocation uniform|greedy] [--steering STEERING_PLAN] [--lm-head T]

Thresholds are read from streaming histograms of every projection's input
scores on the text (default: a short English text shipped with steerkern),
with the steering plan applied when one is given.  A held-out part of the
text reports the sparsity the plan really reaches.
"""
from __future__ import annotations

import dataclasses
import os

from ._common import DTYPE_NAMES, dtype_of, minilm_dir


def add_model_args(p) -> None:
    """Options shared by ``calibrate`` and ``eval``."""
    p.add_argument("--model", required=True,
                   help="a local model directory or hub id ('minilm': the bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", help="UTF-8 text file (default: steerkern's calibration text)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--max-windows", type=int, default=64, help="at most this many windows (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=("wina", "teal"), default="wina")
    p.add_argument("--allocation", choices=("uniform", "greedy"), default="uniform",
                   help="one sparsity for every projection, or greedy per block (default uniform)")
    p.add_argument("--step", type=float, default=0.05, help="greedy allocation step (default 0.05)")
    p.add_argument("--greedy-windows", type=int, default=8,
                   help="windows each block is replayed on by the greedy allocation (default 8)")
    p.add_argument("--refine", type=int, default=1,
                   help="passes that re-read thresholds with the plan applied (default 1)")
    p.add_argument("--steering", help="a saved SteeringPlan: calibrate on steered activations")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate per-layer sparsity thresholds on text")
    add_model_args(p)
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity, e.g. 0.5")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="fraction of windows kept out to report realized sparsity (0: none)")
    p.add_argument("-o", "--output", required=True, help="where to write the plan (.safetensors)")
    p.add_argument("--lm-head", type=float, default=None, metavar="T",
                   help="also store a threshold for the LM head's input (0: dense, through steerkern's "
                        "GEMV kernel at decode); default: the head is left to torch")
    p.set_defaults(func=run)


def resolve_model(name: str) -> str:
    if name.lower() == "minilm":
        return str(minilm_dir("--model minilm"))
    return name


def load_model(args):
    """(model, tokenizer, name) for ``args.model``: an encoder for BERT-like
    models, a causal LM otherwise.  ``name`` is what patching checks a plan's
    ``model`` against: the directory's base name."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = dtype_of(args.dtype)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, os.path.basename(path.rstrip("/"))


def load_windows(args, tok, name: str = "--data"):
    from ..calibration import default_text_path, read_text, token_windows

    if args.max_windows < 1:
        raise ValueError(f"--max-windows: expected >= 1, got {args.max_windows}")
    text = read_text(args.data or default_text_path(), name)
    return token_windows(tok, text, args.seq_len, max_windows=args.max_windows, name=name)


def load_steering(args):
    if not args.steering:
        return None
    from ..plan import SteeringPlan

    if not os.path.isfile(args.steering):
        raise ValueError(f"--steering: no such file: {args.steering}")
    return SteeringPlan.load(args.steering)


def run(args) -> int:
    from ..calibration import Calibrator, average, measure, site_weights, split_windows
    from ..calibration.allocate import check_sparsity

    check_sparsity(args.sparsity, "--sparsity")
    if not 0.0 <= args.held_out < 0.5:
        raise ValueError(f"--held-out: expected a fraction in [0, 0.5), got {args.held_out}")
    model, tok, name = load_model(args)
    windows = load_windows(args, tok)
    steering = load_steering(args)
    calib, held = windows, None
    if args.held_out > 0 and len(windows) * args.held_out >= 1:
        calib, held = split_windows(windows, args.held_out)
    cal = Calibrator(model, calib, steering=steering, batch_size=args.batch_size,
                     greedy_windows=args.greedy_windows if args.allocation == "greedy" else 0,
                     progress=not args.no_progress)
    plan = cal.plan(args.sparsity, mode=args.mode, allocation=args.allocation, step=args.step,
                    refine=args.refine, model_name=name)
    if args.lm_head is not None:
        plan = dataclasses.replace(plan, lm_head=args.lm_head)
    plan.save(args.output)
    print(f"calibrated {len(cal.layers)} layers x {len(cal.sites) // len(cal.layers)} projections "
          f"on {cal.tokens} tokens ({args.mode}, {args.allocation}, target {args.sparsity:g}"
          f"{', steered' if steering is not None else ''})")
    if held is not None:
        realized = measure(model, plan, held, steering=steering, batch_size=args.batch_size)
        per = sorted(realized.values())
        print(f"held-out ({held.numel()} tokens): realized sparsity {average(realized, site_weights(cal.sites)):.3f} "
              f"(weight-weighted; per projection {per[0]:.3f}..{per[-1]:.3f})")
    print(f"wrote {args.output}")
    return 0
