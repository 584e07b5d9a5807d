"""The study's verdict rules on hand-made numbers (the end-to-end run is tests/test_study.py): a synthetic study
folder of saved per-trial metrics with per-item results, read back by trial_numbers, decided by intervals into
held, did not hold and undecided, and recomputed from the saved files."""

from __future__ import annotations

import json
import zlib

import numpy as np

from longctx.report.intervals import FAILED, HELD, NOT_RUN, UNDECIDED
from longctx.runs.study import rope_grid_point
from longctx.runs.study_report import (TARGET_DATA, TARGET_NIAH_NAIVE, TARGET_NLL, TARGET_PASSKEY_NAIVE,
                                       TARGET_PASSKEY_SFT, TARGET_PASSKEY_SFT_PLAIN, TARGET_ROPE, TARGETS,
                                       trial_numbers, verdict_lines, verdicts, write_study_report)

CTX, PK = 64, 32
DOCS = [f"doc-{i:02d}" for i in range(30)]
BASE_NLL = np.random.default_rng(0).normal(3.5, 0.5, len(DOCS))  # a per-document effect every model shares


def _entry(role: str, shift: float, *, seed: int = 0, noise: float = 0.01, passkey: int | None = None,
           niah: int | None = None, docs=DOCS, base=BASE_NLL) -> dict:
    """One model's metrics.json entry: documents at BASE_NLL + shift (+ noise), `passkey` of 20 prompts
    correct, `niah` of 20 NIAH samples right."""
    rng = np.random.default_rng(zlib.crc32(f"{role} {seed} {shift}".encode()))
    nll = base + shift + rng.normal(0, noise, len(docs))
    items = {"perplexity": {str(CTX): {"ids": list(docs), "nll_within_base": [3.0] * len(docs),
                                       "nll_beyond_base": [round(float(x), 6) for x in nll]}}}
    entry = {"spec": {"role": role}, "perplexity": {"nll_beyond_base": float(np.mean(nll)), "nll_within_base": 3.0,
                                                    "context_length": CTX}, "items": items}
    if passkey is not None:
        items["passkey"] = {"ids": [f"passkey-{PK}-0.5-{t}-{1000 + t}" for t in range(20)], "length": [PK] * 20,
                            "correct": [int(t < passkey) for t in range(20)]}
        entry["passkey"] = {"accuracy_by_length": {str(PK): passkey / 20}}
    if niah is not None:
        items["ruler"] = {"ids": [f"ruler-{PK}-niah_single_1-{t}" for t in range(20)], "length": [PK] * 20,
                          "task": ["niah_single_1"] * 20, "score": [100.0 * (t < niah) for t in range(20)]}
    return entry


def _write(root, trial, models, folder="eval"):
    path = root / "trials" / trial / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"models": models}))


def _study(root, *, pi_shift=0.3, per_source_shift=-0.002):
    """A two-seed study whose Long-PT is clearly best, with PI at `pi_shift` nats and per-source upsampling at
    `per_source_shift` against global."""
    plan = {"parts": "abcd", "steps": 2, "context_length": CTX, "base_length": 16, "passkey_length": PK,
            "rope_bound": 1e5, "seeds": [0, 1], "sources": ["c", "code"], "niah_tasks": ["niah_single_1"],
            "a_trials": {"0": "a-long-pt-s0", "1": "a-long-pt-s1"},
            "rope_trials": {"80000": "a-long-pt-s0", "113900": "d-rope-113900"},
            "b_models": {f"{s} s{k}": {"strategy": s, "seed": k} for s in ("per-source", "global", "cut-at-base")
                         for k in (0, 1)}}
    (root / "plan.json").write_text(json.dumps(plan))
    naive = _entry("naive", 0.6, passkey=0, niah=3)
    pi = _entry("pi", 0.6 if pi_shift is None else pi_shift, passkey=0, niah=0)
    if pi_shift is None:  # PI = naive +- 0.05 nats per document, alternating: a difference of exactly 0
        col = json.loads(json.dumps(naive["items"]["perplexity"][str(CTX)]))
        col["nll_beyond_base"] = [x + (0.05 if j % 2 else -0.05) for j, x in enumerate(col["nll_beyond_base"])]
        pi = {**pi, "items": {**pi["items"], "perplexity": {str(CTX): col}}}
    _write(root, "a-long-pt-s0", {
        "base (naive)": naive, "PI": pi,
        "NTK": _entry("dynamic_ntk", 0.1, passkey=18, niah=10), "YaRN": _entry("yarn", 0.1, passkey=17, niah=9),
        "Long-PT": _entry("trained", 0.0, passkey=17, niah=9)})
    _write(root, "a-long-pt-s1", {"Long-PT": _entry("trained", 0.01, seed=1, passkey=16, niah=8)})
    _write(root, "c-long-sft-chat", {"Long-PT": _entry("long_pt", 0.0, passkey=17, niah=9),
                                     "Long-PT + long-SFT (chat)": _entry("long_sft_chat", 0.0, passkey=20, niah=12)})
    _write(root, "c-long-sft-plain", {"Long-PT + long-SFT (plain text)": _entry("long_sft_plain", 0.0, passkey=10)})
    _write(root, "d-rope-113900", {"Long-PT": _entry("trained", -0.05)})
    for src, off in (("c", 0.0), ("code", 0.7)):
        docs = [f"{d}-{src}" for d in DOCS]
        _write(root, "b-strategies", {
            f"{s} s{k}": _entry(s, off + shift, seed=k, docs=docs, noise=0.01)
            for s, shift in (("per-source", per_source_shift), ("global", 0.0), ("cut-at-base", 0.005))
            for k in (0, 1)}, folder=f"eval-{src}")


def _status(nums):
    return {v["target"]: v["status"] for v in verdicts(nums)}


def test_rope_grid_point_at_the_bound_is_never_below_it():
    bound = 113834.65286067824
    assert rope_grid_point(bound, 1.0) == 113900.0 >= bound
    assert rope_grid_point(bound, 0.1) == 11390.0 and rope_grid_point(bound, 10.0) == 1139000.0
    assert rope_grid_point(1e4, 1.0) == 1e4  # exact values stay exact


def test_verdict_kinds_from_saved_items_and_recomputed(tmp_path):
    _study(tmp_path)
    nums = trial_numbers(str(tmp_path))
    assert nums["a"]["Long-PT"]["seeds"] == 2 and nums["b"]["per-source"]["seeds"] == 2
    assert set(nums["items"]["b"]["per-source"]["nll_beyond_base"]["1"]) == {f"{s}/{d}-{s}" for s in ("c", "code")
                                                                            for d in DOCS}
    v = verdicts(nums)
    status = {x["target"]: x["status"] for x in v}
    assert [x["target"] for x in v] == list(TARGETS)
    assert status[TARGET_NLL] == HELD  # every link by >= 0.1 nats over documents that agree to 0.01
    assert status[TARGET_PASSKEY_NAIVE] == HELD  # 0 of 20
    assert status[TARGET_NIAH_NAIVE] == UNDECIDED  # 3 of 20 = 15%: the interval straddles 10%
    assert status[TARGET_PASSKEY_SFT] == HELD and status[TARGET_PASSKEY_SFT_PLAIN] == FAILED  # 20/20, 10/20
    assert status[TARGET_DATA] == UNDECIDED  # per-source 0.002 nats better than global with 0.01 noise: no call
    assert status[TARGET_ROPE] == HELD  # the bound's point 0.05 nats better than 8e4
    nll = next(x for x in v if x["target"] == TARGET_NLL)
    assert len(nll["intervals"]) == 5 and all(i["lo"] <= i["point"] <= i["hi"] for i in nll["intervals"])
    link = nll["intervals"][0]  # Long-PT - YaRN over two seeds x 30 documents
    assert link["seeds"] == 2 and link["items"] == 30 and abs(link["point"] - (0.005 - 0.1)) < 0.01
    assert "Long-PT - YaRN -0.09" in nll["detail"] and "held" in nll["detail"]
    # the report's first lines count each kind, then give the verdicts
    report = (tmp_path / "report.md")
    write_study_report(str(tmp_path), nums, v)
    lines = report.read_text().splitlines()
    assert lines[2] == "Verdicts: 4 held, 1 did not hold, 2 undecided, 0 not run."
    assert lines[6:6 + len(TARGETS)] == verdict_lines(v)
    # recomputed from the saved files: the same numbers and verdicts (the bootstrap is seeded)
    saved = json.loads(json.dumps({"numbers": nums, "verdicts": v}))
    again = trial_numbers(str(tmp_path))
    assert json.loads(json.dumps(again)) == saved["numbers"]
    assert json.loads(json.dumps(verdicts(again))) == saved["verdicts"]


def test_each_kind_moves_with_the_saved_items(tmp_path):
    # negative controls: the same targets decided the other way when the saved items say so
    _study(tmp_path, pi_shift=0.8, per_source_shift=-0.05)
    status = _status(trial_numbers(str(tmp_path)))
    assert status[TARGET_NLL] == FAILED  # PI worse than naive (what the toy run measured), by 0.2 nats
    assert status[TARGET_DATA] == HELD  # per-source 0.05 nats better than global and cut-at-base in both sources
    _study(tmp_path, pi_shift=None)  # PI equal to naive on average, +-0.05 per document: that link is undecided
    assert _status(trial_numbers(str(tmp_path)))[TARGET_NLL] == UNDECIDED
    # the verdicts read the items, not the means: a saved mean alone does not move them
    path = tmp_path / "trials" / "a-long-pt-s0" / "eval" / "metrics.json"
    ev = json.loads(path.read_text())
    ev["models"]["base (naive)"]["perplexity"]["nll_beyond_base"] = 0.0
    path.write_text(json.dumps(ev))
    assert _status(trial_numbers(str(tmp_path)))[TARGET_NLL] == UNDECIDED
    # ... while items that no longer pair (a document missing for one model) are refused, not silently dropped
    ev["models"]["YaRN"]["items"]["perplexity"][str(CTX)]["ids"][0] = "doc-other"
    path.write_text(json.dumps(ev))
    try:
        verdicts(trial_numbers(str(tmp_path)))
    except ValueError as e:
        assert "not the same items" in str(e)
    else:
        raise AssertionError("a wrong pairing went through")


def test_parts_not_run_say_so():
    status = _status({"plan": {}, "items": {}})
    assert set(status.values()) == {NOT_RUN} and len(status) == len(TARGETS)
