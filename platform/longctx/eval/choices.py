"""Short multiple-choice tasks scored by log-likelihood (MMLU-style files), for the regression gate.

    questions = load_choice_questions("mmlu_subset.jsonl")         # [{"question", "choices", "answer"}]
    score_choices(model, tokenizer, questions)                     # {"accuracy": 0.61, "questions": 200}

A file holds JSON lines `{"question": str, "choices": [str, ...], "answer": int}` (`answer` indexes `choices`).
Each choice is scored as lm-evaluation-harness scores a multiple-choice continuation (its `acc`): the summed
log-likelihood of " <choice>" after "Question: <question>\\nAnswer:"; the likeliest choice is the model's answer.
A record that does not have this shape stops the read with its file and line named (a short task file is the
user's own, a silent skip would change the score).
"""

from __future__ import annotations

from typing import Sequence

import torch

from longctx.eval.documents import iter_records
from longctx.eval.perplexity import token_nll

PROMPT = "Question: {question}\nAnswer:"


class ChoiceFileError(ValueError):
    """A multiple-choice record is malformed; the message names the file, the line and the field."""


def load_choice_questions(uri: str, limit: int | None = None) -> list[dict]:
    """The first `limit` questions of the JSONL file(s) at `uri`, each checked."""
    out: list[dict] = []
    for where, rec in iter_records(uri):
        question, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
        if not isinstance(question, str) or not question:
            raise ChoiceFileError(f"{where}: `question` must be a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ChoiceFileError(f"{where}: `choices` must be a list of at least 2 non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ChoiceFileError(f"{where}: `answer` must be an index into `choices` (0..{len(choices) - 1})")
        out.append({"question": question, "choices": choices, "answer": answer})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ChoiceFileError(f"{uri}: no multiple-choice questions found")
    return out


def choice_loglikelihoods(model, tokenizer, question: str, choices: Sequence[str]) -> list[float]:
    """Summed log-likelihood of each " <choice>" after the question's prompt (one right-padded batch: causal
    attention, so padding after a choice does not change its tokens' scores)."""
    prompt = tokenizer(PROMPT.format(question=question), add_special_tokens=True)["input_ids"]
    conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    width = len(prompt) + max(len(c) for c in conts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [prompt + c + [pad] * (width - len(prompt) - len(c)) for c in conts]
    nll = token_nll(model, torch.tensor(rows, dtype=torch.long), from_position=len(prompt))
    return [-float(nll[i, len(prompt):len(prompt) + len(c)].sum()) for i, c in enumerate(conts)]


def score_choices(model, tokenizer, questions: Sequence[dict]) -> dict:
    """Accuracy (0-1) of the likeliest choice over `questions`."""
    model.eval()
    correct = 0
    for q in questions:
        ll = choice_loglikelihoods(model, tokenizer, q["question"], q["choices"])
        correct += int(max(range(len(ll)), key=ll.__getitem__) == q["answer"])
    return {"accuracy": correct / len(questions), "questions": len(questions)}
