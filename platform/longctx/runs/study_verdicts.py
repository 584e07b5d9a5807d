"""The study's verdicts: every target decided by 95% intervals from the saved per-item results.

    verdict = verdicts(trial_numbers("runs/study"))    # [{"target", "status", "detail", "intervals"}, ...]

`trial_numbers` (`longctx.runs.study_report`) gathers each model's items (`nums["items"]`: per part, per model
role, per metric, `{seed: {item id: value}}`). Each target is one or more links, each a claim on an interval
(`longctx.report.intervals`): an ordering "x < y" on the paired interval of x - y (two-level over seeds where a
model has several), or a threshold on the interval of one value. A link **held** when its interval excludes the
reverse, **did not hold** when it excludes the claim, and is **undecided** otherwise; a target held when every
link held, did not hold when any link did not, and is undecided otherwise (`not run` when a part or its items
are missing). The detail gives every link's point estimate, interval and kind, so nothing failed is hidden.
"""

from __future__ import annotations

from typing import Mapping

from longctx.report.intervals import (FAILED, HELD, NOT_RUN, UNDECIDED, combine_kinds, diff_interval,
                                      ordering_kind, threshold_kind, value_interval)

TARGET_NLL = "NLL beyond base: Long-PT < YaRN ~ dynamic NTK < PI < naive"
TARGET_PASSKEY_NAIVE = "passkey at 4x: naive <= 10%"
TARGET_NIAH_NAIVE = "RULER NIAH at 4x: naive <= 10%"
TARGET_PASSKEY_SFT = "passkey at 4x: Long-PT + synthetic long-SFT (chat) >= 90%"
TARGET_PASSKEY_SFT_PLAIN = "passkey at 4x: Long-PT + synthetic long-SFT (plain text) >= 90%"
TARGET_DATA = ("per-source upsampling: lowest NLL beyond base of the three strategies, no source worse than "
               "cut-at-base by > 0.02")
TARGET_ROPE = "RoPE sweep: best base >= the `rope suggest` bound"
TARGETS = (TARGET_NLL, TARGET_PASSKEY_NAIVE, TARGET_NIAH_NAIVE, TARGET_PASSKEY_SFT, TARGET_PASSKEY_SFT_PLAIN,
           TARGET_DATA, TARGET_ROPE)
LABELS = {"trained": "Long-PT", "yarn": "YaRN", "dynamic_ntk": "dynamic NTK", "pi": "PI", "naive": "naive",
          "long_pt": "Long-PT", "long_sft_chat": "+ long-SFT (chat)", "long_sft_plain": "+ long-SFT (plain text)"}
DATA_ALLOWANCE = 0.02  # nats: how much worse than cut-at-base a source may be under per-source upsampling


def _link(what: str, iv, kind: str, unit: str = "", signed: bool = False) -> dict:
    """unit "%" (a share, shown in percent), "points" (a difference of shares, in percentage points) or "" (nats);
    a difference (`signed`) is shown with its sign."""
    sign = "+" if signed else ""
    text = iv.text(100, f"{sign}.0f") if unit else iv.text(1.0, f"{sign}.3f")
    if unit == "%":
        text = text.replace(" [", "% [")
    return {"what": what, **iv.to_dict(), "kind": kind,
            "text": f"{what} {text}{' points' if unit == 'points' else ''} {kind}"}


def ordering(what: str, x: Mapping, y: Mapping, claim: str = "<", margin: float = 0.0,
             strata: Mapping[str, str] | None = None, unit: str = "") -> dict:
    """One ordering link: the interval of mean(x) - mean(y) against `claim` margin."""
    iv = diff_interval(x, y, strata=strata)
    return _link(what, iv, ordering_kind(iv, claim, margin), unit, signed=True)


def threshold(what: str, x: Mapping, claim: str, value: float, percent: bool = True) -> dict:
    """One threshold link: the interval of mean(x) against `claim` value."""
    iv = value_interval(x)
    return _link(what, iv, threshold_kind(iv, claim, value), "%" if percent else "")


def _verdict(target: str, links: list[dict], head: str = "") -> dict:
    status = combine_kinds([lk["kind"] for lk in links])
    detail = "; ".join(x for x in [head, *(lk["text"] for lk in links)] if x)
    return {"target": target, "status": status, "detail": detail, "intervals": links}


def _not_run(target: str, why: str) -> dict:
    return {"target": target, "status": NOT_RUN, "detail": why, "intervals": []}


def _nll_links(items: dict) -> list[dict]:
    m = {r: items[r]["nll_beyond_base"] for r in ("trained", "yarn", "dynamic_ntk", "pi", "naive")}
    pairs = [("trained", "yarn"), ("trained", "dynamic_ntk"), ("yarn", "pi"), ("dynamic_ntk", "pi"), ("pi", "naive")]
    return [ordering(f"{LABELS[x]} - {LABELS[y]}", m[x], m[y]) for x, y in pairs]


def _part_a(nums: dict) -> list[dict]:
    items = (nums.get("items") or {}).get("a") or {}
    roles = ("trained", "yarn", "dynamic_ntk", "pi", "naive")
    if not nums.get("a"):
        return [_not_run(t, "part a not run") for t in (TARGET_NLL, TARGET_PASSKEY_NAIVE, TARGET_NIAH_NAIVE)]
    out = []
    if all(items.get(r, {}).get("nll_beyond_base") for r in roles):
        means = {v["role"]: v["nll_beyond_base"] for v in nums["a"].values()}
        head = ", ".join(f"{LABELS[r]} {means[r]:.3f}" for r in roles)
        out.append(_verdict(TARGET_NLL, _nll_links(items), head + " (differences, 95% intervals)"))
    else:
        out.append(_not_run(TARGET_NLL, f"NLL beyond base per document of: {sorted(items)}"))
    for target, metric, name in ((TARGET_PASSKEY_NAIVE, "passkey", "passkey"), (TARGET_NIAH_NAIVE, "niah", "NIAH")):
        naive = items.get("naive", {}).get(metric)
        if not naive:
            out.append(_not_run(target, f"no {name} at 4x"))
            continue
        others = "; ".join(f"{LABELS[r]} {100 * value_interval(items[r][metric]).point:.0f}%"
                           for r in roles if r != "naive" and items.get(r, {}).get(metric))
        out.append(_verdict(target, [threshold(f"naive {name}", naive, "<=", 0.10)], ""))
        n = len(next(iter(naive.values())))
        out[-1]["detail"] += f" (others: {others}; {n} prompt{'s' if n != 1 else ''} per model)"
    return out


def _part_c(nums: dict) -> list[dict]:
    items = (nums.get("items") or {}).get("c") or {}
    out = []
    for target, role in ((TARGET_PASSKEY_SFT, "long_sft_chat"), (TARGET_PASSKEY_SFT_PLAIN, "long_sft_plain")):
        pk = items.get(role, {}).get("passkey")
        if not pk:
            out.append(_not_run(target, "part c not run" if not nums.get("c") else f"no passkey items of {role}"))
            continue
        links = [threshold(f"{LABELS[role]} passkey", pk, ">=", 0.90)]
        before = items.get("long_pt", {})
        extra = []
        if before.get("passkey"):  # LongSkywork's effect: the change in retrieval the SFT stage brought
            extra.append(ordering("change vs Long-PT, passkey", pk, before["passkey"], ">", unit="points")["text"])
        if items[role].get("niah") and before.get("niah"):
            extra.append(ordering("change vs Long-PT, NIAH", items[role]["niah"], before["niah"], ">",
                                  unit="points")["text"])
        v = _verdict(target, links)
        if extra:
            v["detail"] += " (" + "; ".join(extra) + ")"
        out.append(v)
    return out


def source_strata(ids) -> dict[str, str]:
    """Part b's document items by source: {item id: source} (ids are "<source>/<document id>")."""
    return {i: i.split("/", 1)[0] for i in ids}


def source_items(by_seed: dict, src: str) -> dict:
    """Part b's items ({seed: {item id: value}}) of one source."""
    return {seed: {i: v for i, v in vals.items() if i.split("/", 1)[0] == src} for seed, vals in by_seed.items()}


def _part_b(nums: dict) -> dict:
    items = (nums.get("items") or {}).get("b") or {}
    need = ("per-source", "global", "cut-at-base")
    if not all(items.get(s, {}).get("nll_beyond_base") for s in need):
        return _not_run(TARGET_DATA, "part b not run")
    m = {s: items[s]["nll_beyond_base"] for s in need}
    ids = next(iter(m["per-source"].values()))
    strata = source_strata(ids)
    links = [ordering("per-source - global", m["per-source"], m["global"], strata=strata),
             ordering("per-source - cut-at-base", m["per-source"], m["cut-at-base"], strata=strata)]
    for src in sorted(set(strata.values())):
        links.append(ordering(f"{src}: per-source - cut-at-base (<= {DATA_ALLOWANCE})",
                              source_items(m["per-source"], src), source_items(m["cut-at-base"], src), "<=",
                              DATA_ALLOWANCE))
    means = ", ".join(f"{k} {v['nll_beyond_base_mean']:.3f}" for k, v in nums["b"].items())
    return _verdict(TARGET_DATA, links, means + " (mean over sources; differences, 95% intervals)")


def _part_d(nums: dict) -> dict:
    d = nums.get("d")
    items = (nums.get("items") or {}).get("d") or {}
    if not d or not items or len(items) != len(d["nll_beyond_base_by_theta"]):
        return _not_run(TARGET_ROPE, "part d not run")
    by = {float(k): v for k, v in d["nll_beyond_base_by_theta"].items()}
    bound = d["bound"]
    head = ", ".join(f"{t:.3g}: {v:.3f}" for t, v in sorted(by.items())) + f"; bound {bound:.3g}"
    above = [t for t in by if t >= bound]
    below = [t for t in by if t < bound]
    if not above or not below:  # nothing to compare against: the best is on one side by construction
        kind = HELD if not below else FAILED
        return {"target": TARGET_ROPE, "status": kind, "intervals": [],
                "detail": head + f"; every base is {'at or above' if not below else 'below'} the bound"}
    key = {float(k): k for k in items}
    best_above, best_below = min(above, key=by.get), min(below, key=by.get)
    link = ordering(f"best at/above the bound ({best_above:.3g}) - best below ({best_below:.3g})",
                    items[key[best_above]]["nll_beyond_base"], items[key[best_below]]["nll_beyond_base"])
    return _verdict(TARGET_ROPE, [link], head)


def verdicts(nums: dict) -> list[dict]:
    """One verdict per target, in `TARGETS` order: {"target", "status": held | did not hold | undecided | not
    run, "detail" (numbers and intervals inline), "intervals" (each link's interval and kind)}."""
    out = [*_part_a(nums), *_part_c(nums), _part_b(nums), _part_d(nums)]
    by = {v["target"]: v for v in out}
    return [by[t] for t in TARGETS]


__all__ = ["TARGETS", "verdicts", "source_items", "source_strata", "HELD", "FAILED", "UNDECIDED", "NOT_RUN"]
