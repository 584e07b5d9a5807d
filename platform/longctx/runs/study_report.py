"""The study's numbers, verdicts and report: everything `longctx.runs.study` computes from the saved per-trial
metrics, so anyone can recompute the report from them.

    nums = trial_numbers("runs/study")           # from trials/*/eval/metrics.json and part a's checkpoint ledger
    verdict = verdicts(nums)                     # held | did not hold | undecided | not run, intervals inline
    write_study_report("runs/study", nums, verdict)

Targets (letters of the parts as in docs/study.md; the rules are in `longctx.runs.study_verdicts`): NLL beyond
base of the training-free baselines vs Long-PT (a), passkey and RULER NIAH at 4x for the naive baseline (a) and
passkey after the synthetic long-SFT stage in chat and in plain-text format (c), per-source upsampling against the
other data strategies (b), and the RoPE sweep's best base against the `rope suggest` bound (d). Each is decided by
95% bootstrap intervals over the saved per-item results (documents, prompts) and training seeds; an ordering that
failed or could not be decided is reported as such, with its numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any

from longctx import storage
from longctx.eval.items import item_values
from longctx.report.intervals import count_kinds, diff_interval, value_interval
from longctx.runs.folder import EVAL_DIR, METRICS, REPORT, TRAIN_DIR
from longctx.runs.study_verdicts import (TARGET_DATA, TARGET_NIAH_NAIVE, TARGET_NLL, TARGET_PASSKEY_NAIVE,  # noqa: F401
                                         TARGET_PASSKEY_SFT, TARGET_PASSKEY_SFT_PLAIN, TARGET_ROPE, TARGETS, source_items,
                                         source_strata, verdicts)
from longctx.train.snapshots import ledger_uri, read_ledger

PLAN = "plan.json"
STUDY_JSON = "study.json"

STRATEGIES = {"per-source": "per-source", "global": "global", "cut-at-base": "cut-4k"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs and all(_finite(x) for x in xs) else None


# ------------------------------------------------------------------------------------------------ numbers
def _read_eval(root: str, trial: str, folder: str = EVAL_DIR) -> dict:
    return json.loads(storage.read_text(storage.join(root, "trials", trial, folder, METRICS)))


def model_items(entry: dict, passkey_len: int, niah_tasks: list[str]) -> dict[str, dict]:
    """{metric: {item id: value}} of one model's saved items: nll_beyond_base per document, passkey (1/0) and
    RULER NIAH (score / 100) per prompt at `passkey_len`; metrics with no items are left out."""
    out = {"nll_beyond_base": item_values(entry, "nll_beyond_base"),
           "passkey": item_values(entry, "passkey", passkey_len),
           "niah": item_values(entry, "ruler", passkey_len, niah_tasks) if niah_tasks else {}}
    return {k: v for k, v in out.items() if v}


def model_numbers(ev_metrics: dict, passkey_len: int, niah_tasks: list[str] = ()) -> dict[str, dict]:
    """Per model of one evaluation: NLL beyond/within base, passkey and RULER NIAH at `passkey_len` (None when
    not run)."""
    out = {}
    for name, m in ev_metrics.get("models", {}).items():
        ppl = m.get("perplexity") or {}
        pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
        niah = item_values(m, "ruler", passkey_len, niah_tasks) if niah_tasks else {}
        out[name] = {"role": m["spec"].get("role"), "nll_beyond_base": ppl.get("nll_beyond_base"),
                     "nll_within_base": ppl.get("nll_within_base"), "passkey_4x": pk.get(str(passkey_len)),
                     "niah_4x": _mean(niah.values()) if niah else None}
    return out


def _add_items(store: dict, key: str, seed: str, items: dict[str, dict]) -> None:
    for metric, vals in items.items():
        store.setdefault(key, {}).setdefault(metric, {})[seed] = vals


def trial_numbers(root: str) -> dict:
    """The study's numbers, read back from the saved per-trial metrics under `root/trials/`: per part, each
    model's means (over seeds where it has several), and under "items" each model's per-item results by seed
    (what `verdicts` computes the intervals from)."""
    plan = json.loads(storage.read_text(storage.join(root, PLAN)))
    pk_len, niah_tasks = plan["passkey_length"], plan.get("niah_tasks", [])
    out: dict[str, Any] = {"plan": plan}
    items: dict[str, dict] = {}
    if "a" in plan["parts"]:
        a: dict[str, dict] = {}
        ia: dict[str, dict] = {}
        per_seed: dict[str, list[dict]] = {}
        for seed, trial in plan["a_trials"].items():
            ev = _read_eval(root, trial)
            for name, nums in model_numbers(ev, pk_len, niah_tasks).items():
                per_seed.setdefault(name, []).append(nums)
                _add_items(ia, nums["role"], seed, model_items(ev["models"][name], pk_len, niah_tasks))
        for name, runs in per_seed.items():
            a[name] = {"role": runs[0]["role"], "seeds": len(runs),
                       **{k: _mean(r[k] for r in runs) for k in runs[0] if k != "role"}}
        out["a"], items["a"] = a, ia
    if "b" in plan["parts"]:
        b: dict[str, dict] = {}
        ib: dict[str, dict] = {}
        models = plan.get("b_models") or {s: {"strategy": s, "seed": 0} for s in STRATEGIES}
        for src in plan["sources"]:
            ev = _read_eval(root, "b-strategies", f"eval-{src}")
            for name, nums in model_numbers(ev, pk_len).items():
                strategy, seed = models[name]["strategy"], str(models[name]["seed"])
                entry = b.setdefault(strategy, {"by_seed": {}, "passkey": []})
                entry["by_seed"].setdefault(seed, {})[src] = nums["nll_beyond_base"]
                if nums["passkey_4x"] is not None:
                    entry["passkey"].append(nums["passkey_4x"])
                docs = item_values(ev["models"][name], "nll_beyond_base")
                ib.setdefault(strategy, {}).setdefault("nll_beyond_base", {}).setdefault(seed, {}).update(
                    {f"{src}/{i}": v for i, v in docs.items()})
        for strategy, entry in b.items():
            by_seed = entry.pop("by_seed")
            entry["nll_beyond_base_by_source"] = {s: _mean(v.get(s) for v in by_seed.values()) for s in plan["sources"]}
            entry["nll_beyond_base_mean"] = _mean(entry["nll_beyond_base_by_source"].values())
            pk = entry.pop("passkey")
            entry["passkey_4x"] = _mean(pk) if pk else None
            entry["seeds"] = len(by_seed)
        out["b"], items["b"] = b, ib
    if "c" in plan["parts"]:
        c: dict[str, dict] = {}
        ic: dict[str, dict] = {}
        for trial in ("c-long-sft-chat", "c-long-sft-plain"):
            ev = _read_eval(root, trial)
            for name, m in ev.get("models", {}).items():
                pk = (m.get("passkey") or {}).get("accuracy_by_length", {})
                needle = ((m.get("needle") or {}).get("single") or {}).get("by_length", {})
                key_nll = ((m.get("passkey") or {}).get("key_nll_by_length") or {}).get(str(pk_len))
                mi = model_items(m, pk_len, niah_tasks)
                c[name] = {"role": m["spec"].get("role"), "passkey_4x": pk.get(str(pk_len)),
                           "passkey_key_nll_4x": key_nll, "needle_4x": needle.get(str(pk_len)),
                           "niah_4x": _mean(mi["niah"].values()) if "niah" in mi else None}
                _add_items(ic, c[name]["role"], "0", mi)
        out["c"], items["c"] = c, ic
    if "d" in plan["parts"]:
        d, idd = {}, {}
        for theta, trial in plan["rope_trials"].items():
            ev = _read_eval(root, trial)
            name, nums = next((n, v) for n, v in model_numbers(ev, pk_len).items() if v["role"] == "trained")
            d[theta] = nums["nll_beyond_base"]
            idd[theta] = {"nll_beyond_base": {"0": item_values(ev["models"][name], "nll_beyond_base")}}
        out["d"], items["d"] = {"nll_beyond_base_by_theta": d, "bound": plan["rope_bound"]}, idd
    if "e" in plan["parts"]:
        recs = read_ledger(ledger_uri(storage.join(root, "trials", plan["a_trials"]["0"], TRAIN_DIR)))
        out["e"] = [{"step": r["step"], "tokens": r["tokens"], "passkey_4x": (r.get("passkey_by_length") or {}).get(str(pk_len)),
                     "nll_beyond_base": r.get("nll_beyond_base")} for r in recs]
    out["items"] = items
    return out


# ------------------------------------------------------------------------------------------------- report
def verdict_lines(verdict: list[dict]) -> list[str]:
    return [f"- **{v['status'].upper()}**: {v['target']} — {v['detail']}" for v in verdict]


def count_line(verdict: list[dict]) -> str:
    """The report's first line: how many verdicts are of each kind."""
    return ", ".join(f"{n} {kind}" for kind, n in count_kinds(verdict).items())


def _iv(values: dict | None, percent: bool = False) -> str:
    """A model's mean with its 95% interval (over seeds x items), or n/a."""
    if not values:
        return "n/a"
    iv = value_interval(values)
    return iv.text(100, ".0f").replace(" [", "% [") if percent else iv.text()


def write_study_report(root: str, nums: dict, verdict: list[dict]) -> str:
    """`root/report.md` (+ PNGs): the count of each verdict kind, the verdicts, then one table per part, every
    mean with its 95% interval ("x [lo, hi]")."""
    plan = nums["plan"]
    items = nums.get("items", {})
    seeds = len(plan.get("seeds") or [0])
    tier = "quick tier: one training seed" if seeds == 1 else f"{seeds} training seeds"
    lines = ["# longctx study: the papers' orderings at toy scale", "", f"Verdicts: {count_line(verdict)}.", "",
             f"{tier}; {plan['steps']} training steps per trial, base length {plan['base_length']}, evaluated at "
             f"{plan['context_length']} tokens, passkey and RULER NIAH at {plan['passkey_length']}. Intervals: 95% "
             "paired bootstrap over held-out documents / prompts (the same for every model), two-level over "
             "seeds x items where a model has several seeds. HELD: the interval excludes the reverse ordering; "
             "DID NOT HOLD: it excludes the claimed one; UNDECIDED: neither.", "", *verdict_lines(verdict), ""]
    png = plot_study(nums)
    if png:
        storage.write_bytes(storage.join(root, STUDY_PLOT), png)
        lines += [f"![the study's numbers, one panel per part]({STUDY_PLOT})", ""]
    if "a" in nums:
        ia = items.get("a", {})
        lines += ["## a. Training-free baselines vs Long-PT", "",
                  "| model | seeds | NLL within base | NLL beyond base [95%] | passkey at 4x [95%] "
                  "| RULER NIAH at 4x [95%] |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in nums["a"].items():
            m = ia.get(v["role"], {})
            lines.append(f"| {name} | {v['seeds']} | {_f(v['nll_within_base'])} | {_iv(m.get('nll_beyond_base'))} "
                         f"| {_iv(m.get('passkey'), True)} | {_iv(m.get('niah'), True)} |")
        lines.append("")
    if "b" in nums:
        srcs = plan["sources"]
        lines += ["## b. Data strategies on the long-tailed corpus (same token budget)", "",
                  "NLL beyond base per source (Fu et al. Table 5's layout), mean over seeds; the mean over sources "
                  "with its 95% interval (documents resampled within each source).", "",
                  "| strategy | seeds | " + " | ".join(f"NLL beyond base: {s}" for s in srcs)
                  + " | mean [95%] | passkey at 4x |", "|---|---:|" + "---:|" * (len(srcs) + 2)]
        for name, v in nums["b"].items():
            docs = items.get("b", {}).get(name, {}).get("nll_beyond_base")
            mean = value_interval(docs, strata=source_strata(next(iter(docs.values())))).text() \
                if docs else _f(v["nll_beyond_base_mean"])
            per_source = " | ".join(_f(v["nll_beyond_base_by_source"].get(s)) for s in srcs)
            lines.append(f"| {name} | {v['seeds']} | {per_source}"
                         + f" | {mean} | {_pct(v['passkey_4x'])} |")
        lines += ["", "Long-token share per source, in -> out (how much each strategy upsampled; seed 0):", "",
                  "| strategy | " + " | ".join(srcs) + " |", "|---|" + "---:|" * len(srcs)]
        for label, per in plan.get("b_data", {}).items():
            lines.append(f"| {label} | " + " | ".join(
                f"{_pct(per.get(s, {}).get('long_share_in'))} -> {_pct(per.get(s, {}).get('long_share_out'))}" for s in srcs) + " |")
        lines.append("")
    if "c" in nums:
        cd = plan.get("c_data", {})
        fm = cd.get("formats", {})
        lines += ["## c. Long-PT, then a short synthetic long-SFT stage (LongSkywork), in two formats", "",
                  f"{cd.get('steps')} Long-SFT steps from part a's model (seed 0) on the same synthetic retrieval and "
                  "table conversations, rendered with the chat template (chat) or as plain text, each turn on its "
                  "own line as the passkey and RULER prompts are (plain text); the loss covers the answers only. "
                  + "; ".join(f"{k}: {v.get('rows')} packed rows, final loss {_f(v.get('final_loss'))}"
                              for k, v in fm.items()) + ".", "",
                  "| model | passkey at 4x [95%] | RULER NIAH at 4x [95%] | pass key NLL at 4x (teacher-forced) "
                  "| needle at 4x (NeedleBench, 0-100) |", "|---|---:|---:|---:|---:|"]
        for name, v in nums["c"].items():
            m = items.get("c", {}).get(v["role"], {})
            lines.append(f"| {name} | {_iv(m.get('passkey'), True)} | {_iv(m.get('niah'), True)} "
                         f"| {_f(v.get('passkey_key_nll_4x'))} | {_score(v['needle_4x'])} |")
        lines += ["", "The needle score gives 100 when the needle's keyword is in the answer and otherwise 0.2 x the "
                  "string similarity to the reference (so a few points without any retrieval).", ""]
    if "d" in nums:
        lines += [f"## d. RoPE base sweep (rope suggest bound {nums['d']['bound']:.4g}; seed 0)", "",
                  "| rope_theta | NLL beyond base [95%] |", "|---:|---:|"]
        for t, v in sorted(nums["d"]["nll_beyond_base_by_theta"].items(), key=lambda kv: float(kv[0])):
            docs = items.get("d", {}).get(t, {}).get("nll_beyond_base")
            lines.append(f"| {float(t):.4g} | {_iv(docs) if docs else _f(v)} |")
        lines.append("")
    if "e" in nums:
        a0 = plan.get("a_trials", {}).get("0", "a-long-pt-s0")
        lines += ["## e. Retrieval and NLL beyond base vs tokens trained (part a's run, seed 0, every checkpoint)", ""]
        if nums["e"]:
            lines += [f"![retrieval and NLL beyond base vs tokens trained](trials/{a0}/train/checkpoint_eval.png)", "",
                      "| step | tokens trained | passkey at 4x | NLL beyond base |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['step']} | {r['tokens']:,} | {_pct(r['passkey_4x'])} | {_f(r['nll_beyond_base'])} |" for r in nums["e"]]
        else:
            lines.append("No checkpoint evaluation was recorded.")
        lines.append("")
    lines += ["Timings (s): " + ", ".join(f"{k} {v}" for k, v in plan.get("timings_s", {}).items()), "",
              "Numbers: `study.json` (recomputable from `trials/*/eval/metrics.json` with "
              "`longctx.runs.study_report.trial_numbers`, the verdicts and intervals with `verdicts`)."]
    uri = storage.join(root, REPORT)
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


STUDY_PLOT = "study.png"


def plot_study(nums: dict) -> bytes | None:
    """PNG, one panel per part run (a, b, c, d): each baseline's NLL beyond base minus Long-PT's (a) and each
    strategy's minus cut-at-base's per source (b), with paired 95% intervals; passkey and RULER NIAH at 4x before
    and after long-SFT with their intervals (c); NLL beyond base against the RoPE base with the bound (d)."""
    from longctx.report.plots import STYLE, png_bytes, plt  # deferred: matplotlib (seconds), needed for the report only

    panels = [k for k in ("a", "b", "c", "d") if nums.get(k)]
    if not panels:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, part in zip(axes[0], panels):
            if part == "a":  # each baseline against Long-PT, paired intervals (what the verdicts decide on)
                ia = nums.get("items", {}).get("a", {})
                ref = ia.get("trained", {}).get("nll_beyond_base")
                names = [n for n, v in nums["a"].items() if v["role"] != "trained"]
                ivs = [_diff(ia.get(nums["a"][n]["role"], {}).get("nll_beyond_base"), ref) for n in names]
                ax.bar(range(len(names)), [iv[0] for iv in ivs], color="tab:gray",
                       yerr=[[iv[0] - iv[1] for iv in ivs], [iv[2] - iv[0] for iv in ivs]], capsize=3)
                ax.axhline(0, color="tab:green", lw=1.2, label="Long-PT")
                ax.set_xticks(range(len(names)), [n.replace("base + ", "") for n in names], rotation=30, ha="right")
                ax.legend(fontsize=7)
                ax.set_title("a. baselines vs Long-PT")
                ax.set_ylabel("NLL beyond base minus Long-PT's (nats, 95%)")
            elif part == "b":  # per source, against cut-at-base (the sources' NLLs differ by ~2 nats)
                strategies = [st for st in nums["b"] if st != "cut-at-base"]
                sources = sorted({s for v in nums["b"].values() for s in v["nll_beyond_base_by_source"]})
                width = 0.8 / max(1, len(strategies))
                ib = nums.get("items", {}).get("b", {})
                for i, st in enumerate(strategies):
                    x, y = ib.get(st, {}).get("nll_beyond_base"), ib.get("cut-at-base", {}).get("nll_beyond_base")
                    ivs = [_diff(x and source_items(x, s), y and source_items(y, s)) for s in sources]
                    ax.bar([j + i * width for j in range(len(sources))], [iv[0] for iv in ivs], width, label=st,
                           yerr=[[iv[0] - iv[1] for iv in ivs], [iv[2] - iv[0] for iv in ivs]], capsize=3)
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
                ax.legend(fontsize=7)
                ax.set_title("b. data strategies vs cut at base length")
                ax.set_ylabel("NLL beyond base minus cut-at-base (nats, 95%)")
            elif part == "c":  # retrieval before / after, each format, with 95% intervals over the prompts
                names = list(nums["c"])
                ic = nums.get("items", {}).get("c", {})
                for i, (metric, label) in enumerate((("passkey", "passkey"), ("niah", "RULER NIAH"))):
                    ivs = [_diff(ic.get(nums["c"][n]["role"], {}).get(metric), None, value=True) for n in names]
                    ax.bar([j + 0.4 * i for j in range(len(names))], [100 * iv[0] for iv in ivs], 0.4, label=label,
                           yerr=[[100 * (iv[0] - iv[1]) for iv in ivs], [100 * (iv[2] - iv[0]) for iv in ivs]],
                           capsize=3)
                ax.axhline(90, color="tab:red", ls="--", lw=0.8, label="target 90%")
                ax.set_xticks([j + 0.2 for j in range(len(names))], [n.replace("Long-PT + ", "+ ") for n in names],
                              rotation=15, ha="right")
                ax.set_ylim(0, 105)
                ax.legend(fontsize=7)
                ax.set_title("c. Long-PT, then long-SFT")
                ax.set_ylabel("retrieval at 4x (%, 95%)")
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
        return png_bytes(fig)


def _diff(x: dict | None, y: dict | None, value: bool = False) -> tuple[float, float, float]:
    """(point, lo, hi) of mean(x) - mean(y), paired (of mean(x) when `value`); zeros without items."""
    if not x or (not y and not value):
        return 0.0, 0.0, 0.0
    iv = diff_interval(x, None if value else y)
    return iv.point, iv.lo, iv.hi



def _f(v) -> str:
    return "n/a" if v is None or not _finite(v) else f"{v:.3f}"


def _score(v) -> str:
    return "n/a" if v is None else f"{v:.1f}/100"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
