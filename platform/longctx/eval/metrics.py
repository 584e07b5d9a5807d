"""LongBench's metrics, reimplemented to give the same numbers as its `metrics.py` / `eval.py`.

    qa_f1_score("The Eiffel Tower", "eiffel tower")        # 1.0
    score_dataset("trec", preds, answers, all_classes)       # 100x, rounded to 2 decimals

Parity notes (each checked against LongBench's reference packages; see tests/test_eval_metrics.py):
- English normalisation: lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse spaces.
  Chinese: jieba word segmentation (`jieba.cut(text, cut_all=False)`, as LongBench), then per token
  lower-case, drop ASCII + CJK punctuation and all whitespace, drop empty tokens.
- ROUGE-L is the `rouge` package (1.0.1, what LongBench installs) `Rouge().get_scores(..., avg=True)
  ["rouge-l"]["f"]`: sentences split on ".", words on single spaces, summary-level union LCS where the
  union is a *set of words* (exclusive mode) and m, n count *distinct* words, F = 2PR/(P+R+1e-8).
  The LCS tie-breaking path is the package's, since it decides which words enter the set.
  NOTE: that package reconstructs the LCS recursively; a sentence pair whose backtracking path is longer
  than Python's recursion limit allows raises RecursionError, which LongBench's bare `except` turns into a
  score of 0. With `rouge_recursion_parity=True` (the default) we reproduce that: a pair whose path needs
  more than `ROUGE_MAX_FRAMES` nested calls scores 0, as on a default Python with LongBench's call stack.
  This mostly hits long Chinese summaries (vcsum), which have no "." to split on. Pass False for the
  mathematically intended score.
- Classification keeps LongBench's quirks: classes found as substrings of the prediction, then a class
  that is a strict substring of the answer is dropped *while iterating the same list* (so the element after
  a removed one is not examined), score 1/len(matches) if the answer is among them, else 0. The difflib
  fallback in the source is unreachable (`list != 0` is always true), so it is not applied.
- Code similarity is fuzzywuzzy's `fuzz.ratio` as LongBench's requirements install it (no
  python-Levenshtein): difflib.SequenceMatcher(None, a, b) ratio, x100 rounded half-to-even to an int, /100;
  100 when equal strings, 0 when one is empty. `code_sim_backend="indel"` gives the python-Levenshtein /
  rapidfuzz ratio instead (a different number for some pairs). The prediction is its first line (after
  leading newlines) containing none of "`", "#", "//".
- Dataset score: the first line of the prediction for trec/triviaqa/samsum/lsht, max over the reference
  answers (starting at 0), mean over samples, round(100 x mean, 2). LongBench-E buckets by `length`
  (< 4000, < 8000, else) and reports NaN for an empty bucket; we report None (null in JSON).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import string
from collections import Counter
from typing import Callable, Sequence

ROUGE_MAX_FRAMES = 991
"""Nested `_recon` calls the rouge package survives under LongBench's eval.py (English ROUGE; one fewer for
Chinese, whose wrapper adds a frame) with CPython 3.11's default recursion limit of 1000; calibrated against
rouge 1.0.1 called through a stack as deep as LongBench's (other CPython versions may differ by a frame)."""

_CN_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = set(string.punctuation + _CN_PUNCT)
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")


# ------------------------------------------------------------------------------------------- tokenizing
def normalize_answer(s: str) -> str:
    """English answer normalisation (SQuAD style, as LongBench)."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese token normalisation: lower-case, no punctuation (ASCII + CJK), no whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ALL_PUNCT)
    return "".join(s.split())


_JIEBA = None


def jieba_cut(text: str) -> list[str]:
    """jieba's accurate-mode segmentation (loaded once; its dictionary log line is silenced)."""
    global _JIEBA
    if _JIEBA is None:
        import jieba  # deferred: heavy import, used only here

        jieba.setLogLevel(logging.WARNING)
        _JIEBA = jieba
    return list(_JIEBA.cut(text, cut_all=False))


# ------------------------------------------------------------------------------------------------- F1
def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    pred = [t for t in (normalize_zh_answer(x) for x in jieba_cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(x) for x in jieba_cut(ground_truth)) if t]
    return f1_score(pred, gold)


# ---------------------------------------------------------------------------------------------- ROUGE-L
class _RecursionLimit(Exception):
    pass


def _lcs_words(x: list[str], y: list[str], max_frames: int | None) -> set[str]:
    """Words of the LCS of x and y along the rouge package's backtracking path (iteratively)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    words: set[str] = set()
    i, j, frames = n, m, 1
    while i > 0 and j > 0:
        frames += 1
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    if max_frames is not None and frames > max_frames:
        raise _RecursionLimit
    return words


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def rouge_l_f(prediction: str, ground_truth: str, *, recursion_parity: bool = True, extra_frames: int = 0) -> float:
    """ROUGE-L F of the `rouge` package (summary level, exclusive); 0.0 where the package raises."""
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0  # the package raises "Hypothesis is empty" and LongBench returns 0
    ref_vocab = {w for s in ref for w in s.split(" ")}
    hyp_vocab = {w for s in hyp for w in s.split(" ")}
    union: set[str] = set()
    max_frames = ROUGE_MAX_FRAMES - extra_frames if recursion_parity else None
    try:
        for ref_s in ref:
            ref_words = ref_s.split(" ")
            for hyp_s in hyp:
                union |= _lcs_words(ref_words, hyp_s.split(" "), max_frames)
    except _RecursionLimit:
        return 0.0
    llcs = len(union)
    r, p = llcs / len(ref_vocab), llcs / len(hyp_vocab)
    return 2.0 * ((p * r) / (p + r + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_l_f(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(ground_truth)), extra_frames=1)


# ------------------------------------------------------------------------------ classification / counts
def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    all_classes = kwargs.get("all_classes") or []
    matches = [c for c in all_classes if c in prediction]
    # NOTE: LongBench removes from the list it is iterating over; an explicit index keeps that behaviour
    # (after a removal the next element shifts into the current slot and is not examined).
    k = 0
    while k < len(matches):
        term = matches[k]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        k += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _numbers_score(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == str(target)) / len(numbers)


def count_score(prediction: str, ground_truth, **_) -> float:
    return _numbers_score(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"passage_retrieval_en answer {ground_truth!r} has no 'Paragraph N'")
    return _numbers_score(prediction, found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"段落(\d+)", ground_truth)
    if not found:
        raise ValueError(f"passage_retrieval_zh answer {ground_truth!r} has no '段落N'")
    return _numbers_score(prediction, found[0])


# ------------------------------------------------------------------------------------------ code sim
def _indel_ratio(a: str, b: str) -> float:
    """1 - InDel distance / (len a + len b) (python-Levenshtein's / rapidfuzz's ratio)."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for ca in a:  # LCS length, row by row
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return 2 * prev[-1] / (len(a) + len(b))


def fuzz_ratio(a: str, b: str, backend: str = "difflib") -> int:
    """fuzzywuzzy.fuzz.ratio: 100 for equal strings, 0 if either is empty, else round(100 x ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    r = difflib.SequenceMatcher(None, a, b).ratio() if backend == "difflib" else _indel_ratio(a, b)
    return int(round(100 * r))


def code_sim_score(prediction: str, ground_truth: str, *, code_sim_backend: str = "difflib", **_) -> float:
    first = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return fuzz_ratio(first, ground_truth, code_sim_backend) / 100


# -------------------------------------------------------------------------------------------- datasets
DATASET_METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
"""LongBench dataset -> metric (its eval.py table). `_e` suffixes (LongBench-E) map to the same metric."""


def metric_for(dataset: str) -> Callable[..., float]:
    name = dataset[:-2] if dataset.endswith("_e") and dataset not in DATASET_METRIC else dataset
    if name not in DATASET_METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(sorted(DATASET_METRIC))}")
    return DATASET_METRIC[name]


def sample_score(dataset: str, prediction: str, answers: Sequence[str], all_classes=None, **kwargs) -> float:
    """Score of one prediction: first-line rule where LongBench applies it, max over the answers."""
    base = dataset[:-2] if dataset.endswith("_e") else dataset
    if base in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = metric_for(dataset)
    score = 0.0
    for gt in answers:
        score = max(score, fn(prediction, gt, all_classes=all_classes, **kwargs))
    return score


def _classes_of(all_classes, i: int):
    """The class list for sample i: one shared list of strings (LongBench's eval.py), or one entry per sample."""
    if not all_classes:
        return None
    if all(isinstance(c, str) for c in all_classes):
        return list(all_classes)
    return all_classes[i]


def score_dataset(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes=None, **kwargs) -> float:
    """LongBench's `scorer`: round(100 x mean sample score, 2)."""
    if not predictions:
        raise ValueError(f"{dataset}: no predictions to score")
    total = 0.0
    for i, (pred, golds) in enumerate(zip(predictions, answers)):
        total += sample_score(dataset, pred, golds, _classes_of(all_classes, i), **kwargs)
    return round(100 * total / len(predictions), 2)


LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else ("4-8k" if length < 8000 else "8k+")


def score_dataset_e(dataset: str, predictions, answers, lengths, all_classes=None, **kwargs) -> dict:
    """LongBench-E's `scorer_e`: the score per length bucket (None where a bucket is empty)."""
    buckets: dict[str, list[float]] = {b: [] for b in LENGTH_BUCKETS}
    for i, (pred, golds, length) in enumerate(zip(predictions, answers, lengths)):
        buckets[length_bucket(int(length))].append(sample_score(dataset, pred, golds, _classes_of(all_classes, i), **kwargs))
    return {b: (round(100 * sum(v) / len(v), 2) if v else None) for b, v in buckets.items()}


CATEGORIES: dict[str, list[str]] = {
    "Single-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "Multi-Doc QA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "Summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "Few-shot Learning": ["trec", "triviaqa", "samsum", "lsht"],
    "Synthetic Tasks": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "Code Completion": ["lcc", "repobench-p"],
}
"""LongBench's task categories (its paper's tables)."""
ZH_DATASETS = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}


def category_averages(scores: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean score per category for English and Chinese datasets, and their average ("Avg").

    As LongBench's tables: a category's score is the mean of its datasets present in `scores` (code
    completion counts for both languages); "Avg" is the mean of the category scores. Rounded to 2 decimals.
    """
    out: dict[str, dict[str, float]] = {}
    for lang in ("en", "zh"):
        cats: dict[str, float] = {}
        for cat, names in CATEGORIES.items():
            vals = [scores[n] for n in names if n in scores and isinstance(scores[n], (int, float))
                    and (cat == "Code Completion" or (n in ZH_DATASETS) == (lang == "zh"))]
            if vals:
                cats[cat] = round(sum(vals) / len(vals), 2)
        if cats and set(cats) != {"Code Completion"}:
            cats["Avg"] = round(sum(cats.values()) / len(cats), 2)
            out[lang] = cats
    return out


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))
