"""Budget reading that honours upsampling (data/budget.py), without Ray: a long-tailed two-source corpus streamed
through the reader in its file order, then the length plan on what was kept.

- target_share: the reader asks for the long documents the plan draws, so no document repeats while unread
  documents remain; negative control: the old rule (each source's byte share of the budget, natural lengths) on
  the same corpus makes the plan repeat long documents, and `repeats_while_unread` names the sources.
- keep_prob: the plan meets the budget within 3%; under the old rule it falls far short.
- the budget is on by default whenever data.token_budget or train.token_budget is set.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from longctx.config import DataConfig, SourceSpec, load_config
from longctx.data.budget import BudgetReader, data_budget, effective_data_config, repeats_while_unread
from longctx.data.fingerprint import data_fingerprint
from longctx.data.mixture import plan_mixture
from longctx.data.sources import FileTask

THR = 4096
# source -> (files, documents per file, share of documents that are long)
CORPUS = {"book": (40, 30, 0.5), "web": (200, 60, 0.05)}


def _corpus(seed: int = 0):
    rng = np.random.default_rng(seed)
    tasks, lengths, idx = [], {}, 0
    for s, (files, docs, p_long) in sorted(CORPUS.items()):
        for f in range(files):
            long = rng.random(docs) < p_long
            n = np.where(long, rng.integers(THR, 6 * THR, docs), rng.integers(100, 2000, docs))
            tasks.append(FileTask(idx, f"/corpus/{s}/part-{f:04d}.jsonl", s, SourceSpec(uri=f"/corpus/{s}")))
            lengths[idx] = n
            idx += 1
    return tasks, lengths


def _read(data_cfg, budget: int, reader_cfg="same"):
    """Stream the corpus through the reader as pass 1 would (file order, one batch per file); returns the kept
    lengths per source and the reader."""
    tasks, lengths = _corpus()
    sizes = {t.uri: int(lengths[t.file_idx].sum()) * 4 for t in tasks}  # ~4 bytes per token
    gate = BudgetReader(tasks, budget, data_cfg.read_margin, data_cfg.seed, sizes=sizes,
                        data_cfg=data_cfg if reader_cfg == "same" else reader_cfg)
    kept: dict[str, list] = {}
    for t in gate.order:
        n = lengths[t.file_idx]
        batch = pa.table({"file_idx": pa.array([t.file_idx] * len(n), pa.int64()),
                          "reason": pa.nulls(len(n), pa.string()), "n_tokens": pa.array(n, pa.int64()),
                          "source": [t.source] * len(n)})
        out = gate.admit(batch)
        kept.setdefault(t.source, []).extend(out.column("n_tokens").to_pylist())
        if gate.done:
            break
    else:
        gate.exhausted = True
    return {s: np.array(v, np.int32) for s, v in kept.items()}, gate


def _manifest_view(plan, gate) -> dict:
    return {"sources": {s: {"repeat_tokens": p.repeat_tokens} for s, p in plan.sources.items()},
            "input": {"read": gate.report()}}


def test_target_share_reads_the_long_documents_it_needs_and_repeats_nothing():
    total = sum(int(v.sum()) for v in _corpus()[1].values())
    budget = total // 10
    d = DataConfig(strategy="per-source", upsample_mode="target_share", long_threshold=THR, long_share=0.7,
                   token_budget=budget, read_margin=0.1, seed=3)
    kept, gate = _read(d, budget)
    plan = plan_mixture(kept, d, gate.estimate())
    report = gate.report()["sources"]
    assert all(r["files_skipped"] > 0 for r in report.values()), report  # most of the corpus was never read
    assert {s: p.repeat_tokens for s, p in plan.sources.items()} == {"book": 0, "web": 0}
    assert repeats_while_unread(_manifest_view(plan, gate)) == {}
    assert sum(plan.planned_tokens().values()) == budget
    for s, p in plan.sources.items():  # the long share the mixture asked for, from distinct documents
        long = p.lengths >= THR
        got = (np.where(p.counts > 0, p.last_take, 0)[long].sum()) / p.planned_tokens
        assert got >= 0.69, (s, got)
    read_share = sum(r["tokens_kept"] + r["tokens_skipped"] for r in report.values()) / total
    print(f"target_share: read {100 * read_share:.1f}% of the corpus for a budget of 10%; "
          f"{ {s: r['files_read'] for s, r in report.items()} } files read")

    # negative control: the byte-share rule (natural lengths) leaves web's long pool short: repeats, flagged
    kept, old = _read(d, budget, reader_cfg=None)
    plan = plan_mixture(kept, d, old.estimate())
    flagged = repeats_while_unread(_manifest_view(plan, old))
    assert "web" in flagged and flagged["web"] > 0.05 * budget, flagged


def test_keep_prob_meets_the_budget_within_3_percent():
    total = sum(int(v.sum()) for v in _corpus()[1].values())
    budget = total // 10
    d = DataConfig(strategy="per-source", upsample_mode="keep_prob", keep_prob=0.1, long_threshold=THR,
                   token_budget=budget, read_margin=0.1, seed=4)
    kept, gate = _read(d, budget)
    plan = plan_mixture(kept, d, gate.estimate())
    planned = sum(plan.planned_tokens().values())
    assert abs(planned - budget) <= 0.03 * budget, (planned, budget)
    assert all(p.repeat_tokens == 0 for p in plan.sources.values())
    # negative control: reading each source's byte share x 1.1 leaves keep_prob far short of the budget
    kept, old = _read(d, budget, reader_cfg=None)
    short = sum(plan_mixture(kept, d, old.estimate()).planned_tokens().values())
    assert short < 0.8 * budget, (short, budget)


def test_budget_reading_is_on_whenever_a_budget_is_set():
    assert data_budget(load_config(None, [])) == (None, None)
    cfg = load_config(None, ["train.token_budget=81920"])
    assert data_budget(cfg) == (81920, "train.token_budget") and cfg.data.budget_read
    assert effective_data_config(cfg).token_budget == 81920 and cfg.data.token_budget is None
    cfg = load_config(None, ["train.token_budget=81920", "data.token_budget=1000000"])
    assert data_budget(cfg) == (1_000_000, "data.token_budget")


def test_the_data_fingerprint_follows_the_training_budget_it_prepares_for():
    a = load_config(None, ["train.token_budget=81920"])
    b = load_config(None, ["train.token_budget=163840"])
    c = load_config(None, ["train.token_budget=163840", "data.token_budget=163840"])
    assert data_fingerprint(a) != data_fingerprint(b) and data_fingerprint(b) == data_fingerprint(c)
    assert data_fingerprint(load_config(None, ["train.token_budget=81920", "data.budget_read=false"])) != \
        data_fingerprint(a)


@pytest.mark.parametrize("strategy,mode,expect", [("per-source", "target_share", "target_share"),
                                                  ("per-source", "keep_prob", "keep_prob"),
                                                  ("cut-seq", "target_share", "natural")])
def test_needs_follow_the_strategy(strategy, mode, expect):
    from longctx.data.budget import mixture_needs

    assert mixture_needs(DataConfig(strategy=strategy, upsample_mode=mode))("web").mode == expect
    d = DataConfig(strategy="sources", upsample_sources=["book"])
    assert mixture_needs(d)("book").mode == "target_share" and mixture_needs(d)("web").mode == "natural"
