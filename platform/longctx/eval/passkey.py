"""Passkey retrieval (Mohtashami & Jaggi 2023; used by the position-interpolation and LongLoRA papers).

A random 5-digit pass key sits at a relative depth inside repeated filler sentences; the prompt ends with
"What is the pass key? The pass key is" and the model continues greedily. The prompt is built in token ids
of the evaluated model's tokenizer, so its length is exact (see `longctx.eval.haystack`).

Scoring: a trial is correct when the first integer in the greedy continuation equals the pass key
(LongLoRA compares the generated answer tokens with the key's tokens; this is the same test, robust to
how the tokenizer splits digits). Accuracy is reported per (length, depth) cell and per length, beside
the key's mean teacher-forced NLL per length (a graded signal where small models never get it exactly).

    prompts = build_passkey_prompts(tokenizer, lengths=[256, 1024], depths=[0.1, 0.5, 0.9], trials=4)
    result = run_passkey(model, tokenizer, prompts)
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from longctx.eval.generate import greedy_generate
from longctx.eval.haystack import Haystack, fill_with_needles
from longctx.eval.perplexity import token_nll

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTemplate:
    task: str
    filler: tuple[str, ...]
    needle: str
    """Holds `{key}`."""
    question: str
    """Ends where the key is to be continued."""


TEMPLATES = {
    # the published prompt (Mohtashami & Jaggi 2023), used everywhere by default
    "default": PasskeyTemplate(TASK, tuple(FILLER), NEEDLE, QUESTION),
    # another wording, filler and question form, for checking that a score is not tied to one template (the
    # shipped base's retrieval training data contains neither)
    "locker": PasskeyTemplate(
        "Below is a long note. One line of it holds a number you will be asked about.",
        ("Rain fell over the old harbor.", "A cat slept on the warm wall.", "Boats rocked in the wind.",
         "Nobody came to the market that day.", "The bell rang twice."),
        "My locker combination is {key}. Do not lose it. {key} is my locker combination.",
        " Tell me my locker combination. My locker combination is"),
}


@dataclass
class PasskeyPrompt:
    length: int
    """Prompt length in tokens (exact)."""
    depth: float
    """Requested relative depth of the pass key in the filler."""
    trial: int
    key: str
    """The pass key (5 digits)."""
    input_ids: list[int]
    needle_start: int
    """Token index where the pass-key sentence starts."""

    def to_row(self) -> dict:
        return asdict(self)


def build_passkey_prompts(
    tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0,
    template: PasskeyTemplate | str = "default",
) -> list[PasskeyPrompt]:
    """Every (length, depth, trial) prompt, reproducible from `seed`; `template` is a PasskeyTemplate or a name
    in TEMPLATES."""
    t = TEMPLATES[template] if isinstance(template, str) else template
    rng = random.Random(seed)
    hay = Haystack.from_sentences(tokenizer, list(t.filler))
    task_ids = tokenizer(t.task, add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(t.question, add_special_tokens=False)["input_ids"]
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer(" " + t.needle.format(key=key), add_special_tokens=False)["input_ids"]
                body = length - len(task_ids) - len(question_ids)
                if body < len(needle) + 1:
                    raise ValueError(
                        f"passkey length {length} is too short: the task, question and key alone take "
                        f"{len(task_ids) + len(question_ids) + len(needle)} tokens"
                    )
                ids, (start,) = fill_with_needles(hay, body, [needle], [depth], offset=trial)
                full = [*task_ids, *ids, *question_ids]
                assert len(full) == length
                prompts.append(PasskeyPrompt(length, float(depth), trial, key, full, len(task_ids) + start))
    return prompts


def answer_tokens_budget(tokenizer) -> int:
    """New tokens to generate: the key's tokens plus a little slack for a leading space."""
    return len(tokenizer(" 99999.", add_special_tokens=False)["input_ids"]) + 2


def is_correct(prediction: str, key: str) -> bool:
    """The first integer in the prediction is the key."""
    found = re.search(r"\d+", prediction)
    return bool(found) and found.group(0) == key


def score_passkey_rows(rows: Sequence[dict]) -> dict:
    """Accuracy per (length, depth) and per length from rows with length, depth and correct."""
    cells: dict = defaultdict(list)
    by_length: dict = defaultdict(list)
    for r in rows:
        cells[(int(r["length"]), float(r["depth"]))].append(bool(r["correct"]))
        by_length[int(r["length"])].append(bool(r["correct"]))
    lengths = sorted(by_length)
    depths = sorted({d for _, d in cells})
    nll_by_length: dict = defaultdict(list)
    for r in rows:
        if r.get("key_nll") is not None:
            nll_by_length[int(r["length"])].append(float(r["key_nll"]))
    extra = {"key_nll_by_length": {str(n): sum(v) / len(v) for n, v in sorted(nll_by_length.items())}} if nll_by_length else {}
    return {
        **extra,
        "lengths": lengths,
        "depths": depths,
        "accuracy": {str(n): {str(d): sum(cells[(n, d)]) / len(cells[(n, d)]) for d in depths if cells[(n, d)]} for n in lengths},
        "accuracy_by_length": {str(n): sum(by_length[n]) / len(by_length[n]) for n in lengths},
        "overall": sum(sum(v) for v in by_length.values()) / max(1, sum(len(v) for v in by_length.values())),
        "trials": sum(len(v) for v in by_length.values()),
    }


def key_nll(model, tokenizer, prompts: Sequence[PasskeyPrompt]) -> list[float]:
    """Mean NLL of the key's tokens (" 12345") after each prompt, teacher-forced.

    A graded signal beside exact match: small models that never retrieve the key still show whether the
    context helps (lower NLL) or a RoPE change breaks it (higher NLL).
    """
    targets = [tokenizer(" " + p.key, add_special_tokens=False)["input_ids"] for p in prompts]
    out = [0.0] * len(prompts)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        groups[(len(p.input_ids), len(t))].append(i)
    for (plen, tlen), idx in groups.items():
        ids = torch.tensor([prompts[i].input_ids + targets[i] for i in idx])
        nll = token_nll(model, ids, from_position=plen)  # the LM head only runs on the key's positions
        for row, i in zip(nll, idx):
            out[i] = float(row[plen:].mean())
    return out


def run_passkey_batch(model, tokenizer, prompts: Sequence[PasskeyPrompt], prefill_chunk: int = 4096) -> list[dict]:
    """Greedy answers for prompts (equal lengths batch together) and the key's NLL; one row per prompt."""
    by_len: dict[int, list[PasskeyPrompt]] = defaultdict(list)
    for p in prompts:
        by_len[len(p.input_ids)].append(p)
    budget = answer_tokens_budget(tokenizer)
    rows = []
    for group in by_len.values():
        outs = greedy_generate(
            model, [p.input_ids for p in group], max_new_tokens=budget,
            eos_token_id=tokenizer.eos_token_id, prefill_chunk=prefill_chunk,
        )
        nlls = key_nll(model, tokenizer, group)
        for p, out, nll in zip(group, outs, nlls):
            pred = tokenizer.decode(out, skip_special_tokens=True)
            rows.append({"length": p.length, "depth": p.depth, "trial": p.trial, "key": p.key,
                         "prediction": pred, "correct": is_correct(pred, p.key), "key_nll": nll})
    return rows


def run_passkey(model, tokenizer, prompts: Sequence[PasskeyPrompt], batch_size: int = 4) -> dict:
    """Passkey accuracy of one model (no Ray; the runner spreads the same work over actors)."""
    model.eval()
    rows = []
    for i in range(0, len(prompts), batch_size):
        rows.extend(run_passkey_batch(model, tokenizer, prompts[i : i + batch_size]))
    out = score_passkey_rows(rows)
    out["examples"] = rows[:3]
    return out
