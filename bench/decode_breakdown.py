"""Where a decode step's time goes, timed inside the step (CPU).

bench_decode.py reports tokens/s; this splits one decode step of the same
models into its pieces, timed where they run (a piece of Python timed in a
loop of its own looks several times cheaper than it is inside a step, whose
projections have just streamed tens of MB through the caches):

* (d) steering + 50% sparsity: the sparse GEMV calls (time, and the bytes of
  weight rows they read, counted from the active inputs of every call in a
  round of its own, so an in-situ bandwidth), the attention calls, and the
  rest of the step; then one step's GEMV calls replayed back to back (the
  kernel's own rate on these shapes, no Python between the calls) and the
  step with the GEMVs stubbed out (the rest with warm caches: a floor);
* (c) steering against (e) the empty patch: the steered layer end
  (``post_mlp_stream``: add, steer and the next layer's input RMSNorm in one
  call, the kernel timed separately) against the model's own RMSNorm calls,
  and the attention and MLP blocks of both.

Timing wrappers add a little to every piece; compare pieces, not the step
total with bench_decode's rates.

    python bench/decode_breakdown.py                 # TinyLlama shape, bf16
    python bench/decode_breakdown.py --dtype fp32 --shape small

Writes JSON (default bench/results/decode_breakdown_cpu_<shape>_<dtype>.json).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import DTYPES, SHAPES, build  # noqa: E402


class Timers:
    def __init__(self):
        self.t = collections.Counter()
        self.n = collections.Counter()
        self.bytes = 0.0
        self.count_bytes = False
        self.captured = None  # a list: every GEMV call's kernel and arguments are kept
        self.stub = False

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.t[label] += time.perf_counter() - start
            self.n[label] += 1
            return out
        return timed


def _patch_attr(undo, obj, name, value):
    old = getattr(obj, name)
    undo.append(lambda: setattr(obj, name, old))
    setattr(obj, name, value)


def _steps(model, ids, steps, timers):
    """Per-step seconds of ``steps`` decode steps after a prefill; timers count only the steps."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    timers.t.clear()
    timers.n.clear()
    timers.bytes = 0.0
    if timers.captured:
        timers.captured.clear()  # the decode steps' calls only
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def breakdown(shape: str, dtype_name: str, steps: int, rounds: int) -> dict:
    import steerkern
    from steerkern import backends
    from steerkern.calibration import calibrate
    from steerkern.patching import forwards
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build(shape, DTYPES[dtype_name], "cpu")
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(d, generator=g)
    vector = vector / vector.norm()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=g)
    steering = steerkern.SteeringPlan.add(vector, 0.5, site="post_mlp")
    windows = torch.randint(3, model.config.vocab_size, (16, 32), generator=g)
    sparsity = dataclasses.replace(calibrate(model, windows, 0.5, progress=False, refine=0), lm_head=0.0)
    timers = Timers()
    undo = []

    # the GEMV calls: the multi-part kernel form, with the bytes of the rows it reads
    for (impl, form), fn in list(backends._FORMS.items()):
        if form == "parts":
            def parts(x, weights, biases, scales, thresholds, _fn=fn, _timed=timers.wrap("sparse GEMV", fn)):
                if timers.stub:  # the step without its GEMVs: outputs of the right shape, zero
                    return [x.new_zeros(*x.shape[:-1], w.shape[1]) for w in weights]
                if timers.captured is not None:
                    timers.captured.append((_fn, (x.clone(), weights, biases, scales, thresholds)))
                if timers.count_bytes:  # a separate round: counting costs time of its own
                    xf = x.float().reshape(-1, x.shape[-1]).abs()
                    for w, s, t in zip(weights, scales, thresholds):
                        active = ~((xf if s is None else xf * s) <= t).all(0)  # the rows' union, as the kernel reads
                        timers.bytes += float(active.sum()) * w.shape[1] * w.element_size()
                return _timed(x, weights, biases, scales, thresholds)
            _patch_attr(undo, backends, "_FORMS", {**backends._FORMS, (impl, form): parts})
        if form == "any_shape":
            _patch_attr(undo, backends, "_FORMS", {**backends._FORMS, (impl, form): timers.wrap("fused kernel", fn)})
    backends._SELECTED.clear()
    # attention: our kernel and the model's own functions
    # (an item set on the shared interface: a local override, dropped after)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = timers.wrap("attention", ALL_ATTENTION_FUNCTIONS["sdpa"])
    undo.append(lambda: ALL_ATTENTION_FUNCTIONS._local_mapping.pop("sdpa", None))
    kernel = backends.extra("decode_attention", "cpu")
    if kernel is not None:
        _patch_attr(undo, backends, "_EXTRAS", {**backends._EXTRAS, ("decode_attention", "cpu"):
                                                timers.wrap("attention", kernel)})
    layer = model.model.layers[0]
    for cls, name, label in ((type(layer.self_attn), "forward", "attention block"),
                             (type(layer.mlp), "forward", "MLP block"),
                             (type(layer.input_layernorm), "forward", "model RMSNorm"),
                             (forwards.LayerSteering, "post_mlp_stream", "steered layer end")):
        _patch_attr(undo, cls, name, timers.wrap(label, getattr(cls, name)))

    out = {}
    try:
        with torch.no_grad():
            # (d): one patch, the bytes and times summed over the rounds
            with steerkern.patch(model, steering, sparsity, drop_dense=True):
                timers.count_bytes = True
                _steps(model, ids, steps, timers)
                nbytes = timers.bytes / steps * rounds
                timers.count_bytes = False
                step, gemv, attn = 0.0, 0.0, 0.0
                for _ in range(rounds):
                    step += _steps(model, ids, steps, timers)
                    gemv += timers.t["sparse GEMV"] / steps
                    attn += timers.t["attention"] / steps
                # the same GEMV calls back to back, nothing between them: the kernel's
                # own rate on these shapes (one step's calls, captured in a step of their own)
                timers.captured = []
                _steps(model, ids, 1, timers)
                calls, timers.captured = timers.captured, None
                replay = min(_time(lambda: [fn(*a) for fn, a in calls]) for _ in range(rounds + 1))
                # the step with every GEMV stubbed out: what the rest costs with warm caches
                timers.stub = True
                try:
                    bare = min(_steps(model, ids, steps, timers) for _ in range(rounds))
                finally:
                    timers.stub = False
            per_step = nbytes / rounds
            out["steered_sparse"] = {
                "ms_per_step": 1e3 * step / rounds, "gemv_ms": 1e3 * gemv / rounds,
                "gemv_gb_per_step": per_step / 1e9, "gemv_gbs": nbytes / gemv / 1e9,
                "attention_ms": 1e3 * attn / rounds,
                "rest_ms": 1e3 * (step - gemv - attn) / rounds,
                "gemv_calls_per_step": len(calls),
                "gemv_back_to_back_ms": 1e3 * replay, "gemv_back_to_back_gbs": per_step / replay / 1e9,
                "step_without_gemv_ms": 1e3 * bare,
            }
            # (c) and (e): alternate rounds, per-call microseconds of each piece
            plans = {"steered": steering, "empty_patch": steerkern.SteeringPlan()}
            sums = {k: collections.Counter() for k in plans}
            calls = {k: collections.Counter() for k in plans}
            for r in range(rounds):
                for k in (list(plans) if r % 2 == 0 else list(plans)[::-1]):
                    with steerkern.patch(model, plans[k]):
                        sums[k]["step"] += _steps(model, ids, steps, timers) * steps
                        sums[k].update(timers.t)
                        calls[k].update(timers.n)
            for k in plans:
                n_steps = rounds * steps
                out[k] = {"ms_per_step": 1e3 * sums[k]["step"] / n_steps}
                for label in ("steered layer end", "fused kernel", "model RMSNorm", "attention block", "MLP block"):
                    if calls[k][label]:
                        out[k][f"{label} us per call"] = 1e6 * sums[k][label] / calls[k][label]
                        out[k][f"{label} calls per step"] = calls[k][label] / n_steps
    finally:
        for restore in reversed(undo):
            restore()
        backends._SELECTED.clear()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tinyllama-1.1b", choices=[s for s in SHAPES if s != "llama-8b"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be at least 1")
    res = {"shape": args.shape, "dtype": args.dtype, "torch": torch.__version__,
           "threads": torch.get_num_threads(), **breakdown(args.shape, args.dtype, args.steps, args.rounds)}
    x = torch.ones(1 << 28)  # read bandwidth beside it (1 GiB fp32 torch.sum), as bench_ops_cpu measures it
    x.sum()
    res["read_bw_gbs"] = x.numel() * 4 / min(_time(x.sum) for _ in range(5)) / 1e9
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_breakdown_cpu_{args.shape}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    s = res["steered_sparse"]
    print(f"{args.shape} {args.dtype}, read bandwidth {res['read_bw_gbs']:.1f} GB/s")
    print(f"(d) steering + 50% sparse: {s['ms_per_step']:.2f} ms per step: sparse GEMVs {s['gemv_ms']:.2f} ms "
          f"({s['gemv_gb_per_step']:.3f} GB, {s['gemv_gbs']:.1f} GB/s), attention {s['attention_ms']:.2f} ms, "
          f"the rest {s['rest_ms']:.2f} ms")
    print(f"    the step's {s['gemv_calls_per_step']} GEMV calls back to back: {s['gemv_back_to_back_ms']:.2f} ms "
          f"({s['gemv_back_to_back_gbs']:.1f} GB/s); the step with them stubbed out: "
          f"{s['step_without_gemv_ms']:.2f} ms")
    for k in ("steered", "empty_patch"):
        r = res[k]
        pieces = ", ".join(f"{key.replace(' us per call', '')} {v:.1f} us x {r[key.replace('us per call', 'calls per step')]:.0f}"
                           for key, v in r.items() if key.endswith("us per call"))
        print(f"({'c' if k == 'steered' else 'e'}) {k}: {r['ms_per_step']:.2f} ms per step; per call: {pieces}")
    print(f"wrote {out.name}")
    return 0


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
