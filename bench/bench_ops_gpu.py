"""GPU kernel benchmark: sparse GEMV against the HBM bound and dense cuBLAS,
the dense crossover, and the cost of steering.

Everything is measured in the same run, on the same GPU:

* the HBM bound: a large device-to-device copy and a large reduction (read
  bandwidth; a GEMV reads its weight and writes next to nothing);
* ``sparse_linear`` for each backend (triton, cuda) at decode batches 1..8
  (and above, to find the crossover) over Llama-3-8B-shaped layers, at
  several sparsities: time, ``ours / HBM bound`` for the bytes the union of
  the rows' active inputs really needs, and ``ours / dense`` where dense is
  cuBLAS ``F.linear`` on the full weight;
* the crossover: the smallest batch at which the masked dense matmul (the
  fallback above ``DENSE_CROSSOVER`` rows) beats the sparse kernel;
* steering overhead: ``steer`` and the fused ``add_steer_rmsnorm`` with a
  table against the same op with no steering and against a plain copy.

Weights (<= 112 MiB each) would sit partly in L2 on repeated calls, so every
timing flushes L2 first (triton.testing.do_bench).  Results are written as
JSON to bench/results/ and printed as a table.  (Not yet run on a GPU: no
device has been available to this project.)

    python bench/bench_ops_gpu.py                 # everything
    python bench/bench_ops_gpu.py --quick         # one layer shape, fewer points
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (name, in_features, out_features): Llama-3-8B projections
LAYERS = [
    ("q_proj 4096x4096", 4096, 4096),
    ("up_proj 4096x14336", 4096, 14336),
    ("down_proj 14336x4096", 14336, 4096),
]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="triton,cuda", help="comma-separated kernel backends (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="activation and weight dtype")
    p.add_argument("--batches", default="1,2,4,8,12,16", help="decode batch sizes (rows of x)")
    p.add_argument("--sparsity", default="0.5,0.7,0.9",
                   help="fraction of inputs inactive in each row (TEAL threshold mode)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size for the steering benchmark")
    p.add_argument("--quick", action="store_true", help="one layer shape, batches 1,4,8,16, sparsity 0.7")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/ops_gpu_<device>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ measurement


def bench_ms(fn):
    """Median GPU time of ``fn`` in ms, with L2 flushed before each call."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def hbm_bandwidth(torch):
    """(copy GB/s counting read + write, read-only GB/s) on 1 GiB buffers."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    words = src.view(torch.float32)
    read_ms = bench_ms(lambda: words.sum())
    del src, dst
    return 2 * n / copy_ms / 1e6, n / read_ms / 1e6


def threshold_for(torch, x, sparsity):
    """One threshold for all rows that leaves ``sparsity`` of |x| below it."""
    return torch.quantile(x.float().abs().flatten()[: 1 << 24], sparsity).reshape(())


def bench_sparse(torch, F, library, sparse_gemv, backends_, args, dtype, bw_read):
    rows_out = []
    layers = LAYERS[:1] if args.quick else LAYERS
    batches = [1, 4, 8, 16] if args.quick else [int(b) for b in args.batches.split(",")]
    sparsities = [0.7] if args.quick else [float(s) for s in args.sparsity.split(",")]
    op = library.op("sparse_linear")
    for name, n_in, n_out in layers:
        W = torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in ** 0.5
        Wt = W.T.contiguous()
        w_bytes = Wt.numel() * Wt.element_size()
        for batch in batches:
            x = torch.randn(batch, n_in, device="cuda", dtype=dtype)
            dense_ms = bench_ms(lambda: F.linear(x, W))
            for s in sparsities:
                t = threshold_for(torch, x, s)
                mask = x.float().abs() > t
                union = float(mask.any(dim=0).float().mean())
                bound_ms = (union * w_bytes + x.numel() * x.element_size()) / bw_read / 1e6
                xm = torch.where(mask, x, torch.zeros((), dtype=dtype, device="cuda"))
                # the fallback above DENSE_CROSSOVER: mask on the device, then cuBLAS
                masked_dense_ms = bench_ms(lambda: sparse_gemv._dense(x, Wt, None, None, t, -1))
                row = dict(layer=name, n_in=n_in, n_out=n_out, batch=batch, sparsity=s, union_density=union,
                           dense_ms=dense_ms, masked_dense_ms=masked_dense_ms, bound_ms=bound_ms)
                for b in backends_:
                    ms = bench_ms(lambda: op(x, Wt, None, None, t, -1, backend=b))
                    row[f"{b}_ms"] = ms
                    row[f"{b}_vs_bound"] = ms / bound_ms
                    row[f"{b}_vs_dense"] = ms / dense_ms
                # the kernel must agree with cuBLAS on the masked input
                ref = (xm.float() @ Wt.float())
                for b in backends_:
                    got = op(x, Wt, None, None, t, -1, backend=b).float()
                    row[f"{b}_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                rows_out.append(row)
        del W, Wt
        torch.cuda.empty_cache()
    return rows_out


def crossover(sparse_rows, backend):
    """Per (layer, sparsity): the smallest batch where the masked dense matmul beats the kernel."""
    out = {}
    for r in sparse_rows:
        key = f"{r['layer']} @ {r['sparsity']:.2f}"
        if f"{backend}_ms" not in r:
            continue
        if r["masked_dense_ms"] < r[f"{backend}_ms"] and key not in out:
            out[key] = r["batch"]
    return out


def bench_steer(torch, library, steerkern, backends_, args, dtype, bw_read):
    from steerkern import SteerEntry, SteerTable, orthonormalize

    d = args.hidden
    g = torch.Generator(device="cuda").manual_seed(0)
    table = SteerTable.from_entries([
        SteerEntry(directions=orthonormalize(torch.randn(2, d, device="cuda", generator=g)),
                   vector=torch.randn(d, device="cuda", generator=g), alpha=4.0),
    ], d, device="cuda")
    tensors = table.tensors()
    none = (None,) * len(tensors)
    weight = torch.ones(d, device="cuda", dtype=dtype)
    steer, fused = library.op("steer"), library.op("add_steer_rmsnorm")
    out = []
    for rows in (1, 8, 2048):
        h = torch.randn(rows, d, device="cuda", dtype=dtype)
        res = torch.randn_like(h)
        index = torch.ones(rows, dtype=torch.int32, device="cuda")
        nbytes = h.numel() * h.element_size()
        row = dict(rows=rows, d=d, copy_ms=bench_ms(lambda: h.clone()),
                   steer_bound_ms=2 * nbytes / bw_read / 1e6, fused_bound_ms=4 * nbytes / bw_read / 1e6)
        for b in backends_:
            row[f"{b}_steer_ms"] = bench_ms(lambda: steer(h, index, *tensors, backend=b))
            row[f"{b}_add_rmsnorm_ms"] = bench_ms(
                lambda: fused(h, res, weight, 1e-6, 0.0, None, *none, backend=b))
            row[f"{b}_add_steer_rmsnorm_ms"] = bench_ms(
                lambda: fused(h, res, weight, 1e-6, 0.0, index, *tensors, backend=b))
            row[f"{b}_steer_overhead_ms"] = row[f"{b}_add_steer_rmsnorm_ms"] - row[f"{b}_add_rmsnorm_ms"]
        out.append(row)
    return out


# ------------------------------------------------------------------ report


def print_tables(result, backends_):
    bw = result["bandwidth"]
    print(f"\n{result['device']}: copy {bw['copy_GBps']:.0f} GB/s (read+write), read {bw['read_GBps']:.0f} GB/s")
    head = f"{'layer':<22}{'b':>3}{'sp':>5}{'union':>7}{'dense':>8}{'m.dense':>8}{'bound':>8}"
    head += "".join(f"{b:>9}{'/bnd':>7}{'/dns':>7}" for b in backends_)
    print("\nsparse_linear (ms; ours/bound, ours/dense)\n" + head)
    for r in result["sparse_linear"]:
        line = (f"{r['layer']:<22}{r['batch']:>3}{r['sparsity']:>5.2f}{r['union_density']:>7.2f}"
                f"{r['dense_ms']:>8.4f}{r['masked_dense_ms']:>8.4f}{r['bound_ms']:>8.4f}")
        for b in backends_:
            line += f"{r[f'{b}_ms']:>9.4f}{r[f'{b}_vs_bound']:>7.2f}{r[f'{b}_vs_dense']:>7.2f}"
        print(line)
    for b in backends_:
        err = max((r[f"{b}_max_rel_err"] for r in result["sparse_linear"]), default=0.0)
        print(f"\n{b}: max error vs fp32 matmul of the masked input {err:.2e} (relative to max |y|)")
        print(f"crossover ({b}: first batch where masked dense wins): {result['crossover'][b] or 'none measured'}")
    print("\nsteering (ms)")
    for r in result["steer"]:
        parts = [f"rows {r['rows']:>5} d {r['d']}: copy {r['copy_ms']:.4f}"]
        for b in backends_:
            parts.append(f"{b}: steer {r[f'{b}_steer_ms']:.4f}, add+rmsnorm {r[f'{b}_add_rmsnorm_ms']:.4f}, "
                         f"add+steer+rmsnorm {r[f'{b}_add_steer_rmsnorm_ms']:.4f} "
                         f"(+{r[f'{b}_steer_overhead_ms']:.4f})")
        print("; ".join(parts))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_ops_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    import steerkern
    from steerkern import backends
    from steerkern.kernels import cuda as cuda_kernels
    from steerkern.kernels.triton import sparse_gemv
    from steerkern.ops import library

    backends_ = [b for b in args.backends.split(",") if b]
    for b in backends_:
        if not backends.available(b, "cuda"):
            print(f"bench_ops_gpu: backend {b!r} unavailable: {backends._UNAVAILABLE.get(b)}", file=sys.stderr)
            return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    # measure the kernels at every batch: the fallback is what is being placed
    sparse_gemv.DENSE_CROSSOVER = 1 << 30
    if "cuda" in backends_:
        cuda_kernels.set_dense_crossover(1 << 30)

    copy_bw, read_bw = hbm_bandwidth(torch)
    sparse_rows = bench_sparse(torch, F, library, sparse_gemv, backends_, args, dtype, read_bw)
    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__, steerkern=steerkern.__version__,
        python=platform.python_version(), dtype=args.dtype,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        bandwidth=dict(copy_GBps=copy_bw, read_GBps=read_bw),
        sparse_linear=sparse_rows,
        crossover={b: crossover(sparse_rows, b) for b in backends_},
        steer=bench_steer(torch, library, steerkern, backends_, args, dtype, read_bw),
    )
    print_tables(result, backends_)
    slug = "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_").lower()
    path = pathlib.Path(args.out) if args.out else RESULTS / f"ops_gpu_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
