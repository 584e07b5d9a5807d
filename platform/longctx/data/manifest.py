"""Step 9 of the data path: `manifest.json`, the record of what a packed-data folder holds and how it was made.

Contract: schemas/manifest.schema.json (a test checks that a real manifest validates). The manifest is
deterministic (no timestamps, no durations), so two runs with the same input, config and seed produce the same
manifest as well as byte-identical shards.
"""

from __future__ import annotations

import longctx
from longctx.data.budget import data_budget
from longctx.data.fingerprint import data_fingerprint, data_tree, fingerprint_of
from longctx.data.mixture import MixturePlan
from longctx.data.pack import PACKED_KIND, PACKED_SCHEMA, PackStats
from longctx.data.stats import LengthAccumulator, describe_lengths

SCHEMA_VERSION = 1
def _rounded(x: float) -> float:
    return round(float(x), 6)


def build_manifest(cfg, tok, eos: int, pad: int, cache, plan: MixturePlan, in_stats: dict,
                   out_acc: dict[str, LengthAccumulator], pack: PackStats, shards: list[dict],
                   bad_fraction: float) -> dict:
    d = cfg.data
    budget, budget_from = data_budget(cfg)
    in_total = in_stats["__all__"]["tokens"] or 1
    out = {s: a.result() for s, a in sorted(out_acc.items())}
    out_total = sum(o["tokens"] for o in out.values()) or 1
    empty_out = describe_lengths([], d.long_threshold)
    sources = {}
    for s, sp in sorted(plan.sources.items()):
        o = out.get(s, empty_out)
        repeats = (sp.counts - 1).clip(min=0)
        sources[s] = {
            "in": in_stats[s],
            "out": o,
            "in_share": _rounded(in_stats[s]["tokens"] / in_total),
            "out_share": _rounded(o["tokens"] / out_total),
            "target_tokens": int(sp.target_tokens or 0),
            "dropped_docs": int((sp.counts == 0).sum()),
            "repeated_docs": int((sp.counts > 1).sum()),
            "repeat_emissions": int(repeats.sum()),
            "repeat_tokens": sp.repeat_tokens,
        }
    long_out = sum(o["long_tokens"] for o in out.values())
    rows = pack.rows
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": PACKED_KIND,
        "longctx_version": longctx.__version__,
        "tokenizer": {"uri": d.tokenizer, "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_id": eos,
                      "pad_id": pad, "fingerprint": fingerprint_of(tok)},
        "data_fingerprint": data_fingerprint(cfg),
        "data_config": data_tree(cfg),
        "seq_len": d.seq_len,
        "attention": d.attention,
        "packing": d.packing,
        "labels": "unshifted token ids (the model shifts); -100 on padding",
        "strategy": plan.strategy,
        "params": plan.params,
        "seed": d.seed,
        "token_budget": {"requested": budget, "from": budget_from, "planned": int(plan.budget),
                         "emitted": int(pack.tokens),
                         "repeat_tokens": int(sum(s["repeat_tokens"] for s in sources.values()))},
        "sources": sources,
        "totals": {
            "rows": rows,
            "tokens": int(pack.tokens),
            "pad_tokens": int(pack.pad_tokens),
            "pad_fraction": _rounded(pack.pad_tokens / (rows * d.seq_len)) if rows else 0.0,
            "long_tokens": int(long_out),
            "long_share": _rounded(long_out / out_total),
            "split_docs": int(pack.split_docs),
            "pieces": int(pack.pieces),
            "pack_buffer_rows": d.pack_buffer_rows,
            "tail_dropped_tokens": int(pack.tail_dropped),
        },
        "input": {"files": cache.files, "records": cache.good + cache.bad, "good_records": cache.good,
                  "tokens": in_stats["__all__"]["tokens"],
                  **({"read": cache.read} if getattr(cache, "read", None) else {})},
        "quarantine": {
            "records": cache.bad,
            "by_reason": dict(sorted(cache.bad_by_reason.items())),
            "fraction": _rounded(bad_fraction),
            "max_bad_fraction": d.max_bad_fraction,
            "file": "_quarantine/records.jsonl",
        },
        "columns": [f.name for f in PACKED_SCHEMA],
        "shards": shards,
    }
