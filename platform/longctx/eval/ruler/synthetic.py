"""RULER's retrieval generators: needle in a haystack (8 tasks) and variable tracking, ported call for call.

Ported from NVIDIA/RULER (commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a; `scripts/data/synthetic/niah.py`
and `variable_tracking.py`, Copyright (c) 2024 NVIDIA CORPORATION, Apache License 2.0) and changed: the
script-level globals became instance state, RULER's random streams (`random` and `numpy.random` seeded
with the task's seed) are explicit `random.Random` / `numpy.random.RandomState` objects drawn in the same
order, so the same tokenizer, seed and word lists give RULER's samples string for string. Deviations, all
where RULER would not produce a sample: a sample that cannot fit after retries raises `RulerLengthError`
instead of looping forever, and lengths too short for RULER's smallest haystack search below it.

Each generator's `generate(num_samples)` returns RULER's JSONL rows (`index`, `input`, `outputs`, `length`,
`length_w_model_temp`, `answer_prefix`, and niah's `token_position_answer`). A sample's `length` counts the
prompt (input + answer prefix) with the model's tokenizer plus the task's tokens_to_generate, and never
exceeds `max_seq_length`.
"""

from __future__ import annotations

import heapq
import random
import re
import string
import uuid
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from longctx.eval.ruler.constants import BASE_TASKS, DEPTHS, NEEDLE, NOISE
from longctx.eval.ruler.words import niah_words, sent_tokenize

_RETRIES = 50  # NOTE: RULER retries a sample at its smallest haystack forever; we give up after this many


class RulerLengthError(ValueError):
    """A RULER task cannot fit the requested length (the message has the numbers and the fix)."""


@dataclass(frozen=True)
class Template:
    """RULER's prompt: optional model wrapper around the task template, then the answer prefix.

    `format` gives `pre + task.format(...) + post + answer_prefix.format(...)`, what RULER's
    `(model_template.format(task_template=...) + answer_prefix).format(...)` gives for a wrapper without braces.
    """

    task: str
    answer_prefix: str
    pre: str = ""
    post: str = ""

    def format(self, **kw) -> str:
        return self.pre + self.task.format(**kw) + self.post + self.answer_prefix.format(**kw)

    def replace(self, old: str, new: str) -> "Template":
        # RULER edits the template text; the model wrapper is left alone here (RULER's `base` has none)
        return replace(self, task=self.task.replace(old, new), answer_prefix=self.answer_prefix.replace(old, new))

    @property
    def wrapped(self) -> bool:
        return bool(self.pre or self.post)

    @classmethod
    def for_task(cls, base_task: str, pre: str = "", post: str = "") -> "Template":
        t = BASE_TASKS[base_task]
        return cls(t["template"], t["answer_prefix"], pre, post)


def binary_search(gen: Callable[[int], tuple[str, object]], measure: Callable[[str], int], lower: int, upper: int,
                  budget: int, tolerant: bool = False) -> int | None:
    """Largest haystack size in [lower, upper] whose prompt measures <= budget (RULER's search), else None.

    `tolerant`: a size the generator rejects (fewer haystack units than needles) counts as not fitting.
    """
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        try:
            fits = measure(gen(mid)[0]) <= budget
        except RulerLengthError:
            raise
        except ValueError:
            if not tolerant:
                raise
            fits = False
        if fits:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best


def search_size(gen, measure, incremental: int, upper: int, budget: int) -> int:
    """RULER's search from `incremental`; below it (1 .. incremental-1) when nothing there fits."""
    found = binary_search(gen, measure, incremental, upper, budget)
    if found is None:  # RULER would use `incremental` and retry forever; a shorter haystack may still fit
        found = binary_search(gen, measure, 1, incremental - 1, budget, tolerant=True)
    return incremental if found is None else found


def fit_sample(gen, measure, start: int, incremental: int, budget: int, what: str):
    """(text, answer, length) of one sample: RULER's retry loop (smaller by `incremental` while it does not fit)."""
    used, stuck = start, 0
    while True:
        try:
            text, answer = gen(used)
            length = measure(text)
            if length <= budget:
                return text, answer, length
        except RulerLengthError:
            raise
        except ValueError:  # RULER's bare except: e.g. more needles than haystack sentences
            length = None
        if used > incremental:
            used -= incremental
            continue
        stuck += 1
        if stuck >= _RETRIES:
            if used > 1:
                used, stuck = used - 1, 0
                continue
            last = f" (the last try measured {length} tokens with tokens to generate)" if length is not None else ""
            raise RulerLengthError(
                f"{what}: no sample fits max_seq_length {budget}{last}; use a longer length (eval.ruler.lengths) or "
                "fewer tokens to generate (eval.ruler.tokens_to_generate)")


def answer_split(text: str, base_task: str) -> tuple[str, str]:
    """(input, answer_prefix): RULER cuts the prompt at the last occurrence of the answer prefix's first 10 chars."""
    at = text.rfind(BASE_TASKS[base_task]["answer_prefix"][:10])
    return text[:at], text[at:]


def essay_words(essay: str | None, task: str) -> list[str]:
    """The essay haystack as RULER holds it: whitespace runs to one space, split on spaces."""
    if not essay:
        raise ValueError(f"{task}: the essay haystack needs text (eval.ruler.essay)")
    return re.sub(r"\s+", " ", essay).split(" ")


def remove_newline_tab(text: str) -> str:
    return " ".join(text.replace("\n", " ").replace("\t", " ").strip().split())


class Task:
    base_task = ""

    def __init__(self, *, template: Template, count: Callable[[str], int], max_seq_length: int,
                 tokens_to_generate: int | None = None, seed: int = 42, remove_newlines: bool = False, name: str = ""):
        self.template = template
        self.count = count
        self.max_seq_length = max_seq_length
        self.tokens_to_generate = BASE_TASKS[self.base_task]["tokens_to_generate"] if tokens_to_generate is None \
            else tokens_to_generate
        self.seed = seed
        self.remove_newlines = remove_newlines
        self.name = name or self.base_task
        self.rng = random.Random(seed)  # RULER: random.seed(args.random_seed)
        self.nprng = np.random.RandomState(seed)  # RULER: np.random.seed(args.random_seed)

    def _row(self, index: int, text: str, answer, length: int) -> dict:
        if self.remove_newlines:
            text = remove_newline_tab(text)
        inp, prefix = answer_split(text, self.base_task)
        return {"index": index, "input": inp, "outputs": list(answer), "length": length,
                "length_w_model_temp": length, "answer_prefix": prefix}


class NIAH(Task):
    """niah.py: keys and values as words, 7-digit numbers or UUIDs; haystack noise, essay or needle."""

    base_task = "niah"

    def __init__(self, *, type_haystack: str, type_needle_k: str, type_needle_v: str, num_needle_k: int = 1,
                 num_needle_v: int = 1, num_needle_q: int = 1, essay: str | None = None, **kw):
        super().__init__(**kw)
        self.type_haystack, self.type_needle_k, self.type_needle_v = type_haystack, type_needle_k, type_needle_v
        self.num_needle_k = max(num_needle_k, num_needle_q)
        self.num_needle_v, self.num_needle_q = num_needle_v, num_needle_q
        if type_haystack == "essay":
            self.haystack: str | list[str] = essay_words(essay, self.name)
        elif type_haystack == "noise":
            self.haystack = NOISE
        elif type_haystack == "needle":
            self.haystack = NEEDLE
        else:
            raise ValueError(f"{self.name}: haystack {type_haystack!r} is not one of noise, essay, needle")
        self.words = niah_words()

    def _random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            return self.rng.choice(self.words)
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        raise ValueError(f"{self.name}: needle type {kind!r} is not one of numbers, words, uuids")

    def generate_input_output(self, num_haystack: int) -> tuple[str, list[str]]:
        rng = self.rng
        keys, values, needles = [], [], []
        for _ in range(self.num_needle_k):
            keys.append(self._random(self.type_needle_k))
            value = []
            for _ in range(self.num_needle_v):
                value.append(self._random(self.type_needle_v))
                needles.append(NEEDLE.format(type_needle_v=self.type_needle_v, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)

        if self.type_haystack == "essay":
            hay = self.haystack
            if num_haystack <= len(hay):
                text = " ".join(hay[:num_haystack])
            else:
                repeats = (num_haystack + len(hay) - 1) // len(hay)
                text = " ".join((hay * repeats)[:num_haystack])
            sents = sent_tokenize(text.strip())
            cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.type_haystack == "noise":
                sentences = [self.haystack] * num_haystack
            else:
                sentences = [NEEDLE.format(type_needle_v=self.type_needle_v, key=self._random(self.type_needle_k),
                                           value=self._random(self.type_needle_v)) for _ in range(num_haystack)]
            indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for index, element in zip(indexes, needles):
                sentences.insert(index, element)
            context = "\n".join(sentences)

        indices = rng.sample(range(self.num_needle_k), self.num_needle_q)
        queries = [keys[i] for i in indices]
        answers = [a for i in indices for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_v = self.template, self.type_needle_v
        if self.num_needle_q * self.num_needle_v == 1:
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_v = type_v[:-1]
        return template.format(type_needle_v=type_v, context=context, query=query), answers

    def generate(self, num_samples: int) -> list[dict]:
        ttg, budget = self.tokens_to_generate, self.max_seq_length
        incremental = {"essay": 500, "noise": 25, "needle": 25}[self.type_haystack]
        if self.type_haystack != "essay" and budget < 4096:
            incremental = 5
        measure = lambda text: self.count(text) + ttg  # noqa: E731
        per_unit = self.count(self.generate_input_output(incremental)[0]) / incremental
        upper = max(int((budget / per_unit) * 3), incremental * 2)
        num_haystack = search_size(self.generate_input_output, measure, incremental, upper, budget)
        rows = []
        for index in range(num_samples):
            text, answer, length = fit_sample(self.generate_input_output, measure, num_haystack, incremental,
                                              budget, f"{self.name} at {budget} tokens")
            row = self._row(index, text, answer, length)
            # NOTE: RULER overwrites `index` with the answer's character offset here (a bug); we keep the sample number
            at = row["input"].find(answer[0])
            row["token_position_answer"] = self.count(row["input"][:at])
            rows.append(row)
        return rows


class VariableTracking(Task):
    """variable_tracking.py: chains `VAR X = 12345`, `VAR Y = VAR X`, ... in noise; one-shot ICL example."""

    base_task = "variable_tracking"

    def __init__(self, *, type_haystack: str = "noise", num_chains: int = 1, num_hops: int = 4,
                 essay: str | None = None, **kw):
        super().__init__(**kw)
        self.type_haystack, self.num_chains, self.num_hops = type_haystack, num_chains, num_hops
        if type_haystack == "essay":
            self.haystack: str | list[str] = essay_words(essay, self.name)
        elif type_haystack == "noise":
            self.haystack = NOISE
        else:
            raise ValueError(f"{self.name}: haystack {type_haystack!r} is not one of noise, essay")

    def generate_chains(self, is_icl: bool):
        k = 3 if is_icl else 5
        num_hops = min(10, self.num_hops) if is_icl else self.num_hops
        n = (num_hops + 1) * self.num_chains
        vars_all = ["".join(self.rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range(n)]
        while len(set(vars_all)) < n:
            vars_all.append("".join(self.rng.choices(string.ascii_uppercase, k=k)).upper())
        vars_ret, chains_ret = [], []
        for i in range(0, len(vars_all), num_hops + 1):
            this_vars = vars_all[i:i + num_hops + 1]
            vars_ret.append(this_vars)
            chain = [f"VAR {this_vars[0]} = 12345"] if is_icl else \
                [f"VAR {this_vars[0]} = {str(self.nprng.randint(10000, 99999))}"]
            chain += [f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} " for j in range(num_hops)]
            chains_ret.append(chain)
        return vars_ret, chains_ret

    def _shuffle_sublists_heap(self, lst):
        heap = []
        for i in range(len(lst)):
            heapq.heappush(heap, (self.rng.random(), i, 0))
        out = []
        while heap:
            _, li, ei = heapq.heappop(heap)
            out.append(lst[li][ei])
            if ei + 1 < len(lst[li]):
                heapq.heappush(heap, (self.rng.random(), li, ei + 1))
        return out

    def generate_input_output(self, num_noises: int, is_icl: bool = False) -> tuple[str, list[str]]:
        vars_, chains = self.generate_chains(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        if self.type_haystack == "essay":
            sents = sent_tokenize(" ".join(self.haystack[:num_noises]).strip())
            flat = self._shuffle_sublists_heap(chains)
            cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in self.rng.sample(DEPTHS, len(flat))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(flat):
                    parts.append(flat[i - 1].strip() + ".")
            context = " ".join(parts)
        else:
            sentences = [self.haystack] * num_noises
            for chain in chains:
                positions = sorted(self.rng.sample(range(len(sentences)), len(chain)))
                for insert_pi, j in zip(positions, range(len(chain))):
                    sentences.insert(insert_pi + j, chain[j])
            context = "\n".join(sentences)
        context = context.replace(". \n", ".\n")
        template = self.template
        if is_icl and template.wrapped:  # the ICL example is the bare task template, without the model wrapper
            template = Template(template.task, template.answer_prefix)
        return template.format(context=context, query=value, num_v=self.num_hops + 1), vars_[0]

    def _icl_example(self) -> str:
        """RULER's first pass: one ICL sample of at most 500 tokens (3-letter variables, value 12345)."""
        incremental = 50 if self.type_haystack == "essay" else 5
        gen = lambda n: self.generate_input_output(n, is_icl=True)  # noqa: E731
        per_unit = self.count(gen(incremental)[0]) / incremental
        upper = max(int((500 / per_unit) * 3), incremental * 2)
        size = search_size(gen, self.count, incremental, upper, 500)
        text, answer, _ = fit_sample(gen, lambda t: self.count(self._nl(t)), size, incremental, 500,
                                     f"{self.name} ICL example")
        return self._nl(text) + " " + " ".join(answer) + "\n"

    def _nl(self, text: str) -> str:
        return remove_newline_tab(text) if self.remove_newlines else text

    def _randomize_icl(self, icl: str) -> str:
        for item in icl.strip().split()[-self.num_hops - 1:]:
            icl = icl.replace(item, "".join(self.rng.choices(string.ascii_uppercase, k=len(item))).upper())
        return icl.replace("12345", str(self.nprng.randint(10000, 99999)))

    def generate(self, num_samples: int) -> list[dict]:
        icl = self._icl_example()
        ttg, budget = self.tokens_to_generate, self.max_seq_length
        incremental = 500 if self.type_haystack == "essay" else 10
        if self.type_haystack != "essay" and budget < 4096:
            incremental = 5
        example_tokens = self.count(icl)
        cut_at = BASE_TASKS["variable_tracking"]["template"][:20]

        def gen(n):
            text, answer = self.generate_input_output(n)
            cutoff = text.index(cut_at)
            return self._nl(text[:cutoff] + self._randomize_icl(icl) + "\n" + text[cutoff:]), answer

        search_measure = lambda text: self.count(text) + example_tokens + ttg  # noqa: E731
        per_unit = self.count(self.generate_input_output(incremental)[0]) / incremental
        upper = max(int((budget / per_unit) * 3), incremental * 2)
        size = search_size(self.generate_input_output, search_measure, incremental, upper, budget)
        rows = []
        for index in range(num_samples):
            text, answer, length = fit_sample(gen, lambda t: self.count(t) + ttg, size, incremental, budget,
                                              f"{self.name} at {budget} tokens")
            rows.append(self._row(index, text, answer, length))
        return rows
