"""PNG plots of evaluation metrics (matplotlib, Agg backend; no display needed).

Each function takes the metrics dict of `longctx.eval.runner.evaluate_models` and returns PNG bytes, or
None when the metrics hold nothing to plot; `write_report` stores them beside report.md.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

# The look every longctx plot shares (the report's, the sweep's, the study's and the watcher's).
STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}


def png_bytes(fig, dpi: float | str = "figure") -> bytes:
    """The figure as PNG bytes; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def mark_base(ax, base_len, label_y: float | None = None):
    """A dashed line at the length the base model was trained at, labelled."""
    if base_len:
        ax.axvline(base_len, color="0.35", linestyle="--", linewidth=1)
        ax.annotate(f"base trained at {base_len}", xy=(base_len, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.3")


def plot_nll_by_position(metrics: dict) -> bytes | None:
    """Mean next-token NLL against token position, one line per model (lower is better)."""
    models = {n: m["perplexity"] for n, m in metrics.get("models", {}).items() if m.get("perplexity")}
    if not models:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for name, ppl in models.items():
            curve = ppl.get("curve") or {}
            if curve.get("position"):
                ax.plot(curve["position"], curve["nll"], label=name, linewidth=1.8)
            else:  # bucket means only
                xs = [(lo + hi) / 2 for lo, hi in ppl["buckets"]]
                ax.plot(xs, ppl["mean_nll"], marker="o", label=name)
        mark_base(ax, metrics.get("base_context_length"))
        ax.set_xlabel("token position")
        ax.set_ylabel("mean next-token NLL (nats)")
        ctx = metrics.get("context_length")
        docs = next(iter(models.values())).get("documents")
        ax.set_title(f"NLL by position ({docs} held-out documents, {ctx} tokens each)", fontsize=10)
        ax.set_xlim(0, ctx or None)
        ax.legend(fontsize=8, frameon=False)
        return png_bytes(fig)


def plot_passkey_accuracy(metrics: dict) -> bytes | None:
    """Passkey accuracy against prompt length, one line per model."""
    models = {n: m["passkey"] for n, m in metrics.get("models", {}).items() if m.get("passkey")}
    if not models:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        n = len(models)
        for k, (name, pk) in enumerate(models.items()):
            lengths = [int(x) for x in pk["accuracy_by_length"]]
            acc = [100 * v for v in pk["accuracy_by_length"].values()]
            # a small horizontal offset keeps overlapping lines (e.g. all at 0%) visible
            offs = [x * (1 + 0.015 * (k - (n - 1) / 2)) for x in lengths]
            ax.plot(offs, acc, marker="o", label=name, linewidth=1.8)
        ax.set_xscale("log", base=2)
        all_lengths = sorted({int(x) for pk in models.values() for x in pk["accuracy_by_length"]})
        ax.set_xticks(all_lengths, [str(x) for x in all_lengths])
        ax.minorticks_off()
        mark_base(ax, metrics.get("base_context_length"))
        ax.set_ylim(-5, 105)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey accuracy (%)")
        trials = next(iter(models.values())).get("trials")
        ax.set_title(f"Passkey retrieval ({trials} prompts per model, depths averaged)", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        return png_bytes(fig)


def plot_needle_heatmap(name: str, grid: dict) -> bytes:
    """Needle-in-a-haystack heatmap: score (0-100) by context length (x) and needle depth (y)."""
    from matplotlib.colors import LinearSegmentedColormap  # deferred: heavy import, used only here

    lengths = [int(x) for x in grid["lengths"]]
    depths = [float(d) for d in grid["depths"]]
    scores = grid["scores"]  # {length: {depth: score}}
    data = np.array([[scores.get(str(n), {}).get(str(d), math.nan) for n in lengths] for d in depths], dtype=float)
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(lengths) + 2.5), max(3.0, 0.45 * len(depths) + 1.6)))
        im = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=8, color="black")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: needle retrieval score (mean {grid.get('mean', float('nan')):.1f})", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
        return png_bytes(fig)


def smooth(values: list[float], window: int) -> list[float]:
    """Debiased exponential moving average (as TensorBoard smooths), span ~ `window` points."""
    if window <= 1:
        return list(values)
    beta = 1.0 - 2.0 / (window + 1)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        norm = beta * norm + (1 - beta)
        out.append(avg / norm)
    return out


def plot_loss_curve(history: list[dict], title: str = "training loss") -> bytes | None:
    """Training loss per step (raw and smoothed) and validation loss where measured; None with < 2 steps."""
    pts = [(h["step"], h["loss"]) for h in history if isinstance(h.get("loss"), (int, float))]
    if len(pts) < 2:
        return None
    steps, loss = [p[0] for p in pts], [p[1] for p in pts]
    window = max(2, round(len(loss) / 10))
    val = [(h["step"], h["val_loss"]) for h in history if isinstance(h.get("val_loss"), (int, float))]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        ax.plot(steps, loss, color="#9ab8d8", linewidth=1.0, label="train loss (per step)")
        ax.plot(steps, smooth(loss, window), color="#1f5fa8", linewidth=2.0,
                label=f"train loss (EMA, span {window} steps)")
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], color="#d9534f", marker="o", linewidth=1.5,
                    label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("next-token NLL (nats)")
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.set_title(f"{title} ({len(loss)} steps)", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        return png_bytes(fig)
