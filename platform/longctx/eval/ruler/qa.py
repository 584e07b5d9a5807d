"""RULER's QA tasks: a SQuAD (qa_1) or HotpotQA (qa_2) question among distractor documents.

Ported from NVIDIA/RULER (commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a; `scripts/data/synthetic/qa.py`,
Copyright (c) 2024 NVIDIA CORPORATION, Apache License 2.0) with the same random draws in the same order.
The data is the user's, in the files RULER's `download_qa_dataset.sh` fetches:
- qa_1: SQuAD 2.0 dev (`dev-v2.0.json`, RULER's `squad.json`): {"data": [{"paragraphs": [{"context", "qas":
  [{"question", "answers": [{"text"}], "is_impossible"}]}]}]}; unanswerable questions are left out.
  (SQuAD 1.1 files, without `is_impossible`, are read as all answerable.)
- qa_2: HotpotQA dev distractor (`hotpot_dev_distractor_v1.json`, RULER's `hotpotqa.json`): a list of
  {"question", "answer", "context": [[title, [sentence, ...]], ...]}.
"""

from __future__ import annotations

import json
import random

from longctx import storage
from longctx.eval.ruler.constants import DOCUMENT_PROMPT
from longctx.eval.ruler.synthetic import Task, fit_sample, search_size

QA_SOURCES = {"squad": "SQuAD 2.0 dev JSON (dev-v2.0.json)", "hotpotqa": "HotpotQA dev distractor JSON "
              "(hotpot_dev_distractor_v1.json)"}


def _load(uri: str, dataset: str):
    try:
        return json.loads(storage.read_text(uri))
    except (OSError, storage.StorageError) as e:
        raise FileNotFoundError(f"{uri}: cannot read the {QA_SOURCES[dataset]} ({e})") from e
    except ValueError as e:
        raise ValueError(f"{uri}: not JSON ({e}); expected the {QA_SOURCES[dataset]}") from e


def read_squad(uri: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) as RULER's read_squad builds them."""
    data = _load(uri, "squad")
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        pos = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            more = [pos[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for q in p["qas"]:
                    if not q.get("is_impossible", False):
                        qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                    "context": [pos[p["context"]]],
                                    "more_context": [i for i in more if i != pos[p["context"]]]})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{uri}: not SQuAD format (missing {e}); expected the {QA_SOURCES['squad']}") from e
    return qas, docs


def read_hotpotqa(uri: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) as RULER's read_hotpotqa builds them."""
    data = _load(uri, "hotpotqa")
    try:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        pos = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [pos[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{uri}: not HotpotQA format ({e!r}); expected the {QA_SOURCES['hotpotqa']}") from e
    return qas, docs


READERS = {"squad": read_squad, "hotpotqa": read_hotpotqa}


class QA(Task):
    """qa.py: the question's own documents plus distractors (same article first for SQuAD), shuffled."""

    base_task = "qa"

    def __init__(self, *, dataset: str, data: tuple[list[dict], list[str]], **kw):
        super().__init__(**kw)
        self.dataset = dataset
        self.qas, self.docs = data
        if not self.qas:
            raise ValueError(f"{self.name}: the {dataset} file has no answerable questions")

    def generate_input_output(self, index: int, num_docs: int) -> tuple[str, list[str]]:
        q = self.qas[index]
        curr_docs, curr_more = q["context"], q.get("more_context", [])
        if num_docs < len(self.docs):
            if (num_docs - len(curr_docs)) > len(curr_more):
                taken = set(curr_docs + curr_more)
                addition = [i for i in range(len(self.docs)) if i not in taken]
                picked = curr_docs + curr_more + self.rng.sample(
                    addition, max(0, num_docs - len(curr_docs) - len(curr_more)))
            else:
                picked = curr_docs + self.rng.sample(curr_more, num_docs - len(curr_docs))
            all_docs = [self.docs[i] for i in picked]
        else:
            repeats = (num_docs + len(self.docs) - 1) // len(self.docs)
            all_docs = (self.docs * repeats)[:num_docs]
        random.Random(self.seed).shuffle(all_docs)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(all_docs))
        return self.template.format(context=context, query=q["query"]), q["outputs"]

    def generate(self, num_samples: int) -> list[dict]:
        if num_samples > len(self.qas):
            raise ValueError(f"{self.name}: {num_samples} samples asked, the {self.dataset} file has "
                             f"{len(self.qas)} answerable questions; lower eval.ruler.num_samples")
        ttg, budget, incremental = self.tokens_to_generate, self.max_seq_length, 10
        measure = lambda text: self.count(text) + ttg  # noqa: E731
        first = lambda n: self.generate_input_output(0, n)  # noqa: E731
        per_doc = self.count(first(incremental)[0]) / incremental
        upper = max(int((budget / per_doc) * 3), incremental * 2)
        num_docs = search_size(first, measure, incremental, upper, budget)
        rows = []
        for index in range(num_samples):
            text, answer, length = fit_sample(lambda n: self.generate_input_output(index, n), measure, num_docs,
                                              incremental, budget, f"{self.name} at {budget} tokens")
            rows.append(self._row(index, text, answer, length))
        return rows
