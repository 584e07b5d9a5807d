"""Retrieval instructions for Long-SFT: passkey, key-value and multi-needle samples over corpus haystacks.

The haystack is real text from the user's corpus (`synth.retrieval.haystack`, default `data.sources`, read by
the data engine's validating readers), cut at a seeded offset to the exact number of tokens the sample needs.
Needles go in as their own line at a requested depth *in tokens* of the haystack: depth d puts the needle
after round(d * N) of the N haystack tokens (the cut is moved before the space that starts the next word, so
the text before it tokenizes to the same ids). Tasks:

- `passkey`       "The pass key is 71432. Remember it. 71432 is the pass key." -> "71432"
- `kv`            the value of one key among `kv_distractors` other key-value needles at random depths
- `multi_needle`  `num_needles` facts ("The secret number of Oslo is 4821."); the first at the requested
                  depth, the others at random depths; the answer lists every number in the asked order

Lengths (chat-templated, in the model's tokenizer) and depths follow a 2-D low-discrepancy sequence, so any
number of samples covers the (length, depth) square evenly.

    longctx data synth retrieval --set synth.retrieval.num_samples=2000 --set synth.output=s3://bucket/synth
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from longctx import storage
from longctx.config import DataConfig
from longctx.data import sources as src
from longctx.data.synthetic.common import (ChatTokens, chat_record, generate_sft_set, item_rng, spread,
                                           target_length)
from longctx.raycluster import connect as ensure_ray

KIND = "retrieval"
CITIES = ["Oslo", "Lima", "Quito", "Hanoi", "Dakar", "Perth", "Turin", "Kyoto", "Minsk", "Porto", "Tunis", "Cusco",
          "Bergen", "Lagos", "Riga", "Split", "Bruges", "Malmo", "Gdansk", "Cork"]
OPEN, CLOSE = "<document>\n", "\n</document>"
INSTRUCTION = ("Some facts are hidden in the long text below. Read it, then answer the question after it.\n\n")


def load_haystack(cfg) -> tuple[list[str], list[str]]:
    """(doc ids, texts) of the haystack corpus, at most synth.retrieval.haystack_max_chars characters, taken
    evenly from every file so a big first source does not crowd out the others."""
    r = cfg.synth.retrieval
    specs = DataConfig(sources=r.haystack).source_specs() if r.haystack else cfg.data.source_specs()
    tasks = src.list_files(specs)
    per_file = max(1, r.haystack_max_chars // max(1, len(tasks)))
    ids, texts = [], []
    for task in tasks:
        chars = 0
        for table in src.read_file(task):
            good = table.filter(pc.is_null(table.column("reason")))
            for doc_id, text in zip(good.column("doc_id").to_pylist(), good.column("text").to_pylist()):
                ids.append(doc_id)
                texts.append(text[: per_file - chars])
                chars += len(texts[-1])
                if chars >= per_file:
                    break
            if chars >= per_file:
                break
    if not texts:
        raise ValueError(f"synth.retrieval: the haystack corpus ({', '.join(sorted(specs))}) holds no readable text")
    return ids, texts


class RetrievalSampleBuilder:
    """Builds one retrieval sample for (seed, index) from a haystack corpus."""

    def __init__(self, tokenizer: str, seed: int, settings: dict, doc_ids: list[str], texts: list[str]):
        self.chat = ChatTokens(tokenizer)
        self.seed, self.s = seed, settings
        self.doc_ids, self.texts = doc_ids, texts

    def build(self, index: int) -> dict:
        s, rng = self.s, item_rng(self.seed, KIND, index)
        u, depth = spread(self.seed, KIND, index)
        target = target_length(u, s["min_tokens"], s["max_tokens"])
        task = s["tasks"][index % len(s["tasks"])]
        needles, depths, question, answer = self._needles(task, rng, depth)
        blocks = ["\n" + n + "\n" for n in needles]
        overhead = self.chat.sample_tokens(self._messages("", question, answer)) + sum(self.chat.count_many(blocks))
        filler, offsets, docs = self._filler(rng, max(target - overhead, 16))
        n = len(offsets)
        at = [min(n, int(round(d * n))) for d in depths]
        cuts = [self._cut(filler, offsets, t) for t in at]
        order = sorted(range(len(needles)), key=lambda j: (cuts[j], j))
        pieces, last = [], 0
        for j in order:
            pieces += [filler[last:cuts[j]], blocks[j]]
            last = cuts[j]
        haystack = "".join(pieces) + filler[last:]
        # The target needle's depth is re-measured by tokenizing the text before it; the others (distractors and
        # extra needles, up to a dozen encodes of the whole haystack) keep the token index they were cut at.
        measured = [self.chat.count(filler[:cuts[0]]) / n] + [t / n for t in at[1:]]
        messages = self._messages(haystack, question, answer)
        tokens = self.chat.sample_tokens(messages)
        meta = {"task": task, "target_tokens": target, "tokens": tokens, "haystack_tokens": n,
                "requested_depth": round(depth, 6), "needle_depth": round(measured[0], 6),
                "requested_depths": [round(d, 6) for d in depths], "needle_depths": [round(m, 6) for m in measured],
                "needles": needles, "haystack_docs": docs}
        rec = chat_record(KIND, self.seed, index, messages[0]["content"], answer, meta)
        return {"index": index, "line": json.dumps(rec, ensure_ascii=False), "tokens": tokens, "task": task,
                "target_tokens": target, "depth": measured[0]}

    @staticmethod
    def _messages(haystack: str, question: str, answer: str) -> list[dict]:
        user = f"{INSTRUCTION}{OPEN}{haystack}{CLOSE}\n\nQuestion: {question}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def _needles(self, task: str, rng, depth: float) -> tuple[list[str], list[float], str, str]:
        """(needle sentences, their depths (first = requested), question, answer)."""
        if task == "passkey":
            key = str(rng.randint(10000, 99999))
            return ([f"The pass key is {key}. Remember it. {key} is the pass key."], [depth],
                    "What is the pass key? Answer with the pass key only.", key)
        if task == "kv":
            pairs = [(f"{rng.getrandbits(32):08x}", f"{rng.getrandbits(32):08x}")
                     for _ in range(1 + self.s["kv_distractors"])]
            needles = [f"The value of key {k} is {v}." for k, v in pairs]
            depths = [depth] + [rng.random() for _ in pairs[1:]]
            return needles, depths, f"What is the value of key {pairs[0][0]}? Answer with the value only.", pairs[0][1]
        if task == "multi_needle":
            k = self.s["num_needles"]
            cities = rng.sample(CITIES, k)
            numbers = [str(rng.randint(1000, 9999)) for _ in cities]
            needles = [f"The secret number of {c} is {x}." for c, x in zip(cities, numbers)]
            depths = [depth] + [rng.random() for _ in cities[1:]]
            listed = ", ".join(cities[:-1]) + f" and {cities[-1]}"
            return (needles, depths, f"What are the secret numbers of {listed}? Answer with the numbers in that "
                    "order, separated by commas.", ", ".join(numbers))
        raise ValueError(f"unknown retrieval task {task!r}")

    def _filler(self, rng, n_tokens: int) -> tuple[str, list, list[str]]:
        """(text, token offsets, doc ids): n_tokens tokens of consecutive corpus text from a seeded document and
        offset (wrapping around the corpus when it is short), cut at a token boundary. The offsets are those of
        the longer text it was cut from (the cut text tokenizes to the same first n_tokens ids)."""
        d = rng.randrange(len(self.texts))
        first = self.texts[d]
        start = rng.randrange(max(1, len(first) // 2))
        nl = first.find("\n", start)
        start = nl + 1 if 0 <= nl < len(first) - 1 else 0
        parts, docs, chars = [first[start:]], [self.doc_ids[d]], len(first) - start
        want = 4 * n_tokens
        while True:
            while chars < want:
                d = (d + 1) % len(self.texts)
                parts.append(self.texts[d])
                docs.append(self.doc_ids[d])
                chars += len(self.texts[d]) + 2
            text = "\n\n".join(parts)
            enc = self.chat.encode(text)
            if len(enc.ids) > n_tokens:
                return text[:self._cut(text, enc.offsets, n_tokens)], enc.offsets[:n_tokens], docs
            want = int(want * 1.5 * n_tokens / max(1, len(enc.ids))) + 64

    @staticmethod
    def _cut(text: str, offsets, t: int) -> int:
        """Character position where token t starts, moved before the whitespace that opens it (so the text
        before the cut tokenizes to the first t ids and the word after it keeps its leading space)."""
        if t >= len(offsets):
            return len(text)
        c = offsets[t][0]
        prev_end = offsets[t - 1][1] if t > 0 else 0
        while c > prev_end and text[c - 1].isspace():
            c -= 1
        return c


class RetrievalSamples:
    """Ray Data actor: batch {"id": sample indices} -> retrieval samples (index, line, tokens, task, ...)."""

    def __init__(self, tokenizer: str, seed: int, settings: dict, haystack: list):
        import ray  # deferred: heavy import, used only here

        ref = haystack[0]  # wrapped in a list so Ray passes the reference, not a copy per argument
        doc_ids, texts = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        self.builder = RetrievalSampleBuilder(tokenizer, seed, settings, doc_ids, texts)

    def __call__(self, batch: dict) -> dict:
        out = [self.builder.build(int(i)) for i in batch["id"]]
        return {k: np.array([o[k] for o in out]) for k in ("index", "line", "tokens", "task", "target_tokens", "depth")}


def retrieval_settings(cfg) -> dict:
    r = cfg.synth.retrieval
    return {"min_tokens": r.min_tokens, "max_tokens": r.max_tokens, "tasks": list(r.tasks),
            "num_needles": r.num_needles, "kv_distractors": r.kv_distractors}


def synth_retrieval(cfg, output: str | None = None, overwrite: bool = False) -> dict:
    """Generate `synth.retrieval.num_samples` retrieval chat samples and publish them at `output` (default
    `synth.output/retrieval`). Returns the manifest plus `uri` and `timings`."""
    import ray  # deferred: heavy import, used only here

    storage.configure(cfg.storage)
    dest = output or (storage.join(cfg.synth.output, "retrieval") if cfg.synth.output else None)
    if not dest:
        raise ValueError("no output location: set synth.output (local folder or s3:// prefix) or pass output=")
    doc_ids, texts = load_haystack(cfg)
    ensure_ray(cfg)
    ref = ray.put((doc_ids, texts))
    settings = retrieval_settings(cfg)
    r = cfg.synth.retrieval
    params = {**settings, "haystack": {k: (v if isinstance(v, str) else v.model_dump())
                                       for k, v in (r.haystack or cfg.data.sources).items()},
              "haystack_docs": len(texts), "haystack_chars": sum(len(t) for t in texts)}
    return generate_sft_set(cfg, "retrieval", RetrievalSamples,
                            {"tokenizer": cfg.data.tokenizer, "seed": cfg.synth.seed, "settings": settings,
                             "haystack": [ref]},
                            r.num_samples, dest, params, (r.min_tokens, r.max_tokens), overwrite=overwrite)
