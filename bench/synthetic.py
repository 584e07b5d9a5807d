"""Synthetic-data generation throughput: SynL tables, retrieval instructions and the CIP-k row rewrite.

    python bench/synthetic.py                                   # ~1-2 min on 2 cores, shipped tiny tokenizer
    python bench/synthetic.py --lengths 4096 32768 --samples 16 --ray-samples 64 --actors 2

Per generator and sample length: one process (the builder alone: samples/s, generated tokens/s), then the same
generator through Ray Data (`ray.data.range(n).map_batches(<actor class>)`, an actor pool of --actors actors)
including writing the chat-JSONL shards and the manifest. CIP-k: rows/s and tokens/s of `cip_table` on packed
rows of --cip-seq tokens (in process; the Ray Data stage runs the same function per block).
Token counts are the chat-templated sample in the given tokenizer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def bench_builders(args, cfg) -> None:
    from longctx.data.synthetic.retrieval import RetrievalSampleBuilder, load_haystack, retrieval_settings
    from longctx.data.synthetic.tables import TableSampleBuilder, table_settings

    ids, texts = load_haystack(cfg)
    print(f"haystack: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'generator':<10} {'tokens':>8} {'samples/s':>10} {'tokens/s':>10} {'tokens/cpu-s':>13}   (one process)")
    for length in args.lengths:
        size = {"min_tokens": length, "max_tokens": length}
        cfg.synth.tables = cfg.synth.tables.model_copy(update=size)
        cfg.synth.retrieval = cfg.synth.retrieval.model_copy(update=size)
        builders = {"tables": TableSampleBuilder(args.tokenizer, 0, table_settings(cfg)),
                    "retrieval": RetrievalSampleBuilder(args.tokenizer, 0, retrieval_settings(cfg), ids, texts)}
        for name, b in builders.items():
            b.build(0)  # warm-up (template compile, caches)
            t0, c0, tokens = time.perf_counter(), time.process_time(), 0
            for i in range(args.samples):
                tokens += int(b.build(i)["tokens"])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            print(f"{name:<10} {length:>8} {args.samples / dt:>10.2f} {tokens / dt:>10,.0f} {tokens / dc:>13,.0f}")


def bench_ray(args, cfg) -> None:
    from longctx.data.synthetic.retrieval import synth_retrieval
    from longctx.data.synthetic.tables import synth_tables

    length = args.lengths[-1]
    cfg.synth.num_actors = args.actors
    cfg.synth.batch_size = max(1, args.ray_samples // (4 * args.actors))
    size = {"num_samples": args.ray_samples, "min_tokens": length // 2, "max_tokens": length}
    cfg.synth.tables = cfg.synth.tables.model_copy(update=size)
    cfg.synth.retrieval = cfg.synth.retrieval.model_copy(update=size)
    print(f"\n{'generator':<10} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'tokens/s':>10}   "
          f"(Ray Data, {args.actors} actors, lengths {length // 2}-{length}, incl. writing)")
    with tempfile.TemporaryDirectory() as out:
        for name, fn in (("tables", synth_tables), ("retrieval", synth_retrieval)):
            r = fn(cfg, os.path.join(out, name))
            t = r["timings"]
            print(f"{name:<10} {r['totals']['samples']:>8} {t['seconds']:>8.1f} {t['samples_per_s']:>10.2f} "
                  f"{t['tokens_per_s']:>10,.0f}")


def bench_cip(args) -> None:
    from longctx.data.pack import RowBuilder, Segment
    from longctx.data.cip import cip_table

    rng = np.random.default_rng(0)
    builder = RowBuilder(args.cip_seq, 0, "document")
    for r in range(args.cip_rows):
        left, segs = args.cip_seq, []
        while left > 0:
            n = int(min(left, max(1, rng.lognormal(np.log(args.cip_seq / 8), 1.0))))
            segs.append(Segment(rng.integers(3, 2000, n).astype(np.int32), "s", f"d{r}-{len(segs)}", n))
            left -= n
        builder.add(r, segs)
    table = builder.table()
    t0, c0 = time.perf_counter(), time.process_time()
    out = cip_table(table, k=2, fraction=1.0)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    segs = sum(len(x) for x in table.column("seg_lengths").to_pylist()) / table.num_rows
    print(f"\nCIP-2 rewrite: {out.num_rows} rows x {args.cip_seq} tokens ({segs:.1f} documents/row): "
          f"{out.num_rows / dt:,.0f} rows/s, {out.num_rows * args.cip_seq / dt / 1e6:.1f}M tokens/s "
          f"({out.num_rows * args.cip_seq / dc / 1e6:.1f}M tokens/cpu-s, one process)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="builtin:tiny-tokenizer")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--samples", type=int, default=12, help="samples per (generator, length), one process")
    p.add_argument("--ray-samples", type=int, default=32, help="samples per generator through Ray Data (0: skip)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cip-seq", type=int, default=32768)
    p.add_argument("--cip-rows", type=int, default=64)
    args = p.parse_args()

    from longctx.config import load_config

    cfg = load_config(None, [f"data.tokenizer={args.tokenizer}", "synth.retrieval.haystack_max_chars=4000000"])
    bench_builders(args, cfg)
    bench_cip(args)
    if args.ray_samples:
        import ray

        ray.init(address="local", num_cpus=max(2, args.actors + 1), include_dashboard=False)
        try:
            bench_ray(args, cfg)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
