"""Budget-aware reading (data/budget.py) through real Ray Data: over a corpus 20x larger than the token budget,
pass 1 reads no more than the plan says, counted per source (files and records), in the seeded shuffled file
order; the plan still hits the budget and the sources' shares; the manifest records what was read and skipped.
It is on by default: the budget here is train.token_budget alone, with the default read_margin. Negative control:
without a budget the same corpus is read whole. (The mixture-aware needs and repeats: test_data_budget_plan.py.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from longctx.config import SourceSpec, load_config
from longctx.data.budget import BudgetReader
from longctx.data.sources import list_files

pytestmark = [pytest.mark.ray]

WORDS = [f"w{i}" for i in range(200)] + "the of and to in is for on that with".split()
FILES = {"big": 48, "small": 16}   # files per source; every file holds RECORDS records of similar length
RECORDS = 20
MARGIN = 0.1  # data.read_margin's default


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-corpus")
    rng = np.random.default_rng(5)
    for s, n in FILES.items():
        (root / s).mkdir()
        for f in range(n):
            with open(root / s / f"part-{f:03d}.jsonl", "w") as fh:
                for r in range(RECORDS):
                    words = rng.choice(WORDS, int(rng.integers(80, 120)))
                    fh.write(json.dumps({"text": " ".join(words), "id": f"{s}/{f}/{r}"}) + "\n")
    return root


def _cfg(root, **over):
    sets = ["data.seq_len=256", "data.long_threshold=128", "data.num_tokenize_actors=1",
            "ray.data_cpus_per_task=0.25", "data.seed=2", "data.rows_per_shard=500"]
    sets += [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, sets)
    cfg.data.sources = {s: SourceSpec(uri=str(root / s), id_field="id") for s in FILES}
    return cfg


@pytest.mark.slow
def test_budget_reading_reads_only_what_the_plan_needs_and_says_so(ray_cluster, corpus, tmp_path):
    from longctx.data.pipeline import pack_and_publish
    from longctx.data.token_cache import tokenize_corpus

    # The whole corpus, read without a budget (also the negative control: everything is read).
    full = tokenize_corpus(_cfg(corpus), None, with_tokens=False)
    lengths = full.source_lengths()
    total_records = sum(FILES.values()) * RECORDS
    assert full.good == total_records
    total_tokens = sum(int(v.sum()) for v in lengths.values())
    budget = total_tokens // 20

    cfg = _cfg(corpus, **{"train.token_budget": budget})  # data.token_budget unset: reading follows it
    (tmp_path / "work").mkdir()
    cache = tokenize_corpus(cfg, str(tmp_path / "work"))
    read = cache.read["sources"]
    file_tokens = {s: int(lengths[s].sum()) / FILES[s] for s in FILES}  # about equal files within a source
    for s in FILES:
        r = read[s]
        need = budget * FILES[s] / sum(FILES.values()) * (1 + MARGIN)  # byte shares: files are alike
        assert r["need_tokens"] == pytest.approx(need, rel=0.1)
        # reads stop at the need: kept tokens pass it by less than one record, and no more files than needed
        assert r["need_tokens"] <= r["tokens_kept"] < r["need_tokens"] + int(lengths[s].max())
        assert r["files_read"] <= int(np.ceil(r["need_tokens"] / (0.9 * file_tokens[s]))) + 1, r
        assert r["files_read"] + r["files_skipped"] == FILES[s]
        assert r["records_kept"] + r["records_skipped"] <= r["files_read"] * RECORDS
        # the whole-source estimate from what was read is close to the truth
        assert r["estimated_tokens"] == pytest.approx(int(lengths[s].sum()), rel=0.1)
    records_read = sum(r["records_kept"] + r["records_skipped"] for r in read.values())
    print(f"budget 1/20 of the corpus: {records_read} of {total_records} records read "
          f"({100 * records_read / total_records:.1f}%), files {[read[s]['files_read'] for s in FILES]} of "
          f"{list(FILES.values())}")
    # the plan's need in whole files, plus the file the stop falls in, per source: about 1/20 x 1.25 of the corpus
    # here plus file granularity (the small source needs about one file)
    planned_files = sum(int(np.ceil(read[s]["need_tokens"] / (0.9 * file_tokens[s]))) + 1 for s in FILES)
    assert records_read <= planned_files * RECORDS < total_records / 5

    # what was cached comes from the first files of each source's seeded shuffled order, nothing else
    reader = BudgetReader(list_files(cfg.data.source_specs()), budget, MARGIN, cfg.data.seed, data_cfg=cfg.data)
    for s in FILES:
        order = [t.uri.rsplit("part-", 1)[1][:3] for t in reader.order if t.source == s]
        ids = cache.read_source(s).column("doc_id")
        files = {x.split("/")[1] for x in pc.unique(ids).to_pylist()}
        # a prefix of the order (files read after the need was met, while the other source caught up, are
        # counted as read and their records as skipped: not cached)
        assert files == {str(int(f)) for f in order[: len(files)]} and len(files) <= read[s]["files_read"]
        assert order != sorted(order)  # shuffled

    # the plan and the manifest: exact budget, shares by the whole-source estimate, read/skipped recorded
    manifest = pack_and_publish(cfg, cache, str(tmp_path / "out"), quiet=True)
    assert manifest["token_budget"]["planned"] == budget
    assert manifest["token_budget"]["from"] == "train.token_budget" and manifest["token_budget"]["repeat_tokens"] == 0
    assert manifest["input"]["read"]["sources"]["big"]["files_skipped"] > 0
    shares = {s: manifest["sources"][s]["out_share"] for s in FILES}
    true = {s: int(lengths[s].sum()) / total_tokens for s in FILES}
    for s in FILES:
        assert shares[s] == pytest.approx(true[s], abs=0.03), (shares, true)

    # the same run with the tokenizer actors writing the cache themselves (prepare_data's way: the driver gets
    # lengths and row-group locations only): same lengths, row groups, read report and byte-identical shards;
    # a row group the budget stop cut keeps its first records
    (tmp_path / "work2").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    cache2 = tokenize_corpus(cfg, str(tmp_path / "work2"), shared_root=str(shared))
    assert cache2.chunks and cache2.root == str(shared) and not cache.chunks
    assert cache2.read == cache.read and cache2.row_groups == cache.row_groups
    for s in FILES:
        assert np.array_equal(cache2.source_lengths()[s], cache.source_lengths()[s])
    assert sum(1 for _ in shared.iterdir()) > len(FILES)  # one file per tokenized block and source
    manifest2 = pack_and_publish(cfg, cache2, str(tmp_path / "out2"), quiet=True)
    assert [s["sha256"] for s in manifest2["shards"]] == [s["sha256"] for s in manifest["shards"]]
