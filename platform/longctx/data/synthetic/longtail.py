"""A per-source long-tailed corpus, built from the shipped sample corpus: most documents shorter than the base
model's context, a minority of long ones (like SlimPajama, where about 70% of documents are under 4K tokens).

    from longctx.data.synthetic.longtail import build_long_tailed_corpus
    info = build_long_tailed_corpus("runs/study/corpus", seed=0)     # code/c/records .jsonl.gz + stats.json
    info["sources"]["code"]["share_docs_short"], info["sources"]["code"]["long_token_share"]

    python -m longctx.data.synthetic.longtail --output runs/study/corpus --seed 0

The shipped corpus is 83-99% long documents in every source, so per-source upsampling has nothing to do on it.
Here every source keeps a *different*, seed-chosen minority of its long documents whole (`long_doc_fraction`
of the documents that are long enough) and cuts every other document at line breaks into short pieces whose
lengths follow a log-normal (median `short_median_tokens`, capped below `short_max_tokens`, the base length).
The text is the shipped corpus's own, so a model pretrained on it reads familiar material; only the length
distribution changes. Deterministic: the same seed and inputs give byte-identical files (gzip mtime 0).

Lengths are measured with the tokenizer the study trains with (`builtin:tiny-tokenizer` by default), so "short"
means shorter than the base length in tokens, not characters.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import random

from longctx import storage

DEFAULT_SOURCES = {
    "code": "builtin:corpus/code.jsonl.gz",
    "c": "builtin:corpus/c.jsonl.gz",
    "records": "builtin:corpus/records.jsonl.gz",
}
# Share of each source's long-enough documents kept whole. Different per source on purpose: a global
# upsampler then changes the source mix, a per-source one does not (Fu et al., section 3).
DEFAULT_LONG_FRACTION = {"code": 0.3, "c": 0.3, "records": 0.1}


def _pieces(text: str, tok, rng: random.Random, median: int, max_tokens: int) -> list[str]:
    """Cut `text` at line breaks into pieces of about log-normal(median) tokens, each < max_tokens tokens."""
    lines = text.splitlines(keepends=True)
    counts = [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]] if lines else []
    out, cur, cur_n = [], [], 0
    target = _draw(rng, median, max_tokens)
    for line, n in zip(lines, counts):
        if n >= max_tokens:  # one over-long line: its own piece, cut by characters
            if cur:
                out.append("".join(cur))
                cur, cur_n = [], 0
            step = max(1, len(line) * (max_tokens - 1) // (2 * n))
            out += [line[i : i + step] for i in range(0, len(line), step)]
            continue
        if cur and cur_n + n > target:
            out.append("".join(cur))
            cur, cur_n, target = [], 0, _draw(rng, median, max_tokens)
        cur.append(line)
        cur_n += n
    if cur:
        out.append("".join(cur))
    return [p for p in out if p.strip()]


def _draw(rng: random.Random, median: int, max_tokens: int) -> int:
    return int(min(max_tokens * 0.9, max(16, rng.lognormvariate(math.log(median), 0.6))))


def build_long_tailed_corpus(out_dir: str, seed: int = 0, *, sources: dict[str, str] | None = None,
                             long_doc_fraction: dict[str, float] | None = None, long_min_tokens: int = 1024,
                             short_median_tokens: int = 96, short_max_tokens: int = 256,
                             tokenizer: str = "builtin:tiny-tokenizer", text_field: str = "text",
                             max_documents: int | None = None) -> dict:
    """Write `<out_dir>/<source>.jsonl.gz` for every source plus `stats.json`; returns the stats.

    Per source: of the documents with >= `long_min_tokens` tokens, a seeded `long_doc_fraction[source]` share is
    kept whole (the long tail); every other document becomes pieces of < `short_max_tokens` tokens. Records are
    `{"id", "source", "text"}` (ids `<original id>#<piece>`), in a seeded shuffled order. `max_documents`: read
    only the first N documents of each source (quick tests).
    """
    from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

    sources = dict(sources or DEFAULT_SOURCES)
    fractions = {**DEFAULT_LONG_FRACTION, **(long_doc_fraction or {})}
    tok = load_tokenizer(tokenizer)
    stats: dict = {"seed": seed, "long_min_tokens": long_min_tokens, "short_max_tokens": short_max_tokens,
                   "short_median_tokens": short_median_tokens, "tokenizer": tokenizer, "sources": {}}
    for name, uri in sorted(sources.items()):
        if name not in fractions:
            raise ValueError(f"long_doc_fraction has no share for source {name!r} ({uri})")
        rng = random.Random(f"longctx-longtail:{seed}:{name}")
        records = _read_records(uri, text_field)[:max_documents]
        lengths = [len(ids) for ids in tok([r["text"] for r in records], add_special_tokens=False)["input_ids"]]
        eligible = [i for i, n in enumerate(lengths) if n >= long_min_tokens]
        keep = set(rng.sample(eligible, round(fractions[name] * len(eligible))))
        out: list[dict] = []
        for i, rec in enumerate(records):
            rid = str(rec.get("id") or f"{name}/{i}")
            if i in keep:
                out.append({"id": rid, "source": name, "text": rec["text"], "_tokens": lengths[i]})
                continue
            for k, piece in enumerate(_pieces(rec["text"], tok, rng, short_median_tokens, short_max_tokens)):
                out.append({"id": f"{rid}#{k}", "source": name, "text": piece})
        rng.shuffle(out)
        piece_lengths = [len(ids) for ids in tok([r["text"] for r in out], add_special_tokens=False)["input_ids"]]
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
            for r in out:
                r.pop("_tokens", None)
                gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        storage.write_bytes(storage.join(out_dir, f"{name}.jsonl.gz"), buf.getvalue())
        total = sum(piece_lengths)
        sorted_lengths = sorted(piece_lengths)
        stats["sources"][name] = {
            "uri": storage.join(out_dir, f"{name}.jsonl.gz"), "documents": len(out), "tokens": total,
            "long_documents": len(keep), "median_doc_tokens": sorted_lengths[len(sorted_lengths) // 2],
            "share_docs_short": sum(n < short_max_tokens for n in piece_lengths) / len(out),
            "long_token_share": {str(t): sum(n for n in piece_lengths if n >= t) / total
                                 for t in (256, 512, 1024)},
        }
    storage.write_json(storage.join(out_dir, "stats.json"), stats)
    return stats


def _read_records(uri: str, text_field: str) -> list[dict]:
    raw = storage.read_bytes(uri)
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec.get(text_field), str):
            raise ValueError(f"{uri}: line {n} has no string field {text_field!r}")
        out.append({"id": rec.get("id"), "text": rec[text_field]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder (local or s3://) for <source>.jsonl.gz + stats.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-min-tokens", type=int, default=1024)
    ap.add_argument("--short-max-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    stats = build_long_tailed_corpus(args.output, args.seed, long_min_tokens=args.long_min_tokens,
                                     short_max_tokens=args.short_max_tokens)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
