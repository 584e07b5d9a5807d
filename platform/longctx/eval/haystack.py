"""Token-exact haystacks: filler text of an exact token length with a needle at a depth measured in tokens.

Passkey retrieval and the needle grid both build prompts as token ids, not text, so a prompt of "1024
tokens" has exactly 1024 tokens of the evaluated model's tokenizer and a needle at depth 0.5 really starts
at the middle of the filler (moved back to the nearest sentence boundary so it never splits a sentence, as
gkamradt's and NeedleBench's builders do). The ids are fed to the model directly; decoding them and
re-tokenizing would not give the same ids.

    hay = Haystack.from_sentences(tokenizer, sentences)
    ids, boundaries = hay.fill(n_tokens)
    ids, at = insert_at_depth(ids, boundaries, needle_ids, depth=0.5)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from longctx import storage
from longctx.eval.documents import iter_texts

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences (on ., !, ? and their CJK forms followed by whitespace)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@dataclass
class Haystack:
    """Sentences already tokenized (each with a leading space so they join as in running text)."""

    sentence_ids: list[list[int]]

    @classmethod
    def from_sentences(cls, tokenizer, sentences: Iterable[str]) -> "Haystack":
        ids = [tokenizer(" " + s.strip(), add_special_tokens=False)["input_ids"] for s in sentences if s.strip()]
        ids = [i for i in ids if i]
        if not ids:
            raise ValueError("haystack has no text: give at least one non-empty sentence")
        return cls(ids)

    @classmethod
    def from_text(cls, tokenizer, text: str) -> "Haystack":
        return cls.from_sentences(tokenizer, split_sentences(text))

    def fill(self, n_tokens: int, offset: int = 0) -> tuple[list[int], list[int]]:
        """Exactly `n_tokens` ids of haystack, cycling over the sentences from sentence `offset`.

        Returns (ids, boundaries): boundaries are the indices where a sentence starts (0 included, and
        n_tokens itself when the last sentence ends exactly there); the last sentence may be cut short.
        """
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        ids: list[int] = []
        boundaries: list[int] = []
        i = offset % len(self.sentence_ids)
        while len(ids) < n_tokens:
            boundaries.append(len(ids))
            ids.extend(self.sentence_ids[i])
            i = (i + 1) % len(self.sentence_ids)
        if len(ids) == n_tokens:
            boundaries.append(n_tokens)
        return ids[:n_tokens], [b for b in boundaries if b <= n_tokens]


def insert_at_depth(
    hay_ids: Sequence[int], boundaries: Sequence[int], needle_ids: Sequence[int], depth: float
) -> tuple[list[int], int]:
    """Insert the needle at the last sentence boundary at or before depth * len(hay_ids).

    Returns (new ids, index of the needle's first token). depth 0 puts the needle first, depth 1 last.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = int(round(depth * len(hay_ids)))
    candidates = [b for b in boundaries if b <= target] or [0]
    at = max(candidates)
    return [*hay_ids[:at], *needle_ids, *hay_ids[at:]], at


def fill_with_needles(
    hay: Haystack, n_tokens: int, needles: Sequence[Sequence[int]], depths: Sequence[float], offset: int = 0
) -> tuple[list[int], list[int]]:
    """Haystack of exactly n_tokens in total *including* the needles, each needle at its depth.

    A depth is a fraction of the filler (the haystack without needles, as gkamradt's and NeedleBench's
    builders measure it): a needle at depth d goes in at the last sentence boundary at or before d x filler
    tokens, so depth 0 is the very start and depth 1 the end. Returns (ids, start index of each needle in
    the returned ids, in the order given).
    """
    needle_total = sum(len(n) for n in needles)
    filler = n_tokens - needle_total
    if filler < 0:
        raise ValueError(f"needles take {needle_total} tokens, more than the {n_tokens} asked for")
    ids, bounds = hay.fill(filler, offset)
    order = sorted(range(len(needles)), key=lambda k: depths[k])
    out: list[int] = []
    starts = [0] * len(needles)
    prev = 0  # filler index the previous needle went in at
    for k in order:
        target = max(0, round(depths[k] * filler))  # in filler coordinates
        at = max([b for b in bounds if prev <= b <= target] or [prev])
        out.extend(ids[prev:at])
        starts[k] = len(out)
        out.extend(needles[k])
        prev = at
    out.extend(ids[prev:])
    return out, starts


_SUBJECTS = ["The old harbour", "A quiet library", "The morning market", "Our village bakery", "The river path",
             "A small orchard", "The railway museum", "The hill trail", "An evening choir", "The weekly newspaper",
             "A community garden", "The town clock", "The lighthouse keeper", "A travelling circus", "The school band"]
_VERBS = ["opens", "closes", "welcomes visitors", "gets busy", "stays calm", "looks different", "smells of rain",
          "draws a small crowd", "needs repairs", "changes its timetable"]
_TIMES = ["early in spring", "after the first frost", "on most Sundays", "during the long summer evenings",
          "when the tide is low", "before the holidays", "in the middle of the week", "at dawn", "late in autumn"]
_DETAILS = ["Nobody seems to mind the delay.", "Children count the boats from the wall.",
            "The bread is usually gone by ten.", "Someone always forgets an umbrella.",
            "The paint on the benches is fresh again.", "A dog waits patiently by the gate.",
            "The notice board lists the changes in neat handwriting.", "Tea is served in mismatched cups.",
            "The wind carries the sound of bells across the fields.", "Most people walk rather than drive."]


def generate_haystack_text(n_sentences: int = 1500, seed: int = 7) -> str:
    """Plain, needle-free filler prose from a seeded template grammar (the shipped default haystack)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_sentences):
        if i % 3 == 2:
            out.append(rng.choice(_DETAILS))
        else:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TIMES)}.")
        if i % 12 == 11:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n").strip() + "\n"


def load_haystack_text(uri: str, text_field: str = "text", min_chars: int = 200_000) -> str:
    """Haystack text from a .txt file or the first texts of a corpus (joined until `min_chars`)."""
    if uri.endswith(".txt") or uri.endswith(".md"):
        return storage.read_text(uri)
    parts, total = [], 0
    for text in iter_texts(uri, text_field):
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    if not parts:
        raise ValueError(f"{uri}: no haystack text found")
    return "\n\n".join(parts)
