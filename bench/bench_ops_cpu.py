"""Benchmark of the C++ CPU kernels against the machine's memory bound and torch.

Every number is measured in the same run and printed as a ratio:

* the bound is the machine's read bandwidth, measured here as a torch
  ``.sum()`` over a 1 GiB fp32 tensor with all threads, again right before
  each weight shape and each steer dtype (this machine's bandwidth drifts by
  up to 2x within minutes, so every ratio uses the bandwidth measured next to
  it; the column ``bw`` shows it);
* ``sparse_linear`` at batch 1 (decode) reads only the active rows of W^T: its
  effective bandwidth (bytes it really reads / time) is compared with the
  bound (goal >= 90%), and its time with torch's dense fp32 matvec of the
  same weight (goal >= 1.8x at 50% sparsity; >= 3x with bf16 weights) and
  with torch's own bf16 matvec;
* ``steer`` (rank-1 ablation + addition) and the fused add + steer + RMSNorm
  at 4096 tokens x 4096 hidden are compared with the time to read their
  inputs and write their outputs once at the bound (goal within 1.3x), and
  with ``h.clone()``, the cheapest out-of-place op torch has; their in-place
  forms (``steer_``, ``add_steer_rmsnorm_``) with ``h.add_(v)``;
* at one token, the per-call overhead in microseconds through the public API
  (``steerkern.steer``) and through the raw kernel, beside torch's ``h + v``;
* decode attention (one query token, TinyLlama's 32 query / 4 key-value heads
  of 64) at several cache lengths: the kernel's time per call beside torch's
  ``scaled_dot_product_attention`` (``enable_gqa``), which a model's sdpa
  attention calls.

Large outputs are fresh allocations; without huge pages the page faults of
a new 32 MiB tensor cost more than the kernel, for torch's ops as for ours.
So, as one would for CPU inference, this script turns on torch's huge-page
allocation (``THP_MEM_ALLOC_ENABLE=1``) unless ``--no-thp`` is given.

Each timed call runs after reading a 64 MiB buffer so that the weights come
from DRAM, as they do in a model far larger than the last-level cache.  The
minimum over repetitions is reported (the machine may be shared), the median
is kept in the JSON.

Usage::

    python bench/bench_ops_cpu.py            # full run, ~3-5 minutes
    python bench/bench_ops_cpu.py --quick    # small shapes, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "ops_cpu.json"
QUICK_RESULTS = RESULTS.with_name("ops_cpu_quick.json")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--no-thp", action="store_true", help="leave torch's huge-page allocation off")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help=f"JSON output path (default: results/{RESULTS.name}, or {QUICK_RESULTS.name} with --quick)")
    args = p.parse_args()
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    return args


ARGS = _parse()
if not ARGS.no_thp:
    # read by torch's CPU allocator at its first large allocation
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import steerkern  # noqa: E402
from steerkern import SparseWeight, SteerEntry, SteerTable  # noqa: E402
from steerkern.kernels import cpu as cpu_kernels  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety
    tqdm = None

GiB = 1 << 30


class Timer:
    """Times calls, each after a cache flush, and keeps min and median."""

    def __init__(self, flush_bytes: int):
        self.flush = torch.ones(flush_bytes // 4)

    def __call__(self, fn, reps: int, flush: bool = True) -> dict:
        fn()  # warm up: first-touch allocations, lazy init
        ts = []
        for _ in range(reps):
            if flush:
                self.flush.sum()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return {"min_s": min(ts), "median_s": statistics.median(ts)}


def per_call_us(fn, calls: int, rounds: int = 7) -> float:
    """Microseconds per call of a tiny op: the best of `rounds` loops."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def read_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of torch .sum() over an fp32 tensor of nbytes (all threads)."""
    big = torch.ones(nbytes // 4)
    big.sum()
    best = min(_time_once(big.sum) for _ in range(reps))
    del big
    return nbytes / best


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info() -> dict:
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "steerkern": steerkern.__version__,
        "capability": cpu_kernels.capability,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()[0]
    return info


# ---------------------------------------------------------------- cases


def sparse_cases(quick: bool):
    shapes = [(1024, 2816), (2816, 1024)] if quick else [(4096, 11008), (11008, 4096)]
    for inn, out in shapes:
        for wdtype in (torch.float32, torch.bfloat16):
            yield ("sparse_linear", inn, out, wdtype)


def bench_sparse_shape(timer: Timer, bw: float, inn: int, out: int, wdtype, reps: int, sparsities):
    """sparse_linear at batch 1 for one weight, over the sparsities."""
    ext = cpu_kernels._ext
    g = torch.Generator().manual_seed(inn * 31 + out)
    W = torch.randn(out, inn, generator=g) / inn ** 0.5
    sw = SparseWeight.from_linear(W, mode="wina", dtype=wdtype)
    xdtype = wdtype  # a bf16 model runs bf16 activations
    calib = torch.randn(64, inn, generator=g)
    scores = (calib.abs() * sw.scale).flatten()
    x = torch.randn(1, inn, generator=g).to(xdtype)
    x32 = x.float()
    # torch baselines on the nn.Linear layout [out, in]
    W32 = W.contiguous()
    Wlow = W.to(wdtype).contiguous()
    dense32 = timer(lambda: F.linear(x32, W32), reps)
    dense_low = timer(lambda: F.linear(x, Wlow), reps) if wdtype != torch.float32 else dense32
    rows = []
    for sp in sparsities:
        thr = float(torch.quantile(scores[:1 << 20], sp)) if sp > 0 else 0.0
        t = torch.tensor(thr)
        nact = int(((x.float().abs() * sw.scale) > thr).sum())
        ours = timer(lambda: ext.sparse_linear(x, sw.weight_t, None, sw.scale, t, -1), reps)
        es = sw.weight_t.element_size()
        nbytes = nact * out * es + inn * (x.element_size() + 4) + out * x.element_size()
        eff = nbytes / ours["min_s"]
        rows.append({
            "op": "sparse_linear", "batch": 1, "in": inn, "out": out,
            "weight_dtype": str(wdtype).replace("torch.", ""), "x_dtype": str(xdtype).replace("torch.", ""),
            "target_sparsity": sp, "sparsity": 1 - nact / inn,
            "ours_ms": ours["min_s"] * 1e3, "ours_median_ms": ours["median_s"] * 1e3,
            "bytes_read": nbytes, "effective_gbs": eff / 1e9, "read_bw_gbs": bw / 1e9, "bw_fraction": eff / bw,
            "torch_dense_fp32_ms": dense32["min_s"] * 1e3,
            "speedup_vs_dense_fp32": dense32["min_s"] / ours["min_s"],
            "torch_dense_same_dtype_ms": dense_low["min_s"] * 1e3,
            "speedup_vs_dense_same_dtype": dense_low["min_s"] / ours["min_s"],
        })
    return rows


def steer_table(d: int, g) -> SteerTable:
    q = torch.randn(d, generator=g)
    return SteerTable.from_entries(
        [SteerEntry(directions=q / q.norm(), vector=torch.randn(d, generator=g), alpha=2.0)], d)


def bench_steer(timer: Timer, bw: float, tokens: int, d: int, dtype, reps: int):
    """steer and add_steer_rmsnorm over [tokens, d] against the memory bound."""
    ext = cpu_kernels._ext
    g = torch.Generator().manual_seed(d)
    table = steer_table(d, g)
    tab = table.tensors()
    h = torch.randn(tokens, d, generator=g).to(dtype)
    res = torch.randn(tokens, d, generator=g).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    q, v, alpha = table.basis[0, 0].to(dtype), table.vec[0].to(dtype), float(table.alpha[0])
    nbytes = h.numel() * h.element_size()

    def torch_steer(x):  # the same math, unfused, in torch eager
        return x - (x @ q)[:, None] * q + alpha * v

    def torch_fused():
        r = torch_steer(h + res)
        return r, F.rms_norm(r, (d,), w, 1e-6)

    def row(op, ours, tensors, base_name, base_s, eager):
        bound = tensors * nbytes / bw  # each tensor read or written once
        return {
            "op": op, "tokens": tokens, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "ours_ms": ours["min_s"] * 1e3, "ours_median_ms": ours["median_s"] * 1e3,
            "bound_ms": bound * 1e3, "read_bw_gbs": bw / 1e9, "ratio_to_bound": ours["min_s"] / bound,
            f"torch_{base_name}_ms": base_s * 1e3, f"ratio_to_{base_name}": ours["min_s"] / base_s,
            "torch_eager_ms": eager["min_s"] * 1e3, "speedup_vs_torch": eager["min_s"] / ours["min_s"],
        }

    clone_s = timer(lambda: h.clone(), reps)["min_s"]
    torch_t = timer(lambda: torch_steer(h), reps)
    torch_f = timer(torch_fused, reps)
    out = [
        row("steer", timer(lambda: ext.steer(h, None, *tab), reps), 2, "clone", clone_s, torch_t),
        # read x and residual, write r and y
        row("add_steer_rmsnorm", timer(lambda: ext.add_steer_rmsnorm(h, res, w, 1e-6, 0.0, None, *tab), reps),
            4, "clone", 2 * clone_s, torch_f),
    ]
    # in place: nothing allocated, so no page faults; torch's own in-place
    # add (one read, one write) is the comparison
    hi, ri = h.clone(), res.clone()
    add_s = timer(lambda: hi.add_(v), reps)["min_s"]
    out += [
        row("steer_", timer(lambda: ext.steer_(hi, None, *tab), reps), 2, "inplace", add_s, torch_t),
        row("add_steer_rmsnorm_", timer(lambda: ext.add_steer_rmsnorm_(hi, ri, w, 1e-6, 0.0, None, *tab), reps),
            4, "inplace", 2 * add_s, torch_f),
    ]
    return out


def bench_one_token(d: int, dtype, calls: int):
    """Per-call overhead at one token: public API, raw kernel, torch h + v."""
    ext = cpu_kernels._ext
    g = torch.Generator().manual_seed(1)
    table = steer_table(d, g)
    tab = table.tensors()
    h = torch.randn(1, d, generator=g).to(dtype)
    v = table.vec[0].to(dtype)
    return {
        "op": "steer_1_token", "d": d, "dtype": str(dtype).replace("torch.", ""),
        "api_us": per_call_us(lambda: steerkern.steer(h, table), calls),
        "kernel_us": per_call_us(lambda: ext.steer(h, None, *tab), calls),
        "torch_add_us": per_call_us(lambda: h + v, calls),
    }


def bench_attention(L: int, dtype, calls: int):
    """Decode attention at cache length L: the kernel and torch's sdpa, us per call."""
    import torch.nn.functional as F

    ext = cpu_kernels._ext
    g = torch.Generator().manual_seed(2)
    # transformers' layouts: q a transposed view, k/v contiguous caches
    q = torch.randn(1, 1, 32, 64, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(1, 4, L, 64, generator=g).to(dtype)
    v = torch.randn(1, 4, L, 64, generator=g).to(dtype)
    ours = per_call_us(lambda: ext.decode_attention(q, k, v, 0.125), calls)
    sdpa = per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True), calls)
    return {"op": "decode_attention", "heads": 32, "kv_heads": 4, "head_dim": 64, "cache": L,
            "dtype": str(dtype).replace("torch.", ""), "ours_us": ours, "sdpa_us": sdpa,
            "speedup_vs_sdpa": sdpa / ours}


# ---------------------------------------------------------------- report


def print_table(res: dict) -> None:
    bw = res["read_bw_gbs"]
    print(f"\nmachine: {res['machine']['cpu']}, {res['machine']['torch_threads']} threads, "
          f"kernels: {res['machine']['capability']}, torch {res['machine']['torch']}")
    print(f"read bandwidth (torch .sum, {res['bw_bytes'] / GiB:.2f} GiB fp32) at the start: {bw:.1f} GB/s; "
          f"bw: the same, measured next to each case\n")
    print("sparse_linear, batch 1 (W^T [in, out]; WINA scores; goals: >= 0.90 of bw, "
          ">= 1.8x dense fp32 at 50% fp32, >= 3x with bf16 weights)")
    print(f"{'in x out':>12} {'weight':>8} {'sparsity':>8} {'ms':>8} {'GB/s':>7} {'bw':>6} {'of bw':>6} "
          f"{'vs fp32':>8} {'vs same':>8}")
    for r in res["sparse_linear"]:
        print(f"{r['in']:>5}x{r['out']:<6} {r['weight_dtype']:>8} {r['sparsity']:>8.2f} {r['ours_ms']:>8.3f} "
              f"{r['effective_gbs']:>7.1f} {r['read_bw_gbs']:>6.1f} {r['bw_fraction']:>6.2f} "
              f"{r['speedup_vs_dense_fp32']:>7.2f}x {r['speedup_vs_dense_same_dtype']:>7.2f}x")
    print("\nsteer (rank-1 ablation + addition) and fused add+steer+RMSNorm "
          "(goal: within 1.3x of the bound); a trailing _ is the in-place op")
    print(f"{'op':>19} {'tokens x d':>11} {'dtype':>8} {'ms':>8} {'bw':>6} {'/bound':>7} {'/torch':>7} {'vs torch':>9}")
    for r in res["steer"]:
        # out of place against clone(), in place against torch's in-place add
        base = r.get("ratio_to_clone", r.get("ratio_to_inplace"))
        print(f"{r['op']:>19} {r['tokens']:>5}x{r['d']:<5} {r['dtype']:>8} {r['ours_ms']:>8.3f} "
              f"{r['read_bw_gbs']:>6.1f} {r['ratio_to_bound']:>7.2f} {base:>7.2f} {r['speedup_vs_torch']:>8.2f}x")
    print("  /torch: ours over h.clone() (out of place) or over h.add_(v) (in place), same run")
    print("\none token, per call (us)")
    print(f"{'d':>6} {'dtype':>8} {'api':>8} {'kernel':>8} {'torch h+v':>10}")
    for r in res["one_token"]:
        print(f"{r['d']:>6} {r['dtype']:>8} {r['api_us']:>8.1f} {r['kernel_us']:>8.1f} {r['torch_add_us']:>10.1f}")
    print("\ndecode attention, 32 query / 4 key-value heads of 64, one token (us per call)")
    print(f"{'cache':>6} {'dtype':>8} {'ours':>8} {'sdpa':>8} {'vs sdpa':>8}")
    for r in res["attention"]:
        print(f"{r['cache']:>6} {r['dtype']:>8} {r['ours_us']:>8.1f} {r['sdpa_us']:>8.1f} {r['speedup_vs_sdpa']:>7.2f}x")


def main() -> int:
    if cpu_kernels._ext is None:
        print("steerkern C++ CPU kernels are not available; build them first "
              "(pip install --no-build-isolation -e .)", file=sys.stderr)
        return 1
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    quick = ARGS.quick
    reps = 5 if quick else 12
    bw_bytes = (256 << 20) if quick else GiB
    sparsities = (0.0, 0.25, 0.5, 0.7)
    steer_shape = (512, 1024) if quick else (4096, 4096)
    timer = Timer(64 << 20)

    jobs = [("bandwidth",)] + list(sparse_cases(quick))
    jobs += [("steer", dt) for dt in (torch.bfloat16, torch.float32)]
    jobs += [("one_token", dt) for dt in (torch.bfloat16, torch.float32)]
    jobs += [("attention", L, dt) for dt in (torch.bfloat16, torch.float32)
             for L in ((48, 512) if quick else (48, 512, 2048))]
    bar = tqdm(jobs, desc="bench_ops_cpu", file=sys.stderr) if tqdm else jobs

    res = {"machine": machine_info(), "quick": quick, "bw_bytes": bw_bytes,
           "sparse_linear": [], "steer": [], "one_token": [], "attention": []}
    bw = None
    for i, job in enumerate(bar):
        if tqdm is None:
            print(f"[{i + 1}/{len(jobs)}] {job[0]}", file=sys.stderr, flush=True)
        if job[0] == "bandwidth":
            bw = read_bandwidth(bw_bytes, reps=3 if quick else 6)
            res["read_bw_gbs"] = bw / 1e9
        elif job[0] == "sparse_linear":
            _, inn, out, wdt = job
            local = read_bandwidth(bw_bytes, reps=3)
            res["sparse_linear"] += bench_sparse_shape(timer, local, inn, out, wdt, reps, sparsities)
        elif job[0] == "steer":
            local = read_bandwidth(bw_bytes, reps=3)
            res["steer"] += bench_steer(timer, local, *steer_shape, job[1], reps)
        elif job[0] == "attention":
            res["attention"].append(bench_attention(job[1], job[2], 50 if quick else 300))
        else:
            res["one_token"].append(bench_one_token(4096, job[1], 200 if quick else 2000))
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_end"] = os.getloadavg()[0]

    print_table(res)
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {ARGS.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
