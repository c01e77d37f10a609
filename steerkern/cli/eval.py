"""``steerkern eval``: quality against sparsity, TEAL and WINA side by side.

    steerkern eval --model PATH --data FILE --sparsity 0.25,0.5,0.7 [--plot out.png]

Perplexity for causal LMs, embedding cosine to the dense model for encoders
(BERT, MiniLM).  Thresholds are calibrated on ``--calib`` (default:
steerkern's calibration text); quality and realized sparsity are measured on
``--data``.  Sparsity is applied with the reference mask on every token.
"""
from __future__ import annotations

from .calibrate import add_model_args, load_model, load_steering, load_windows


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / embedding cosine against sparsity (TEAL vs WINA)")
    add_model_args(p)
    p.add_argument("--sparsity", default="0.25,0.5,0.7", help="comma-separated targets (default 0.25,0.5,0.7)")
    p.add_argument("--calib", help="calibration text (default: steerkern's calibration text)")
    p.add_argument("--modes", default="teal,wina", help="comma-separated modes (default teal,wina)")
    p.add_argument("--plot", help="write a PNG plot of quality against sparsity")
    p.set_defaults(func=run)


def parse_levels(spec: str):
    from ..calibration.allocate import check_sparsity

    try:
        levels = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sparsity: expected comma-separated fractions like 0.25,0.5,0.7, got {spec!r}") from None
    if not levels:
        raise ValueError("--sparsity: no level given")
    return [check_sparsity(s, "--sparsity") for s in levels]


def run(args) -> int:
    import argparse

    from ..calibration.quality import format_table, plot, sweep

    levels = parse_levels(args.sparsity)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("teal", "wina")]
    if bad or not modes:
        raise ValueError(f"--modes: expected teal and/or wina, got {args.modes!r}")
    model, tok, name = load_model(args)
    eval_windows = load_windows(args, tok, "--data")
    calib_args = argparse.Namespace(**{**vars(args), "data": args.calib})
    calib_windows = load_windows(calib_args, tok, "--calib")
    rows = sweep(model, calib_windows, eval_windows, levels, modes=modes, allocation=args.allocation,
                 steering=load_steering(args), batch_size=args.batch_size, greedy_windows=args.greedy_windows,
                 step=args.step, refine=args.refine, progress=not args.no_progress)
    name = args.model if args.model.lower() == "minilm" else name
    print(f"{name}: {rows[0].metric} on {eval_windows.numel()} tokens, {args.allocation} allocation")
    print(format_table(rows))
    if args.plot:
        plot(rows, args.plot, title=f"{name}: {rows[0].metric} vs sparsity ({args.allocation})")
        print(f"wrote {args.plot}")
    return 0
