"""RULER's task templates, task settings and needle formats, as NVIDIA/RULER defines them.

Copied from NVIDIA/RULER at commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a (files
`scripts/data/synthetic/constants.py`, `scripts/synthetic.yaml`, `scripts/data/synthetic/niah.py`,
`scripts/data/synthetic/qa.py`, `scripts/eval/synthetic/constants.py`).
Copyright (c) 2024, NVIDIA CORPORATION. Licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0). Changed here: the Python dicts were re-typed as the
frozen tables below; the strings themselves are verbatim (prompts must match to compare with published
RULER tables).
"""

from __future__ import annotations

import numpy as np

RULER_COMMIT = "c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a"
"""The NVIDIA/RULER commit whose generators, templates and scoring this package follows."""

BASE_TASKS: dict[str, dict] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",  # noqa: E501
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        "metric": "string_match_all",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",  # noqa: E501
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",  # noqa: E501
        "metric": "string_match_all",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",  # noqa: E501
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
        "metric": "string_match_all",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",  # noqa: E501
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
        "metric": "string_match_all",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",  # noqa: E501
        "answer_prefix": " Answer:",
        "metric": "string_match_part",
    },
}
"""Per base task: tokens to generate, prompt template, answer prefix and metric (RULER's TASKS)."""


def _niah(haystack: str, k: str, v: str, nk: int = 1, nv: int = 1, nq: int = 1) -> dict:
    return {"task": "niah", "args": {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v,
                                     "num_needle_k": nk, "num_needle_v": nv, "num_needle_q": nq}}


TASKS: dict[str, dict] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": {"task": "variable_tracking", "args": {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}},
    "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
    "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
    "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
    "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
}
"""RULER's 13 tasks (its `synthetic.yaml`), in the order RULER's tables list them."""

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "retrieval (NIAH)": TASK_NAMES[:8], "multi-hop tracing": ("vt",), "aggregation": ("cwe", "fwe"),
    "question answering": ("qa_1", "qa_2"),
}
"""RULER's four task categories (paper, Table 2)."""

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
"""NIAH needle sentence (also the distractor sentence of the `needle` haystack)."""
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""The `noise` haystack's repeated sentence group (niah and variable tracking)."""
DOCUMENT_PROMPT = "Document {i}:\n{document}"
"""How QA documents are numbered in the context."""
DEPTHS: list[int] = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
"""Needle insertion depths (percent) sampled for the essay haystack."""

EFFECTIVE_THRESHOLD = 85.6
"""RULER's effective-length threshold: Llama-2-7B's average at 4K; a length counts as effective above it."""
