"""RULER: samples in RULER's templates and formats, string for string what RULER's own scripts write; scoring
equal to RULER's evaluate.py on the same predictions; the shipped tiny model retrieving on niah_single_1 at its
own 256 tokens.

Expected strings are RULER's (NVIDIA/RULER c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a, scripts/data/synthetic/
constants.py and niah.py, scripts/eval/synthetic/constants.py); tests/data/ruler/reference.jsonl.gz holds rows
RULER's own prepare.py wrote at that commit, reference_scores.json what its evaluate.py scored for seeded
predictions on them (scripts/ruler_reference.py says how).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from longctx.config import RulerConfig, load_config
from longctx.eval.ruler.constants import TASK_NAMES
from longctx.eval.ruler.generate import generate_ruler, prompt_ids, token_counter, tokens_to_generate
from longctx.eval.ruler.score import (postprocess_pred, score_ruler_rows, string_match_all, string_match_part,
                                      summarize, weighted_averages)
from longctx.eval.ruler.synthetic import RulerLengthError
from longctx.eval.ruler.words import AdjNounWords, niah_words, word_lists, zeta
from longctx.model.load import load_tokenizer

DATA = Path(__file__).parent / "data" / "ruler"
LENGTHS = [2048, 4096]

# RULER's templates and answer prefixes, verbatim from its scripts/data/synthetic/constants.py
NIAH_T = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
          "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
          "for {query} mentioned in the provided text?")
NIAH_P = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_T = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
        "Find all variables that are assigned the value {query} in the text above.")
VT_P = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: ")
CWE_T = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
         "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_P = " Answer: The top 10 words that appear most often in the list are:"
FWE_T = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
         "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
         "What are the three most frequently appeared words in the above coded text?")
FWE_P = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_T = ("Answer the question based on the given documents. Only give me the answer and do not output any other words."
        "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only "
        "give me the answer and do not output any other words.\n\nQuestion: {query}")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NUMBER, UUID = r"\d{7}", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
WORD = r"[a-zA-Z' ]+(?:-[a-zA-Z' ]+)+"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-tokenizer")


@pytest.fixture(scope="module")
def settings():
    return RulerConfig(squad=str(DATA / "squad.json"), hotpotqa=str(DATA / "hotpotqa.json"), num_samples=2)


@pytest.fixture(scope="module")
def samples(tok, settings):
    return generate_ruler(tok, settings, LENGTHS)


def _singular(t: str) -> str:  # niah.py's edits when one value is asked for
    return t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _split(template: str, row_input: str) -> tuple[str, str]:
    """(text before {context}, text after it) of a formatted template, checked against the row."""
    head, _, tail = template.partition("{context}")
    assert row_input.startswith(head), (head[:80], row_input[:80])
    assert row_input.endswith(tail), (tail[-80:], row_input[-80:])
    return head, row_input[len(head):len(row_input) - len(tail)]


def test_every_task_in_rulers_templates_and_formats(samples, tok, settings):
    count = token_counter(tok)
    for length in LENGTHS:
        assert list(samples[length]) == list(TASK_NAMES)
        for task, rows in samples[length].items():
            assert [r["index"] for r in rows] == [0, 1]
            for r in rows:
                assert set(r) >= {"index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix"}
                assert r["length"] == count(r["input"] + r["answer_prefix"]) + tokens_to_generate(settings, task)
                assert r["length"] <= length, (task, length)
                _check_format(task, r, length)


def _check_format(task: str, r: dict, length: int) -> None:
    inp, out, prefix = r["input"], r["outputs"], r["answer_prefix"]
    if task.startswith("niah"):
        v = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
        key = UUID if task == "niah_multikey_3" else WORD
        value = UUID if v == "uuids" else NUMBER
        single = task not in ("niah_multivalue", "niah_multiquery")
        t, p, tv = (_singular(NIAH_T), _singular(NIAH_P), v[:-1]) if single else (NIAH_T, NIAH_P, v)
        query = re.fullmatch(re.escape(p.format(type_needle_v=tv, query="\x00")).replace("\x00", "(.+)"), prefix).group(1)
        _, context = _split(t.format(type_needle_v=tv, context="{context}", query=query), inp)
        needles = re.findall(rf"One of the special magic {v} for ({key}) is: ({value})\.", context)
        assert [val for _, val in needles if val in out] and all(o in context for o in out)
        assert len(out) == {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
        hay = {"niah_single_1": "noise", "niah_multikey_2": "needle", "niah_multikey_3": "needle"}.get(task, "essay")
        if hay == "noise":
            assert set(context.split("\n")) - {NOISE} == {f"One of the special magic {v} for {k} is: {x}." for k, x in needles}
        elif hay == "needle":
            assert all(re.fullmatch(rf"One of the special magic {v} for {key} is: {value}\.", s) for s in context.split("\n"))
            assert len(needles) >= 5  # the haystack is distractor needles
        else:
            assert "A small orchard" in context or "The " in context  # the shipped prose
        assert len([k for k, _ in needles]) >= {"niah_multikey_1": 4, "niah_multiquery": 4}.get(task, 1)
    elif task == "vt":
        num_v = len(out)
        assert num_v == 5 and all(re.fullmatch(r"[A-Z]{5}", o) for o in out)
        value = re.search(r"VAR " + out[0] + r" = (\d{5})\n", inp).group(1)
        assert prefix == VT_P.format(num_v=5, query=value)
        # the one-shot example (3-letter variables) comes first, then the task itself in RULER's template
        icl, _, rest = inp.partition("\n" + VT_T[:20])
        assert icl.startswith(VT_T[:20]) and re.search(r"VAR [A-Z]{3} = \d{5}\n", icl)
        _, context = _split(VT_T.format(context="{context}", query=value), VT_T[:20] + rest)
        for a, b in zip(out, out[1:]):
            assert f"VAR {b} = VAR {a} " in context
        assert set(context.split("\n")) - {NOISE} == {f"VAR {out[0]} = {value}"} | {
            f"VAR {b} = VAR {a} " for a, b in zip(out, out[1:])}
    elif task == "cwe":
        assert prefix == CWE_P and len(out) == 10
        shot, _, main = inp.partition("\n" + CWE_T[:30])
        assert shot.startswith(CWE_T[:30]) and CWE_P in shot  # RULER's one-shot example, with its answer
        _, context = _split(CWE_T, CWE_T[:30] + main)
        words = re.findall(r"\d+\. (.+?)(?= \d+\. |$)", context)
        counts = Counter(words)
        repeats = 30 if length >= 4096 else 6
        assert all(counts[o] == repeats for o in out) and set(counts.values()) == {repeats, 3 if length >= 4096 else 1}
    elif task == "fwe":
        assert prefix == FWE_P and len(out) == 3
        _, context = _split(FWE_T, inp)
        counts = Counter(context.split())
        top = [w for w, _ in counts.most_common() if w != "..."][:3]
        assert sorted(top) == sorted(out) and counts["..."] > max(counts[o] for o in out)
    else:
        assert prefix == " Answer:"
        _, context = _split(QA_T.replace("{query}", inp.rsplit("Question: ", 1)[1]), inp)
        docs = re.split(r"\n\nDocument \d+:\n", "\n\n" + context)[1:]
        assert context.startswith("Document 1:\n") and len(docs) >= 2
        question = inp.rsplit("Question: ", 1)[1]
        if task == "qa_1":  # SQuAD answers are spans of their paragraph
            assert any(o in d for o in out for d in docs)
        else:  # HotpotQA: every document of the question is in the context, titled
            (q,) = [q for q in json.loads((DATA / "hotpotqa.json").read_text()) if q["question"] == question]
            assert out == [q["answer"]] and {f"{t}\n{''.join(ss)}" for t, ss in q["context"]} <= set(docs)


def test_samples_equal_what_rulers_own_scripts_write(samples):
    """Rows from RULER's prepare.py at the same commit, tokenizer, seed and inputs (scripts/ruler_reference.py)."""
    with gzip.open(DATA / "reference.jsonl.gz", "rt") as f:
        ref = [json.loads(x) for x in f]
    groups = defaultdict(list)
    for r in ref:
        groups[(r["task"], r["max_seq_length"])].append(r)
    assert set(groups) == {(t, n) for t in TASK_NAMES for n in LENGTHS}
    for (task, length), theirs in groups.items():
        ours = samples[length][task]
        assert len(ours) == len(theirs) == 2
        for o, r in zip(ours, theirs):
            r = {k: v for k, v in r.items() if k not in ("task", "max_seq_length")}
            if task.startswith("niah"):  # RULER's niah.py overwrites `index` with the answer's offset (a bug)
                r["index"] = o["index"]
            assert o == r, (task, length)


def test_scores_equal_rulers_evaluate_py_on_the_same_predictions():
    """reference_scores.json: RULER's evaluate.py (summary.csv) on seeded predictions for the reference rows."""
    with gzip.open(DATA / "reference.jsonl.gz", "rt") as f:
        ref = [json.loads(x) for x in f]
    for run in json.loads((DATA / "reference_scores.json").read_text()):
        rows = [dict(r, pred=p) for r, p in zip([r for r in ref if r["max_seq_length"] == run["length"]],
                                                run["predictions"])]
        ours = score_ruler_rows(rows, with_nulls=True)
        assert {t: v["score"] for t, v in ours.items()} == run["scores"]
        assert {t: v["nulls"] for t, v in ours.items()} == run["nulls"]
        assert 0 < sum(run["scores"].values()) < 100 * len(run["scores"])  # neither all right nor all wrong


def test_adjective_noun_words_index_like_the_sorted_list():
    w = word_lists()
    adjs = [a for a in w["adjectives"] if a.split("-")[0] in {"old", "blue", "high", "wide", "ad", "x"}] + w["adjectives"][:40]
    nouns = w["nouns"][:300] + [n for n in w["nouns"] if "-" in n or " " in n][:40]
    full = sorted({f"{a}-{n}" for a in adjs for n in nouns})
    fast = AdjNounWords(adjs, nouns)
    assert len(fast) == len(full) and [fast[i] for i in range(len(full))] == full
    assert len(niah_words()) == 6171620  # RULER's list from the shipped wonderwords 3.0.1 lists
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [rng_a.choice(fast) for _ in range(50)] == [rng_b.choice(full) for _ in range(50)]


def test_zeta_matches_known_values():
    assert zeta(2.0) == 1.6449340668482264  # scipy.special.zeta(2.0)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-15)
    assert zeta(1.5) == pytest.approx(2.612375348685488, rel=1e-15)
    with pytest.raises(ValueError):
        zeta(1.0)


def test_scores_equal_rulers_string_match():
    preds = ["The special magic numbers are 1234567 and 7654321.", "only 1234567", "nothing here", "ABC"]
    refs = [["1234567", "7654321"], ["1234567", "7654321"], ["1234567"], ["abc", "xyz"]]
    # string_match_all: (2/2 + 1/2 + 0 + 1/2) / 4 * 100 = 50.0; string_match_part: (1 + 1 + 0 + 1) / 4 * 100 = 75.0
    assert string_match_all(preds, refs) == 50.0 and string_match_part(preds, refs) == 75.0
    assert string_match_all(["a"] * 3, [["a"], ["b"], ["b"]]) == 33.33  # round(33.333.., 2) as RULER rounds
    # post-processing: strip, control characters to newlines, strip again
    assert postprocess_pred("  \x00 VAR ABCDE\tVAR FGHIJ\x1f  ") == "VAR ABCDE\nVAR FGHIJ"
    rows = [{"task": "niah_single_1", "pred": " 1234567.\x07", "outputs": ["1234567"]},
            {"task": "niah_single_1", "pred": "", "outputs": ["7654321"]},
            {"task": "qa_1", "pred": "In Ashford.", "outputs": ["Ashford", "at Ashford"]},
            {"task": "qa_1", "pred": "Redstone", "outputs": ["Ashford"]}]
    assert score_ruler_rows(rows) == {"niah_single_1": 50.0, "qa_1": 50.0}
    assert score_ruler_rows(rows, with_nulls=True)["niah_single_1"] == {"score": 50.0, "nulls": "1/2", "samples": 2}
    with pytest.raises(ValueError, match="prediction 0: `task` 'niah'"):
        score_ruler_rows([{"task": "niah", "pred": "", "outputs": ["1"]}])


def test_shuffled_predictions_score_lower(samples):
    """Negative control: perfect answers score 100, the same answers given to the wrong samples do not."""
    rows = [{"task": t, "pred": " ".join(r["outputs"]), "outputs": r["outputs"]}
            for t, rs in samples[4096].items() for r in rs]
    right = score_ruler_rows(rows)
    assert set(right.values()) == {100.0}
    preds = [r["pred"] for r in rows]
    shuffled = [dict(r, pred=preds[(i + 1) % len(preds)]) for i, r in enumerate(rows)]
    wrong = score_ruler_rows(shuffled)
    assert sum(wrong.values()) < 0.5 * sum(right.values())


def test_rulers_averages():
    # RULER README, Llama-3.1-70B: 96.5 95.8 95.4 94.8 88.4 66.6 at 4K..128K -> 89.6 / 85.5 / 93.7
    by_len = dict(zip([4096, 8192, 16384, 32768, 65536, 131072], [96.5, 95.8, 95.4, 94.8, 88.4, 66.6]))
    w = weighted_averages(by_len)
    assert (round(w["avg"], 1), round(w["wavg_inc"], 1), round(w["wavg_dec"], 1)) == (89.6, 85.5, 93.7)
    s = summarize({4096: {"a": 90.0, "b": 85.0}, 8192: {"a": 80.0, "b": 60.0}})
    assert s["average"] == {"4096": 87.5, "8192": 70.0} and s["effective_length"] == 4096


def test_qa_needs_its_file_and_short_lengths_say_so(tok):
    with pytest.raises(ValueError, match="qa_1 needs the SQuAD 2.0 dev JSON .* eval.ruler.squad=PATH"):
        generate_ruler(tok, RulerConfig(), [2048], tasks=["qa_1"], num_samples=1)
    default = generate_ruler(tok, RulerConfig(), [2048], tasks=None, num_samples=1)[2048]
    assert "qa_1" not in default and "qa_2" not in default and len(default) == 11
    with pytest.raises(FileNotFoundError, match="squad.missing: cannot read the SQuAD 2.0 dev JSON"):
        generate_ruler(tok, RulerConfig(squad=str(DATA / "squad.missing")), [2048], tasks=["qa_1"], num_samples=1)
    with pytest.raises(ValueError, match="hotpotqa.json: not SQuAD format"):
        generate_ruler(tok, RulerConfig(squad=str(DATA / "hotpotqa.json")), [2048], tasks=["qa_1"], num_samples=1)
    with pytest.raises(RulerLengthError, match="no sample fits max_seq_length 256.*tokens_to_generate"):
        generate_ruler(tok, RulerConfig(), [256], tasks=["niah_single_1"], num_samples=1)
    skipped: dict[str, str] = {}  # inside `eval run`: the cell is left out and said why, the rest runs
    out = generate_ruler(tok, RulerConfig(), [256, 1024], tasks=["niah_single_1"], num_samples=1, skipped=skipped)
    assert list(out[256]) == [] and list(out[1024]) == ["niah_single_1"]
    assert list(skipped) == ["niah_single_1 at 256"] and "no sample fits" in skipped["niah_single_1 at 256"]
    with pytest.raises(ValueError, match="eval.ruler.tokens_to_generate"):
        load_config(None, ["eval.ruler.tokens_to_generate={niahh: 8}"])


def test_chat_template_wraps_the_task_and_keeps_the_answer_prefix_last(tok):
    st = RulerConfig(chat_template=True, num_samples=1)
    (row,) = generate_ruler(tok, st, [2048], tasks=["niah_single_1"])[2048]["niah_single_1"]
    assert row["input"].startswith("<|im_start|>user\nA special magic number is hidden")
    assert row["input"].endswith("mentioned in the provided text?<|im_end|>\n<|im_start|>assistant\n")
    assert row["answer_prefix"].startswith(" The special magic number for ")
    assert prompt_ids(tok, row, True) == tok(row["input"] + row["answer_prefix"])["input_ids"]


def test_shipped_base_retrieves_niah_single_1_at_its_own_256_tokens(tok):
    """The shipped tiny Llama (trained at 256 tokens, 5-digit passkeys) finds RULER's 7-digit needle.

    RULER's 128 tokens to generate count in the length and leave no room for a haystack at 256, so the
    budget is 16 (2 noise groups fit). Chance for a 7-digit number is ~0; measured: 33% on 100 samples, the
    first 5 digits right in 82% (the model often stops after 5 or 6 digits, the passkey length it learned).
    """
    import torch

    from longctx.eval.ruler.evaluate import answer_rows
    from longctx.model.load import load_causal_lm

    torch.set_num_threads(1)  # as tests/test_eval_core.py: a 1M-parameter model, 2 cores shared with other jobs
    model = load_causal_lm("builtin:tiny-llama").eval()
    st = RulerConfig(tokens_to_generate={"niah": 16}, num_samples=30)
    samples = generate_ruler(tok, st, [256], tasks=["niah_single_1"])[256]
    assert all(r["length"] <= 256 and r["input"].count(NOISE) == 2 for r in samples["niah_single_1"])
    rows = answer_rows(model, tok, samples, st)
    score = score_ruler_rows(rows)["niah_single_1"]
    assert score >= 15.0, [(r["outputs"], r["pred"]) for r in rows[:5]]
    # negative control: the same answers checked against other samples' needles
    shuffled = [dict(r, outputs=rows[(i + 1) % len(rows)]["outputs"]) for i, r in enumerate(rows)]
    assert score_ruler_rows(shuffled)["niah_single_1"] <= 5.0


def test_preflight_finds_missing_ruler_and_infinitebench_inputs(tmp_path):
    from longctx.preflight import check_job

    cfg = load_config(None, ["eval.ruler.enabled=true", "eval.ruler.tasks=[qa_1,niah_single_2]",
                             f"eval.ruler.hotpotqa={tmp_path}/none.json", f"eval.ruler.essay={tmp_path}/essays.txt",
                             "eval.infinitebench.enabled=true", "eval.perplexity=false"])
    lines = [p.line() for p in check_job(cfg, "eval")]
    assert any("eval.ruler.tasks" in x and "qa_1 needs RULER's squad.json" in x for x in lines), lines
    assert any("eval.ruler.hotpotqa" in x and "none.json" in x for x in lines), lines
    assert any("eval.ruler.essay" in x and "essays.txt" in x for x in lines), lines
    assert any("eval.infinitebench.data" in x and "not set" in x for x in lines), lines
    ok = load_config(None, ["eval.ruler.enabled=true", f"eval.ruler.squad={DATA / 'squad.json'}", "eval.perplexity=false"])
    assert check_job(ok, "eval") == []


def test_cli_generate_writes_rulers_jsonl_per_task_and_length(tmp_path, tok, capsys):
    from longctx.cli import main

    assert main(["eval", "ruler", "generate", "--set", "eval.ruler.lengths=[2048,1024]", "--set",
                 "eval.ruler.num_samples=2", "--set", "eval.ruler.tasks=[niah_single_1,fwe]",
                 "--output", str(tmp_path)]) == 0
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl"))
    assert files == ["1024/fwe.jsonl", "1024/niah_single_1.jsonl", "2048/fwe.jsonl", "2048/niah_single_1.jsonl"]
    want = generate_ruler(tok, RulerConfig(num_samples=2), [2048], tasks=["niah_single_1"])[2048]["niah_single_1"]
    assert [json.loads(x) for x in (tmp_path / "2048" / "niah_single_1.jsonl").read_text().splitlines()] == want
    assert "wrote 4 RULER files" in capsys.readouterr().out


def test_cwe_asks_for_rulers_english_words_only_beyond_the_shipped_lists(tok, tmp_path):
    from longctx.eval.ruler.generate import build_task

    cwe = build_task("cwe", tok, 4096, RulerConfig())
    context, common = cwe.get_example(len(cwe.words), 30, 3, 10)  # every shipped word, no extra file needed
    assert len(common) == 10 and context.startswith("1. ")
    with pytest.raises(RulerLengthError, match=r"needs 8167 distinct words.*english_words.json.*eval.ruler.cwe_words"):
        cwe.get_example(len(cwe.words) + 1)
    words = tmp_path / "english_words.json"
    words.write_text(json.dumps({str(i): f"w{i}" for i in range(9000)}))
    cwe = build_task("cwe", tok, 4096, RulerConfig(cwe_words=str(words)))
    _, common = cwe.get_example(8500)
    assert all(re.fullmatch(r"w\d+", w) for w in common)


def test_report_table_and_tracked_scalars():
    from longctx.eval.ruler.score import summarize
    from longctx.eval.ruler.suite import settings_note
    from longctx.report.markdown import eval_markdown
    from longctx.tracking import eval_scalars

    st = RulerConfig(tokens_to_generate={"niah": 16})
    scores = {256: {t: 90.0 for t in TASK_NAMES[:11]}, 1024: {t: 10.0 for t in TASK_NAMES[:11]}}

    def entry(s):
        return {"scores": {str(n): v for n, v in s.items()}, **summarize(s), "settings": settings_note(st)}

    metrics = {"base_context_length": 256, "models": {
        "base (naive)": {"spec": {"uri": "m", "role": "naive"}, "ruler": entry(scores)},
        "Long-PT": {"spec": {"uri": "t", "role": "trained"}, "ruler": entry({n: {t: 95.0 for t in s} for n, s in scores.items()})}}}
    md = eval_markdown(metrics)
    assert "| model | 256 | 1024† | Avg. | wAvg. (inc) | wAvg. (dec) | effective |" in md
    assert "| base (naive) | 90.00 | 10.00 | 50.00 | 36.67 | 63.33 | 256 |" in md
    assert "| Long-PT | 95.00 | 95.00 | 95.00 | 95.00 | 95.00 | 1024 |" in md
    assert "**1024† tokens**" in md and "| model | niah_single_1 |" in md and "| vt | cwe | fwe | Avg. |" in md
    assert "Not run: qa_1 (no eval.ruler.squad file); qa_2 (no eval.ruler.hotpotqa file)" in md
    assert "averages over the tasks run at a length are not comparable with RULER's 13-task averages" in md
    assert 'Changed from RULER\'s settings: {"tokens_to_generate": {"niah": 16}}' in md
    assert eval_scalars(metrics)["eval/Long-PT/ruler_1024"] == 95.0
