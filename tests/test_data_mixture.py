"""Length mixture plans (longctx.data.mixture), checked as numbers: token budget, per-source shares, long
shares, repeats, Fu et al.'s keep_prob rule. Pure numpy; no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from longctx.config import DataConfig
from longctx.data.mixture import plan_mixture

THR = 4096


def _corpus(seed=0) -> dict[str, np.ndarray]:
    """Three sources with different natural long-token shares (about 0.97 / 0.5 / 0.15 at 4K)."""
    rng = np.random.default_rng(seed)
    return {
        "book": rng.lognormal(9.8, 0.8, 300).astype(np.int32) + 1,
        "code": rng.lognormal(7.6, 1.2, 2500).astype(np.int32) + 1,
        "web": rng.lognormal(6.5, 0.9, 8000).astype(np.int32) + 1,
    }


def _out(plan, s):
    p = plan.sources[s]
    take = np.where(p.counts > 0, p.last_take, 0).astype(np.int64)
    full = np.maximum(p.counts - 1, 0).astype(np.int64) * p.lengths
    tokens = full + take
    return int(tokens.sum()), int(tokens[p.lengths >= THR].sum())


def _shares(lengths):
    total = sum(int(v.sum()) for v in lengths.values())
    return {s: int(v.sum()) / total for s, v in lengths.items()}, {
        s: int(v[v >= THR].sum()) / int(v.sum()) for s, v in lengths.items()}


@pytest.mark.parametrize("budget_factor", [0.5, 1.0, 2.5])
def test_per_source_target_share_hits_budget_shares_and_long_share(budget_factor):
    lengths = _corpus()
    total = sum(int(v.sum()) for v in lengths.values())
    budget = int(total * budget_factor)
    plan = plan_mixture(lengths, DataConfig(strategy="per-source", long_threshold=THR, long_share=0.7,
                                            token_budget=budget, seed=3))
    in_share, natural_long = _shares(lengths)
    got = {s: _out(plan, s) for s in lengths}
    emitted = sum(t for t, _ in got.values())
    assert abs(emitted - budget) <= 0.01 * budget
    for s, (tokens, long_tokens) in got.items():
        assert abs(tokens / emitted - in_share[s]) <= 0.01, s
        want = max(0.7, natural_long[s])
        assert abs(long_tokens / tokens - want) <= 0.02, (s, long_tokens / tokens, want)
    # web's long pool is small: it must be drawn repeatedly, and the repeats are visible in the counts
    web = plan.sources["web"]
    assert web.counts[web.lengths >= THR].min() >= 2
    if budget_factor <= 1.0:  # book is already above 0.7: never upsampled, so no repeats within the budget
        assert plan.sources["book"].counts.max() <= 1


def test_plan_is_deterministic_and_seed_dependent():
    lengths = _corpus()
    cfg = dict(strategy="per-source", long_threshold=THR, token_budget=5_000_000)
    a = plan_mixture(lengths, DataConfig(seed=1, **cfg))
    b = plan_mixture(lengths, DataConfig(seed=1, **cfg))
    c = plan_mixture(lengths, DataConfig(seed=2, **cfg))
    assert all(np.array_equal(a.sources[s].counts, b.sources[s].counts) for s in lengths)
    assert any(not np.array_equal(a.sources[s].counts, c.sources[s].counts) for s in lengths)


def test_keep_prob_mode_keeps_long_never_repeats_and_samples_short_at_rate():
    lengths = _corpus()
    plan = plan_mixture(lengths, DataConfig(strategy="per-source", upsample_mode="keep_prob", keep_prob=0.1,
                                            long_threshold=THR, seed=0))
    for s, p in plan.sources.items():
        assert p.counts.max() <= 1  # never repeated
        assert (p.counts[p.lengths >= THR] == 1).all()  # every long document kept (no budget cap)
        short = p.lengths < THR
        if short.sum() > 1000:
            assert abs(p.counts[short].mean() - 0.1) < 0.02, s
    # with a budget, each source stops at w_s * B
    total = sum(int(v.sum()) for v in lengths.values())
    budget = total // 4
    plan = plan_mixture(lengths, DataConfig(strategy="per-source", upsample_mode="keep_prob", keep_prob=0.1,
                                            long_threshold=THR, token_budget=budget, seed=0))
    in_share, _ = _shares(lengths)
    for s in lengths:
        tokens, _ = _out(plan, s)
        assert tokens <= round(in_share[s] * budget) + 1
        # budget binds for sources whose long tokens alone exceed w_s*B (book, code)
        if s != "web":
            assert abs(tokens - in_share[s] * budget) <= 2, s


def test_global_upsamples_over_the_whole_corpus_and_changes_the_mix():
    lengths = _corpus()
    total = sum(int(v.sum()) for v in lengths.values())
    plan = plan_mixture(lengths, DataConfig(strategy="global", long_threshold=THR, long_share=0.9,
                                            token_budget=total, seed=0))
    got = {s: _out(plan, s) for s in lengths}
    emitted = sum(t for t, _ in got.values())
    long_total = sum(l for _, l in got.values())
    assert abs(emitted - total) <= 0.01 * total
    assert abs(long_total / emitted - 0.9) <= 0.02
    in_share, _ = _shares(lengths)
    assert got["web"][0] / emitted < in_share["web"] - 0.05  # web (mostly short) loses share


def test_sources_strategy_upsamples_only_listed_sources():
    lengths = _corpus()
    plan = plan_mixture(lengths, DataConfig(strategy="sources", upsample_sources=["code"], long_threshold=THR,
                                            long_share=0.8, seed=0))
    _, natural = _shares(lengths)
    tokens, long_tokens = _out(plan, "code")
    assert abs(long_tokens / tokens - 0.8) <= 0.02
    tokens, long_tokens = _out(plan, "web")
    assert abs(long_tokens / tokens - natural["web"]) <= 0.02
    with pytest.raises(ValueError, match="not sources"):
        plan_mixture(lengths, DataConfig(strategy="sources", upsample_sources=["nope"]))


def test_cut_strategies_keep_natural_lengths_once():
    lengths = _corpus()
    for strategy, chunk, extra in [("cut-seq", None, {}), ("cut-4k", 4096, {}), ("cut-4k", 256, {"cut_len": 256})]:
        plan = plan_mixture(lengths, DataConfig(strategy=strategy, long_threshold=THR, **extra))
        assert plan.chunk_len == chunk
        assert all((p.counts == 1).all() and (p.last_take == p.lengths).all() for p in plan.sources.values())


def test_sources_without_long_or_short_documents_fill_from_the_other_pool():
    lengths = {"short_only": np.full(100, 100, np.int32), "long_only": np.full(10, 10_000, np.int32)}
    plan = plan_mixture(lengths, DataConfig(strategy="per-source", long_threshold=THR, token_budget=200_000))
    assert _out(plan, "short_only") == (int(round(200_000 * 10_000 / 110_000)), 0)
    tokens, long_tokens = _out(plan, "long_only")
    assert tokens == long_tokens == 200_000 - int(round(200_000 * 10_000 / 110_000))
