"""Step 6 of the data path: the length mixture (docs/architecture.md section 5) as a plan over document lengths.

Pass 1 of the pipeline leaves, per source, the token length of every document in cache order. From those
lengths alone (no tokens) `plan_mixture` decides how often each document is emitted (`counts`, 0 = dropped,
2+ = repeated) and how many tokens its last occurrence keeps (`last_take`, < length only for the one document
per pool that a token budget cuts). Pass 2 then streams the cached tokens and follows the plan.

Strategies (`data.strategy`):
  per-source  every source keeps its input token share w_s; inside it, long documents (>= long_threshold)
              are upsampled. `target_share` draws q_s·w_s·B tokens from the source's long pool and the rest from
              its short pool, q_s = max(long_share, natural share); pools are drawn without replacement while
              they last, then whole passes repeat (counted). `keep_prob` is Fu et al.'s builder: shuffled
              documents, every long one kept, a short one kept with probability keep_prob, never repeated, the
              source stops when its budget w_s·B is used.
  sources     like per-source, but only `upsample_sources` are upsampled; the others keep natural lengths.
  global      one pool over the whole corpus (upsampling changes the source mix).
  cut-seq     natural lengths, no upsampling (budget drawn proportionally).
  cut-4k      like cut-seq, then every document is chunked into 4096-token documents when emitted.
Default budget B (data.token_budget unset): the input token count (keep_prob: whatever it keeps, uncapped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CUT_4K = 4096


@dataclass
class SourcePlan:
    lengths: np.ndarray    # token length of every document (cache order), EOS included
    counts: np.ndarray     # occurrences of each document in the output
    last_take: np.ndarray  # tokens kept in each document's last occurrence
    target_tokens: int = 0

    @property
    def repeat_tokens(self) -> int:
        """Tokens emitted again after a document's first occurrence."""
        return int((np.maximum(self.counts - 1, 0).astype(np.int64) * self.lengths.astype(np.int64)).sum())

    @property
    def planned_tokens(self) -> int:
        full = (np.maximum(self.counts - 1, 0) * self.lengths.astype(np.int64)).sum()
        return int(full + np.where(self.counts > 0, self.last_take, 0).sum())


@dataclass
class MixturePlan:
    strategy: str
    params: dict
    budget: int
    chunk_len: int | None          # cut-4k: documents are cut into chunks of this many tokens when emitted
    sources: dict[str, SourcePlan] = field(default_factory=dict)

    def planned_tokens(self) -> dict[str, int]:
        return {s: p.planned_tokens for s, p in self.sources.items()}


def _split_evenly(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Integer targets proportional to weights that sum exactly to total (largest remainder)."""
    wsum = sum(weights.values())
    if wsum == 0:
        return {k: 0 for k in weights}
    raw = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


def draw_from_pool(plan: SourcePlan, idx: np.ndarray, target: int, rng: np.random.Generator) -> int:
    """Add `target` tokens from the documents `idx` to `plan`: whole passes while the target exceeds the pool,
    then a random subset without replacement, the last document cut to hit the target exactly. Returns the
    tokens drawn (less than target only when the pool is empty)."""
    if target <= 0 or len(idx) == 0:
        return 0
    lengths = plan.lengths[idx].astype(np.int64)
    pool = int(lengths.sum())
    passes, rem = divmod(int(target), pool)
    plan.counts[idx] += passes
    if rem:
        perm = rng.permutation(len(idx))
        cum = np.cumsum(lengths[perm])
        j = int(np.searchsorted(cum, rem))  # first document whose running total reaches rem
        chosen = idx[perm[: j + 1]]
        plan.counts[chosen] += 1
        last = idx[perm[j]]
        plan.last_take[last] = plan.lengths[last] - int(cum[j] - rem)
    return int(target)


def keep_prob_draw(plan: SourcePlan, idx: np.ndarray, threshold: int, r: float, cap: int | None,
                   rng: np.random.Generator) -> int:
    """Fu et al.'s builder over documents `idx`: shuffled; long kept, short kept with probability r; no repeats;
    stop once `cap` tokens are taken (the last document cut to fit)."""
    if len(idx) == 0:
        return 0
    order = idx[rng.permutation(len(idx))]
    lengths = plan.lengths[order].astype(np.int64)
    keep = (lengths >= threshold) | (rng.random(len(order)) < r)
    kept, kept_len = order[keep], lengths[keep]
    if cap is not None:
        cum = np.cumsum(kept_len)
        if len(cum) and cum[-1] > cap:
            j = int(np.searchsorted(cum, cap))
            kept, over = kept[: j + 1], int(cum[j] - cap)
            plan.last_take[kept[-1]] = plan.lengths[kept[-1]] - over
            kept_len = kept_len[: j + 1]
            kept_len[-1] -= over
    plan.counts[kept] += 1
    return int(kept_len.sum())


def plan_mixture(lengths_by_source: dict[str, np.ndarray], data_cfg,
                 natural_tokens: dict[str, int] | None = None) -> MixturePlan:
    """The per-document plan for `data_cfg.strategy` (see the module docstring). `natural_tokens`: each source's
    token count in the whole corpus when only part of it was read (budget-aware reading): the budget is split
    by these instead of by the tokens read."""
    d = data_cfg
    if getattr(d, "eval_fraction", 0.0):
        raise ValueError(f"data.eval_fraction={d.eval_fraction}: the data engine holds nothing out; evaluate on a "
                         "separate held-out corpus (eval.documents) and leave data.eval_fraction at 0")
    strategy, mode, thr = d.strategy, d.upsample_mode, d.long_threshold
    names = sorted(lengths_by_source)
    plans = {s: SourcePlan(lengths=np.asarray(lengths_by_source[s], np.int32),
                           counts=np.zeros(len(lengths_by_source[s]), np.int32),
                           last_take=np.asarray(lengths_by_source[s], np.int32).copy()) for s in names}
    natural = {s: int(p.lengths.astype(np.int64).sum()) for s, p in plans.items()}
    total = sum(natural.values())
    upsampled = {"per-source": set(names), "global": set(names), "sources": set(d.upsample_sources)}.get(strategy, set())
    unknown = set(d.upsample_sources) - set(names)
    if strategy == "sources" and unknown:
        raise ValueError(f"data.upsample_sources names {sorted(unknown)}, which are not sources; "
                         f"sources are {names}")
    params = {"long_threshold": thr}
    if strategy in ("per-source", "sources", "global"):
        params["upsample_mode"] = mode
        params.update({"long_share": d.long_share} if mode == "target_share" else {"keep_prob": d.keep_prob})
    if strategy == "sources":
        params["upsample_sources"] = sorted(upsampled)
    if strategy == "cut-4k":
        params["chunk_len"] = getattr(d, "cut_len", CUT_4K)
    keep_prob_mode = mode == "keep_prob" and bool(upsampled)
    budget = d.token_budget if d.token_budget is not None else (None if keep_prob_mode else total)
    seed_base = np.random.SeedSequence([d.seed, 7])

    # Groups the draw works on: every source alone, or (global) the whole corpus as one pool.
    if strategy == "global":
        offsets = np.cumsum([0] + [len(plans[s].lengths) for s in names])
        merged = SourcePlan(lengths=np.concatenate([plans[s].lengths for s in names]) if names else np.zeros(0, np.int32),
                            counts=np.zeros(int(offsets[-1]), np.int32), last_take=np.zeros(0, np.int32))
        merged.last_take = merged.lengths.copy()
        groups = [("<all>", merged, budget)]
    else:
        weights = {s: int((natural_tokens or natural).get(s, natural[s])) for s in names}
        targets = _split_evenly(budget, weights) if budget is not None else {s: None for s in names}
        groups = [(s, plans[s], targets[s]) for s in names]

    for gi, (name, plan, target) in enumerate(groups):
        rng = np.random.default_rng(seed_base.spawn(len(groups))[gi])
        is_long = plan.lengths >= thr
        long_idx, short_idx = np.flatnonzero(is_long), np.flatnonzero(~is_long)
        n_all = int(plan.lengths.astype(np.int64).sum())
        nat_share = plan.lengths[is_long].astype(np.int64).sum() / n_all if n_all else 0.0
        up = name in upsampled or strategy == "global"
        if up and mode == "keep_prob":
            keep_prob_draw(plan, np.arange(len(plan.lengths)), thr, d.keep_prob, target, rng)
            plan.target_tokens = target if target is not None else plan.planned_tokens
            continue
        if target is None:  # keep_prob run without a budget: sources that are not upsampled keep everything
            target = n_all
        q = max(d.long_share, nat_share) if up else nat_share
        long_t = int(round(q * target))
        if len(long_idx) == 0:
            long_t = 0
        elif len(short_idx) == 0:
            long_t = target
        draw_from_pool(plan, long_idx, long_t, rng)
        draw_from_pool(plan, short_idx, target - long_t, rng)
        plan.target_tokens = target

    if strategy == "global":
        merged = groups[0][1]
        for i, s in enumerate(names):
            sl = slice(int(offsets[i]), int(offsets[i + 1]))
            plans[s].counts[:] = merged.counts[sl]
            plans[s].last_take[:] = merged.last_take[sl]
            plans[s].target_tokens = plans[s].planned_tokens
    realised_budget = sum(p.planned_tokens for p in plans.values())
    return MixturePlan(strategy=strategy, params=params, budget=budget if budget is not None else realised_budget,
                       chunk_len=getattr(d, "cut_len", CUT_4K) if strategy == "cut-4k" else None, sources=plans)
