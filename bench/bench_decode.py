"""End-to-end decode speed: batch-1 greedy decode with random weights.

Providers, measured in the same run on the same model:

  (a) unpatched       plain transformers
  (b) hook-steered    a forward hook on every layer adds alpha * v to its
                      output, the way hook-based steering libraries do it
  (c) steered         steerkern, the same steering (site post_mlp, every layer)
  (d) steered+sparse  (c) plus 50% WINA sparsity on every projection input
                      (thresholds calibrated on random token windows); the
                      LM head stays dense but runs through steerkern's GEMV
                      kernel (SparsityPlan.lm_head = 0); with a sparsity
                      plan a decode step's attention runs steerkern's decode
                      attention kernel (patch's attention="auto")
  (e) empty patch     steerkern patched with an empty plan

Also measured next to each (a, d) pair: (d') (d) with the model's own
attention (attention="model"), reported as steered_sparse_model_attention,
the attention kernel's share; and (d'') (d) with the family's attention and
MLP forwards instead of steerkern's lean decode forwards, reported as
steered_sparse_modules, the lean forwards' share.

Goals: (c) costs <= 3% over (e); (d) >= 1.7x (a) in fp32 and >= 3x in bf16 (CPU).
(c) and (e) are measured in alternating pairs (--pairs), and so are (a) and
(d) (--speed-pairs), each pair in the opposite order to the one before: the
cost and the speedup are medians over the pairs, since the machine's drift
between runs is larger than the cost.
Decode tokens/s is (N - 1) / (t(N new tokens) - t(1 new token)), so prefill is
not counted.  Writes JSON (default bench/results/decode_cpu.json) and a PNG.

    python bench/bench_decode.py --quick        # small Llama shape, a minute or two
    python bench/bench_decode.py                # + TinyLlama-1.1B shape
    python bench/bench_decode.py --gpu          # 8B shape, bf16, CUDA
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "small": (512, 1408, 8, 8, 4, 4096),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("unpatched", "hook_steered", "steered", "steered_sparse", "steered_sparse_model_attention",
             "steered_sparse_modules", "empty_patch")


def build(shape: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def decode_rate(model, ids, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s, best of ``repeats``, prefill excluded."""

    def run(n):
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)  # warm-up
    rates = []
    for _ in range(repeats):
        t1, tn = run(1), run(new_tokens)
        rates.append((new_tokens - 1) / max(tn - t1, 1e-9))
    return max(rates)


def add_hooks(model, vector, alpha):
    def hook(module, args, out):
        return out + alpha * vector.to(out.dtype)

    return [layer.register_forward_hook(hook) for layer in model.model.layers]


def bench_one(shape, dtype_name, device, new_tokens, repeats, pairs, speed_pairs, progress):
    import steerkern
    from steerkern.calibration import calibrate
    from steerkern.patching import decode as lean_decode

    dtype = DTYPES[dtype_name]
    model = build(shape, dtype, device)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(d, generator=g)
    vector = (vector / vector.norm()).to(device)
    alpha = 0.5
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=g).to(device)
    steering = steerkern.SteeringPlan.add(vector.cpu(), alpha, site="post_mlp")
    windows = torch.randint(3, model.config.vocab_size, (16, 32), generator=g)
    sparsity = calibrate(model, windows.to(device), 0.5, progress=False, refine=0)
    # (d) also runs the (dense) LM head through steerkern's GEMV kernel
    head_sparsity = dataclasses.replace(sparsity, lm_head=0.0)
    def measure(name, tokens=new_tokens, reps=repeats):
        hooks, handle = [], None
        if name == "hook_steered":
            hooks = add_hooks(model, vector, alpha)
        elif name == "steered":
            handle = steerkern.patch(model, steering)
        elif name == "steered_sparse":
            handle = steerkern.patch(model, steering, head_sparsity, drop_dense=True)
        elif name == "steered_sparse_model_attention":
            handle = steerkern.patch(model, steering, head_sparsity, drop_dense=True, attention="model")
        elif name == "steered_sparse_modules":
            # (d) with the family's block forwards instead of the lean ones
            # (steerkern.patching.decode): what the lean forwards are worth
            handle = steerkern.patch(model, steering, head_sparsity, drop_dense=True)
            lean_decode.uninstall(handle._lean)
            handle._lean = []
        elif name == "empty_patch":
            handle = steerkern.patch(model, steerkern.SteeringPlan())
        with torch.no_grad():
            rate = decode_rate(model, ids, tokens, reps)
        for h in hooks:
            h.remove()
        if handle is not None:
            handle.remove()
        return rate

    def ordered(i, first, second, *args):
        """(rate of first, rate of second), measured in the order first, second
        on even pairs and second, first on odd ones: a drift within a pair
        then favours neither side over the pairs."""
        if i % 2:
            b = measure(second, *args)
            return measure(first, *args), b
        a = measure(first, *args)
        return a, measure(second, *args)

    out = {}
    # (a) and (d) alternate too: the ratio of each pair is taken within one
    # machine state, and the median of the pairs is the speedup reported
    progress(f"{shape} {dtype_name} unpatched vs steered+sparse, {speed_pairs} pairs")
    speed, model_attention, modules = [], [], []
    for i in range(speed_pairs):
        speed.append(ordered(i, "unpatched", "steered_sparse"))
        # next to each pair, (d) with the model's own attention (the decode
        # attention kernel's share of (d); on CUDA the two are the same) and
        # (d) with the family's block forwards (the lean forwards' share)
        model_attention.append(measure("steered_sparse_model_attention"))
        modules.append(measure("steered_sparse_modules"))
    out["unpatched"] = max(a for a, _ in speed)
    out["steered_sparse"] = max(d for _, d in speed)
    out["speed_pairs"] = [{"unpatched": a, "steered_sparse": d, "steered_sparse_model_attention": m,
                           "steered_sparse_modules": f}
                          for (a, d), m, f in zip(speed, model_attention, modules)]
    out["steered_sparse_model_attention"] = max(model_attention)
    out["ratio_sparse_over_model_attention"] = statistics.median(d / m for (_, d), m in zip(speed, model_attention))
    out["steered_sparse_modules"] = max(modules)
    out["ratio_sparse_over_modules"] = statistics.median(d / f for (_, d), f in zip(speed, modules))
    progress(f"{shape} {dtype_name} hook_steered")
    out["hook_steered"] = measure("hook_steered")
    # steering's cost is a few percent, below the machine's drift between
    # runs: so (e) and (c) alternate, and the cost is the median of the pairs
    progress(f"{shape} {dtype_name} steered vs empty patch, {pairs} pairs")
    # many pairs, each of two runs close in time, so that a pair sees about
    # one machine state; each run decodes for ~1 s where 256 tokens allow
    # (runs of a few tens of ms on the small model swung by several percent
    # on jitter alone, and runs of 0.4 s by 3-5%)
    pair_tokens = max(new_tokens, min(256, int(1.0 * out["unpatched"])))
    out["pair_tokens"] = pair_tokens
    pair_rates = [ordered(i, "empty_patch", "steered", pair_tokens, 1) for i in range(pairs)]
    out["empty_patch"] = max(e for e, _ in pair_rates)
    out["steered"] = max(c for _, c in pair_rates)
    out["pairs"] = [{"empty_patch": e, "steered": c} for e, c in pair_rates]
    out["ratio_steered_over_empty_cost"] = statistics.median(e / c for e, c in pair_rates) - 1.0
    out["ratio_steered_over_empty_cost_best"] = out["empty_patch"] / out["steered"] - 1.0
    # the same cost from the other side, free of the drift: the time of the
    # steered sites' calls, measured alone, over the time of one decode step
    site_us, sites = steer_site_us(model, steering, device)
    out["steer_site_us"] = site_us
    out["steer_sites"] = sites
    out["steer_cost_from_site_time"] = sites * site_us * 1e-6 * out["empty_patch"]
    out["ratio_sparse_over_unpatched"] = statistics.median(d / a for a, d in speed)
    out["ratio_sparse_over_unpatched_best"] = out["steered_sparse"] / out["unpatched"]
    out["ratio_steered_over_hooks"] = out["steered"] / out["hook_steered"]
    del model
    return out


def steer_site_us(model, steering, device, calls: int = 2000):
    """Extra microseconds per decode step and steered post-MLP site, measured
    alone: the patched layer's end (``post_mlp_stream``: the residual add,
    the steering and, fused in, the next layer's input norm) against what the
    empty patch runs there (``residual + x``, then that norm); and the number
    of steered sites."""
    import steerkern

    def best_us(fn):
        best = float("inf")
        for _ in range(5):
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / calls)
        return best * 1e6

    with steerkern.patch(model, steering), torch.no_grad():
        layers = model.model.layers
        sk = layers[0].steerkern
        sites = sum(m is not None for layer in layers
                    for m in (layer.steerkern.pre, layer.steerkern.post_attn, layer.steerkern.post_mlp))
        shape = (1, 1, model.config.hidden_size)
        r = torch.randn(shape, device=device).to(model.dtype)
        x = torch.randn(shape, device=device).to(model.dtype)
        norm = layers[1].input_layernorm
        steered = best_us(lambda: sk.post_mlp_stream(r, x))
        plain = best_us(lambda: norm(r + x))
        layers[1].steerkern.take_normed(r)  # drop the norm left for the next layer
    return steered - plain, sites


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(s, dt) for s in results["runs"] for dt in results["runs"][s]]
    fig, ax = plt.subplots(figsize=(2.6 * len(groups) + 2, 4))
    width = 0.8 / len(PROVIDERS)
    for k, prov in enumerate(PROVIDERS):
        # relative to unpatched, so shapes of very different speed share one axis
        vals = [results["runs"][s][dt][prov] / results["runs"][s][dt]["unpatched"] for s, dt in groups]
        bars = ax.bar([i + k * width for i in range(len(groups))], vals, width, label=prov)
        ax.bar_label(bars, labels=[f"{results['runs'][s][dt][prov]:.3g}" for s, dt in groups],
                     fontsize=6, rotation=90, padding=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{dt}" for s, dt in groups])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("decode speed / unpatched (batch 1; bars: tokens/s)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title(f"steerkern decode, {results['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small shape only")
    p.add_argument("--gpu", action="store_true", help="the 8B shape in bf16 on CUDA")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (CPU runs)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per timed run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    p.add_argument("--pairs", type=int, default=10, help="alternating (empty patch, steered) measurements")
    p.add_argument("--speed-pairs", type=int, default=5,
                   help="alternating (unpatched, steered+sparse) measurements")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/decode_<device>.json, decode_<device>_quick.json "
                        "with --quick)")
    args = p.parse_args(argv)

    import steerkern
    from tqdm import tqdm

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device visible")
        device, shapes, dtypes = "cuda", ["llama-8b"], ["bf16"]
    else:
        device = "cpu"
        shapes = ["small"] if args.quick else ["small", "tinyllama-1.1b"]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise SystemExit(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tokens = args.tokens or (16 if args.quick else 32)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "steerkern": steerkern.__version__,
        "backends": steerkern.backend_report(), "new_tokens": tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "runs": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    jobs = [(s, dt) for s in shapes for dt in dtypes]
    bar = tqdm(total=len(jobs) * 3, desc="decode bench")

    def progress(msg):
        bar.set_postfix_str(msg)
        bar.update(1)

    for s, dt in jobs:
        results["runs"].setdefault(s, {})[dt] = bench_one(s, dt, device, tokens, args.repeats, args.pairs, args.speed_pairs, progress)
    bar.close()
    # a quick run never overwrites the full run's results that README quotes
    name = f"decode_{device}_quick.json" if args.quick else f"decode_{device}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    for s, per in results["runs"].items():
        for dt, r in per.items():
            print(f"{s:16s} {dt:5s} " + "  ".join(f"{k}={r[k]:.2f}" for k in PROVIDERS))
            print(f"{'':22s} steered cost over empty patch: {100 * r['ratio_steered_over_empty_cost']:+.1f}% "
                  f"median of {len(r['pairs'])} pairs, {100 * r['ratio_steered_over_empty_cost_best']:+.1f}% "
                  f"best vs best, {100 * r['steer_cost_from_site_time']:+.1f}% from "
                  f"{r['steer_sites']} sites x {r['steer_site_us']:+.1f} us alone (goal <= +3%); sparse/unpatched: {r['ratio_sparse_over_unpatched']:.2f}x median of pairs "
                  f"(goal {'1.7' if dt == 'fp32' else '3'}x); steered/hooks: {r['ratio_steered_over_hooks']:.2f}x; "
                  f"steered+sparse with the model's attention: {r['steered_sparse_model_attention']:.2f} tok/s "
                  f"(the attention kernel: {r['ratio_sparse_over_model_attention']:.2f}x, median of pairs); "
                  f"with the family's block forwards: {r['steered_sparse_modules']:.2f} tok/s "
                  f"(the lean forwards: {r['ratio_sparse_over_modules']:.3f}x, median of pairs)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
