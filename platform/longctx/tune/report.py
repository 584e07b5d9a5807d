"""A sweep's results: the trial table (CSV + Parquet), the papers' figures and the best trial as a recipe.

`write_results` publishes `<sweep>/results/` atomically (a `_COMMITTED` marker last):

- `trials.csv`, `trials.parquet`: one row per trial: parameter values, status, objective and every metric,
  the final model (checkpoint) and the trial folder;
- `heatmap.png`: the objective over RoPE base x token budget (or the first two axes), with the RoPE-base lower
  bound of Liu et al. 2023 (`longctx rope suggest`) drawn where it falls;
- `ppl_vs_length.png`: perplexity against evaluated context length, one curve per RoPE base (the Index-1.9B
  report's figure), the base model's naive and dynamic-NTK curves dashed;
- `objective_vs_rope_base.png`: the objective against the RoPE base per token budget, bound drawn;
- `best_config.yaml`: the best trial's full job config (the sweep's config with its values, no `tune` section),
  ready for `python jobs/long_pt.py --config best_config.yaml`;
- `report.md`: all of the above as tables and images.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from longctx import storage
from longctx.config import OBJECTIVE_MODE, JobConfig, load_config, set_dotted
from longctx.model.rope import suggest_rope_base
from longctx.report.plots import mark_base, png_bytes, plt
from longctx.tune.space import base_tree, compact_number, cumulative_perplexity, trial_key

ROPE = "model.rope_theta"
BUDGET = "train.token_budget"
METRIC_COLUMNS = ["objective", "nll_beyond_base", "nll_within_base", "overall_nll", "val_loss", "final_train_loss",
                  "passkey_accuracy", "needle_score", "train_steps", "train_tokens", "tokens_per_s", "time_total_s"]


def _num(x) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return f


def trial_table(rows: list[dict], axes: list[str]) -> list[dict[str, Any]]:
    """Flat table rows (one per trial) from the sweep's collected results."""
    out = []
    for row in rows:
        m, p = row["metrics"], row["params"]
        rec: dict[str, Any] = {"trial_key": m.get("trial_key") or trial_key(p), "status": row["status"]}
        rec.update({a: p.get(a) for a in axes})
        for c in METRIC_COLUMNS:
            rec[c] = m.get(c)
        if m.get("objective") is None:  # stopped early / failed: what its last training report said
            rec["final_train_loss"] = m.get("loss")
            rec["train_steps"] = m.get("step")
            rec["train_tokens"] = m.get("tokens")
        rec.update(final_model=m.get("final_model") or m.get("checkpoint_path"), trial_dir=m.get("trial_dir"),
                   bucket_edges=m.get("bucket_edges"), bucket_nll=m.get("bucket_nll"),
                   bucket_tokens=m.get("bucket_tokens"), error=row.get("error"), tune_dir=row.get("tune_dir"))
        out.append(rec)
    return out


def best_row(table: list[dict], objective: str) -> dict | None:
    scored = [r for r in table if r["status"] == "done" and not math.isnan(_num(r["objective"]))]
    if not scored:
        return None
    sign = 1 if OBJECTIVE_MODE[objective] == "min" else -1
    return min(scored, key=lambda r: sign * _num(r["objective"]))


def rope_bound(cfg: JobConfig) -> dict | None:
    """`rope suggest` for the sweep: the base's head_dim and training length, the evaluated context length."""
    from transformers import AutoConfig  # deferred: heavy import, used only here

    from longctx.eval.runner import eval_lengths  # deferred: pulls in torch, used only here
    from longctx.model.load import local_model_dir  # deferred: pulls in torch, used only here

    try:
        hf = AutoConfig.from_pretrained(local_model_dir(cfg.model.path))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        context, base_len = eval_lengths(cfg, cfg.model.path)
        return suggest_rope_base(int(head_dim), base_len, context)
    except Exception as e:  # the bound is an annotation: a model without a standard config just gets none
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------------------------------- plots
def _fmt(v) -> str:
    """1e4 for floats (RoPE bases, learning rates), 245,760 for integers (token budgets)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return compact_number(v, ".3g")


def _bound_x(values: list[float], bound: float) -> float | None:
    """Where `bound` falls on a categorical axis of sorted positive values (log interpolation), or None."""
    vals = [float(v) for v in values]
    if len(vals) < 2 or any(v <= 0 for v in vals):
        return None
    lv, lb = [math.log(v) for v in vals], math.log(bound)
    if lb <= lv[0]:
        return -0.5
    if lb >= lv[-1]:
        return len(vals) - 0.5
    for i in range(len(lv) - 1):
        if lv[i] <= lb <= lv[i + 1]:
            return i + (lb - lv[i]) / (lv[i + 1] - lv[i])
    return None


def plot_heatmap(table: list[dict], x_axis: str, y_axis: str | None, objective: str, bound: dict | None) -> bytes:
    xs = sorted({r[x_axis] for r in table if r[x_axis] is not None})
    ys = sorted({r[y_axis] for r in table if r[y_axis] is not None}) if y_axis else [None]
    grid = np.full((len(ys), len(xs)), np.nan)
    for r in table:
        if r["status"] != "done" or r[x_axis] not in xs:
            continue
        i, j = ys.index(r[y_axis]) if y_axis else 0, xs.index(r[x_axis])
        v = _num(r["objective"])
        grid[i, j] = v if math.isnan(grid[i, j]) else (min if OBJECTIVE_MODE[objective] == "min" else max)(grid[i, j], v)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(xs), 1.4 + 0.9 * len(ys)))
    cmap = "viridis_r" if OBJECTIVE_MODE[objective] == "min" else "viridis"
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", origin="lower")
    for i in range(len(ys)):
        for j in range(len(xs)):
            v = grid[i, j]
            ax.text(j, i, "—" if math.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=9,
                    color="white" if not math.isnan(v) and v == np.nanmax(grid) and OBJECTIVE_MODE[objective] == "min" else "black")
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys] if y_axis else [""])
    ax.set_xlabel(x_axis)
    if y_axis:
        ax.set_ylabel(y_axis)
    if bound and bound.get("base_lower_bound") and x_axis == ROPE:
        bx = _bound_x(xs, bound["base_lower_bound"])
        if bx is not None:
            ax.axvline(bx, color="red", linestyle="--", linewidth=1.5)
            ax.annotate(f"rope-suggest bound {bound['base_lower_bound']:.3g}\n(for {bound['target_len']} tokens)",
                        xy=(bx, 1.0), xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points",
                        fontsize=8, color="red")
    fig.colorbar(im, ax=ax, label=objective)
    ax.set_title(f"{objective} ({OBJECTIVE_MODE[objective]} is best)", pad=26)
    ax.grid(False)
    return png_bytes(fig, dpi=110)


def plot_ppl_vs_length(table: list[dict], baselines: dict | None, base_len: int | None) -> bytes | None:
    """Cumulative perplexity at each evaluated length, per RoPE base (the largest token budget of each)."""
    done = [r for r in table if r["status"] == "done" and r.get("bucket_nll")]
    if not done:
        return None
    key = ROPE if any(r.get(ROPE) is not None for r in done) else None
    groups: dict[Any, dict] = {}
    for r in done:
        g = r.get(key) if key else r["trial_key"]
        if g not in groups or _num(r.get(BUDGET)) > _num(groups[g].get(BUDGET)):
            groups[g] = r
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("viridis")
    for n, (g, r) in enumerate(sorted(groups.items(), key=lambda kv: _num(kv[0]) if key else 0)):
        edges, nll, tok = (json.loads(r[c]) for c in ("bucket_edges", "bucket_nll", "bucket_tokens"))
        label = f"rope_theta {_fmt(g)}" if key else str(g)
        if key and r.get(BUDGET) is not None:
            label += f" ({_fmt(r[BUDGET])} tokens)"
        ax.plot(edges, cumulative_perplexity(edges, nll, tok), marker="o", color=cmap(n / max(1, len(groups) - 1)),
                label=label)
    for name, entry in ((baselines or {}).get("models") or {}).items():
        ppl = entry.get("perplexity") or {}
        if ppl.get("buckets"):
            edges = [hi for _, hi in ppl["buckets"]]
            ax.plot(edges, cumulative_perplexity(edges, ppl["mean_nll"], ppl["tokens"]), linestyle="--",
                    color="0.5" if "naive" in name else "0.2", label=name)
    mark_base(ax, base_len)
    ax.set_xlabel("evaluated context length (tokens)")
    ax.set_ylabel("perplexity over the first N tokens")
    ax.set_title("Perplexity vs context length per RoPE base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig, dpi=110)


def plot_objective_vs_rope(table: list[dict], objective: str, bound: dict | None) -> bytes | None:
    done = [r for r in table if r["status"] == "done" and r.get(ROPE) is not None]
    if not done:
        return None
    budgets = sorted({r.get(BUDGET) for r in done}, key=_num)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for b in budgets:
        pts = sorted(((float(r[ROPE]), _num(r["objective"])) for r in done if r.get(BUDGET) == b))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"token budget {_fmt(b)}" if b is not None else "trials")
    ax.set_xscale("log")
    if bound and bound.get("base_lower_bound"):
        ax.axvline(bound["base_lower_bound"], color="red", linestyle="--", linewidth=1.5,
                   label=f"rope-suggest lower bound ({bound['target_len']} tokens): {bound['base_lower_bound']:.3g}")
    ax.set_xlabel("rope_theta")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} vs RoPE base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig, dpi=110)


# ---------------------------------------------------------------------------------------------------- writing
def best_config_yaml(cfg: JobConfig, best: dict, axes: list[str]) -> str:
    """The best trial's full job config as YAML (validated by loading it back)."""
    tree = base_tree(cfg)
    tree["run_name"] = None
    for a in axes:
        set_dotted(tree, a.split("."), best[a], f"best trial's {a}")
    values = ", ".join(f"{a}={_fmt(best[a])}" for a in axes)
    head = (f"# Best trial of sweep {cfg.tune.name or cfg.run_name or 'sweep'}: {values}\n"
            f"# {cfg.tune.objective} = {_num(best['objective']):.4f}; trial folder {best.get('trial_dir')}\n"
            f"# Run it: python jobs/long_pt.py --config best_config.yaml\n")
    return head + yaml.safe_dump(tree, sort_keys=False)


def _md_table(table: list[dict], axes: list[str], best_key: str | None) -> str:
    cols = ["trial", *axes, "status", "objective", "nll_beyond_base", "overall_nll", "val_loss", "final_train_loss",
            "train_steps"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "—"
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 1000 else _fmt(v)

    for r in sorted(table, key=lambda r: tuple(_num(r[a]) if r[a] is not None else 0 for a in axes)):
        name = (r["trial_key"] or "?") + (" **(best)**" if r["trial_key"] == best_key else "")
        vals = [name, *(cell(r[a]) for a in axes), r["status"] + (f": {r['error']}" if r.get("error") else ""),
                *(cell(r[c]) for c in cols[len(axes) + 2:])]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_results(cfg: JobConfig, root: str, rows: list[dict], baselines: dict | None) -> dict:
    """Publish `<root>/results/` (see the module docstring); returns {"uri", "best", "best_config"}."""
    axes = sorted(cfg.tune.space())
    table = trial_table(rows, axes)
    objective = cfg.tune.objective
    best = best_row(table, objective)
    bound = rope_bound(cfg)
    base_len = (baselines or {}).get("base_context_length")
    if base_len is None and bound and "train_len" in bound:
        base_len = bound["train_len"]
    x_axis = ROPE if ROPE in axes else axes[0]
    y_axis = BUDGET if BUDGET in axes and x_axis != BUDGET else next((a for a in axes if a != x_axis), None)
    uri = storage.join(root, "results")
    arrow = pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
                                  for r in table])
    with storage.publish_dir(uri, overwrite=True) as staging:
        pq.write_table(arrow, os.path.join(staging, "trials.parquet"))
        pacsv.write_csv(arrow, os.path.join(staging, "trials.csv"))
        images = {}
        for fname, png in (("heatmap.png", plot_heatmap(table, x_axis, y_axis, objective, bound)),
                           ("ppl_vs_length.png", plot_ppl_vs_length(table, baselines, base_len)),
                           ("objective_vs_rope_base.png", plot_objective_vs_rope(table, objective, bound))):
            if png:
                with open(os.path.join(staging, fname), "wb") as f:
                    f.write(png)
                images[fname] = fname
        best_cfg = None
        if best:
            text = best_config_yaml(cfg, best, axes)
            path = os.path.join(staging, "best_config.yaml")
            with open(path, "w") as f:
                f.write(text)
            load_config(path)  # a recipe that does not load is a bug here, not the user's problem later
            best_cfg = "best_config.yaml"
        with open(os.path.join(staging, "report.md"), "w") as f:
            f.write(report_markdown(cfg, table, axes, best, bound, images, baselines))
    if best_cfg:  # where it landed (under a generation folder after an S3 overwrite)
        best_cfg = storage.published_path(uri, best_cfg)
    return {"uri": uri, "best": best, "best_config": best_cfg}


def report_markdown(cfg: JobConfig, table: list[dict], axes: list[str], best: dict | None, bound: dict | None,
                    images: dict[str, str], baselines: dict | None) -> str:
    t = cfg.tune
    counts = {s: sum(r["status"] == s for r in table) for s in ("done", "stopped", "error")}
    parts = [f"# Sweep {t.name or cfg.run_name or 'sweep'}\n",
             f"{len(table)} trials ({counts['done']} finished, {counts['stopped']} stopped early by ASHA, "
             f"{counts['error']} failed) over {', '.join(f'`{a}`' for a in axes)}; objective `{t.objective}` "
             f"({OBJECTIVE_MODE[t.objective]} is best), scheduler `{t.scheduler}`. Each trial: packed data (shared "
             f"per data config) -> Long-PT ({cfg.train.num_workers} Ray Train worker{'s' if cfg.train.num_workers != 1 else ''}, DeepSpeed ZeRO-"
             f"{cfg.train.zero_stage}) -> evaluation at {cfg.eval.context_length or cfg.data.seq_len} tokens.\n"]
    if best:
        vals = ", ".join(f"`{a}` = {_fmt(best[a])}" for a in axes)
        parts.append(f"**Best:** {vals}: {t.objective} {_num(best['objective']):.4f}. Its full recipe is "
                     f"`best_config.yaml` (run it with `python jobs/long_pt.py --config best_config.yaml`); its "
                     f"model is `{best.get('final_model')}`.\n")
    if bound and bound.get("base_lower_bound"):
        parts.append(f"**`longctx rope suggest`** (Liu et al. 2023, arXiv 2310.05209) for head_dim {bound['head_dim']}, "
                     f"trained at {bound['train_len']}, target {bound['target_len']}: critical dimension "
                     f"{bound['critical_dim']}, RoPE base >= **{bound['base_lower_bound']:.4g}** (the red line in the "
                     f"plots).\n")
    parts += ["## Trials\n", _md_table(table, axes, best["trial_key"] if best else None) + "\n",
              "Every column, with the bucketed NLL per trial and the checkpoint paths: `trials.csv` / `trials.parquet`.\n"]
    for fname, title in (("heatmap.png", "Objective over the grid"), ("ppl_vs_length.png", "Perplexity vs context length"),
                         ("objective_vs_rope_base.png", "Objective vs RoPE base")):
        if fname in images:
            parts += [f"## {title}\n", f"![{title}]({fname})\n"]
    if baselines and baselines.get("models"):
        lines = ["| base model | nll within base | nll beyond base |", "|---|---:|---:|"]
        for name, e in baselines["models"].items():
            p = e.get("perplexity") or {}
            lines.append(f"| {name} | {_num(p.get('nll_within_base')):.4f} | {_num(p.get('nll_beyond_base')):.4f} |")
        parts += ["## Training-free baselines (base model)\n", "\n".join(lines) + "\n"]
    return "\n".join(parts)
