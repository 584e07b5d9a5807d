"""The report's verdict: the subject model (the trained one) against the best *other* model on every metric shown,
and first of all where it loses.

    text = verdict(metrics)   # "Long-PT: best on NLL beyond 256 tokens; loses on passkey at 1024 tokens (58% vs 83%
                              #  for base + dynamic NTK x4)." and one line per metric

A verdict that compares the trained model only with naive extrapolation flatters it: training-free dynamic NTK or
YaRN often score close, and sometimes better. So for each metric (NLL beyond and within the base length, passkey
accuracy at the longest prompt, RULER's average at its longest length, the needle score of each variant) the
verdict names the best of the other models, with naive extrapolation beside it as the floor; a metric every model
scores 0% or 100% on is left out (it cannot discriminate). Values are compared as shown (NLL to 2 decimals,
percentages to whole points): equal is a tie.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str
    values: dict[str, float]
    higher_is_better: bool
    percent: bool = False

    def show(self, v: float) -> str:
        return f"{100 * v:.0f}%" if self.percent else f"{v:.2f}"

    def key(self, v: float) -> float:
        """The value as shown, oriented so that larger is better."""
        shown = round(100 * v) if self.percent else round(v, 2)
        return shown if self.higher_is_better else -shown


def _role(entry: dict) -> str:
    return (entry.get("spec") or {}).get("role", "")


def _all_same(values: list[float], level: float) -> bool:
    return bool(values) and all(v == level for v in values)


def metrics_of(ev: dict) -> list[Metric]:
    """The metrics the verdict compares, each with a value per model that has it."""
    models = ev.get("models", {})
    base_len = ev.get("base_context_length")
    out = []
    for key, label in (("nll_beyond_base", f"NLL beyond {base_len} tokens"),
                       ("nll_within_base", f"NLL within {base_len} tokens")):
        vals = {n: m["perplexity"][key] for n, m in models.items()
                if isinstance((m.get("perplexity") or {}).get(key), (int, float))}
        if vals:
            out.append(Metric(label, vals, higher_is_better=False))
    pk = {n: m["passkey"]["accuracy_by_length"] for n, m in models.items() if (m.get("passkey") or {})
          .get("accuracy_by_length")}
    if pk:
        longest = max((int(x) for acc in pk.values() for x in acc), default=None)
        vals = {n: acc[str(longest)] for n, acc in pk.items() if str(longest) in acc}
        all_vals = [v for acc in pk.values() for v in acc.values()]
        if vals and not (_all_same(all_vals, 0.0) or _all_same(all_vals, 1.0)):
            out.append(Metric(f"passkey at {longest} tokens", vals, higher_is_better=True, percent=True))
    ruler = {n: m["ruler"]["average"] for n, m in models.items() if ((m.get("ruler") or {}).get("average"))}
    if ruler:
        longest = max(int(x) for avg in ruler.values() for x in avg)
        vals = {n: avg[str(longest)] / 100 for n, avg in ruler.items()
                if isinstance(avg.get(str(longest)), (int, float))}
        if vals and not (_all_same(list(vals.values()), 0.0) or _all_same(list(vals.values()), 1.0)):
            out.append(Metric(f"RULER average at {longest} tokens", vals, higher_is_better=True, percent=True))
    variants = sorted({v for m in models.values() for v in (m.get("needle") or {})})
    for variant in variants:
        vals = {n: m["needle"][variant]["mean"] for n, m in models.items()
                if isinstance(((m.get("needle") or {}).get(variant) or {}).get("mean"), (int, float))}
        if vals and not (_all_same(list(vals.values()), 0.0) or _all_same(list(vals.values()), 100.0)):
            out.append(Metric(f"needle ({variant}) score", {n: v / 100 for n, v in vals.items()},
                              higher_is_better=True, percent=True))
    return out


def compare(metric: Metric, subject: str, naive: str | None) -> dict | None:
    """{metric, subject, value, best_other, best_value, naive_value, outcome: best|tie|loses} for one metric."""
    if subject not in metric.values:
        return None
    others = {n: v for n, v in metric.values.items() if n != subject}
    if not others:
        return None
    best = max(others, key=lambda n: metric.key(others[n]))
    s, b = metric.key(metric.values[subject]), metric.key(others[best])
    return {"metric": metric, "subject": subject, "value": metric.values[subject], "best_other": best,
            "best_value": others[best], "naive": naive if naive in others else None,
            "naive_value": others.get(naive) if naive else None,
            "outcome": "best" if s > b else "tie" if s == b else "loses"}


def subject_of(ev: dict) -> str | None:
    """The trained model when there is one, else the model with the lowest NLL beyond the base length."""
    models = ev.get("models", {})
    trained = next((n for n, m in models.items() if _role(m) == "trained"), None)
    if trained:
        return trained
    beyond = {n: m["perplexity"]["nll_beyond_base"] for n, m in models.items()
              if isinstance((m.get("perplexity") or {}).get("nll_beyond_base"), (int, float))}
    return min(beyond, key=beyond.get) if beyond else None


def verdict(metrics: dict) -> str | None:
    """A summary line (where the subject is best, ties, loses) and one bullet per metric naming the best other
    model and naive extrapolation; None when there is nothing to compare."""
    ev = metrics.get("eval", metrics) if isinstance(metrics, dict) else {}
    subject = subject_of(ev)
    if subject is None:
        return None
    naive = next((n for n, m in ev.get("models", {}).items() if _role(m) == "naive"), None)
    rows = [r for r in (compare(m, subject, naive) for m in metrics_of(ev)) if r]
    if not rows:
        return None
    by = {k: [r for r in rows if r["outcome"] == k] for k in ("best", "tie", "loses")}
    m = lambda r: r["metric"]  # noqa: E731
    parts = []
    if by["best"]:
        parts.append("best on " + ", ".join(m(r).label for r in by["best"]))
    if by["tie"]:
        parts.append("ties on " + ", ".join(f"{m(r).label} (with {r['best_other']})" for r in by["tie"]))
    parts.append("loses on " + ", ".join(
        f"{m(r).label} ({m(r).show(r['value'])} vs {m(r).show(r['best_value'])} for {r['best_other']})"
        for r in by["loses"]) if by["loses"] else "loses on none of them")
    lines = [f"{subject}: " + "; ".join(parts) + "."]
    for r in rows:
        line = (f"- {m(r).label} ({'higher' if m(r).higher_is_better else 'lower'} is better): {subject} "
                f"{m(r).show(r['value'])}; best other: {r['best_other']} {m(r).show(r['best_value'])}")
        if r["naive"] and r["naive"] != r["best_other"]:
            line += f"; naive {m(r).show(r['naive_value'])}"
        lines.append(line + ".")
    return lines[0] + "\n\n" + "\n".join(lines[1:])
