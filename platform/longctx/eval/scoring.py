"""`longctx eval score`: score a predictions JSONL from any harness by its benchmark's own rules.

    score_prediction_file("preds/", "scores.json")    # {dataset or task: score}

Each row is scored by the benchmark it belongs to:
- RULER: `task` (niah_single_1, ..., qa_2), `pred`, `outputs`; RULER's own prediction files (`<task>.jsonl`,
  without `task`) are recognised by their file name. String match as RULER's evaluate.py (`eval.ruler.score`).
- InfiniteBench: `task` (passkey, number_string, kv_retrieval, math_find, code_debug, longbook_choice_eng),
  `prediction` or `pred`, `ground_truth` or `label`; its `preds_<task>.jsonl` files by their name.
- LongBench / LEval: `pred`, `answers`, `all_classes`, `dataset` (`eval.longbench.score_rows`).
"""

from __future__ import annotations

import json
import os
import re

from longctx import storage
from longctx.eval import infinitebench
from longctx.eval.documents import iter_records
from longctx.eval.longbench import score_rows, scores_table
from longctx.eval.ruler.constants import TASKS as RULER_TASKS
from longctx.eval.ruler.score import length_average, score_ruler_rows


def _task_from_file(where: str) -> str | None:
    name = os.path.basename(where.rsplit(":", 1)[0])
    stem = re.sub(r"\.jsonl(\.gz|\.zst)?$|\.json$", "", name)
    if stem in RULER_TASKS:
        return stem
    if stem.startswith("preds_") and stem[len("preds_"):] in infinitebench.TASKS:
        return stem[len("preds_"):]
    return None


def split_rows(uri: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(RULER rows, InfiniteBench rows, LongBench rows) of a predictions file / folder / prefix."""
    ruler, ib, lb = [], [], []
    for where, rec in iter_records(uri):
        task = rec.get("task") or _task_from_file(where)
        if task in RULER_TASKS:
            ruler.append({**rec, "task": task, "_where": where})
        elif task in infinitebench.TASKS:
            ib.append({**rec, "task": task, "_where": where})
        else:
            lb.append(rec)
    return ruler, ib, lb


def score_prediction_file(uri: str, output: str | None = None, *, print_table: bool = True) -> dict:
    """Score every row of `uri` by its benchmark; write {dataset or task: score} JSON to `output`."""
    ruler, ib, lb = split_rows(uri)
    if not (ruler or ib or lb):
        raise ValueError(f"{uri}: no predictions")
    scores: dict = {}
    lines = []
    if lb:
        lb_scores = score_rows(lb)
        scores.update(lb_scores)
        lines.append(scores_table(lb_scores))
    if ruler:
        r = score_ruler_rows(ruler, with_nulls=True)
        scores.update({t: v["score"] for t, v in r.items()})
        lines += [f"{t:24s} {v['score']:6.2f}  (nulls {v['nulls']})" for t, v in r.items()]
        avg = length_average({t: v["score"] for t, v in r.items()})
        lines.append(f"-- RULER average over {len(r)} task(s): {avg:.2f}"
                     + ("" if len(r) == len(RULER_TASKS) else f" (RULER's tables average all {len(RULER_TASKS)})"))
    if ib:
        i = infinitebench.score_infinitebench_rows(ib)
        scores.update(i)
        lines += [f"{t:24s} {v:6.2f}" for t, v in i.items()]
    if output:
        storage.write_text(output, json.dumps(scores, ensure_ascii=False, indent=4) + "\n")
    if print_table:
        print("\n".join(lines), flush=True)
    return scores
