"""Steering's cost at decode, measured step by step in one process.

bench_decode.py compares whole generate() runs, (c) steered against (e) the
empty patch, in alternating pairs; on this machine the decode rate swings by
10-30% within a minute, so a cost of 1-2% is at the edge of what those pairs
resolve.  Here the two plans take turns every few decode steps instead: each
has its own KV cache (prefilled once), the model is re-patched for each turn
(cheap: no sparse weights to prepare), and the cost is the median over the
rounds of (time per step with the plan) / (time per step with the empty
patch) - 1.  A third plan, the same steering with alpha = 0, runs the same
code with no effect on the values: it separates the cost of the code path
from any effect of the steered values on the rest of the model.

    python bench/bench_steer_cost.py                       # TinyLlama shape, bf16 and fp32
    python bench/bench_steer_cost.py --shape small --rounds 40

Writes JSON (default bench/results/steer_cost_cpu_<shape>.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import DTYPES, SHAPES, build  # noqa: E402


def measure(shape: str, dtype_name: str, rounds: int, steps: int, progress) -> dict:
    import steerkern
    from transformers import DynamicCache

    model = build(shape, DTYPES[dtype_name], "cpu")
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(d, generator=g)
    vector = vector / vector.norm()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=g)
    plans = {"empty_patch": steerkern.SteeringPlan(),
             "steered": steerkern.SteeringPlan.add(vector, 0.5, site="post_mlp"),
             "steered_alpha0": steerkern.SteeringPlan.add(vector, 0.0, site="post_mlp")}
    token = torch.tensor([[5]])
    caches, times = {}, {name: [] for name in plans}
    with torch.no_grad():
        for name, plan in plans.items():
            with steerkern.patch(model, plan):
                caches[name] = DynamicCache(config=model.config)
                model(ids, past_key_values=caches[name], use_cache=True)
        for r in range(rounds):
            # alternate the order too, so that a drift within a round favours no plan
            for name in (list(plans) if r % 2 == 0 else list(plans)[::-1]):
                with steerkern.patch(model, plans[name]):
                    model(token, past_key_values=caches[name], use_cache=True)  # the patch's first call
                    start = time.perf_counter()
                    for _ in range(steps):
                        model(token, past_key_values=caches[name], use_cache=True)
                    times[name].append((time.perf_counter() - start) / steps)
            progress()
    out = {"rounds": rounds, "steps_per_turn": steps, "ms_per_step_median": {}}
    for name in plans:
        out["ms_per_step_median"][name] = statistics.median(times[name]) * 1e3
        if name != "empty_patch":
            costs = [t / e - 1.0 for t, e in zip(times[name], times["empty_patch"])]
            q1, med, q3 = statistics.quantiles(costs, n=4)
            out[f"cost_{name}"] = {"median": statistics.median(costs), "q1": q1, "q3": q3}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tinyllama-1.1b", choices=[s for s in SHAPES if s != "llama-8b"])
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of fp32, bf16")
    p.add_argument("--rounds", type=int, default=24, help="turns of each plan")
    p.add_argument("--steps", type=int, default=6, help="decode steps per turn")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/steer_cost_cpu_<shape>.json)")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
    if args.rounds < 4 or args.steps < 1:
        raise SystemExit("--rounds must be at least 4 (quartiles) and --steps at least 1")
    from tqdm import tqdm

    import steerkern

    bar = tqdm(total=args.rounds * len(dtypes), desc="steer cost")
    results = {"shape": args.shape, "torch": torch.__version__, "steerkern": steerkern.__version__,
               "threads": torch.get_num_threads(), "runs": {}}
    for dt in dtypes:
        bar.set_postfix_str(dt)
        results["runs"][dt] = measure(args.shape, dt, args.rounds, args.steps, lambda: bar.update(1))
    bar.close()
    out = Path(args.out or Path(__file__).parent / "results" / f"steer_cost_cpu_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for dt, r in results["runs"].items():
        ms = r["ms_per_step_median"]
        print(f"{args.shape} {dt}: {ms['empty_patch']:.2f} ms per step with the empty patch; cost of steering "
              + ", ".join(f"{name[5:]} {100 * c['median']:+.2f}% (quartiles {100 * c['q1']:+.2f} to "
                          f"{100 * c['q3']:+.2f}%)" for name, c in r.items() if name.startswith("cost_"))
              + " (goal <= +3%)")
    print(f"wrote {out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
