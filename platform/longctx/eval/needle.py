"""Needle in a haystack: a lengths x depths grid, single and multi-needle, retrieval and reasoning variants.

Variants (as NeedleBench v1 has them):
- `single`: one needle ("The secret ingredient of Oslo's famous soup is saffron."), asked for its keyword.
- `multi_retrieval`: k needles about k different cities, the first at the requested depth and the others
  spread evenly towards the end; the question asks for all k keywords.
- `multi_reasoning`: a k-hop chain ("Ada's mentor is Bo." "Bo's mentor is Cy." ...), shuffled over depths
  like multi_retrieval; the question asks for the end of the chain starting from the first name.

Prompts are token-exact (`haystack.py`): a grid cell "1024 tokens, depth 0.5" has exactly 1024 prompt
tokens and its first needle starts at 50% of the haystack, measured in tokens (moved back to the sentence
boundary before it). The haystack is any text: the shipped `builtin:haystack/default.txt` or a corpus.

Scoring (NeedleBench v1, OpenCompass `NeedleBenchOriginEvaluator` / `NeedleBenchMultiEvaluator`):
- single and multi_reasoning: 100 if the keyword occurs in the raw answer; otherwise
  20 x (1 - Levenshtein(answer, reference) / max(len answer, len reference)), both with all whitespace
  removed, where the reference is the needle sentence (single) or the answer sentence (reasoning).
- multi_retrieval: 100 x (keywords found) / k, case-insensitive substring match of each keyword.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Sequence

from longctx.eval.haystack import Haystack, fill_with_needles

CITIES = ["Oslo", "Lima", "Quito", "Hanoi", "Dakar", "Perth", "Turin", "Kyoto", "Minsk", "Porto", "Tunis",
          "Cusco", "Bergen", "Lagos", "Riga", "Split", "Bruges", "Malmo", "Gdansk", "Cork"]
INGREDIENTS = ["saffron", "cardamom", "tamarind", "fennel", "sumac", "juniper", "wasabi", "nutmeg", "anise",
               "turmeric", "paprika", "lavender", "ginger", "vanilla", "oregano", "caraway", "mustard", "clove"]
NAMES = ["Ada", "Bram", "Cleo", "Dario", "Edda", "Fionn", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars",
         "Mila", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tilda"]
TASK = ("This is a test of long-text capability. Read the document below, then answer the question at the "
        "end based on the information in the document.\n")
VARIANTS = ("single", "multi_retrieval", "multi_reasoning")


@dataclass
class NeedlePrompt:
    variant: str
    length: int
    depth: float
    trial: int
    input_ids: list[int]
    reference: str
    """What a perfect answer says (the needle or answer sentence)."""
    keywords: list[str]
    needle_starts: list[int] = field(default_factory=list)
    """Token index of each needle's first token in the prompt."""
    max_new_tokens: int = 24

    def to_row(self) -> dict:
        return asdict(self)


def _needles(variant: str, k: int, rng: random.Random):
    """(needle sentences, question, answer stub, reference, keywords) for one prompt."""
    if variant == "single":
        city, item = rng.choice(CITIES), rng.choice(INGREDIENTS)
        needle = f"The secret ingredient of {city}'s famous soup is {item}."
        return [needle], f"What is the secret ingredient of {city}'s famous soup?", \
            f"The secret ingredient of {city}'s famous soup is", needle, [item]
    if variant == "multi_retrieval":
        cities, items = rng.sample(CITIES, k), rng.sample(INGREDIENTS, k)
        needles = [f"The secret ingredient of {c}'s famous soup is {i}." for c, i in zip(cities, items)]
        listed = ", ".join(f"{c}'s" for c in cities)
        return needles, f"What are the secret ingredients of the famous soups of {listed}?", \
            "The secret ingredients are", " ".join(needles), items
    if variant == "multi_reasoning":
        people = rng.sample(NAMES, k + 1)
        needles = [f"{a}'s mentor is {b}." for a, b in zip(people[:-1], people[1:])]
        chain = " ".join(["the mentor of"] * k)
        answer = f"{chain[0].upper()}{chain[1:]} {people[0]} is {people[-1]}."
        return needles, f"Following the mentors in the document, who is {chain} {people[0]}?", \
            answer.rsplit(" ", 1)[0], answer, [people[-1]]
    raise ValueError(f"unknown needle variant {variant!r}; allowed: {', '.join(VARIANTS)}")


def needle_depths(depth: float, k: int) -> list[float]:
    """Depths of k needles: the first at `depth`, the rest evenly spaced towards the end (NeedleBench)."""
    return [depth + i * (1.0 - depth) / k for i in range(k)]


def build_needle_prompts(
    tokenizer,
    haystack_text: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    variants: Sequence[str] = ("single",),
    num_needles: int = 3,
    trials: int = 1,
    seed: int = 0,
) -> list[NeedlePrompt]:
    """Every (variant, length, depth, trial) prompt, reproducible from `seed`."""
    rng = random.Random(seed)
    hay = Haystack.from_text(tokenizer, haystack_text)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    task_ids = enc(TASK)
    prompts = []
    for variant in variants:
        k = 1 if variant == "single" else num_needles
        for length in lengths:
            for depth in depths:
                for trial in range(trials):
                    needles, question, stub, reference, keywords = _needles(variant, k, rng)
                    needle_ids = [enc(" " + n) for n in needles]
                    tail = enc(f"\n\nQuestion: {question}\nAnswer: {stub}")
                    body = length - len(task_ids) - len(tail)
                    if body < sum(map(len, needle_ids)) + 1:
                        raise ValueError(f"needle length {length} is too short for the {variant} prompt")
                    ds = needle_depths(depth, k)
                    if variant == "multi_reasoning":
                        order = list(range(k))
                        rng.shuffle(order)  # the chain's links are not in reading order
                        ds = [ds[order[i]] for i in range(k)]
                    ids, starts = fill_with_needles(hay, body, needle_ids, ds, offset=rng.randrange(len(hay.sentence_ids)))
                    full = [*task_ids, *ids, *tail]
                    assert len(full) == length
                    budget = min(64, max(len(enc(" " + " ".join(keywords))) + 8, len(enc(reference)) // (2 if k > 1 else 4) + 8))
                    prompts.append(NeedlePrompt(variant, length, float(depth), trial, full, reference, keywords,
                                                [len(task_ids) + s for s in starts], budget))
    return prompts


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insert/delete/substitute costs."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def needlebench_score(prediction: str, reference: str, keyword: str) -> float:
    """NeedleBench v1 single-needle score (see the module docstring)."""
    if keyword in prediction:
        return 100.0
    p, r = re.sub(r"\s+", "", prediction), re.sub(r"\s+", "", reference)
    longest = max(len(p), len(r))
    similarity = 100 * (1 - levenshtein(p, r) / longest) if longest else 100.0
    return 0.2 * similarity


def needlebench_multi_score(prediction: str, keywords: Sequence[str]) -> float:
    """NeedleBench v1 multi-needle retrieval score: share of keywords found, case-insensitively."""
    words = " ".join(keywords).lower().split()
    if not words:
        return 0.0
    pred = prediction.lower()
    return sum(1 for w in words if w in pred) * (100 / len(words))


def score_needle(variant: str, prediction: str, reference: str, keywords: Sequence[str]) -> float:
    if variant == "multi_retrieval":
        return needlebench_multi_score(prediction, keywords)
    return needlebench_score(prediction, reference, keywords[0])


def summarize_needle(rows: Sequence[dict]) -> dict:
    """Per variant: mean score, score per length, and the length x depth grid (means over trials)."""
    out: dict = {}
    by_variant: dict[str, list] = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    for variant, vrows in by_variant.items():
        cells: dict = defaultdict(list)
        for r in vrows:
            cells[(int(r["length"]), float(r["depth"]))].append(float(r["score"]))
        lengths = sorted({n for n, _ in cells})
        depths = sorted({d for _, d in cells})
        grid = {str(n): {str(d): sum(cells[(n, d)]) / len(cells[(n, d)]) for d in depths if cells[(n, d)]} for n in lengths}
        per_len = {str(n): sum(sum(cells[(n, d)]) for d in depths) / sum(len(cells[(n, d)]) for d in depths) for n in lengths}
        mean = sum(float(r["score"]) for r in vrows) / len(vrows)
        out[variant] = {"mean": mean, "by_length": per_len,
                        "grid": {"lengths": lengths, "depths": depths, "scores": grid, "mean": mean},
                        "examples": [{k: r[k] for k in ("length", "depth", "prediction", "score")} for r in vrows[:2]]}
    return out
