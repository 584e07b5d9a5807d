"""Intervals and verdict kinds on synthetic numbers (no Ray): held, did not hold and undecided cases, the
numbers behind them, negative controls for pairing, and intervals recomputed from saved per-item metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from longctx.eval.items import document_id, item_values
from longctx.eval.runner import ModelSpec, aggregate_results
from longctx.eval.ruler.suite import RulerItem
from longctx.eval.items import ruler_items
from longctx.report.intervals import (FAILED, HELD, UNDECIDED, PairingError, combine_kinds, count_kinds,
                                      diff_interval, ordering_kind, threshold_kind, value_interval)


def _docs(n=40, seed=0, spread=0.5):
    """Per-document NLLs with a large per-document effect (what pairing removes)."""
    rng = np.random.default_rng(seed)
    return rng.normal(3.5, spread, n)


def _model(values, prefix="doc"):
    return {f"{prefix}-{i}": float(v) for i, v in enumerate(values)}


def test_three_kinds_on_synthetic_orderings():
    base = _docs()
    noise = np.random.default_rng(1).normal(0, 0.02, len(base))
    better = _model(base - 0.05 + noise)      # claim "a < b" true by 0.05 nats, noise 0.02 per document
    worse = _model(base + 0.05 + noise)
    tie = _model(base + noise)
    ref = _model(base)
    iv = diff_interval(better, ref)
    assert iv.point == pytest.approx(float(np.mean(noise)) - 0.05, abs=1e-12)
    assert iv.lo < iv.point < iv.hi < 0 and ordering_kind(iv, "<") == HELD
    assert ordering_kind(diff_interval(worse, ref), "<") == FAILED
    iv_tie = diff_interval(tie, ref)
    assert iv_tie.lo < 0 < iv_tie.hi and ordering_kind(iv_tie, "<") == UNDECIDED
    # the interval has the width the normal theory gives (sd / sqrt(n) of the paired differences)
    half = 1.96 * np.std(noise, ddof=1) / math.sqrt(len(noise))
    assert (iv_tie.hi - iv_tie.lo) / 2 == pytest.approx(half, rel=0.15)
    # deterministic, and the bootstrap seed is what moves it
    assert diff_interval(tie, ref) == iv_tie and diff_interval(tie, ref, seed=1) != iv_tie
    # a margin: "no worse by more than 0.1" holds for the worse model, "by more than 0.01" does not
    assert ordering_kind(diff_interval(worse, ref), "<=", 0.1) == HELD
    assert ordering_kind(diff_interval(worse, ref), "<=", 0.01) == FAILED


def test_threshold_targets_on_passkey_counts():
    def prompts(k, n=50):
        return {f"p{i}": float(i < k) for i in range(n)}

    assert value_interval(prompts(50)).lo == 1.0 and threshold_kind(value_interval(prompts(50)), ">=", 0.9) == HELD
    assert threshold_kind(value_interval(prompts(46)), ">=", 0.9) == UNDECIDED  # 92%: 46/50 cannot exclude 90%
    iv = value_interval(prompts(30))
    assert iv.point == 0.6 and iv.hi < 0.9 and threshold_kind(iv, ">=", 0.9) == FAILED
    assert threshold_kind(value_interval(prompts(0)), "<=", 0.1) == HELD  # the naive baseline's 0%
    assert threshold_kind(value_interval(prompts(1, 12)), "<=", 0.1) == UNDECIDED  # 1/12 prompts: 8%, not decided
    # a 95% binomial interval at 46/50 is about +-7 points
    assert (iv.hi - iv.lo) / 2 == pytest.approx(1.96 * math.sqrt(0.6 * 0.4 / 50), rel=0.2)


def test_negative_controls_unpaired_is_wider_and_wrong_pairing_is_refused():
    base = _docs(spread=0.8)
    noise = np.random.default_rng(2).normal(0, 0.02, len(base))
    a, b = _model(base - 0.03 + noise), _model(base)
    paired = diff_interval(a, b)
    assert ordering_kind(paired, "<") == HELD
    # shuffling which document b's value belongs to (a wrong pairing) destroys the shared per-document effect:
    # the interval gets several times wider and the same 0.03 nats can no longer be decided
    perm = np.random.default_rng(3).permutation(len(base))
    shuffled = _model(base[perm])
    wrong = diff_interval(a, shuffled)
    assert (wrong.hi - wrong.lo) > 5 * (paired.hi - paired.lo)
    assert ordering_kind(wrong, "<") == UNDECIDED
    # items that differ between the models are refused, naming the problem
    b_other = dict(b)
    b_other["doc-999"] = b_other.pop("doc-0")
    with pytest.raises(PairingError, match="not the same items"):
        diff_interval(a, b_other)


def test_two_level_bootstrap_over_seeds():
    base = _docs()
    rng = np.random.default_rng(4)
    # three training seeds whose models differ by a seed effect of 0.04 nats, plus per-document noise
    seed_fx = [-0.04, 0.0, 0.04]
    a = {f"s{k}": _model(base - 0.02 + fx + rng.normal(0, 0.01, len(base))) for k, fx in enumerate(seed_fx)}
    b = _model(base)
    one_seed = diff_interval(a["s1"], b)
    three = diff_interval(a, b)
    assert three.seeds == 3 and three.items == len(base)
    assert three.point == pytest.approx(np.mean([np.mean(list(v.values())) for v in a.values()]) - np.mean(base))
    # the seed spread is now in the interval: wider than one seed's, and 0.02 nats no longer decided
    assert (three.hi - three.lo) > 3 * (one_seed.hi - one_seed.lo)
    assert ordering_kind(one_seed, "<") == HELD and ordering_kind(three, "<") == UNDECIDED
    # both models with seeds: the same seed labels are paired (a shared seed effect cancels)
    b_seeds = {f"s{k}": _model(base + fx) for k, fx in enumerate(seed_fx)}
    a_tight = {k: _model(np.array(list(v.values())) - 0.0) for k, v in a.items()}
    paired = diff_interval(a_tight, b_seeds)
    assert ordering_kind(paired, "<") == HELD and paired.hi - paired.lo < 0.5 * (three.hi - three.lo)


def test_strata_weigh_groups_equally():
    vals = {"c/1": 1.0, "c/2": 3.0, "code/1": 10.0}
    strata = {k: k.split("/")[0] for k in vals}
    iv = value_interval(vals, strata=strata)
    assert iv.point == pytest.approx((2.0 + 10.0) / 2)  # mean over sources of the per-source mean
    # resampled within each source: c's mean is 1, 2 or 3 and code's is 10, so the mean is 5.5 to 6.5
    assert (iv.lo, iv.hi) == (5.5, 6.5)
    # negative control: resampled across sources, a replicate can be all code documents (10) or all c (1)
    flat = value_interval(vals)
    assert flat.point == pytest.approx(14 / 3) and flat.hi > 7 and flat.lo < 3


def test_combine_and_count():
    assert combine_kinds([HELD, HELD]) == HELD
    assert combine_kinds([HELD, UNDECIDED]) == UNDECIDED
    assert combine_kinds([UNDECIDED, FAILED, HELD]) == FAILED
    assert count_kinds([{"status": HELD}, {"status": UNDECIDED}, {"status": HELD}]) == {
        "held": 2, "did not hold": 0, "undecided": 1, "not run": 0}


def test_items_saved_by_the_runner_give_the_aggregates_and_the_same_intervals(tmp_path):
    """aggregate_results (what evaluate_models writes to metrics.json) saves per-document and per-prompt items
    whose means are the aggregates; intervals recomputed from the saved file equal those from memory."""
    rng = np.random.default_rng(5)
    length, base_len, n_docs = 16, 8, 6
    docs = [rng.integers(0, 100, length).tolist() for _ in range(n_docs)]
    doc_ids = [document_id(d) for d in docs]
    assert len(set(doc_ids)) == n_docs and document_id(docs[0]) == document_id(list(docs[0]))
    models = {"naive": ModelSpec("m0", role="naive"), "Long-PT": ModelSpec("m1", role="trained")}
    results, truth = [], {}
    for name, shift in (("naive", 0.5), ("Long-PT", 0.0)):
        rows = rng.gamma(2.0, 1.5, (n_docs, length)) + shift
        rows[:, 0] = 0.0
        truth[name] = rows
        for i, row in enumerate(rows):
            results.append({"model": name, "task": "ppl", "index": i,
                            "result": json.dumps({"nll": [round(float(x), 6) for x in row]})})
        for t in range(5):
            results.append({"model": name, "task": "passkey", "index": t, "result": json.dumps(
                {"length": 32, "depth": 0.5, "trial": t, "key": str(10000 + t), "prediction": "x",
                 "correct": name == "Long-PT" or t == 0})})
    info = {n: {"documents": {length: n_docs}, "skipped_short": {length: 0}, "doc_ids": {length: doc_ids},
                "needle": [], "tasks": []} for n in models}
    metrics = aggregate_results(results, models, info, length, [0, base_len, length], base_len)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    saved = json.loads(path.read_text())
    for name, m in saved["models"].items():
        beyond = item_values(m, "nll_beyond_base")
        assert set(beyond) == set(doc_ids)
        assert np.mean(list(beyond.values())) == pytest.approx(m["perplexity"]["nll_beyond_base"], abs=1e-6)
        assert np.mean(list(item_values(m, "nll_within_base").values())) == pytest.approx(
            m["perplexity"]["nll_within_base"], abs=1e-6)
        assert beyond[doc_ids[2]] == pytest.approx(truth[name][2, base_len:].mean(), abs=1e-6)
        pk = item_values(m, "passkey", 32)
        assert len(pk) == 5 and np.mean(list(pk.values())) == pytest.approx(m["passkey"]["accuracy_by_length"]["32"])
    mem = diff_interval(item_values(metrics["models"]["Long-PT"], "nll_beyond_base"),
                        item_values(metrics["models"]["naive"], "nll_beyond_base"))
    again = diff_interval(item_values(saved["models"]["Long-PT"], "nll_beyond_base"),
                          item_values(saved["models"]["naive"], "nll_beyond_base"))
    assert again == mem and mem.point == pytest.approx(
        truth["Long-PT"][:, base_len:].mean() - truth["naive"][:, base_len:].mean(), abs=1e-5)


def test_ruler_items_score_each_sample_as_ruler_does():
    items = [RulerItem("niah_single_1", 64, {"index": i, "outputs": ["1234567"]}, np.zeros(3, np.int32), 8)
             for i in range(3)]
    got = ruler_items(items, [" 1234567.", "no", "The number is 1234567"])
    assert got["ids"] == ["ruler-64-niah_single_1-0", "ruler-64-niah_single_1-1", "ruler-64-niah_single_1-2"]
    assert got["score"] == [100.0, 0.0, 100.0]
    assert item_values({"items": {"ruler": got}}, "ruler", 64) == {
        "ruler-64-niah_single_1-0": 1.0, "ruler-64-niah_single_1-1": 0.0, "ruler-64-niah_single_1-2": 1.0}


def test_interval_text_shows_round_off_zero_as_zero_and_a_real_negative_with_its_sign():
    from longctx.report.intervals import Interval

    assert Interval(0.1, -1e-17, 0.22, 0.95, 1, 51).text(100, "+.0f") == "+10 [+0, +22]"
    assert Interval(0.1, -0.004, 0.22, 0.95, 1, 51).text(100, "+.0f") == "+10 [-0, +22]"  # below 0: keeps its sign
    assert Interval(-0.057, -0.1, 0.001, 0.95, 3, 8).text() == "-0.057 [-0.100, 0.001]"
