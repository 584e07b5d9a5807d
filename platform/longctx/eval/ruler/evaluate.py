"""RULER on one model without Ray: generate, answer greedily, score. For notebooks, tests and stage gates.

    from longctx.eval.ruler.evaluate import evaluate_ruler
    scores = evaluate_ruler(model, tokenizer, 4096, RulerConfig(num_samples=50))   # {task: score}

`longctx eval run` does the same through the evaluation actor pool (`eval.runner`); this is the plain path
a check after a training stage calls at the base length.
"""

from __future__ import annotations

from collections import defaultdict

from longctx.config import RulerConfig
from longctx.eval.generate import greedy_generate
from longctx.eval.ruler.generate import generate_ruler, prompt_ids, tokens_to_generate
from longctx.eval.ruler.score import score_ruler_rows


def answer_rows(model, tokenizer, rows_by_task: dict[str, list[dict]], settings, *, prefill_chunk: int = 4096,
                batch_size: int = 1) -> list[dict]:
    """RULER prediction rows (`task`, `index`, `pred`, `outputs`, `length`) of greedy answers to the samples."""
    eos = tokenizer.eos_token_id
    out = []
    for task, rows in rows_by_task.items():
        budget = tokens_to_generate(settings, task)
        prompts = [prompt_ids(tokenizer, r, settings.chat_template) for r in rows]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(prompts):  # equal-length prompts decode together
            by_len[len(ids)].append(i)
        preds: dict[int, str] = {}
        for idx in by_len.values():
            for k in range(0, len(idx), batch_size):
                chunk = idx[k:k + batch_size]
                new = greedy_generate(model, [prompts[i] for i in chunk], max_new_tokens=budget, eos_token_id=eos,
                                      prefill_chunk=prefill_chunk)
                for i, ids in zip(chunk, new):
                    preds[i] = tokenizer.decode(ids, skip_special_tokens=True)
        out += [{"task": task, "index": r["index"], "pred": preds[i], "outputs": r["outputs"], "length": r["length"]}
                for i, r in enumerate(rows)]
    return out


def evaluate_ruler(model, tokenizer, length: int, settings=None, *, tasks: list[str] | None = None,
                   num_samples: int | None = None, prefill_chunk: int = 4096, batch_size: int = 1) -> dict[str, float]:
    """{task: score} of RULER at one length for one loaded model (scores 0-100 as RULER's)."""
    settings = settings or RulerConfig()
    samples = generate_ruler(tokenizer, settings, [int(length)], tasks=tasks, num_samples=num_samples)[int(length)]
    rows = answer_rows(model, tokenizer, samples, settings, prefill_chunk=prefill_chunk, batch_size=batch_size)
    return score_ruler_rows(rows)
