"""RULER inside `longctx eval run`: work items for the actor pool, then prediction files and metrics.

The runner (`eval.runner`) builds the samples once per tokenizer with `build_ruler_items`, sends their
prompt ids through the same Ray Data actors as the other evaluations (greedy, each task's
tokens_to_generate), and hands the answers back to `ruler_metrics`, which writes RULER's prediction JSONL
(`<out>/ruler/<model>/<length>/<task>.jsonl`: index, pred, input, outputs, others, truncation, length, so
RULER's own `evaluate.py --data_dir` scores them) and returns the model's `ruler` metrics entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from longctx import storage
from longctx.eval.ruler.constants import RULER_COMMIT, TASK_NAMES
from longctx.eval.ruler.generate import iter_ruler, prompt_ids, resolve_tasks, tokens_to_generate
from longctx.eval.ruler.score import score_task, summarize


@dataclass
class RulerItem:
    task: str
    length: int
    row: dict
    input_ids: np.ndarray
    max_new_tokens: int


@dataclass
class RulerWork:
    items: list[RulerItem] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def ruler_lengths(settings, context: int, base_len: int | None) -> list[int]:
    """eval.ruler.lengths, else the base model's length and the evaluation context length."""
    if settings.lengths:
        return sorted({int(n) for n in settings.lengths})
    return sorted({int(n) for n in (base_len, context) if n})


def build_ruler_items(tokenizer, settings, lengths: list[int]) -> RulerWork:
    """Every sample of every task and length, with its prompt ids."""
    tasks, skipped = resolve_tasks(settings)
    work = RulerWork(skipped=skipped)
    for length, task, rows in iter_ruler(tokenizer, settings, lengths, tasks=tasks, skipped=work.skipped):
        budget = tokens_to_generate(settings, task)
        for row in rows:
            # NOTE: int32 ids, and the prompt text only when it is to be saved: 500 samples x 13 tasks at 128K
            # tokens are 3.3 GB of int32 per length (Python int lists would be 9x that)
            ids = np.asarray(prompt_ids(tokenizer, row, settings.chat_template), dtype=np.int32)
            kept = row if settings.save_inputs else {k: v for k, v in row.items() if k != "input"}
            work.items.append(RulerItem(task, length, kept, ids, budget))
    return work


def settings_note(settings) -> dict:
    """What a reader needs to compare the table with published ones (RULER commit, changes to its settings)."""
    tasks, skipped = resolve_tasks(settings)
    return {"ruler_commit": RULER_COMMIT, "tasks": tasks, "skipped": skipped, "num_samples": settings.num_samples,
            "seed": settings.seed, "essay": settings.essay, "chat_template": settings.chat_template,
            "tokens_to_generate": {t: tokens_to_generate(settings, t) for t in tasks},
            "changed_from_ruler": {"tokens_to_generate": dict(settings.tokens_to_generate),
                                   "haystack": dict(settings.haystack),
                                   "remove_newline_tab": settings.remove_newline_tab}}


def prediction_row(item: RulerItem, pred: str, save_inputs: bool) -> dict:
    """RULER's prediction JSONL row (call_api.py's fields) plus the task."""
    return {"index": item.row["index"], "pred": pred, "input": item.row.get("input", "") if save_inputs else "",
            "outputs": item.row["outputs"], "others": {}, "truncation": -1, "length": item.row["length"],
            "task": item.task}


def ruler_metrics(work: RulerWork, preds: list[str], settings, out_dir: str | None, model_slug: str) -> dict:
    """Scores {length: {task: score}}, nulls, averages; writes the prediction files under out_dir/ruler/."""
    by: dict[tuple[int, str], list[tuple[RulerItem, str]]] = {}
    for item, pred in zip(work.items, preds):
        by.setdefault((item.length, item.task), []).append((item, pred))
    scores: dict[int, dict[str, float]] = {}
    nulls: dict[str, dict[str, str]] = {}
    for (length, task), pairs in sorted(by.items(), key=lambda kv: (kv[0][0], TASK_NAMES.index(kv[0][1]))):
        score, null = score_task(task, [p for _, p in pairs], [it.row["outputs"] for it, _ in pairs])
        scores.setdefault(length, {})[task] = score
        nulls.setdefault(str(length), {})[task] = null
        if out_dir:
            text = "".join(json.dumps(prediction_row(it, p, settings.save_inputs)) + "\n" for it, p in pairs)
            storage.write_text(storage.join(out_dir, "ruler", model_slug, str(length), f"{task}.jsonl"), text)
    examples = [{"task": it.task, "length": it.length, "outputs": it.row["outputs"], "pred": p[:200]}
                for it, p in list(zip(work.items, preds))[:3]]
    note = settings_note(settings)
    note["skipped"] = {**note["skipped"], **work.skipped}  # tasks that did not fit a length, beside QA without files
    return {"scores": {str(n): s for n, s in scores.items()}, **summarize(scores), "nulls": nulls,
            "samples": {str(n): {t: len(by[(n, t)]) for t in s} for n, s in scores.items()},
            "settings": note, "examples": examples}
