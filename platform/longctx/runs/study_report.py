"""The study's numbers, verdicts and report: everything `longctx.runs.study` computes from the saved per-trial
metrics, so anyone can recompute the report from them.

    nums = trial_numbers("runs/study")           # from trials/*/eval/metrics.json and part a's checkpoint ledger
    verdict = verdicts(nums)                     # one per target: held | did not hold | not run, numbers inline
    write_study_report("runs/study", nums, verdict)

Targets (letters of the parts as in docs/study.md): NLL beyond base of the training-free baselines vs Long-PT (a),
passkey at 4x for the naive baseline (a) and after the synthetic long-SFT stage (c), per-source upsampling against
the other data strategies (b), and the RoPE sweep's best base against the `rope suggest` bound (d). An ordering
that failed is reported as such, with its numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any

from longctx import storage
from longctx.runs.folder import EVAL_DIR, METRICS, REPORT, TRAIN_DIR
from longctx.train.snapshots import ledger_uri, read_ledger

PLAN = "plan.json"
STUDY_JSON = "study.json"

STRATEGIES = {"per-source": "per-source", "global": "global", "cut-at-base": "cut-4k"}
TARGET_NLL = "NLL beyond base: Long-PT < YaRN ~ dynamic NTK < PI < naive"
TARGET_PASSKEY_NAIVE = "passkey at 4x: naive <= 10%"
TARGET_PASSKEY_SFT = "passkey at 4x: Long-PT + synthetic long-SFT >= 90%"
TARGET_DATA = "per-source upsampling: lowest NLL beyond base of the three strategies, no source worse than cut-at-base by > 0.02"
TARGET_ROPE = "RoPE sweep: best base >= the `rope suggest` bound"

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ numbers
def model_numbers(ev_metrics: dict, passkey_len: int) -> dict[str, dict]:
    """Per model of one evaluation: NLL beyond/within base and passkey at `passkey_len` (None when not run)."""
    out = {}
    for name, m in ev_metrics.get("models", {}).items():
        ppl = m.get("perplexity") or {}
        pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
        out[name] = {"role": m["spec"].get("role"), "nll_beyond_base": ppl.get("nll_beyond_base"),
                     "nll_within_base": ppl.get("nll_within_base"), "passkey_4x": pk.get(str(passkey_len))}
    return out


def trial_numbers(root: str) -> dict:
    """The study's numbers, read back from the saved per-trial metrics under `root/trials/`."""
    plan = json.loads(storage.read_text(storage.join(root, PLAN)))
    pk_len = plan["passkey_length"]
    out: dict[str, Any] = {"plan": plan}
    if "a" in plan["parts"]:
        ev = json.loads(storage.read_text(storage.join(root, "trials", "a-long-pt", EVAL_DIR, METRICS)))
        out["a"] = model_numbers(ev, pk_len)
    if "b" in plan["parts"]:
        b: dict[str, dict] = {}
        for src in plan["sources"]:
            ev = json.loads(storage.read_text(storage.join(root, "trials", "b-strategies", f"eval-{src}", METRICS)))
            for name, nums in model_numbers(ev, pk_len).items():
                entry = b.setdefault(name, {"nll_beyond_base_by_source": {}, "passkey_4x": None})
                entry["nll_beyond_base_by_source"][src] = nums["nll_beyond_base"]
                if nums["passkey_4x"] is not None:
                    entry["passkey_4x"] = nums["passkey_4x"]
        for entry in b.values():
            vals = list(entry["nll_beyond_base_by_source"].values())
            entry["nll_beyond_base_mean"] = sum(vals) / len(vals) if vals and all(_finite(v) for v in vals) else None
        out["b"] = b
    if "c" in plan["parts"]:
        ev = json.loads(storage.read_text(storage.join(root, "trials", "c-long-sft", EVAL_DIR, METRICS)))
        c = {}
        for name, m in ev.get("models", {}).items():
            pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
            needle = ((m.get("needle") or {}).get("single") or {}).get("by_length", {})
            key_nll = ((m.get("passkey") or {}).get("key_nll_by_length") or {}).get(str(pk_len))
            c[name] = {"role": m["spec"].get("role"), "passkey_4x": pk.get(str(pk_len)),
                       "passkey_key_nll_4x": key_nll, "needle_4x": needle.get(str(pk_len))}
        out["c"] = c
    if "d" in plan["parts"]:
        d = {}
        for theta, trial in plan["rope_trials"].items():
            ev = json.loads(storage.read_text(storage.join(root, "trials", trial, EVAL_DIR, METRICS)))
            nums = next(v for v in model_numbers(ev, pk_len).values() if v["role"] == "trained")
            d[theta] = nums["nll_beyond_base"]
        out["d"] = {"nll_beyond_base_by_theta": d, "bound": plan["rope_bound"]}
    if "e" in plan["parts"]:
        recs = read_ledger(ledger_uri(storage.join(root, "trials", "a-long-pt", TRAIN_DIR)))
        out["e"] = [{"step": r["step"], "tokens": r["tokens"], "passkey_4x": (r.get("passkey_by_length") or {}).get(str(pk_len)),
                     "nll_beyond_base": r.get("nll_beyond_base")} for r in recs]
    return out


def verdicts(nums: dict) -> list[dict]:
    """One verdict per target: {"target", "status": held | did not hold | not run, "detail"} (numbers inline)."""
    out = []
    a = nums.get("a")
    if a:
        by_role = {v["role"]: v for v in a.values()}
        nll = {r: by_role[r]["nll_beyond_base"] for r in ("trained", "yarn", "dynamic_ntk", "pi", "naive") if r in by_role}
        if len(nll) == 5 and all(_finite(v) for v in nll.values()):
            held = nll["trained"] < min(nll["yarn"], nll["dynamic_ntk"]) and max(nll["yarn"], nll["dynamic_ntk"]) < nll["pi"] < nll["naive"]
            detail = (f"Long-PT {nll['trained']:.3f}, YaRN {nll['yarn']:.3f}, dynamic NTK {nll['dynamic_ntk']:.3f}, "
                      f"PI {nll['pi']:.3f}, naive {nll['naive']:.3f}")
            out.append({"target": TARGET_NLL, "status": "held" if held else "did not hold", "detail": detail})
        else:
            out.append({"target": TARGET_NLL, "status": "not run", "detail": f"models evaluated: {sorted(nll)}"})
        naive_pk = by_role.get("naive", {}).get("passkey_4x")
        if naive_pk is None:
            out.append({"target": TARGET_PASSKEY_NAIVE, "status": "not run", "detail": "no passkey at 4x"})
        else:
            detail = "; ".join(f"{n} {100 * v['passkey_4x']:.0f}%" for n, v in a.items() if v["passkey_4x"] is not None)
            out.append({"target": TARGET_PASSKEY_NAIVE, "status": "held" if naive_pk <= 0.10 else "did not hold",
                        "detail": detail + (" (the base cannot retrieve even at its own length: 0% everywhere says "
                                            "nothing about extension)" if all(v["passkey_4x"] == 0 for v in a.values()
                                                                              if v["passkey_4x"] is not None) else "")})
    else:
        out += [{"target": t, "status": "not run", "detail": "part a not run"} for t in (TARGET_NLL, TARGET_PASSKEY_NAIVE)]
    c = nums.get("c")
    by_role_c = {v["role"]: v for v in (c or {}).values()}
    sft_pk = by_role_c.get("long_sft", {}).get("passkey_4x")
    if sft_pk is None:
        out.append({"target": TARGET_PASSKEY_SFT, "status": "not run", "detail": "part c not run"})
    else:
        detail = "; ".join(f"{n}: passkey {_pct(v['passkey_4x'])}, needle score {_score(v['needle_4x'])}"
                           for n, v in c.items())
        if all(v["passkey_4x"] == 0 for v in c.values() if v["passkey_4x"] is not None):
            detail += " (0% before and after: the base never learned to retrieve, see docs/study.md)"
        out.append({"target": TARGET_PASSKEY_SFT, "status": "held" if sft_pk >= 0.9 else "did not hold",
                    "detail": detail})
    b = nums.get("b")
    if b and all(_finite(v.get("nll_beyond_base_mean")) for v in b.values()) and set(b) == set(STRATEGIES):
        means = {k: v["nll_beyond_base_mean"] for k, v in b.items()}
        per, cut = b["per-source"]["nll_beyond_base_by_source"], b["cut-at-base"]["nll_beyond_base_by_source"]
        worst = max(per[s] - cut[s] for s in per)
        held = means["per-source"] < min(means["global"], means["cut-at-base"]) and worst <= 0.02
        detail = (", ".join(f"{k} {v:.3f}" for k, v in means.items()) + "; per source (per-source vs cut-at-base): "
                  + ", ".join(f"{s} {per[s]:.3f} vs {cut[s]:.3f}" for s in sorted(per))
                  + f"; worst source {worst:+.3f} nats")
        out.append({"target": TARGET_DATA, "status": "held" if held else "did not hold", "detail": detail})
    else:
        out.append({"target": TARGET_DATA, "status": "not run", "detail": "part b not run"})
    d = nums.get("d")
    if d and d["nll_beyond_base_by_theta"] and all(_finite(v) for v in d["nll_beyond_base_by_theta"].values()):
        by = {float(k): v for k, v in d["nll_beyond_base_by_theta"].items()}
        best = min(by, key=by.get)
        detail = ", ".join(f"{t:.3g}: {v:.3f}" for t, v in sorted(by.items())) + f"; best {best:.3g}, bound {d['bound']:.3g}"
        out.append({"target": TARGET_ROPE, "status": "held" if best >= d["bound"] else "did not hold", "detail": detail})
    else:
        out.append({"target": TARGET_ROPE, "status": "not run", "detail": "part d not run"})
    return out


# ------------------------------------------------------------------------------------------------- report
def verdict_lines(verdict: list[dict]) -> list[str]:
    return [f"- **{v['status'].upper()}**: {v['target']} — {v['detail']}" for v in verdict]


def write_study_report(root: str, nums: dict, verdict: list[dict]) -> str:
    """`root/report.md` (+ PNGs): verdicts first, then one table per part."""
    plan = nums["plan"]
    held = sum(v["status"] == "held" for v in verdict)
    failed = sum(v["status"] == "did not hold" for v in verdict)
    lines = ["# longctx study: the papers' orderings at toy scale",
             "", f"{held} held, {failed} did not hold, {len(verdict) - held - failed} not run "
             f"({plan['steps']} training steps per trial, base length {plan['base_length']}, evaluated at "
             f"{plan['context_length']} tokens, passkey at {plan['passkey_length']}).", "", *verdict_lines(verdict), ""]
    png = plot_study(nums)
    if png:
        storage.write_bytes(storage.join(root, STUDY_PLOT), png)
        lines += [f"![the study's numbers, one panel per part]({STUDY_PLOT})", ""]
    if "a" in nums:
        lines += ["## a. Training-free baselines vs Long-PT", "",
                  "| model | NLL within base | NLL beyond base | passkey at 4x |", "|---|---:|---:|---:|"]
        for name, v in nums["a"].items():
            lines.append(f"| {name} | {_f(v['nll_within_base'])} | {_f(v['nll_beyond_base'])} | {_pct(v['passkey_4x'])} |")
        lines.append("")
    if "b" in nums:
        srcs = plan["sources"]
        lines += ["## b. Data strategies on the long-tailed corpus (same token budget)", "",
                  "| strategy | " + " | ".join(f"NLL beyond base: {s}" for s in srcs) + " | mean | passkey at 4x |",
                  "|---|" + "---:|" * (len(srcs) + 2)]
        for name, v in nums["b"].items():
            lines.append(f"| {name} | " + " | ".join(_f(v["nll_beyond_base_by_source"].get(s)) for s in srcs)
                         + f" | {_f(v['nll_beyond_base_mean'])} | {_pct(v['passkey_4x'])} |")
        lines += ["", "Long-token share per source, in -> out (how much each strategy upsampled):", "",
                  "| strategy | " + " | ".join(srcs) + " |", "|---|" + "---:|" * len(srcs)]
        for label, per in plan.get("b_data", {}).items():
            lines.append(f"| {label} | " + " | ".join(
                f"{_pct(per.get(s, {}).get('long_share_in'))} -> {_pct(per.get(s, {}).get('long_share_out'))}" for s in srcs) + " |")
        lines.append("")
    if "c" in nums:
        cd = plan.get("c_data", {})
        lines += ["## c. Long-PT, then a short synthetic long-SFT stage (LongSkywork)", "",
                  f"{cd.get('steps')} Long-SFT steps from part a's model on {cd.get('rows')} packed rows of synthetic "
                  f"retrieval and table conversations (final loss {_f(cd.get('final_loss'))}).", "",
                  "| model | passkey at 4x | pass key NLL at 4x (teacher-forced, nats/token) "
                  "| needle at 4x (NeedleBench score, 0-100) |", "|---|---:|---:|---:|"]
        for name, v in nums["c"].items():
            lines.append(f"| {name} | {_pct(v['passkey_4x'])} | {_f(v.get('passkey_key_nll_4x'))} "
                         f"| {_score(v['needle_4x'])} |")
        lines += ["", "The needle score gives 100 when the needle's keyword is in the answer and otherwise 0.2 x the "
                  "string similarity to the reference (so a few points without any retrieval).", ""]
        lines.append("")
    if "d" in nums:
        lines += [f"## d. RoPE base sweep (rope suggest bound {nums['d']['bound']:.4g})", "",
                  "| rope_theta | NLL beyond base |", "|---:|---:|"]
        for t, v in sorted(nums["d"]["nll_beyond_base_by_theta"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {float(t):.4g} | {_f(v)} |")
        lines.append("")
    if "e" in nums:
        lines += ["## e. Retrieval and NLL beyond base vs tokens trained (part a's run, every checkpoint)", ""]
        if nums["e"]:
            lines += ["![retrieval and NLL beyond base vs tokens trained](trials/a-long-pt/train/checkpoint_eval.png)", "",
                      "| step | tokens trained | passkey at 4x | NLL beyond base |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['step']} | {r['tokens']:,} | {_pct(r['passkey_4x'])} | {_f(r['nll_beyond_base'])} |" for r in nums["e"]]
        else:
            lines.append("No checkpoint evaluation was recorded.")
        lines.append("")
    lines += ["Timings (s): " + ", ".join(f"{k} {v}" for k, v in plan.get("timings_s", {}).items()), "",
              "Numbers: `study.json` (recomputable from `trials/*/eval/metrics.json` with `longctx.runs.study_report.trial_numbers`)."]
    uri = storage.join(root, REPORT)
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


STUDY_PLOT = "study.png"


def plot_study(nums: dict) -> bytes | None:
    """PNG, one panel per part run (a, b, c, d): NLL beyond the base length of every model (a), per source and
    strategy (b), the pass key's NLL before/after long-SFT (c), against the RoPE base with the bound (d)."""
    from longctx.report.plots import _STYLE, _png, plt  # deferred: matplotlib (seconds), needed for the report only

    panels = [k for k in ("a", "b", "c", "d") if nums.get(k)]
    if not panels:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, part in zip(axes[0], panels):
            if part == "a":
                names = list(nums["a"])
                vals = [nums["a"][n]["nll_beyond_base"] for n in names]
                ax.bar(range(len(names)), [v if _finite(v) else 0 for v in vals],
                       color=["tab:green" if nums["a"][n]["role"] == "trained" else "tab:gray" for n in names])
                ax.set_xticks(range(len(names)), [n.replace("base + ", "") for n in names], rotation=30, ha="right")
                lo = min(v for v in vals if _finite(v)) if any(_finite(v) for v in vals) else 0
                ax.set_ylim(max(0.0, lo - 0.5), None)
                ax.set_title("a. baselines vs Long-PT")
                ax.set_ylabel("NLL beyond base (nats)")
            elif part == "b":  # per source, against cut-at-base (the sources' NLLs differ by ~2 nats)
                ref = (nums["b"].get("cut-at-base") or {}).get("nll_beyond_base_by_source", {})
                strategies = [st for st in nums["b"] if st != "cut-at-base"]
                sources = sorted({s for v in nums["b"].values() for s in v["nll_beyond_base_by_source"]})
                width = 0.8 / max(1, len(strategies))
                for i, st in enumerate(strategies):
                    per = nums["b"][st]["nll_beyond_base_by_source"]
                    ax.bar([j + i * width for j in range(len(sources))],
                           [per[s] - ref[s] if _finite(per.get(s)) and _finite(ref.get(s)) else 0 for s in sources],
                           width, label=st)
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
                ax.legend(fontsize=7)
                ax.set_title("b. data strategies vs cut at base length")
                ax.set_ylabel("NLL beyond base minus cut-at-base (nats)")
            elif part == "c":
                names = list(nums["c"])
                vals = [nums["c"][n].get("passkey_key_nll_4x") for n in names]
                ax.bar(range(len(names)), [v if _finite(v) else 0 for v in vals], color="tab:purple")
                ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
                for j, n in enumerate(names):
                    ax.annotate(f"passkey {_pct(nums['c'][n]['passkey_4x'])}", (j, 0), xytext=(0, 4),
                                textcoords="offset points", ha="center", fontsize=8, color="white")
                ax.set_title("c. Long-PT, then long-SFT")
                ax.set_ylabel("pass key NLL at 4x (nats/token)")
            else:
                pts = sorted((float(t), v) for t, v in nums["d"]["nll_beyond_base_by_theta"].items() if _finite(v))
                if pts:
                    ax.plot(*zip(*pts), "o-")
                ax.axvline(nums["d"]["bound"], color="tab:red", ls="--", label="rope suggest bound")
                ax.set_xscale("log")
                ax.legend(fontsize=7)
                ax.set_title("d. RoPE base sweep")
                ax.set_xlabel("rope_theta")
                ax.set_ylabel("NLL beyond base (nats)")
        fig.tight_layout()
        return _png(fig)


def _f(v) -> str:
    return "n/a" if v is None or not _finite(v) else f"{v:.3f}"


def _score(v) -> str:
    return "n/a" if v is None else f"{v:.1f}/100"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
