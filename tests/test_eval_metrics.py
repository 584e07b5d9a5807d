"""LongBench metrics and scoring rules against hand-computed cases (English and Chinese)."""

from __future__ import annotations

import json

import pytest

from longctx import storage
from longctx.eval import metrics as M
from longctx.eval.longbench import score_predictions, score_rows


def test_qa_f1_english_normalisation():
    # pred -> [eiffel, tower, in, paris] (article, comma, "!" gone), gold -> [eiffel, tower]: P=1/2, R=1
    assert M.qa_f1_score("The Eiffel Tower, in Paris!", "Eiffel tower") == pytest.approx(2 / 3)
    assert M.qa_f1_score("an apple", "the apple") == 1.0
    assert M.qa_f1_score("nothing", "else") == 0.0
    assert M.normalize_answer("  The  U.S.A. is  a country ") == "usa is country"


def test_qa_f1_chinese_uses_jieba_words():
    assert M.jieba_cut("我们今天去北京大学看书。") == ["我们", "今天", "去", "北京大学", "看书", "。"]
    # "。" normalises to "" and is dropped: 5 predicted words, 1 gold word, 1 shared -> P=1/5, R=1, F1=1/3
    assert M.qa_f1_zh_score("我们今天去北京大学看书。", "北京大学") == pytest.approx(1 / 3)
    assert M.normalize_zh_answer("Ｈｅｌｌｏ，世界！ ") == "ｈｅｌｌｏ世界"


def test_rouge_l_matches_the_rouge_package_semantics():
    # one sentence: distinct words m=n=5, LCS "the cat on the mat" -> word set {the,cat,on,mat} = 4
    assert M.rouge_l_f("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(2 * 0.64 / (1.6 + 1e-8), abs=1e-12)
    # summary level: union LCS over "."-split sentences finds all four words (a plain LCS would find 3)
    assert M.rouge_l_f("a b. c d", "a c. b d") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)
    # an empty hypothesis makes the package raise; LongBench turns that into 0
    assert M.rouge_score("", "a b") == 0.0 and M.rouge_score("...", "a b") == 0.0


def test_rouge_zh():
    # jieba: 会议 讨论 了 预算 和 人员 安排 。 (8 distinct) vs 会议 讨论 了 人员 安排 (5): LCS 5 -> R=1, P=5/8
    assert M.rouge_zh_score("会议讨论了预算和人员安排。", "会议讨论了人员安排") == pytest.approx(2 * (5 / 8) / (13 / 8 + 1e-8), abs=1e-12)


def test_rouge_recursion_parity():
    # rouge 1.0.1 reconstructs the LCS recursively; LongBench scores its RecursionError as 0.
    ok = "x " + "b " * 984  # backtracking path: 991 nested calls, the most that fit under LongBench's stack
    too_long = "x " + "b " * 985
    ref = "x a a a a a"
    assert M.rouge_l_f(ok.strip(), ref) > 0.4
    assert M.rouge_l_f(too_long.strip(), ref) == 0.0
    assert M.rouge_l_f(too_long.strip(), ref, recursion_parity=False) > 0.4
    assert M.rouge_l_f(ok.strip(), ref, extra_frames=1) == 0.0  # Chinese ROUGE has one more frame below


def test_classification_keeps_longbench_quirks():
    classes = ["Location", "Human being", "Entity"]
    assert M.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert M.classification_score("Location or Entity", "Location", all_classes=classes) == 0.5
    assert M.classification_score("no idea", "Location", all_classes=classes) == 0.0
    # "A" (a strict substring of the answer) is removed while iterating, so "B" is never examined: 1/2
    assert M.classification_score("AB", "AB", all_classes=["A", "B", "AB"]) == 0.5


def test_count_and_retrieval():
    assert M.count_score("There are 3 unique paragraphs out of 5", 3) == 0.5
    assert M.count_score("none", 3) == 0.0
    assert M.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert M.retrieval_score("Paragraph 1 or 12", "Paragraph 12") == 0.5
    assert M.retrieval_zh_score("答案是段落3", "段落3") == 1.0
    with pytest.raises(ValueError, match="Paragraph N"):
        M.retrieval_score("1", "no id here")


def test_code_similarity_is_fuzzywuzzy_ratio():
    # first line without ` # // is "x = foo(1)"; difflib matches 9 of 10+10 chars -> 90
    assert M.code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == 0.9
    # 100 x 2/16 = 12.5 rounds half to even, as fuzzywuzzy's int(round(...)) does
    assert M.fuzz_ratio("abcdefgh", "azzzzzzz") == 12
    assert M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("", "a") == 0
    # difflib's greedy longest block ("b" of "bab" with the last "b" of "acb") finds 1 match: 2/6 -> 33;
    # the InDel ratio of python-Levenshtein / rapidfuzz uses the LCS "ab": 4/6 -> 67
    assert M.fuzz_ratio("bab", "acb") == 33 and M.fuzz_ratio("bab", "acb", "indel") == 67


def test_dataset_rules_first_line_max_over_answers_rounding():
    classes = ["Location", "Human being"]
    # trec: only the first line counts ("Location"), else both classes would match (0.5)
    assert M.score_dataset("trec", ["\nLocation\nHuman being"], [["Location"]], classes) == 100.0
    # no first-line rule for hotpotqa: 3 predicted words, 1 gold -> P=1/3, R=1, F1=1/2
    assert M.score_dataset("hotpotqa", ["Location\nHuman being"], [["Location"]]) == 50.0
    # max over answers; 1 of 3 right -> 33.33
    assert M.score_dataset("hotpotqa", ["paris", "x", "y"], [["london", "paris"], ["z"], ["w"]]) == 33.33
    e = M.score_dataset_e("hotpotqa", ["x", "y", "z", "x"], [["x"], ["x"], ["z"], ["w"]], [1000, 5000, 9000, 3999])
    assert e == {"0-4k": 50.0, "4-8k": 0.0, "8k+": 100.0}
    assert M.score_dataset_e("hotpotqa", ["x"], [["x"]], [10]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}
    assert M.qa_f1_score("a", "a") == 0.0  # articles vanish in normalisation: nothing left to match


def test_category_averages():
    cats = M.category_averages({"hotpotqa": 40, "2wikimqa": 20, "narrativeqa": 30, "lcc": 60, "dureader": 10})
    assert cats["en"] == {"Single-Doc QA": 30.0, "Multi-Doc QA": 30.0, "Code Completion": 60.0, "Avg": 40.0}
    assert cats["zh"] == {"Multi-Doc QA": 10.0, "Code Completion": 60.0, "Avg": 35.0}


def test_score_predictions_file(tmp_path, capsys):
    rows = [
        {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "dataset": "hotpotqa", "length": 100},
        {"pred": "Rome", "answers": ["Paris"], "all_classes": None, "dataset": "hotpotqa", "length": 5000},
        {"pred": "Location\nx", "answers": ["Location"], "all_classes": ["Location", "Entity"], "dataset": "trec"},
        {"pred": "B", "answers": ["B) two"], "all_classes": None, "dataset": "leval_quality", "metric": "exam"},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = score_predictions(str(path), str(tmp_path / "scores.json"))
    assert scores == {"hotpotqa": 50.0, "trec": 100.0, "leval_quality": 100.0}
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert "hotpotqa" in capsys.readouterr().out
    with pytest.raises(ValueError, match="length"):
        score_rows(rows[2:3], longbench_e=True)
    with pytest.raises(ValueError, match="missing field 'pred'"):
        score_rows([{"answers": ["x"], "dataset": "hotpotqa"}])


@pytest.mark.s3
def test_score_predictions_on_s3(s3_bucket):
    storage.write_text(f"{s3_bucket}/p/preds.jsonl",
                       json.dumps({"pred": "北京大学", "answers": ["北京大学"], "all_classes": None, "dataset": "multifieldqa_zh"}) + "\n")
    assert score_predictions(f"{s3_bucket}/p/preds.jsonl", f"{s3_bucket}/p/scores.json", print_table=False) == {"multifieldqa_zh": 100.0}
    assert json.loads(storage.read_text(f"{s3_bucket}/p/scores.json")) == {"multifieldqa_zh": 100.0}


def test_all_classes_shared_or_per_sample():
    shared = ["Location", "Entity"]
    per_row = [["Location", "Entity"], None]
    preds, golds = ["Location", "Entity"], [["Location"], ["Entity"]]
    assert M.score_dataset("trec", preds, golds, shared) == 100.0
    assert M.score_dataset("trec", preds, golds, per_row) == 50.0  # no classes for row 2: nothing can match
