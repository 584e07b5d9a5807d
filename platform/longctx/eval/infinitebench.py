"""InfiniteBench's self-scored tasks from the user's files: prompts, generation budgets and official scoring.

    samples = build_prompts(tokenizer, cfg.eval.infinitebench, max_seq_len=131072)
    score_infinitebench_rows([{"task": "passkey", "pred": "71432.", "ground_truth": "71432"}])   # {"passkey": 100.0}

Tasks: passkey, number_string, kv_retrieval, math_find, code_debug, longbook_choice_eng (the ones scored by
rule, without a judge or ROUGE). Files are InfiniteBench's JSONL, one per task named `<task>.jsonl`:
{"id", "context", "input", "answer", "options"}. Prompts are InfiniteBench's templates for open models
(`yarn_mistral_templates`, which its Yi and ChatGLM runs use too) with its per-task generation budgets;
scoring is its `compute_scores.py`. Both from OpenBMB/InfiniteBench at commit
88b3daa6989da2fbe0077170d7a3c84c25d5ae58 (MIT License, Copyright (c) 2023 OpenBMB); the templates are
verbatim, the scoring functions ported rule for rule. Scores are percentages (InfiniteBench prints the
fraction; its tables show percent).

Where we differ, each time because the official code cannot score the released files as they are:
- kv_retrieval: the released files give `answer` as a one-element list, which the official scorer would
  look for as a word and never find; the list is unwrapped (as its passkey / number_string scorers do).
- math_find: a first number that is a decimal where the answer is an integer scores 0 (the official code
  raises on `int("45.8")`); a string answer is read as the number it spells.
- Long prompts keep their first and last (max_seq_len - max_new_tokens) // 2 token ids (InfiniteBench cuts
  the prompt to 128K tokens the same way, without subtracting the generation budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from longctx import storage
from longctx.eval.documents import SUFFIXES, iter_records
from longctx.eval.longbench import dataset_name
from longctx.eval.truncation import max_prompt_len, middle_truncate

INFINITEBENCH_COMMIT = "88b3daa6989da2fbe0077170d7a3c84c25d5ae58"
TASKS = ("passkey", "number_string", "kv_retrieval", "math_find", "code_debug", "longbook_choice_eng")

TEMPLATES: dict[str, str] = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is",  # noqa: E501
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",  # noqa: E501
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",  # noqa: E501
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is",  # noqa: E501
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:",  # noqa: E501
}
"""InfiniteBench's `yarn_mistral_templates` (src/prompt.py) for the six tasks."""

MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_choice_eng": 40, "math_find": 3,
                  "code_debug": 5}
"""InfiniteBench's DATA_NAME_TO_MAX_NEW_TOKENS (src/eval_utils.py)."""


def create_prompt(eg: dict, task: str) -> str:
    """InfiniteBench's create_prompt for one record."""
    template = TEMPLATES[task]
    if task in ("code_debug", "longbook_choice_eng"):
        opts = eg["options"]
        kw = {"question": eg.get("input", "")} if task == "longbook_choice_eng" else {}
        return template.format(context=eg["context"], OPTION_A=opts[0], OPTION_B=opts[1], OPTION_C=opts[2],
                               OPTION_D=opts[3], **kw)
    if task == "math_find":
        found = re.findall(r"The .+ of", eg["input"])
        if not found:
            raise ValueError(f"math_find: cannot find the target number ('The ... of') in {eg['input']!r}")
        prefix = f"What is {found[0].lower()[:-3]} in the following list?"
        return template.format(prefix=prefix, context=eg["context"], input=eg["input"])
    context = eg["context"] if "context" in eg else eg["content"]
    return template.format(context=context, input=eg["input"])


def get_answer(eg: dict, task: str):
    """InfiniteBench's get_answer: choice tasks give [answer text, letter]."""
    if task in ("code_debug", "longbook_choice_eng"):
        ans = eg["answer"]
        if isinstance(ans, str):
            return [ans, "ABCD"[eg["options"].index(ans)]]
        if isinstance(ans, list) and len(ans) == 1:
            return [ans[0], "ABCD"[eg["options"].index(ans[0])]]
        if isinstance(ans, list) and len(ans) == 2 and ans[1] in ("A", "B", "C", "D"):
            return ans
        raise ValueError(f"{task}: answer {ans!r} is neither an option nor [option, letter]")
    return eg["answer"]


# ------------------------------------------------------------------------------------ official scoring
def first_int_match(prediction: str) -> str:
    for item in re.split("[^0-9]", prediction):
        if item != "":
            return item
    return ""


def score_kv_retrieval(pred: str, label) -> bool:
    if isinstance(label, list) and len(label) == 1:  # the released files' list form (see the module docstring)
        label = label[0]
    for c in ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    return label in pred.split()


def score_passkey(pred: str, label) -> bool:
    if isinstance(label, list):
        label = label[0]
    return label == first_int_match(pred)


score_number_string = score_passkey


def _blank(pred: str, chars: Sequence[str]) -> str:
    """Each of `chars` becomes a space, then runs of spaces one space (InfiniteBench's clean-up)."""
    for c in chars:
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    return pred


def _after_prefix(pred: str, prefixes: Sequence[str]) -> str | None:
    """Text after the first of `prefixes` found in order ("" when the prediction ends there), else None."""
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        return "" if len(pred) < idx + len(prefix) + 1 else pred[idx + len(prefix) + 1:]
    return None


def score_code_debug(pred: str, label) -> bool:
    pred = pred.strip()
    label_c, fn_name = label[1], label[0]
    if pred[:2] in [f"{label_c}.", f"{label_c}:"]:
        return True
    after = _after_prefix(_blank(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"]),
                          ["answer is:", "is:", "answer:", "correct option is:"])
    return after is not None and any(after.startswith(s) for s in (label_c, fn_name))


def score_math_find(pred: str, label) -> bool:
    if isinstance(label, list):
        label = label[0]
    if isinstance(label, str):
        label = float(label) if "." in label else int(label)
    first = re.search(r"\d+\.\d+|\d+", pred)
    if first is None:
        return False
    num = first.group(0).strip()
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise TypeError(f"math_find: expected an int or float answer, got {type(label).__name__}")
    if isinstance(label, int):
        return "." not in num and int(num) == label
    return float(num) == label


def score_longbook_choice_eng(pred: str, label) -> bool:
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _blank(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"])
    after = _after_prefix(pred, ["answer is:", "answer:", "answer is", "option is"])
    if after is not None:
        return any(after.startswith(s) for s in label)
    for word in pred.split():
        if word in "ABCD":
            return word in label
    return False


SCORERS = {"passkey": score_passkey, "number_string": score_number_string, "kv_retrieval": score_kv_retrieval,
           "math_find": score_math_find, "code_debug": score_code_debug,
           "longbook_choice_eng": score_longbook_choice_eng}


def score_one(task: str, pred: str, label) -> float:
    if task not in SCORERS:
        raise ValueError(f"{task!r} is not a self-scored InfiniteBench task ({', '.join(TASKS)})")
    return float(SCORERS[task](pred, label))


def _label(row: dict, where: str):
    for key in ("ground_truth", "label"):  # InfiniteBench's prediction files use either
        if key in row:
            return row[key]
    raise ValueError(f"{where}: no `ground_truth` or `label` (InfiniteBench prediction rows)")


def _pred(row: dict, where: str) -> str:
    for key in ("prediction", "pred"):
        if key in row:
            return str(row[key])
    raise ValueError(f"{where}: no `prediction` or `pred`")


def score_infinitebench_rows(rows: Iterable[dict]) -> dict[str, float]:
    """{task: percent correct} of prediction rows with `task`, `prediction`/`pred`, `ground_truth`/`label`."""
    by_task: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        where = r.get("_where", f"prediction {i}")
        task = r.get("task")
        if task not in TASKS:
            raise ValueError(f"{where}: `task` {task!r} is not one of {', '.join(TASKS)}")
        by_task.setdefault(task, []).append(score_one(task, _pred(r, where), _label(r, where)))
    return {t: round(100 * sum(v) / len(v), 2) for t in TASKS if (v := by_task.get(t))}


# ------------------------------------------------------------------------------------------- prompts
@dataclass
class IBSample:
    task: str
    index: int
    id: Any
    input_ids: list[int]
    max_new_tokens: int
    ground_truth: Any
    truncated: bool = False


def task_files(data: str, tasks: Sequence[str] = ()) -> dict[str, str]:
    """{task: uri} of InfiniteBench files under `data` (named `<task>.jsonl`); all asked-for tasks must exist."""
    found = {}
    for uri in storage.expand(data, SUFFIXES):
        name = dataset_name(uri)
        if name in TASKS:
            found[name] = uri
    missing = [t for t in tasks if t not in found]
    if missing:
        raise FileNotFoundError(f"{data}: no {', '.join(f'{t}.jsonl' for t in missing)} (InfiniteBench files are "
                                f"named <task>.jsonl; found: {', '.join(sorted(found)) or 'none'})")
    if not found:
        raise FileNotFoundError(f"{data}: none of {', '.join(f'{t}.jsonl' for t in TASKS)}")
    return {t: found[t] for t in (tasks or TASKS) if t in found}


def build_prompts(tokenizer, settings, max_seq_len: int) -> list[IBSample]:
    """Tokenized, middle-truncated prompts of every configured task (InfiniteBench's templates)."""
    if not settings.data:
        raise ValueError("eval.infinitebench.enabled needs eval.infinitebench.data (a folder of <task>.jsonl files)")
    out: list[IBSample] = []
    for task, uri in task_files(settings.data, settings.tasks).items():
        budget = max_prompt_len(max_seq_len, MAX_NEW_TOKENS[task])
        records = [(where, rec) for where, rec in iter_records(uri)][:settings.max_samples]
        for i, (where, eg) in enumerate(records):
            try:
                prompt, label = create_prompt(eg, task), get_answer(eg, task)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{where}: not an InfiniteBench {task} record ({e!r}); expected id, context, "
                                 "input, answer, options") from e
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            cut = middle_truncate(ids, budget)
            if settings.chat_template and getattr(tokenizer, "chat_template", None):
                text = tokenizer.decode(cut, skip_special_tokens=True)
                enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True)
                cut = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
            out.append(IBSample(task, i, eg.get("id", i), list(cut), MAX_NEW_TOKENS[task], label, len(ids) > budget))
    return out
