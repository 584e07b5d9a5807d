"""Middle truncation, LongBench/LEval prompt building, needle grids (depth in tokens) and NeedleBench scoring."""

from __future__ import annotations

import pytest

from longctx.eval.haystack import Haystack, generate_haystack_text
from longctx.eval.longbench import MAX_NEW_TOKENS, PROMPTS, build_prompts, samples_from_records
from longctx.eval.needle import build_needle_prompts, needle_depths, needlebench_multi_score, needlebench_score
from longctx.eval.truncation import max_prompt_len, middle_truncate
from longctx.model.load import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-tokenizer")


def test_middle_truncation_keeps_both_ends():
    ids = list(range(10))
    assert middle_truncate(ids, 10) == ids and middle_truncate(ids, 12) == ids
    assert middle_truncate(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert middle_truncate(ids, 7) == [0, 1, 2, 7, 8, 9]  # half = 7 // 2 = 3 from each end
    assert max_prompt_len(4096, 128) == 3968
    with pytest.raises(ValueError, match="max_seq_len"):
        max_prompt_len(100, 128)


def test_longbench_prompt_template_and_truncation(tok):
    context = " ".join(f"fact{i} is number {i}." for i in range(400))
    rec = {"input": "Which fact is number 7?", "context": context, "answers": ["fact7"], "length": 2000,
           "all_classes": None, "dataset": "hotpotqa", "language": "en", "_id": "x"}
    full = tok(PROMPTS["hotpotqa"].format(**rec))["input_ids"]
    (s,) = build_prompts(tok, "hotpotqa", [rec], max_seq_len=512)
    budget = 512 - MAX_NEW_TOKENS["hotpotqa"]
    assert len(full) > budget and s.truncated and s.max_new_tokens == 32 and s.answers == ["fact7"]
    assert s.input_ids == full[: budget // 2] + full[-(budget // 2):]
    assert tok.decode(s.input_ids).startswith("Answer the question based on the given passages.")
    assert tok.decode(s.input_ids).endswith("Question: Which fact is number 7?\nAnswer:")
    (short,) = build_prompts(tok, "hotpotqa", [dict(rec, context="fact7 is number 7.")], max_seq_len=512)
    assert not short.truncated and len(short.input_ids) < budget
    (sam,) = build_prompts(tok, "samsum", [dict(rec, dataset="samsum")], max_seq_len=4096)
    assert sam.stop_ids == tok.encode("\n", add_special_tokens=False)[-1:] and sam.max_new_tokens == 128
    with pytest.raises(ValueError, match="record 0"):
        build_prompts(tok, "hotpotqa", [{"foo": 1}], max_seq_len=512)


def test_leval_records_expand_per_instruction():
    rec = {"input": "a long document", "instructions": ["Q1?", "Q2?"], "outputs": ["A", "B"], "evaluation": "exam"}
    samples = samples_from_records("quality", [rec])
    assert [(s["input"], s["answers"], s["metric"]) for s in samples] == [("Q1?", ["A"], "exam"), ("Q2?", ["B"], "exam")]


def test_needle_sits_at_the_requested_depth_in_tokens(tok):
    text = generate_haystack_text(300, seed=1)
    lengths, depths = [200, 400], [0.0, 0.3, 0.7, 1.0]
    prompts = build_needle_prompts(tok, text, lengths, depths, variants=["single"], seed=2)
    assert len(prompts) == 8
    longest_sentence = max(len(s) for s in Haystack.from_text(tok, text).sentence_ids)  # in this tokenizer's tokens
    assert longest_sentence < 60
    for p in prompts:
        assert len(p.input_ids) == p.length
        (start,) = p.needle_starts
        needle = tok(" " + p.reference, add_special_tokens=False)["input_ids"]
        assert p.input_ids[start : start + len(needle)] == needle
        # the haystack spans [task, question); the needle starts within one sentence before depth x haystack
        hay_start = len(tok("This is a test of long-text capability. Read the document below, then answer the "
                            "question at the end based on the information in the document.\n",
                            add_special_tokens=False)["input_ids"])
        tail = tok(f"\n\nQuestion: x", add_special_tokens=False)["input_ids"]
        hay_len = p.length - hay_start - (len(p.input_ids) - p.input_ids.index(tail[0], start + len(needle)))
        target = hay_start + p.depth * (hay_len - len(needle))  # depth is a fraction of the filler
        assert -1 <= target - start <= longest_sentence, (p.length, p.depth, start, target, longest_sentence)
        assert p.keywords[0] in tok.decode(p.input_ids[start:])


def test_multi_needle_variants(tok):
    text = generate_haystack_text(300, seed=1)
    assert needle_depths(0.4, 3) == pytest.approx([0.4, 0.6, 0.8])
    (ret,) = build_needle_prompts(tok, text, [400], [0.4], variants=["multi_retrieval"], num_needles=3, seed=0)
    (rea,) = build_needle_prompts(tok, text, [400], [0.2], variants=["multi_reasoning"], num_needles=3, seed=0)
    for p in (ret, rea):
        assert len(p.input_ids) == 400 and len(p.needle_starts) == 3
        decoded = tok.decode(p.input_ids)
        assert all(k in decoded for k in p.keywords)
    assert len(ret.keywords) == 3 and sorted(ret.needle_starts) == ret.needle_starts
    assert ret.needle_starts[0] < 0.5 * 400 < ret.needle_starts[2]
    # reasoning: a 3-hop chain whose answer is the last name; the links are shuffled over the depths
    assert rea.reference.startswith("The mentor of the mentor of the mentor of") and rea.reference.endswith(f"{rea.keywords[0]}.")


def test_needlebench_scores():
    ref = "The secret ingredient of Oslo's famous soup is saffron."
    assert needlebench_score("It is saffron, of course", ref, "saffron") == 100.0
    # keyword missing: 20 x (1 - edit distance / longer length), whitespace removed: "abd" vs "abcd" -> 15
    assert needlebench_score("a b d", "abcd", "zzz") == pytest.approx(15.0)
    assert needlebench_score("xyz", "abcd", "zzz") == 0.0
    assert needlebench_score(" ", " ", "k") == 20.0  # both empty after whitespace removal: similarity 100
    assert needlebench_multi_score("Saffron and FENNEL", ["saffron", "fennel", "anise"]) == pytest.approx(200 / 3)


def test_chat_template_wraps_all_but_fewshot_and_code(tok):
    rec = {"input": "Q?", "context": "some passage.", "answers": ["a"], "length": 10, "all_classes": ["a", "b"]}
    (qa,) = build_prompts(tok, "hotpotqa", [rec], max_seq_len=512, chat_template=True)
    (fs,) = build_prompts(tok, "trec", [rec], max_seq_len=512, chat_template=True)
    assert tok.decode(qa.input_ids).startswith("<|im_start|>user") and "Question: Q?" in tok.decode(qa.input_ids)
    assert "<|im_start|>" not in tok.decode(fs.input_ids)  # LongBench leaves few-shot/code prompts raw


def test_haystack_and_documents_from_a_corpus(tmp_path):
    import gzip
    import json

    from longctx.eval.documents import iter_texts
    from longctx.eval.haystack import load_haystack_text

    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "First document. It has two sentences."}) + "\n")
        f.write(json.dumps({"body": "no text field"}) + "\n")  # skipped and logged
        f.write(json.dumps({"text": "Second document."}) + "\n")
    assert list(iter_texts(str(path))) == ["First document. It has two sentences.", "Second document."]
    assert load_haystack_text(str(path)) == "First document. It has two sentences.\n\nSecond document."
    assert load_haystack_text("builtin:haystack/default.txt").startswith("A small orchard")


@pytest.mark.s3
def test_documents_from_s3(s3_bucket):
    import json

    from longctx import storage
    from longctx.eval.documents import iter_texts

    storage.write_text(f"{s3_bucket}/held/a.jsonl", json.dumps({"meta": {"t": "deep"}}) + "\n{broken\n")
    assert list(iter_texts(f"{s3_bucket}/held/", text_field="meta.t")) == ["deep"]
