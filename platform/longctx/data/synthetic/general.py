"""Short general instructions with computed answers: the "general" part of a Long-SFT mix at toy scale.

Index-1.9B-32K mixes ~30K long instructions with ~50K general ones so that Long-SFT keeps the model's short-prompt
behaviour; the embedded default recipe (`builtin:recipes/tiny-long-sft.yaml`) needs a small general set too, and
no instruction dataset can be downloaded. These are generated: every answer is computed from the question
(arithmetic, list and string operations, lookups in a small JSON record, unit conversions), a few with a
follow-up turn, so the set is correct by construction and a pure function of (seed, index).

    from longctx.data.synthetic.general import general_record
    rec = general_record(seed=0, index=7)     # {"id", "source": "general", "messages": [...], "meta": {...}}
"""

from __future__ import annotations

import json

from longctx.data.synthetic.common import item_rng

KIND = "general"
WORDS = ["river", "lantern", "copper", "meadow", "orbit", "violet", "harbor", "pepper", "glacier", "saddle",
         "thimble", "canyon", "falcon", "marble", "quartz", "willow", "ember", "cobalt", "prairie", "tundra"]
CITIES = ["Oslo", "Lima", "Quito", "Hanoi", "Dakar", "Perth", "Turin", "Kyoto", "Minsk", "Porto"]
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]
SYSTEM = "You are a concise assistant. Answer exactly what is asked."


def _arithmetic(rng):
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice(["+", "-", "*"])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    follow = ("Now add 10 to that.", f"{value} + 10 = {value + 10}.")
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.", follow


def _sort_numbers(rng):
    xs = rng.sample(range(1, 500), rng.randint(4, 8))
    order = rng.choice(["ascending", "descending"])
    out = sorted(xs, reverse=order == "descending")
    follow = ("Which of them is the largest?", f"The largest is {max(xs)}.")
    return (f"Sort these numbers in {order} order: {', '.join(map(str, xs))}.", ", ".join(map(str, out)) + ".",
            follow)


def _sort_words(rng):
    ws = rng.sample(WORDS, rng.randint(3, 6))
    follow = ("How many words was that?", f"{len(ws)} words.")
    return f"Put these words in alphabetical order: {', '.join(ws)}.", ", ".join(sorted(ws)) + ".", follow


def _reverse(rng):
    w = rng.choice(WORDS)
    follow = ("And in capital letters?", w[::-1].upper() + ".")
    return f"Write the word '{w}' backwards.", w[::-1] + ".", follow


def _count_letter(rng):
    w = rng.choice(WORDS)
    ch = rng.choice(sorted(set(w)))
    n = w.count(ch)
    follow = ("How many letters does the word have in total?", f"{len(w)} letters.")
    return f"How many times does the letter '{ch}' occur in '{w}'?", f"{n} time{'s' if n != 1 else ''}.", follow


def _record_lookup(rng):
    rec = {"name": f"{rng.choice(WORDS).title()} {rng.randint(10, 99)}", "city": rng.choice(CITIES),
           "year": rng.randint(1950, 2024), "items": rng.randint(1, 40)}
    key = rng.choice(sorted(rec))
    other = rng.choice([k for k in sorted(rec) if k != key])
    follow = (f"And its {other}?", f"{rec[other]}.")
    return f"Here is a record: {json.dumps(rec)}. What is its {key}?", f"{rec[key]}.", follow


def _convert(rng):
    big, small, factor = rng.choice(UNITS)
    x = rng.randint(2, 90)
    follow = (f"And {x + 1} {big}?", f"{(x + 1) * factor} {small}.")
    return f"Convert {x} {big} to {small}.", f"{x} {big} = {x * factor} {small}.", follow


TASKS = {"arithmetic": _arithmetic, "sort_numbers": _sort_numbers, "sort_words": _sort_words, "reverse": _reverse,
         "count_letter": _count_letter, "record_lookup": _record_lookup, "convert": _convert}


def general_record(seed: int, index: int) -> dict:
    """One general-instruction chat record (task `index mod len(TASKS)`); about a third have a system prompt and
    a third a follow-up question answered from the first exchange."""
    rng = item_rng(seed, KIND, index)
    task = list(TASKS)[index % len(TASKS)]
    question, answer, (follow_q, follow_a) = TASKS[task](rng)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    turns = 1
    if rng.random() < 1 / 3:
        messages += [{"role": "user", "content": follow_q}, {"role": "assistant", "content": follow_a}]
        turns = 2
    return {"id": f"{KIND}-{seed}-{index:08d}", "source": KIND, "messages": messages,
            "meta": {"task": task, "turns": turns}}
