"""RULER's scoring: the prediction post-processing, string_match_all / string_match_part, and its averages.

Copied from NVIDIA/RULER (commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a; `scripts/eval/evaluate.py` and
`scripts/eval/synthetic/constants.py`, Copyright (c) 2024 NVIDIA CORPORATION, Apache License 2.0; the
arithmetic is kept expression for expression so scores round as RULER's do). Added: scoring rows that
carry their task (`score_ruler_rows`), and the table averages RULER's README reports (mean over tasks per
length; over lengths the plain mean and the weighted means with weights rising / falling with length).

    score_ruler_rows([{"task": "niah_single_1", "pred": " 1234567.", "outputs": ["1234567"]}])
    # -> {"niah_single_1": 100.0}
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

from longctx.eval.ruler.constants import BASE_TASKS, EFFECTIVE_THRESHOLD, TASK_NAMES, TASKS

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(predict_str: str) -> str:
    """RULER's postprocess_pred: strip, control characters become newlines, strip again."""
    predict_str = predict_str.strip()
    return _NON_PRINTABLE.sub("\n", predict_str).strip()


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Percent of predictions containing any of their references (case-insensitive); QA's metric."""
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) \
        / len(preds) * 100
    return round(score, 2)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean percent of each prediction's references it contains (case-insensitive); every other task's metric."""
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def metric_of(task: str):
    return METRICS[BASE_TASKS[TASKS[task]["task"]]["metric"]]


def score_task(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, str]:
    """(score, nulls) of one task as RULER's run_evaluation_per_task: post-processed predictions, empty counted."""
    preds = [postprocess_pred(p) for p in preds]
    nulls = f"{sum([len(x) == 0 for x in preds])}/{len(preds)}"
    if len(refs) > 0 and refs[0][0] is not None:
        return metric_of(task)(preds, refs), nulls
    return 0.0, nulls


def task_of(row: dict, where: str = "") -> str:
    task = row.get("task")
    if task not in TASKS:
        raise ValueError(f"{where or 'prediction'}: `task` {task!r} is not a RULER task ({', '.join(TASK_NAMES)})")
    return task


def score_ruler_rows(rows: Iterable[dict], with_nulls: bool = False) -> dict:
    """{task: score} from rows with `task`, `pred` and `outputs` (RULER's prediction rows plus the task).

    With `with_nulls`, {task: {"score", "nulls", "samples"}}.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(rows):
        where = r.get("_where", f"prediction {i}")
        task = task_of(r, where)
        for key in ("pred", "outputs"):
            if key not in r:
                raise ValueError(f"{where}: missing field {key!r} (RULER rows need task, pred, outputs)")
        if not isinstance(r["outputs"], list) or not r["outputs"]:
            raise ValueError(f"{where}: `outputs` must be a non-empty list of reference strings")
        by_task[task].append(r)
    out: dict = {}
    for task in [t for t in TASK_NAMES if t in by_task]:
        rs = by_task[task]
        score, nulls = score_task(task, [str(r["pred"]) for r in rs], [list(r["outputs"]) for r in rs])
        out[task] = {"score": score, "nulls": nulls, "samples": len(rs)} if with_nulls else score
    return out


def length_average(scores: dict[str, float]) -> float | None:
    """RULER's per-length average: the mean of the task scores (13 tasks in RULER's tables)."""
    vals = [float(v) for v in scores.values() if v is not None]
    return round(sum(vals) / len(vals), 2) if vals else None


def weighted_averages(by_length: dict[int, float]) -> dict[str, float | None]:
    """{"avg", "wavg_inc", "wavg_dec"} over lengths: plain mean, and weights 1..n rising / falling with length.

    The weighted means RULER's README ranks models by (e.g. Llama-3.1-70B: 96.5 95.8 95.4 94.8 88.4 66.6 at
    4K..128K gives Avg 89.6, wAvg (inc) 85.5, wAvg (dec) 93.7).
    """
    lengths = sorted(n for n, v in by_length.items() if v is not None)
    if not lengths:
        return {"avg": None, "wavg_inc": None, "wavg_dec": None}
    vals = [by_length[n] for n in lengths]
    w = list(range(1, len(vals) + 1))
    inc = sum(a * b for a, b in zip(w, vals)) / sum(w)
    dec = sum(a * b for a, b in zip(reversed(w), vals)) / sum(w)
    return {"avg": round(sum(vals) / len(vals), 2), "wavg_inc": round(inc, 2), "wavg_dec": round(dec, 2)}


def summarize(scores: dict[int, dict[str, float]]) -> dict:
    """Averages of a {length: {task: score}} table: per length, then over lengths, and the effective length."""
    per_length = {n: length_average(s) for n, s in scores.items()}
    over = weighted_averages(per_length)
    above = [n for n in sorted(per_length) if per_length[n] is not None and per_length[n] > EFFECTIVE_THRESHOLD]
    # RULER's effective length: the longest length up to which every length beats the threshold
    effective = None
    for n in sorted(per_length):
        if n not in above:
            break
        effective = n
    return {"average": {str(n): v for n, v in per_length.items()}, **over, "effective_length": effective}
