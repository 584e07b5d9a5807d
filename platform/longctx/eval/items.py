"""Per-item results of an evaluation, saved beside the aggregates so intervals can be computed from them.

Every aggregate in `metrics.json` is a mean over items: held-out documents (perplexity), passkey prompts, RULER
samples. `evaluate_models` also saves those items, per model, under `models[<name>]["items"]`:

    {"perplexity": {"<length>": {"ids": [...], "nll_within_base": [...], "nll_beyond_base": [...]}},
     "passkey": {"ids": [...], "length": [...], "correct": [0 | 1, ...]},
     "ruler": {"ids": [...], "length": [...], "task": [...], "score": [0-100, ...]}}

Item ids are stable, so two models (or two evaluations with the same eval settings and tokenizer) are paired
on the same items: a document is `doc-<sha1 of its token ids, 12 hex>`, a passkey prompt
`passkey-<length>-<depth>-<trial>-<key>`, a RULER sample `ruler-<length>-<task>-<index>`. The means of these
columns are the aggregates (documents have equal length, so the mean of per-document means is the token
mean); `longctx.report.intervals` bootstraps them.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from longctx.eval.ruler.score import metric_of, postprocess_pred


def document_id(ids: Sequence[int]) -> str:
    """A held-out document's id: the SHA-1 of its int32 token ids (first 12 hex digits)."""
    return "doc-" + hashlib.sha1(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:12]


def document_items(doc_ids: list[str], rows: dict[int, np.ndarray], base_len: int) -> dict:
    """Per-document mean NLL within (positions 1..base_len-1) and beyond (base_len..) the base length, from
    each document's per-position NLL row (position 0 has no prediction). `rows` maps document index -> row."""
    out: dict = {"ids": [], "nll_within_base": [], "nll_beyond_base": []}
    for i in sorted(rows):
        nll = rows[i]
        out["ids"].append(doc_ids[i])
        inside = nll[1:base_len] if 0 < base_len < len(nll) else nll[1:]
        beyond = nll[base_len:] if 0 < base_len < len(nll) else nll[:0]
        out["nll_within_base"].append(round(float(inside.mean()), 6) if len(inside) else None)
        out["nll_beyond_base"].append(round(float(beyond.mean()), 6) if len(beyond) else None)
    return out


def passkey_id(row: dict) -> str:
    return f"passkey-{int(row['length'])}-{float(row['depth']):g}-{int(row['trial'])}-{row['key']}"


def passkey_items(rows: list[dict]) -> dict:
    """One entry per passkey prompt: its id, length and 1 / 0 (correct or not)."""
    return {"ids": [passkey_id(r) for r in rows], "length": [int(r["length"]) for r in rows],
            "correct": [int(bool(r["correct"])) for r in rows]}


def ruler_items(work_items: list, preds: list[str]) -> dict:
    """One entry per RULER sample: its id, length, task and score (RULER's metric of that one sample, 0-100,
    after RULER's post-processing; the task score is the mean of these)."""
    out: dict = {"ids": [], "length": [], "task": [], "score": []}
    for it, pred in zip(work_items, preds):
        out["ids"].append(f"ruler-{it.length}-{it.task}-{it.row['index']}")
        out["length"].append(int(it.length))
        out["task"].append(it.task)
        refs = it.row["outputs"]
        out["score"].append(float(metric_of(it.task)([postprocess_pred(pred)], [refs])) if refs and refs[0] is not None
                            else 0.0)
    return out


def item_values(entry: dict, metric: str, length: int | str | None = None,
                tasks: Sequence[str] | None = None) -> dict[str, float]:
    """{item id: value} of one model's saved items (a `metrics.json` model entry): `metric` is nll_beyond_base
    or nll_within_base (documents at `length`, default the evaluation length), passkey (1 / 0 per prompt at
    `length`) or ruler (score / 100 per sample at `length`, of `tasks` if given). Empty when not saved."""
    items = entry.get("items") or {}
    if metric in ("nll_beyond_base", "nll_within_base"):
        if length is None:
            length = (entry.get("perplexity") or {}).get("context_length")
        col = (items.get("perplexity") or {}).get(str(length))
        if not col:
            return {}
        return {i: v for i, v in zip(col["ids"], col[metric]) if v is not None}
    if metric == "passkey":
        col = items.get("passkey") or {"ids": [], "length": [], "correct": []}
        return {i: float(c) for i, n, c in zip(col["ids"], col["length"], col["correct"])
                if length is None or int(n) == int(length)}
    if metric == "ruler":
        col = items.get("ruler") or {"ids": [], "length": [], "task": [], "score": []}
        return {i: s / 100.0 for i, n, t, s in zip(col["ids"], col["length"], col["task"], col["score"])
                if (length is None or int(n) == int(length)) and (tasks is None or t in tasks)}
    raise ValueError(f"unknown item metric {metric!r} (nll_beyond_base, nll_within_base, passkey, ruler)")
