"""Generate RULER samples at any length with the evaluated model's tokenizer, and write RULER's JSONL.

    samples = generate_ruler(tokenizer, cfg.eval.ruler, lengths=[4096, 8192])   # {length: {task: [row, ...]}}
    write_ruler_samples("out/", samples)                                        # out/<length>/<task>.jsonl
    write_ruler_samples("out/", iter_ruler(tokenizer, cfg.eval.ruler, [131072]))  # one task at a time

Every (task, length) starts from RULER's seed (default 42) as RULER's prepare.py does, so the rows are
RULER's for the same tokenizer (see `synthetic.py` for the two places we differ). Rows are RULER's data
JSONL: `index`, `input` (prompt without the answer prefix), `outputs` (references), `length` (prompt +
answer prefix tokens + tokens_to_generate), `length_w_model_temp`, `answer_prefix`, niah's
`token_position_answer`; a model is prompted with `input + answer_prefix` and generates greedily at most
the task's tokens_to_generate.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from longctx import storage
from longctx.eval.haystack import load_haystack_text
from longctx.eval.ruler.aggregation import CommonWords, FrequentWords
from longctx.eval.ruler.constants import BASE_TASKS, TASK_NAMES, TASKS
from longctx.eval.ruler.qa import QA, QA_SOURCES, READERS
from longctx.eval.ruler.synthetic import NIAH, RulerLengthError, Template, VariableTracking
from longctx.progress import Progress

log = logging.getLogger(__name__)
_CLASSES = {"niah": NIAH, "variable_tracking": VariableTracking, "common_words_extraction": CommonWords,
            "freq_words_extraction": FrequentWords, "qa": QA}
_SENTINEL = "\x00RULER-TASK\x00"


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a text without special tokens (RULER's `len(tokenizer.tokenize(text))` for HF tokenizers)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_wrapper(tokenizer) -> tuple[str, str]:
    """(text before, text after) the user turn in the tokenizer's chat template, with the generation prompt.

    RULER's model templates (`[INST] {task_template} [/INST]`, ...) in the tokenizer's own form; the answer
    prefix follows it, inside the assistant turn, as RULER places it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("eval.ruler.chat_template is true but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    pre, _, post = str(text).partition(_SENTINEL)
    return pre, post


def resolve_tasks(settings) -> tuple[list[str], dict[str, str]]:
    """(tasks to run, {task: why it is skipped}); QA runs by default only where its file is set."""
    skipped: dict[str, str] = {}
    if settings.tasks:
        return list(settings.tasks), skipped
    tasks = []
    for name in TASK_NAMES:
        dataset = TASKS[name]["args"].get("dataset")
        if dataset and not getattr(settings, dataset):
            skipped[name] = f"no eval.ruler.{dataset} file"
        else:
            tasks.append(name)
    return tasks, skipped


def tokens_to_generate(settings, task: str) -> int:
    """The task's generation budget: eval.ruler.tokens_to_generate by task, then by base task, else RULER's."""
    base = TASKS[task]["task"]
    over = settings.tokens_to_generate
    return int(over.get(task, over.get(base, BASE_TASKS[base]["tokens_to_generate"])))


class _Resources:
    """What the tasks share across lengths: the essay text and the QA files (read once)."""

    def __init__(self, settings):
        self.settings = settings
        self._essay: str | None = None
        self._qa: dict[str, Any] = {}

    def essay(self, min_chars: int) -> str:
        if self._essay is None or len(self._essay) < min_chars:
            self._essay = load_haystack_text(self.settings.essay, self.settings.essay_text_field, min_chars=min_chars)
        return self._essay

    def qa(self, dataset: str):
        if dataset not in self._qa:
            uri = getattr(self.settings, dataset)
            if not uri:
                raise ValueError(f"RULER {'qa_1' if dataset == 'squad' else 'qa_2'} needs the {QA_SOURCES[dataset]} "
                                 f"in RULER's format: set eval.ruler.{dataset}=PATH, or leave the task out of "
                                 "eval.ruler.tasks")
            self._qa[dataset] = READERS[dataset](uri)
        return self._qa[dataset]


def build_task(name: str, tokenizer, length: int, settings, resources: _Resources | None = None,
               wrapper: tuple[str, str] = ("", "")):
    """The generator of one RULER task at one length (max_seq_length = length)."""
    if name not in TASKS:
        raise ValueError(f"unknown RULER task {name!r}; tasks: {', '.join(TASK_NAMES)}")
    resources = resources or _Resources(settings)
    spec = TASKS[name]
    base, args = spec["task"], dict(spec["args"])
    if name in settings.haystack:
        args["type_haystack"] = settings.haystack[name]
    kw: dict[str, Any] = {"template": Template.for_task(base, *wrapper), "count": token_counter(tokenizer),
                          "max_seq_length": int(length), "tokens_to_generate": tokens_to_generate(settings, name),
                          "seed": settings.seed, "remove_newlines": settings.remove_newline_tab, "name": name}
    if args.get("type_haystack") == "essay":
        args["essay"] = resources.essay(min_chars=16 * int(length))
    if base == "common_words_extraction":
        args["english_words"] = settings.cwe_words
    if base == "qa":
        args["data"] = resources.qa(args["dataset"])
    return _CLASSES[base](**args, **kw)


def iter_ruler(tokenizer, settings, lengths: list[int], tasks: list[str] | None = None,
               num_samples: int | None = None, skipped: dict[str, str] | None = None):
    """(length, task, rows) for every length and task in turn, with a progress line (counts, rate, ETA).

    A task that cannot fit a length raises `RulerLengthError`, or, given a `skipped` dict, is left out at that
    length with the reason recorded under "<task> at <length>".
    """
    tasks = tasks if tasks is not None else resolve_tasks(settings)[0]
    n = settings.num_samples if num_samples is None else num_samples
    wrapper = chat_wrapper(tokenizer) if settings.chat_template else ("", "")
    resources = _Resources(settings)
    bar = Progress("RULER samples", total=n * len(tasks) * sum(int(x) for x in lengths), unit="sample tokens")
    done = 0
    for length in lengths:
        for name in tasks:
            t0 = time.perf_counter()
            try:
                rows = build_task(name, tokenizer, length, settings, resources, wrapper).generate(n)
            except RulerLengthError as e:
                if skipped is None:
                    raise
                skipped[f"{name} at {length}"] = str(e)
                log.warning("RULER: %s", e)
                rows = None
            done += n * int(length)
            bar.update(done)
            if rows is not None:
                log.info("RULER %s at %d tokens: %d samples in %.1f s", name, length, len(rows),
                         time.perf_counter() - t0)
                yield int(length), name, rows


def generate_ruler(tokenizer, settings, lengths: list[int], tasks: list[str] | None = None,
                   num_samples: int | None = None,
                   skipped: dict[str, str] | None = None) -> dict[int, dict[str, list[dict]]]:
    """{length: {task: rows}} for every task and length (RULER's data rows, see the module docstring)."""
    out: dict[int, dict[str, list[dict]]] = {int(n): {} for n in lengths}
    for length, name, rows in iter_ruler(tokenizer, settings, lengths, tasks, num_samples, skipped):
        out[length][name] = rows
    return out


def prompt_ids(tokenizer, row: dict, chat_template: bool = False) -> list[int]:
    """Token ids the model is prompted with: input + answer_prefix, with the tokenizer's special tokens.

    NOTE: RULER's HF runner tokenizes the prompt with the tokenizer's defaults (a BOS for Llama); a chat
    template that writes its own BOS text gets no second one.
    """
    text = row["input"] + row.get("answer_prefix", "")
    bos = getattr(tokenizer, "bos_token", None)
    special = not (chat_template and bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def dump_jsonl(rows: list[dict]) -> str:
    # NOTE: ensure_ascii as RULER's write_manifest writes them
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_ruler_samples(out_dir: str, samples) -> list[str]:
    """Write `<out_dir>/<length>/<task>.jsonl` (RULER's data JSONL); returns the files written.

    `samples`: {length: {task: rows}}, or `iter_ruler`'s (length, task, rows), written as they come.
    """
    items = ((n, t, rows) for n, by_task in samples.items() for t, rows in by_task.items()) \
        if isinstance(samples, dict) else samples
    written = []
    for length, task, rows in items:
        uri = storage.join(out_dir, str(length), f"{task}.jsonl")
        storage.write_text(uri, dump_jsonl(rows))
        written.append(uri)
    return written
