"""Report sections of a job (data, training) that read true: loss as means over the first and last 10% of steps
with a loss-curve PNG (validation loss on it), whether the second half of the curve improved on the first and
where the validation loss was lowest, the batch layout as a small table, the lengths histogram linked, and every
path relative to the run folder (a report moved or downloaded with its folder keeps working links).

    md = train_section(cfg, outcome, timings, run_root)     # writes run_root/loss_curve.png
    md = data_section(manifest, run_root, data_uri)
"""

from __future__ import annotations

import math

from longctx import storage
from longctx.report.plots import plot_loss_curve

LOSS_CURVE = "loss_curve.png"


def relative(uri: str | None, run_root: str) -> str | None:
    """`uri` relative to the run folder when it lies inside it (else unchanged: a base model, an outside dataset)."""
    if not uri:
        return uri
    root = storage.normalize(run_root).rstrip("/")
    path = storage.normalize(uri)
    if path == root:
        return "."
    return path[len(root) + 1:] if path.startswith(root + "/") else uri


def loss_summary(history: list[dict], fraction: float = 0.1) -> dict | None:
    """Mean loss over the first and the last `fraction` of logged steps (at least one step each)."""
    losses = [h["loss"] for h in history if isinstance(h.get("loss"), (int, float)) and math.isfinite(h["loss"])]
    if not losses:
        return None
    k = max(1, math.ceil(len(losses) * fraction))
    return {"steps": len(losses), "window": k, "first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k,
            "final": losses[-1]}


def halves(history: list[dict]) -> dict | None:
    """Mean loss over the first and the second half of the logged steps (None with fewer than 4 steps), and
    whether the second half improved on the first (lower mean)."""
    pts = [(h["step"], h["loss"]) for h in history if isinstance(h.get("loss"), (int, float)) and math.isfinite(h["loss"])]
    if len(pts) < 4:
        return None
    k = len(pts) // 2
    first, second = pts[:k], pts[k:]
    a, b = sum(x for _, x in first) / len(first), sum(x for _, x in second) / len(second)
    return {"first": a, "second": b, "first_steps": (first[0][0], first[-1][0]),
            "second_steps": (second[0][0], second[-1][0]), "improved": b < a}


def curve_lines(history: list[dict]) -> list[str]:
    """What the loss curve says that two means do not: whether the second half improved on the first, and where
    the validation loss was lowest when that was not at the end."""
    out = []
    h = halves(history)
    if h:
        (a0, a1), (b0, b1) = h["first_steps"], h["second_steps"]
        verdict = (f"improved by {h['first'] - h['second']:.3f}" if h["improved"] else
                   f"**did not improve** on the first half (+{h['second'] - h['first']:.3f})")
        out.append(f"- loss curve: mean {h['second']:.3f} over steps {b0}-{b1} (second half) vs {h['first']:.3f} "
                   f"over steps {a0}-{a1}: the second half {verdict}")
    val = [x for x in history if isinstance(x.get("val_loss"), (int, float)) and math.isfinite(x["val_loss"])]
    if len(val) >= 2:
        best = min(val, key=lambda x: x["val_loss"])
        if best is not val[-1] and val[-1]["val_loss"] > best["val_loss"]:
            out.append(f"- validation loss was lowest at step {best['step']} ({best['val_loss']:.3f}); the last "
                       f"measurement (step {val[-1]['step']}) is {val[-1]['val_loss']:.3f}")
    return out


_LAYOUT_COLUMNS = [("world_size", "workers"), ("data_parallel", "data parallel"),
                   ("sequence_parallel", "sequence parallel"), ("micro_batch_size", "micro-batch (rows)"),
                   ("grad_accum", "grad accumulation"), ("seq_len", "row length (tokens)"),
                   ("rows_per_step", "rows per step"), ("tokens_per_step", "tokens per step")]


def layout_table(layout: dict) -> str:
    """The batch layout as a one-row markdown table (known fields in a fixed order, the rest after them)."""
    cols = [(k, label) for k, label in _LAYOUT_COLUMNS if k in layout]
    cols += [(k, k.replace("_", " ")) for k in layout if k not in dict(_LAYOUT_COLUMNS)]
    cell = lambda v: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(label for _, label in cols) + " |",
                      "|" + "|".join("---:" for _ in cols) + "|",
                      "| " + " | ".join(cell(layout[k]) for k, _ in cols) + " |"])


def train_section(cfg, outcome, timings: dict, run_root: str, *, from_model: str | None = None,
                  stage: str | None = None) -> str:
    """Markdown summary of the training run; writes the loss curve beside report.md. In a multi-stage run it is
    the last stage's training: `stage` names it and `from_model` is the model it started from (the previous
    stage's final model; default `cfg.model.path`)."""
    hist = outcome.history or []
    tps = sorted(h["tokens_per_s"] for h in hist[1:] if h.get("tokens_per_s")) or \
        sorted(h["tokens_per_s"] for h in hist if h.get("tokens_per_s"))
    rope = cfg.model.rope_theta or "unchanged"
    lines = [
        (f"- stage {stage} (the last), from " if stage else "- model ")
        + f"`{relative(from_model or cfg.model.path, run_root)}`, rope_theta {rope}, seq_len {cfg.data.seq_len}, "
        f"attention `{cfg.data.attention}`",
        f"- {cfg.train.num_workers} workers ({'GPU' if cfg.train.use_gpu else 'CPU'}), ZeRO-{cfg.train.zero_stage}, "
        f"global batch {cfg.train.global_batch_tokens:,} tokens",
    ]
    s = loss_summary(hist)
    if s:
        lines.append(f"- {outcome.steps} steps, {outcome.tokens:,} tokens; loss {s['first']:.3f} (mean of the first "
                     f"{s['window']} step{'s' if s['window'] > 1 else ''}) -> {s['last']:.3f} (mean of the last "
                     f"{s['window']}), final step {s['final']:.3f}"
                     + (f"; median {tps[len(tps) // 2]:,.0f} tokens/s" if tps else ""))
    else:
        lines.append(f"- {outcome.steps} steps, {outcome.tokens:,} tokens")
    val = [h for h in hist if isinstance(h.get("val_loss"), (int, float))]
    if val:
        lines.append(f"- validation loss {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> "
                     f"{val[-1]['val_loss']:.3f} (step {val[-1]['step']}), {len(val)} measurements on held-out "
                     "documents")
    lines += curve_lines(hist)
    lines += [
        f"- final model: `{relative(outcome.final_model_uri, run_root)}`; per-step log: "
        f"`{relative(outcome.metrics_log_uri, run_root)}` (and `.csv`); TensorBoard: "
        f"`tensorboard --logdir <run folder>`",
        "- wall clock: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
    ]
    md = "\n".join(lines) + "\n"
    if outcome.layout:
        md += "\nBatch layout:\n\n" + layout_table(outcome.layout) + "\n"
    png = plot_loss_curve(hist)
    if png:
        storage.write_bytes(storage.join(run_root, LOSS_CURVE), png)
        md += f"\n![training loss]({LOSS_CURVE})\n"
    elif len(hist) < 2:
        md += "\nNo loss curve: fewer than two steps were logged.\n"
    return md


def data_section(manifest: dict, run_root: str, data_uri: str | None = None) -> str:
    """Markdown summary of a data manifest: per-source tokens and long share in and out, and the lengths
    histogram (linked relative to the run folder; copied into it when the data lives elsewhere)."""
    t = manifest.get("totals", {})
    long_threshold = (manifest.get("params") or {}).get("long_threshold") or manifest.get("long_threshold")
    lines = [f"{t.get('rows', 0)} rows x {manifest.get('seq_len')} tokens, {t.get('tokens', 0):,} tokens, "
             f"pad {100 * (t.get('pad_fraction') or 0):.3f}%, long-token share {100 * (t.get('long_share') or 0):.1f}%"
             + (f" (documents >= {long_threshold} tokens)" if long_threshold else "") + ", "
             f"{t.get('split_docs', 0)} documents split, strategy `{manifest.get('strategy')}`, "
             f"{manifest.get('quarantine', {}).get('records', 0)} records quarantined.\n",
             "| source | tokens in | share in | long share in | tokens out | share out | long share out |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, src in sorted(manifest.get("sources", {}).items()):
        i, o = src.get("in", {}), src.get("out", {})
        lines.append(f"| {name} | {i.get('tokens', 0):,} | {100 * (src.get('in_share') or 0):.1f}% | "
                     f"{100 * (i.get('long_share') or 0):.1f}% | {o.get('tokens', 0):,} | "
                     f"{100 * (src.get('out_share') or 0):.1f}% | {100 * (o.get('long_share') or 0):.1f}% |")
    md = "\n".join(lines) + "\n"
    budget, read = manifest.get("token_budget") or {}, (manifest.get("input") or {}).get("read")
    if read:  # budget-aware reading (data/budget.py): what was read per source and what repeats
        parts = ", ".join(f"{name} {r['files_read']}/{r['files']} files ({r['tokens_kept']:,} tokens kept)"
                          for name, r in sorted(read.get("sources", {}).items()))
        md += (f"\nToken budget {budget.get('requested') or 0:,} (`{budget.get('from')}`): read {parts}; "
               f"{budget.get('repeat_tokens', 0):,} tokens repeat.\n")
    link = _lengths_png(run_root, data_uri)
    if link:
        md += f"\n![input tokens by document length]({link})\n"
    if data_uri:
        md += f"\nPacked data: `{relative(data_uri, run_root)}` (manifest.json beside the shards).\n"
    return md


def _lengths_png(run_root: str, data_uri: str | None) -> str | None:
    if not data_uri:
        return None
    src = storage.published_path(data_uri, "lengths.png")
    if not storage.exists(src):
        return None
    rel = relative(src, run_root)
    if rel != src:
        return rel
    storage.write_bytes(storage.join(run_root, "data_lengths.png"), storage.read_bytes(src))
    return "data_lengths.png"
