"""Attention-cost balance of training steps: the max/mean rank cost per step with every rank training its own
lane (before) and with train/balance.py's assignment (after), on packed rows of the shipped corpus and of the
long-tailed corpus (`longctx.data.synthetic.longtail`).

    python bench/batch_balance.py                          # seq 4K/16K/32K, dp 4 x micro 1 x accum 2, Llama-2-7B shape
    python bench/batch_balance.py --seq-lens 8192 --dp 8 --grad-accum 6
    python bench/batch_balance.py --model-config path/to/config.json

Rows come from the data engine itself (pass 2 in-process on a token cache of the corpus: best-fit packing,
document attention, per-source upsampling at `--long-threshold`), lanes as the trainer reads them
(train/batches.py). A row's cost is its training FLOPs with document attention (train/balance.py: 6 x matmul
params per token + 6 x layers x hidden x sum of squared spans, padding included as the kernels compute it);
the model shape comes from a config.json (default: Llama-2-7B's published config). `step` is the step's time
over a perfect split when ranks synchronise every micro-step (ZeRO does): sum over micro-steps of the slowest
rank / sum of the mean; `totals` is max/mean of the ranks' whole-step costs. `best` is a lower bound over all
assignments (train.balance.best_possible). Pure computation: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
from types import SimpleNamespace

import numpy as np

from longctx import storage
from longctx.config import load_config
from longctx.data.mixture import plan_mixture
from longctx.data.pipeline import packed_row_tables
from longctx.data.synthetic.longtail import build_long_tailed_corpus
from longctx.data.token_cache import TokenCache
from longctx.data.tokenize import load_fast_tokenizer
from longctx.train.balance import Assignment, CostModel, assign_rows, best_possible, imbalance
from longctx.train.batches import lane_bounds

DEFAULT_SHAPE = "builtin:model-shapes/llama-2-7b/config.json"


def cost_model(config: dict) -> CostModel:
    """Matmul parameters of a Llama-style decoder from its config: q/o (h x h), k/v (h x kv_dim), the gated MLP
    (3 x h x intermediate) per layer, plus the LM head."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config["intermediate_size"]
    return CostModel.of(SimpleNamespace(**config), layers * per_layer + h * config["vocab_size"])


def tokenize(sources: dict[str, str], work: str) -> TokenCache:
    """A token cache of `sources` (the tiny tokenizer, EOS appended), written in-process."""
    tok, eos, _ = load_fast_tokenizer("builtin:tiny-tokenizer")
    docs = {}
    for name, uri in sorted(sources.items()):
        with gzip.open(storage.normalize(uri), "rt", encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        enc = tok.encode_batch_fast([r["text"] for r in recs], add_special_tokens=False)
        docs[name] = [(str(r.get("id", i)), np.array(e.ids + [eos], np.int32)) for i, (r, e) in enumerate(zip(recs, enc))]
    return TokenCache.from_documents(os.path.join(work, f"cache-{len(os.listdir(work))}"), docs)


def corpus_rows(cache: TokenCache, sources: dict[str, str], seq_len: int, long_threshold: int) -> list[np.ndarray]:
    """Span lengths of every packed row (document attention, padding as its own span)."""
    _, _, pad = load_fast_tokenizer("builtin:tiny-tokenizer")
    cfg = load_config(None, [f"data.seq_len={seq_len}", f"data.long_threshold={long_threshold}",
                             "data.strategy=per-source", "data.rows_per_shard=100000"])
    cfg.data.sources = dict(sources)
    plan = plan_mixture(cache.source_lengths(), cfg.data)
    spans = []
    for table in packed_row_tables(cfg, cache, plan, pad):
        spans += [np.asarray(x, np.int64) for x in table.column("seg_lengths").to_pylist()]
    return spans


def simulate(spans: list[np.ndarray], model: CostModel, seq_len: int, dp: int, micro: int, accum: int) -> dict:
    costs = np.array([model.cost(seq_len, int((s * s).sum())) for s in spans])
    n, k = len(costs), micro * accum
    lanes = [lane_bounds(n, dp, r) for r in range(dp)]
    steps = (n // dp) // k
    out = {"rows": n, "steps": steps, "before": [], "after": [], "best": [], "totals_before": [], "totals_after": []}
    for s in range(steps):
        c = np.concatenate([costs[a + s * k:a + (s + 1) * k] for a, _ in lanes])
        nat, bal = imbalance(c, Assignment.natural(dp, micro, accum), dp, accum), imbalance(c, assign_rows(c, dp, micro, accum), dp, accum)
        out["before"].append(nat["step"])
        out["after"].append(bal["step"])
        out["totals_before"].append(nat["totals"])
        out["totals_after"].append(bal["totals"])
        out["best"].append(best_possible(c, dp, micro, accum))
    out["spread"] = float(costs.max() / costs.min())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--long-threshold", type=int, default=1024)
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--model-config", default=DEFAULT_SHAPE, help="a config.json for the model shape")
    args = ap.parse_args()
    shape = json.loads(storage.read_text(args.model_config))
    model = cost_model(shape)
    print(f"dp {args.dp} x micro {args.micro} x grad_accum {args.grad_accum}; model {shape['num_hidden_layers']} "
          f"layers x {shape['hidden_size']}, {model.matmul_params / 1e9:.2f}B matmul params; long >= "
          f"{args.long_threshold} tokens")
    with tempfile.TemporaryDirectory(prefix="longctx-balance-") as work:
        longtail = build_long_tailed_corpus(os.path.join(work, "longtail"), seed=0)
        corpora = {"shipped": {s: f"builtin:corpus/{s}.jsonl.gz" for s in ("code", "c", "records")},
                   "longtail": {s: v["uri"] for s, v in longtail["sources"].items()}}
        print(f"{'corpus':<9} {'seq':>6} {'rows':>5} {'steps':>5} {'cost max/min':>12} | step max/mean (sync every "
              f"micro-step): {'before':>14} {'after':>14} {'best':>6} | totals {'before':>6} {'after':>6} | saved")
        for name, sources in corpora.items():
            cache = tokenize(sources, work)
            for seq in args.seq_lens:
                r = simulate(corpus_rows(cache, sources, seq, args.long_threshold), model, seq, args.dp, args.micro,
                             args.grad_accum)
                b, a = np.array(r["before"]), np.array(r["after"])
                print(f"{name:<9} {seq:>6} {r['rows']:>5} {r['steps']:>5} {r['spread']:>12.2f} | {'':>33}"
                      f"{b.mean():.3f} (max {b.max():.2f}) {a.mean():.3f} (max {a.max():.2f}) {np.mean(r['best']):>6.3f} | "
                      f"{'':>7}{np.mean(r['totals_before']):>6.3f} {np.mean(r['totals_after']):>6.3f} | "
                      f"{100 * (1 - a.sum() / b.sum()):4.1f}%", flush=True)


if __name__ == "__main__":
    main()
