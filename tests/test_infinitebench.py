"""InfiniteBench's self-scored tasks: its scoring rules on hand-written cases, its prompts, and `eval score`.

Expected outcomes follow OpenBMB/InfiniteBench 88b3daa (src/compute_scores.py, src/prompt.py,
src/eval_utils.py); several predictions are the shapes its published results files hold.
"""

from __future__ import annotations

import json

import pytest

from longctx.cli import main
from longctx.config import InfiniteBenchConfig
from longctx.eval import infinitebench as ib
from longctx.model.load import load_tokenizer


@pytest.mark.parametrize("task,pred,label,expected", [
    ("passkey", "71432.", "71432", True),
    ("passkey", "The pass key is 71432. Remember it.", ["71432"], True),
    ("passkey", "7143", "71432", False),
    ("passkey", "key 12345 then 71432", "71432", False),  # the first integer only
    ("number_string", "30000\nThe grass is green.", "3000077442", False),
    ("number_string", " 3000077442 is the sequence", ["3000077442"], True),
    ("kv_retrieval", '060f3306-5ad1-42a9-a8de-f2a118b33744\n\n\nKey: "798c2306-5',
     "5e6b7b90-710d-4953-9b18-3e96b2cadbf2", False),
    ("kv_retrieval", 'The value is "5e6b7b90-710d-4953-9b18-3e96b2cadbf2".', "5e6b7b90-710d-4953-9b18-3e96b2cadbf2", True),
    ("kv_retrieval", "5e6b7b90-710d-4953-9b18-3e96b2cadbf2", ["5e6b7b90-710d-4953-9b18-3e96b2cadbf2"], True),
    ("kv_retrieval", "5e6b7b90-710d-4953-9b18-3e96b2cadbf2x", "5e6b7b90-710d-4953-9b18-3e96b2cadbf2", False),
    ("math_find", "88\n\nThe smallest number of the list is: 1", 88, True),
    ("math_find", "94", [94], True),
    ("math_find", "The answer is 45.8", 45, False),  # InfiniteBench raises on int("45.8"); scored wrong here
    ("math_find", "45.8", 45.8, True),
    ("math_find", "no number", 3, False),
    ("code_debug", "B. repack_carchive", ["repack_carchive", "B"], True),
    ("code_debug", "\n\n    A\n    B\n    C\n    D\n", ["repack_carchive", "B"], False),
    ("code_debug", "The answer is: B", ["repack_carchive", "B"], True),
    ("code_debug", "the buggy one is: `repack_carchive`", ["repack_carchive", "B"], True),
    ("code_debug", "The correct option is:", ["repack_carchive", "B"], False),  # ends with the prefix
    ("code_debug", "answer: C", ["repack_carchive", "B"], False),
    ("longbook_choice_eng", ":\n\nDear reader,\n\nThe answer to your question is C. Snowfield.", ["Snowfield", "C"], True),
    ("longbook_choice_eng", "A", ["Snowfield", "C"], False),
    ("longbook_choice_eng", "Snowfield", ["Snowfield", "C"], True),
    ("longbook_choice_eng", "I think the answer is: Snowfield, clearly", ["Snowfield", "C"], True),
    ("longbook_choice_eng", "", ["Snowfield", "C"], False),
])
def test_official_scoring_rules(task, pred, label, expected):
    assert ib.score_one(task, pred, label) == float(expected)


def test_scores_are_percent_per_task():
    rows = [{"task": "passkey", "prediction": "71432.", "ground_truth": "71432"},
            {"task": "passkey", "pred": "1", "label": "71432"},
            {"task": "passkey", "prediction": "71432", "ground_truth": "71432"},
            {"task": "code_debug", "prediction": "B.", "ground_truth": ["f", "B"]}]
    assert ib.score_infinitebench_rows(rows) == {"passkey": 66.67, "code_debug": 100.0}
    with pytest.raises(ValueError, match="prediction 0: no `ground_truth` or `label`"):
        ib.score_infinitebench_rows([{"task": "passkey", "prediction": "1"}])


def _write(folder, task, records):
    with open(folder / f"{task}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_prompts_use_infinitebenchs_templates(tmp_path):
    tok = load_tokenizer("builtin:tiny-tokenizer")
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    _write(tmp_path, "passkey", [{"id": 0, "context": noise * 3 + "The pass key is 71432. Remember it. 71432 is the pass "
                                  "key.\n" + noise * 200, "input": "What is the pass key?", "answer": ["71432"],
                                  "options": []}])
    _write(tmp_path, "math_find", [{"id": 0, "context": "[3, 88, 5]", "input": "The largest number of the list is: ",
                                    "answer": [88], "options": []}])
    _write(tmp_path, "code_debug", [{"id": 0, "context": "def f():\n    return 1/0\n", "input": "",
                                     "answer": ["f"], "options": ["g", "f", "h", "k"]}])
    st = InfiniteBenchConfig(enabled=True, data=str(tmp_path))
    by_task = {s.task: s for s in ib.build_prompts(tok, st, max_seq_len=512)}
    assert set(by_task) == {"passkey", "math_find", "code_debug"}
    pk = by_task["passkey"]
    assert pk.truncated and len(pk.input_ids) == 512 - 6 and pk.max_new_tokens == 6 and pk.ground_truth == ["71432"]
    text = tok.decode(pk.input_ids)
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                           "it. I will quiz you about the important information.\n\n")
    assert text.endswith(noise + "\n\nWhat is the pass key?\n\nThe pass key is")
    mf = tok.decode(by_task["math_find"].input_ids)
    # the question's "The largest number of" becomes the prefix's "the largest number"
    assert mf == "What is the largest number in the following list?\n\n[3, 88, 5]\n\nThe largest number of the list is: "
    cd = by_task["code_debug"]
    assert cd.ground_truth == ["f", "B"] and cd.max_new_tokens == 5
    assert tok.decode(cd.input_ids).endswith("Options:\nA. g\nB. f\nC. h\nD. k\n\nThe correct option is:")
    with pytest.raises(FileNotFoundError, match="no kv_retrieval.jsonl"):
        ib.build_prompts(tok, InfiniteBenchConfig(data=str(tmp_path), tasks=["kv_retrieval"]), 512)
    _write(tmp_path, "longbook_choice_eng", [{"id": 0, "context": "x", "input": "q?", "answer": ["zz"],
                                              "options": ["a", "b", "c", "d"]}])
    with pytest.raises(ValueError, match="longbook_choice_eng.jsonl:1: not an InfiniteBench longbook_choice_eng record"):
        ib.build_prompts(tok, st, 512)


def test_eval_score_scores_each_row_by_its_benchmark(tmp_path, capsys):
    (tmp_path / "preds_passkey.jsonl").write_text(
        json.dumps({"id": 0, "prediction": "71432.", "ground_truth": "71432"}) + "\n"
        + json.dumps({"id": 1, "prediction": "99", "ground_truth": "71432"}) + "\n")
    (tmp_path / "niah_single_1.jsonl").write_text(  # RULER's own prediction file: the task is the file name
        json.dumps({"index": 0, "pred": " 1234567", "input": "", "outputs": ["1234567"], "others": {},
                    "truncation": -1, "length": 300}) + "\n")
    (tmp_path / "longbench.jsonl").write_text(  # LongBench rows beside them keep LongBench's rules
        json.dumps({"pred": "east", "answers": ["east"], "all_classes": None, "dataset": "hotpotqa"}) + "\n")
    out = tmp_path / "scores.json"
    assert main(["eval", "score", "--predictions", str(tmp_path), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"hotpotqa": 100.0, "niah_single_1": 100.0, "passkey": 50.0}
    assert "RULER average over 1 task(s): 100.00 (RULER's tables average all 13)" in capsys.readouterr().out
