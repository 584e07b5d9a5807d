"""The Ray Data evaluation path on a tiny real model: baselines, perplexity, passkey, metrics.json, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longctx import storage
from longctx.config import load_config
from longctx.eval.documents import iter_texts
from longctx.eval.fixtures import save_tiny_llama
from longctx.eval.perplexity import perplexity_by_position
from longctx.eval.runner import ModelSpec, default_model_specs, evaluate_models
from longctx.model.load import load_causal_lm, load_tokenizer
from longctx.model.rope import rotary_inv_freq
from longctx.report import write_report

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    base = save_tiny_llama(root / "base", max_position_embeddings=64, seed=0, initializer_range=0.5)
    trained = save_tiny_llama(root / "trained", max_position_embeddings=128, rope_theta=40000.0, seed=1)
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "y", "(", ")", ":", "=", "+", "if", "else", "for", "in", "range"]
    docs = root / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 300 if i != 2 else 20))}) + "\n")
        f.write("{not json\n")  # a bad line is skipped, not fatal
    lb = root / "longbench"
    lb.mkdir()
    ctx = " ".join(f"Passage {i}: the river {w} flows east." for i, w in enumerate(words * 3))
    with open(lb / "hotpotqa.jsonl", "w") as f:
        for q in ("Which river flows east?", "Where does the river def flow?"):
            f.write(json.dumps({"input": q, "context": ctx, "answers": ["east"], "length": 900, "all_classes": None,
                                "dataset": "hotpotqa", "language": "en", "_id": q}) + "\n")
    with open(lb / "lsht.jsonl", "w") as f:
        f.write(json.dumps({"input": "新闻：今天股市上涨。", "context": "新闻：球队赢了比赛。\n类别：体育", "answers": ["财经"],
                            "length": 50, "all_classes": ["体育", "财经"], "dataset": "lsht", "language": "zh"},
                           ensure_ascii=False) + "\n")
    ibdir = root / "infinitebench"  # InfiniteBench's passkey format, short contexts
    ibdir.mkdir()
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    with open(ibdir / "passkey.jsonl", "w") as f:
        for i, key in enumerate(["71432", "69079"]):
            f.write(json.dumps({"id": i, "context": noise * i + f"The pass key is {key}. Remember it. {key} is the pass "
                                f"key.\n" + noise * 2, "input": "What is the pass key?", "answer": [key],
                                "options": []}) + "\n")
    ruler_data = Path(__file__).parent / "data" / "ruler"
    cfg = load_config(None, [
        f"eval.documents={docs}", "eval.context_length=128", "eval.bucket_edges=[0,64,128]",
        "eval.num_documents=5", "eval.baselines=[naive,pi,dynamic_ntk,yarn]", "eval.batch_size=2",
        "eval.passkey.lengths=[96,128]", "eval.passkey.depths=[0.2,0.8]", "eval.passkey.trials=1",
        "eval.num_actors=2", f"data.tokenizer={base}",
        "eval.needle.enabled=true", "eval.needle.lengths=[192]", "eval.needle.depths=[0.0,1.0]",
        "eval.needle.variants=[single,multi_reasoning]", "eval.needle.num_needles=2",
        "eval.extra_context_lengths=[96]", "eval.longbench.enabled=true", f"eval.longbench.data={lb}", "eval.longbench.max_seq_len=160",
        "eval.ruler.enabled=true", "eval.ruler.lengths=[512]", "eval.ruler.tasks=[niah_single_1,cwe,fwe,qa_1]",
        "eval.ruler.num_samples=2", f"eval.ruler.squad={ruler_data / 'squad.json'}",
        "eval.ruler.tokens_to_generate={niah: 4, common_words_extraction: 4, freq_words_extraction: 4, qa: 4}",
        "eval.infinitebench.enabled=true", f"eval.infinitebench.data={ibdir}", "eval.infinitebench.max_seq_len=160",
    ])
    return cfg, base, trained, str(docs)


def test_default_model_specs_build_the_baselines(setup):
    cfg, base, trained, _ = setup
    specs = default_model_specs(cfg, base, trained)
    assert list(specs) == ["base (naive)", "base + PI x2", "base + dynamic NTK x2", "base + YaRN x2", "Long-PT"]
    assert specs["base + PI x2"].scaling.type == "linear" and specs["base + PI x2"].scaling.factor == 2.0
    assert specs["Long-PT"].role == "trained" and specs["Long-PT"].uri == trained
    # the overrides really reach the rotary embedding: PI halves every frequency, YaRN only the low ones
    naive = rotary_inv_freq(specs["base (naive)"].load(cfg.model))
    pi = rotary_inv_freq(specs["base + PI x2"].load(cfg.model))
    yarn = rotary_inv_freq(specs["base + YaRN x2"].load(cfg.model))
    assert np.allclose(pi.numpy(), naive.numpy() / 2)
    assert yarn[0] == pytest.approx(naive[0].item()) and yarn[-1] == pytest.approx(naive[-1].item() / 2, rel=1e-4)
    # the job's own training-time RoPE override must not leak into the baselines
    cfg2 = cfg.model_copy(deep=True)
    cfg2.model.rope_theta = 1e6
    assert np.allclose(rotary_inv_freq(specs["base (naive)"].load(cfg2.model)).numpy(), naive.numpy())
    assert default_model_specs(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"scaling_factor": 8.0})}),
                               base)["base + PI x8"].scaling.factor == 8.0


@pytest.mark.slow
def test_evaluate_models_through_ray_data(setup, ray_cluster, tmp_path):
    cfg, base, trained, docs = setup
    specs = default_model_specs(cfg, base, trained)
    out = str(tmp_path / "eval")
    metrics = evaluate_models(cfg, specs, out)
    assert json.loads(open(f"{out}/metrics.json").read()) == json.loads(json.dumps(metrics))
    assert metrics["context_length"] == 128 and metrics["base_context_length"] == 64
    m = metrics["models"]
    assert set(m) == set(specs)
    for name, entry in m.items():
        ppl = entry["perplexity"]
        assert ppl["documents"] == 5 and ppl["skipped_short"] == 1, name
        assert ppl["tokens"] == [5 * 63, 5 * 64]
        assert entry["perplexity_at"]["96"]["tokens"] == [5 * 63, 5 * 32]  # the same docs' first 96 tokens
        pk = entry["passkey"]
        assert pk["trials"] == 4 and set(pk["accuracy_by_length"]) == {"96", "128"}
        assert all(0 < v < 20 for v in pk["key_nll_by_length"].values())
        # per-item results (for intervals): the same document and prompt ids for every model, means = aggregates
        items = entry["items"]
        assert items["perplexity"]["128"]["ids"] == m["Long-PT"]["items"]["perplexity"]["128"]["ids"]
        assert np.mean(items["perplexity"]["128"]["nll_beyond_base"]) == pytest.approx(ppl["nll_beyond_base"], abs=1e-5)
        assert items["passkey"]["ids"] == m["Long-PT"]["items"]["passkey"]["ids"] and len(items["passkey"]["ids"]) == 4
        assert np.mean(items["passkey"]["correct"]) == pytest.approx(pk["overall"])
    # the Ray path gives the same numbers as the plain function on one model
    model = load_causal_lm(base).eval()
    direct = perplexity_by_position(model, load_tokenizer(base), iter_texts(docs), 128, [0, 64, 128], 2, limit=5)
    assert m["base (naive)"]["perplexity"]["mean_nll"] == pytest.approx(direct["mean_nll"], rel=1e-5)
    # a baseline with another RoPE gives other numbers beyond the base length
    assert abs(m["base + PI x2"]["perplexity"]["mean_nll"][1] - m["base (naive)"]["perplexity"]["mean_nll"][1]) > 1e-4
    assert metrics["timing_s"]["actors"] == 2
    for name, entry in m.items():  # needle grid and LongBench-format tasks ran through the same actors
        assert set(entry["needle"]) == {"single", "multi_reasoning"}
        grid = entry["needle"]["single"]["grid"]
        assert grid["lengths"] == [192] and grid["depths"] == [0.0, 1.0]
        assert all(0 <= v <= 100 for v in grid["scores"]["192"].values())
        lb = entry["longbench"]
        assert set(lb["scores"]) == {"hotpotqa", "lsht"} and lb["samples"] == {"hotpotqa": 2, "lsht": 1}
        assert lb["truncated"]["hotpotqa"] == 2  # 160-token window: the long passages were middle-truncated
    from longctx.report.markdown import slug
    preds = [json.loads(x) for x in open(f"{out}/longbench/{slug('Long-PT')}/hotpotqa.jsonl")]
    assert len(preds) == 2 and all(set(p) >= {"pred", "answers", "all_classes", "dataset"} for p in preds)
    from longctx.eval.scoring import score_prediction_file
    for name, entry in m.items():  # RULER and InfiniteBench through the same actors, scorable from their files
        ru = entry["ruler"]
        assert list(ru["scores"]) == ["512"] and list(ru["scores"]["512"]) == ["niah_single_1", "cwe", "fwe", "qa_1"]
        assert all(0 <= v <= 100 for v in ru["scores"]["512"].values()) and ru["samples"]["512"]["cwe"] == 2
        assert ru["average"]["512"] == pytest.approx(sum(ru["scores"]["512"].values()) / 4, abs=0.01)
        ri = entry["items"]["ruler"]  # one score per sample, whose task means are RULER's task scores
        assert len(ri["ids"]) == 8 and len(set(ri["ids"])) == 8
        for task, score in ru["scores"]["512"].items():
            assert np.mean([s for s, t in zip(ri["score"], ri["task"]) if t == task]) == pytest.approx(score, abs=0.01)
        folder = f"{out}/ruler/{slug(name)}/512"
        rows = [json.loads(x) for x in open(f"{folder}/niah_single_1.jsonl")]
        assert [set(r) for r in rows] == [{"index", "pred", "input", "outputs", "others", "truncation", "length",
                                          "task"}] * 2  # RULER's prediction fields (call_api.py) + the task
        assert score_prediction_file(folder, print_table=False) == ru["scores"]["512"]
        ibm = entry["infinitebench"]
        assert ibm["samples"] == {"passkey": 2} and 0 <= ibm["scores"]["passkey"] <= 100
        assert score_prediction_file(f"{out}/infinitebench/{slug(name)}/preds_passkey.jsonl",
                                     print_table=False) == ibm["scores"]

    report = write_report(str(tmp_path / "run"), metrics, [("Training", "42 steps")])
    text = open(report).read()
    assert "| base + YaRN x2 |" in text and "64-127†" in text and "## Training" in text and "Verdict:" in text
    assert "### Needle in a haystack" in text and "### LongBench-format tasks" in text
    assert "### RULER" in text and "| base + YaRN x2 | " in text and "**512† tokens**" in text
    assert "### InfiniteBench" in text and '"tokens_to_generate": {"niah": 4' in text
    from longctx.report.markdown import needle_saturated, passkey_saturated

    pngs = ["nll_by_position.png"]
    if passkey_saturated(metrics):  # tiny random models: every passkey at 0% says so instead of a flat plot
        assert "Passkey exact match cannot discriminate here" in text
        assert not (tmp_path / "run" / "passkey_accuracy.png").exists()
    else:
        pngs.append("passkey_accuracy.png")
    if needle_saturated(metrics):
        assert "The needle score cannot discriminate here" in text
    else:
        pngs.append("needle_long-pt_single.png")
    for png in pngs:
        assert open(tmp_path / "run" / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.s3
def test_report_to_s3(s3_bucket):
    metrics = {"context_length": 128, "base_context_length": 64, "models": {
        "base (naive)": {"spec": {"uri": "m", "role": "naive"}, "perplexity": {
            "buckets": [[0, 64], [64, 128]], "mean_nll": [2.0, 3.2], "perplexity": [7.39, 24.5], "tokens": [63, 64],
            "overall_nll": 2.6, "nll_beyond_base": 3.2, "documents": 1, "skipped_short": 0}},
        "Long-PT": {"spec": {"uri": "t", "role": "trained"}, "perplexity": {
            "buckets": [[0, 64], [64, 128]], "mean_nll": [1.8, 1.7], "perplexity": [6.05, 5.47], "tokens": [63, 64],
            "overall_nll": 1.75, "nll_beyond_base": 1.7, "documents": 1, "skipped_short": 0}}}}
    uri = write_report(f"{s3_bucket}/runs/r1", metrics)
    text = storage.read_text(uri)
    assert "**Verdict:** Long-PT: best on NLL beyond 64 tokens; loses on none of them." in text
    assert "- NLL beyond 64 tokens (lower is better): Long-PT 1.70; best other: base (naive) 3.20." in text
    assert storage.read_bytes(f"{s3_bucket}/runs/r1/nll_by_position.png")[:4] == b"\x89PNG"
