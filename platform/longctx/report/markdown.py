"""Markdown tables and the verdict (`report.verdict`) for evaluation metrics; `write_report` assembles report.md +
PNGs.

Tables: NLL / perplexity per position bucket per model, passkey accuracy per length per model, needle
grid means, LongBench-format scores, RULER (tasks x lengths, averages as RULER takes them) and InfiniteBench
scores. Buckets and lengths beyond the base model's training length are
marked with a dagger (†), the region where training-free baselines and Long-PT differ.
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable, Sequence

from longctx import storage
from longctx.eval.gate import gate_line
from longctx.report.plots import plot_needle_heatmap, plot_nll_by_position, plot_passkey_accuracy
from longctx.report.sections import relative
from longctx.report.verdict import verdict

BEYOND = "†"


def _f(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], text_columns: int = 1) -> str:
    """Markdown table: the first `text_columns` columns left-aligned, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _eval_part(metrics: dict) -> dict:
    return metrics.get("eval", metrics) if isinstance(metrics, dict) else {}


def perplexity_table(metrics: dict) -> str | None:
    models = {n: m for n, m in metrics.get("models", {}).items() if m.get("perplexity")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    buckets = next(iter(models.values()))["perplexity"]["buckets"]
    header = ["model"] + [f"{lo}-{hi - 1}{BEYOND if base_len and lo >= base_len else ''}" for lo, hi in buckets]
    has_beyond = any("nll_beyond_base" in m["perplexity"] for m in models.values())
    if has_beyond:
        header.append(f"≥{base_len}{BEYOND}")
    header.append("all")
    rows = []
    for name, m in models.items():
        p = m["perplexity"]
        row = [name] + [f"{_f(n)} ({_f(math.exp(n) if n == n else None, 1)})" for n in p["mean_nll"]]
        if has_beyond:
            row.append(_f(p.get("nll_beyond_base")))
        row.append(_f(p.get("overall_nll")))
        rows.append(row)
    first = next(iter(models.values()))["perplexity"]
    note = (f"Mean next-token NLL in nats (perplexity in brackets) by token position; {first.get('documents')} documents "
            f"of {metrics.get('context_length')} tokens ({first.get('skipped_short', 0)} shorter ones skipped). "
            f"{BEYOND} positions at or beyond the base model's training length ({base_len}). Lower is better.")
    return _table(header, rows) + "\n\n" + note


def other_lengths_table(metrics: dict) -> str | None:
    """Overall NLL (and NLL beyond the base length) of each model at every evaluated context length."""
    models = {n: m for n, m in metrics.get("models", {}).items() if m.get("perplexity_at")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    lengths = sorted({int(x) for m in models.values() for x in m["perplexity_at"]} | {int(metrics.get("context_length", 0))})
    header = ["model"] + [f"{n}" for n in lengths]
    rows = []
    for name, m in models.items():
        at = {**m["perplexity_at"], str(metrics.get("context_length")): m.get("perplexity") or {}}
        cells = []
        for n in lengths:
            p = at.get(str(n)) or {}
            beyond = p.get("nll_beyond_base")
            cells.append(_f(p.get("overall_nll")) + (f" ({_f(beyond)}{BEYOND})" if beyond is not None else ""))
        rows.append([name] + cells)
    return _table(header, rows) + (f"\n\nMean NLL over all positions at each context length; in brackets positions "
                                   f"≥ {base_len}{BEYOND}.")


def saturated(values) -> str | None:
    """"0%" / "100%" when every value (fractions or 0-100 scores) is at the floor / the ceiling, else None."""
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return None
    if all(v == 0 for v in vals):
        return "0%"
    top = 100.0 if max(vals) > 1 else 1.0
    return "100%" if all(v == top for v in vals) else None


def passkey_saturated(metrics: dict) -> str | None:
    """"0%" / "100%" when every model scores that at every passkey length (accuracy cannot discriminate)."""
    models = [m["passkey"] for m in metrics.get("models", {}).values() if m.get("passkey")]
    return saturated([v for pk in models for v in pk["accuracy_by_length"].values()]) if models else None


def needle_saturated(metrics: dict) -> str | None:
    models = [nd for m in metrics.get("models", {}).values() for nd in (m.get("needle") or {}).values()]
    return saturated([v for nd in models for v in nd["by_length"].values()]) if models else None


def cannot_discriminate(what: str, level: str, n_models: int, detail: str = "") -> str:
    return (f"**{what} cannot discriminate here:** all {n_models} models score {level} at every length{detail}, "
            f"so it is not shown as a result (the task is {'beyond' if level == '0%' else 'too easy for'} every "
            f"model at this scale).")


def passkey_nll_table(metrics: dict) -> str | None:
    """Teacher-forced NLL of the passkey's tokens by length (discriminates when exact match does not)."""
    models = {n: m["passkey"] for n, m in metrics.get("models", {}).items()
              if (m.get("passkey") or {}).get("key_nll_by_length")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    lengths = sorted({int(x) for pk in models.values() for x in pk["key_nll_by_length"]})
    header = ["model"] + [f"{n}{BEYOND if base_len and n > base_len else ''}" for n in lengths]
    rows = [[name] + [_f(pk["key_nll_by_length"].get(str(n))) for n in lengths] for name, pk in models.items()]
    return _table(header, rows) + ("\n\nMean NLL of the passkey's tokens given the prompt (teacher-forced, nats; "
                                   "lower is better) by prompt length in tokens.")


def passkey_table(metrics: dict) -> str | None:
    models = {n: m for n, m in metrics.get("models", {}).items() if m.get("passkey")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    lengths = sorted({int(x) for m in models.values() for x in m["passkey"]["accuracy_by_length"]})
    header = ["model"] + [f"{n}{BEYOND if base_len and n > base_len else ''}" for n in lengths] + ["all"]
    rows = []
    for name, m in models.items():
        acc = m["passkey"]["accuracy_by_length"]
        nll = m["passkey"].get("key_nll_by_length", {})
        cell = lambda n: (_f(100 * acc[str(n)], 0) + "%" + (f" ({_f(nll[str(n)])})" if str(n) in nll else "")  # noqa: E731
                          if str(n) in acc else "–")
        rows.append([name] + [cell(n) for n in lengths] + [_f(100 * m["passkey"]["overall"], 0) + "%"])
    first = next(iter(models.values()))["passkey"]
    note = (f"Exact-match passkey accuracy by prompt length in tokens (in brackets: mean NLL of the key's tokens, "
            f"teacher-forced; lower is better), averaged over depths "
            f"{', '.join(f'{d:g}' for d in first.get('depths', []))} ({first.get('trials')} prompts per model). "
            f"{BEYOND} longer than the base model's training length.")
    return _table(header, rows) + "\n\n" + note


def needle_table(metrics: dict) -> str | None:
    models = {n: m["needle"] for n, m in metrics.get("models", {}).items() if m.get("needle")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    lengths = sorted({int(x) for nd in models.values() for v in nd.values() for x in v["by_length"]})
    header = ["model", "variant"] + [f"{n}{BEYOND if base_len and n > base_len else ''}" for n in lengths] + ["mean"]
    rows = []
    for name, nd in models.items():
        for variant, v in nd.items():
            rows.append([name, variant] + [_f(v["by_length"].get(str(n)), 1) for n in lengths] + [_f(v["mean"], 1)])
    note = ("NeedleBench v1 scores (0-100) by prompt length in tokens, averaged over needle depths: 100 when the "
            "keyword is in the answer, else 20 x (1 - normalised edit distance to the reference, whitespace removed); "
            "multi-needle retrieval: share of keywords found.")
    return _table(header, rows, text_columns=2) + "\n\n" + note


def longbench_table(metrics: dict) -> str | None:
    models = {n: m["longbench"] for n, m in metrics.get("models", {}).items() if m.get("longbench")}
    if not models:
        return None
    datasets = sorted({d for lb in models.values() for d in lb["scores"]})
    header = ["model"] + datasets + ["avg (en)", "avg (zh)"]
    rows = []
    for name, lb in models.items():
        cells = []
        for d in datasets:
            v = lb["scores"].get(d)
            cells.append(" / ".join("–" if x is None else f"{x:.2f}" for x in v.values()) if isinstance(v, dict) else _f(v))
        cats = lb.get("categories", {})
        rows.append([name] + cells + [_f(cats.get("en", {}).get("Avg")), _f(cats.get("zh", {}).get("Avg"))])
    samples = next(iter(models.values())).get("samples", {})
    note = ("LongBench scoring (x100, 2 decimals; LongBench-E cells are 0-4k / 4-8k / 8k+); samples per dataset: "
            + ", ".join(f"{d} {n}" for d, n in sorted(samples.items())) + ". Over-long prompts keep their first and "
            "last halves (middle truncation).")
    return _table(header, rows) + "\n\n" + note


def ruler_table(metrics: dict) -> str | None:
    """RULER's tables: the average per length for every model (RULER's README layout), then tasks x models
    at each length."""
    models = {n: m["ruler"] for n, m in metrics.get("models", {}).items() if m.get("ruler")}
    if not models:
        return None
    base_len = metrics.get("base_context_length") or 0
    lengths = sorted({int(n) for r in models.values() for n in r["scores"]})
    mark = lambda n: f"{n}{BEYOND if base_len and n > base_len else ''}"  # noqa: E731
    header = ["model"] + [mark(n) for n in lengths] + ["Avg.", "wAvg. (inc)", "wAvg. (dec)", "effective"]
    rows = [[name] + [_f(r["average"].get(str(n))) for n in lengths]
            + [_f(r.get("avg")), _f(r.get("wavg_inc")), _f(r.get("wavg_dec")), str(r.get("effective_length") or "–")]
            for name, r in models.items()]
    out = [_table(header, rows)]
    for n in lengths:
        tasks = [t for t in next(iter(models.values()))["settings"]["tasks"]
                 if any(t in r["scores"].get(str(n), {}) for r in models.values())]
        rows = [[name] + [_f(r["scores"].get(str(n), {}).get(t)) for t in tasks] + [_f(r["average"].get(str(n)))]
                for name, r in models.items()]
        out.append(f"**{mark(n)} tokens**\n\n" + _table(["model"] + tasks + ["Avg."], rows))
    st = next(iter(models.values()))["settings"]
    n_tasks = len(st["tasks"])
    note = (f"RULER (NVIDIA/RULER {st['ruler_commit'][:7]}): string-match scores (0-100) of greedy answers, "
            f"{st['num_samples']} samples per task and length (seed {st['seed']}); Avg. is the mean over the "
            f"{n_tasks} tasks run at each length, then over lengths plainly and with weights rising (inc) / falling "
            f"(dec) with length; effective: the longest length up to which every length averages above 85.6 "
            f"(Llama-2-7B at 4K). Lengths count prompt + tokens to generate; {BEYOND} longer than the base model's "
            "training length.")
    if st["skipped"]:
        note += " Not run: " + "; ".join(f"{t} ({why})" for t, why in st["skipped"].items()) + \
            " - averages over the tasks run at a length are not comparable with RULER's 13-task averages."
    changed = {k: v for k, v in st["changed_from_ruler"].items() if v}
    if changed:
        note += f" Changed from RULER's settings: {json.dumps(changed)}."
    if st.get("essay") == "builtin:haystack/default.txt":
        note += (" Essay haystack: the shipped filler prose, not Paul Graham's essays (niah_single_2/3, multikey_1, "
                 "multivalue, multiquery differ from published runs).")
    return "\n\n".join(out) + "\n\n" + note


def infinitebench_table(metrics: dict) -> str | None:
    models = {n: m["infinitebench"] for n, m in metrics.get("models", {}).items() if m.get("infinitebench")}
    if not models:
        return None
    tasks = [t for t in ("passkey", "number_string", "kv_retrieval", "math_find", "code_debug", "longbook_choice_eng")
             if any(t in ib["scores"] for ib in models.values())]
    rows = [[name] + [_f(ib["scores"].get(t)) for t in tasks] for name, ib in models.items()]
    first = next(iter(models.values()))
    note = (f"InfiniteBench (OpenBMB/InfiniteBench {first.get('commit', '')[:7]}) scoring rules, percent correct; "
            "samples: " + ", ".join(f"{t} {first['samples'].get(t, 0)}" for t in tasks)
            + (("; middle-truncated prompts: " + ", ".join(f"{t} {v}" for t, v in sorted(first["truncated"].items())))
               if first.get("truncated") else "") + ".")
    return _table(["model"] + tasks, rows) + "\n\n" + note


def eval_markdown(metrics: dict, images: dict[str, str] | None = None, run_dir: str | None = None) -> str:
    """Markdown for the evaluation part of a report; `images` maps plot kind -> relative PNG path; model paths
    inside `run_dir` are shown relative to it."""
    metrics = _eval_part(metrics)
    images = images or {}
    out = []
    v = verdict(metrics)
    if v:
        out.append(f"**Verdict:** {v}\n")
    models = metrics.get("models", {})
    if models:
        out.append("Models: " + "; ".join(f"**{n}** = {_describe(m.get('spec') or {}, run_dir)}"
                                          for n, m in models.items()) + ".\n")
    t = perplexity_table(metrics)
    if t:
        out += ["### Perplexity by position\n", t + "\n"]
        if "nll" in images:
            out.append(f"![NLL by position]({images['nll']})\n")
    t = other_lengths_table(metrics)
    if t:
        out += ["#### Other context lengths\n", t + "\n"]
    t = passkey_table(metrics)
    flat = passkey_saturated(metrics)
    if t and flat:
        pk_models = [m["passkey"] for m in models.values() if m.get("passkey")]
        lengths = sorted({int(x) for pk in pk_models for x in pk["accuracy_by_length"]})
        out += ["### Passkey retrieval\n",
                cannot_discriminate("Passkey exact match", flat, len(pk_models),
                                    f" ({', '.join(map(str, lengths))} tokens)") + "\n"]
        nll = passkey_nll_table(metrics)
        if nll:
            out.append(nll + "\n")
    elif t:
        out += ["### Passkey retrieval\n", t + "\n"]
        if "passkey" in images:
            out.append(f"![passkey accuracy]({images['passkey']})\n")
    t = needle_table(metrics)
    flat = needle_saturated(metrics)
    if t and flat:
        n = sum(1 for m in models.values() if m.get("needle"))
        out += ["### Needle in a haystack\n", cannot_discriminate("The needle score", flat, n) + "\n"]
    elif t:
        out += ["### Needle in a haystack\n", t + "\n"]
        for key, path in images.items():
            if key.startswith("needle:"):
                out.append(f"![{key}]({path})\n")
    t = longbench_table(metrics)
    if t:
        out += ["### LongBench-format tasks\n", t + "\n"]
    t = ruler_table(metrics)
    if t:
        out += ["### RULER\n", t + "\n"]
    t = infinitebench_table(metrics)
    if t:
        out += ["### InfiniteBench\n", t + "\n"]
    for extra in metrics.get("extra_markdown", []):
        out.append(extra + "\n")
    timing = metrics.get("timing_s")
    if timing:
        out.append(f"Evaluation took {timing.get('total', 0):.1f} s on {timing.get('actors')} Ray Data actor(s).\n")
    return "\n".join(out)


def _describe(spec: dict, run_dir: str | None = None) -> str:
    uri = spec.get("uri", "?")
    if run_dir and uri != "?":
        uri = relative(uri, run_dir)
    s = f"`{uri}`"
    if spec.get("rope_theta"):
        s += f", rope_theta {spec['rope_theta']:g}"
    sc = spec.get("scaling")
    if sc:
        s += f", RoPE {sc['type']} x{sc['factor']:g}"
    return s


def slug(name: str) -> str:
    """A model name as a file name part ("base + PI x4" -> "base-pi-x4")."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "model"



def gate_markdown(gate: dict) -> str:
    """The regression gate's table: one row per stage and check (base -> after, the limit, passed)."""
    rows = ["| stage | length | check | before | after | limit | passed |", "|---|---|---|---|---|---|---|"]
    for stage, v in gate["verdicts"].items():
        for name, c in v["checks"].items():
            rows.append(f"| {stage} | {v['length']} | {name} | {_num(c['base'])} | {_num(c['after'])} | "
                        f"{_num(c['limit'])} | {'yes' if c['passed'] else '**no**'} |")
    action = {v["action"] for v in gate["verdicts"].values()}
    return "\n".join(rows) + (f"\n\nBefore: each stage's input model; after: its output, on the same prompts "
                              f"(eval.gate.action: {', '.join(sorted(action))}).")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_report(run_dir: str, metrics: dict, sections: Sequence[tuple[str, str] | str] = (), *,
                 title: str = "longctx run report", intro: str | None = None) -> str:
    """Write `run_dir/report.md` and its PNGs (local or s3://); returns the report's URI.

    `sections` are extra (title, markdown) pairs (or plain markdown) placed after the evaluation, e.g. the
    data manifest and training summaries of a job.
    """
    ev = _eval_part(metrics)
    images: dict[str, str] = {}
    plots = [("nll", "nll_by_position.png", plot_nll_by_position)]
    if not passkey_saturated(ev):  # a plot of lines all at 0% (or 100%) says nothing
        plots.append(("passkey", "passkey_accuracy.png", plot_passkey_accuracy))
    for kind, fname, fn in plots:
        png = fn(ev)
        if png:
            storage.write_bytes(storage.join(run_dir, fname), png)
            images[kind] = fname
    for name, m in ev.get("models", {}).items() if not needle_saturated(ev) else ():
        for variant, v in (m.get("needle") or {}).items():
            fname = f"needle_{slug(name)}_{variant}.png"
            storage.write_bytes(storage.join(run_dir, fname), plot_needle_heatmap(f"{name} ({variant})", v["grid"]))
            images[f"needle: {name} ({variant})"] = fname
    gate = metrics.get("gate") or {}
    # a failed gate is the report's first line (one per failed stage)
    parts = [f"**{gate_line(v)}**\n" for v in gate.get("verdicts", {}).values() if not v["passed"]]
    parts.append(f"# {title}\n")
    if intro:
        parts.append(intro + "\n")
    if ev.get("models"):
        parts += ["## Long-context evaluation\n", eval_markdown(ev, images, run_dir)]
    if gate.get("verdicts"):
        parts += ["## Regression gate\n", gate_markdown(gate) + "\n"]
    for sec in sections:
        if isinstance(sec, str):
            parts.append(sec + "\n")
        else:
            parts += [f"## {sec[0]}\n", sec[1] + "\n"]
    uri = storage.join(run_dir, "report.md")
    storage.write_text(uri, "\n".join(parts))
    return uri
