"""Packing benchmark: pad fraction and split documents, best-fit decreasing (ours) vs greedy concatenation
(run_clm's group_texts), at 8K, 32K and 128K rows on a long-tailed document length distribution.

    python bench/packing.py                       # ~1-2 min on 2 cores
    python bench/packing.py --tokens 50e6 --buffers 4 16 64

The length distribution mimics a SlimPajama-like mix after per-source long upsampling (docs/architecture.md section 5): web and
code documents (lognormal, median ~500-800 tokens) next to arXiv (median ~9K) and books (median ~90K), with
70% of tokens in documents >= 4K. Only lengths are packed (zero-copy token views), so the figures are the
packer's alone. Greedy concatenation never pads except in the last row but splits every document that
crosses a row boundary; best-fit splits only documents longer than the row.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from longctx.data.pack import BestFitPacker, GreedyPacker, Segment

MIX = [  # (name, share of tokens, lognormal median tokens, sigma)
    ("web", 0.30, 500, 1.1),
    ("code", 0.15, 800, 1.4),
    ("arxiv", 0.20, 9000, 0.7),
    ("book", 0.35, 90000, 0.8),
]


def long_tailed_lengths(total_tokens: float, seed: int = 0) -> np.ndarray:
    """Document lengths (tokens) of a shuffled multi-source corpus totalling about `total_tokens`."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, share, median, sigma in MIX:
        mean = median * np.exp(sigma ** 2 / 2)
        n = max(1, int(share * total_tokens / mean))
        parts.append(np.clip(rng.lognormal(np.log(median), sigma, n), 16, 2_000_000).astype(np.int64))
    lengths = np.concatenate(parts)
    rng.shuffle(lengths)
    return lengths


def run_best_fit(lengths: np.ndarray, seq_len: int, buffer_rows: int) -> dict:
    zeros = np.zeros(int(lengths.max()), np.int32)
    packer = BestFitPacker(seq_len, buffer_rows)
    t0 = time.perf_counter()
    rows = 0
    for i, n in enumerate(lengths.tolist()):
        for _ in packer.add(Segment(zeros[:n], "", "", n)):
            rows += 1
    for _ in packer.finish():
        rows += 1
    s = packer.stats
    return {"rows": s.rows, "pad_fraction": s.pad_tokens / (s.rows * seq_len), "split_docs": s.split_docs,
            "split_fitting": 0, "seconds": time.perf_counter() - t0}


def run_greedy(lengths: np.ndarray, seq_len: int) -> dict:
    g = GreedyPacker(seq_len)
    fitting_split = 0
    for n in lengths.tolist():
        before = g.stats.split_docs
        g.add_length(n)
        fitting_split += int(g.stats.split_docs > before and n <= seq_len)
    g.finish()
    s = g.stats
    return {"rows": s.rows, "pad_fraction": s.pad_tokens / (s.rows * seq_len), "split_docs": s.split_docs,
            "split_fitting": fitting_split, "seconds": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=100e6, help="corpus size in tokens")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--buffers", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lengths = long_tailed_lengths(args.tokens, args.seed)
    long_share = lengths[lengths >= 4096].sum() / lengths.sum()
    print(f"corpus: {len(lengths):,} documents, {lengths.sum():,} tokens, median {int(np.median(lengths))} tokens, "
          f"{100 * long_share:.1f}% of tokens in documents >= 4K")
    print(f"{'seq_len':>8} {'packer':<18} {'rows':>8} {'pad %':>8} {'split docs':>11} {'split that fit':>15} "
          f"{'Mdocs/s':>8}")
    for L in args.seq_lens:
        g = run_greedy(lengths, L)
        print(f"{L:>8} {'greedy concat':<18} {g['rows']:>8,} {100 * g['pad_fraction']:>8.4f} {g['split_docs']:>11,} "
              f"{g['split_fitting']:>15,} {'':>8}")
        for b in args.buffers:
            r = run_best_fit(lengths, L, b)
            print(f"{L:>8} {f'best-fit buf={b}':<18} {r['rows']:>8,} {100 * r['pad_fraction']:>8.4f} "
                  f"{r['split_docs']:>11,} {r['split_fitting']:>15,} {len(lengths) / r['seconds'] / 1e6:>8.2f}")


if __name__ == "__main__":
    main()
