"""SynL: synthetic lengthy tables with questions answered from them, as chat SFT samples (LongSkywork).

LongSkywork's exact table spec is not public (docs/architecture.md, section 5); ours: a typed table (unique key column,
person names, categories, integers, decimals, dates) of a target token length, serialized as markdown or CSV,
and one question whose answer is computed from the table:

- `lookup`        the value of a column in the row with a given key;
- `filter_count`  how many rows have a category value and a number above a threshold;
- `extremum`      the key of the row with the highest (or lowest) value of a column;
- `multi_hop`     table 1 row by key -> its foreign key -> a column of that row in table 2.

The *answer row* (the looked-up row, the extremum, a row the filter must count, the first hop) sits at a
requested depth of its table, measured in tokens; depths and sample lengths follow a low-discrepancy sequence,
so they are spread uniformly over [0, 1) and [min_tokens, max_tokens]. Lengths are measured with the model's
tokenizer on the chat-templated sample.

    longctx data synth tables --set synth.tables.num_samples=1000 --set synth.output=s3://bucket/synth
"""

from __future__ import annotations

import bisect
import datetime as dt
import json

import numpy as np

from longctx import storage
from longctx.data.synthetic.common import (ChatTokens, chat_record, generate_sft_set, item_rng, spread,
                                           target_length)

KIND = "synl"
FIRST = ["Ada", "Bram", "Cleo", "Dario", "Edda", "Fionn", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars", "Mila",
         "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tilda", "Uma", "Viktor", "Wren", "Xena", "Yusuf", "Zora"]
LAST = ["Abbott", "Berg", "Castro", "Dunn", "Ekberg", "Fischer", "Garcia", "Haas", "Ibsen", "Jensen", "Kovac",
        "Lund", "Moreau", "Novak", "Ortiz", "Park", "Quist", "Rossi", "Silva", "Tanaka", "Ueda", "Vidal", "Weber"]
CITIES = ["Oslo", "Lima", "Quito", "Hanoi", "Dakar", "Perth", "Turin", "Kyoto", "Minsk", "Porto", "Tunis", "Cork"]
DEPTS = ["Logistics", "Finance", "Research", "Legal", "Support", "Design", "Sales", "Security", "Training",
         "Facilities", "Procurement", "Analytics", "Marketing", "Quality", "Payroll", "Archives"]
CATEGORIES = ["Tools", "Garden", "Kitchen", "Office", "Toys", "Audio", "Sports", "Lighting", "Storage", "Travel"]
ADJ = ["Compact", "Solid", "Quiet", "Rapid", "Classic", "Smart", "Folding", "Heavy", "Mini", "Ultra", "Eco", "Pro"]
NOUN = ["Drill", "Kettle", "Lamp", "Chair", "Router", "Speaker", "Tent", "Bottle", "Scale", "Heater", "Fan", "Desk"]
COMPANIES = ["Norvik", "Altamar", "Brightwell", "Calder", "Dunmore", "Everline", "Fairhaven", "Granton", "Hollis",
             "Ironbark", "Juniper", "Kestrel", "Larkspur", "Meridian", "Northgate", "Oakridge"]
COUNTRIES = ["Norway", "Peru", "Ecuador", "Vietnam", "Senegal", "Australia", "Italy", "Japan", "Portugal", "Chile"]

# Column types: key, person, category, fk, int, float, date. Each theme: main table (with a foreign key into the
# second table) and the second table (keyed by that foreign key).
THEMES = {
    "staff": {
        "main": ("staff", [("employee_id", "key", "E", 5), ("name", "person"), ("dept_code", "fk"),
                           ("city", "category", CITIES), ("age", "int", 21, 66), ("salary", "int", 30000, 99999),
                           ("hired", "date", "2000-01-01", "2023-12-31")]),
        "side": ("departments", [("dept_code", "key", "D", 3), ("department", "unique", DEPTS),
                                 ("manager", "person"), ("floor", "int", 1, 40),
                                 ("founded", "date", "1950-01-01", "2015-12-31")]),
    },
    "products": {
        "main": ("products", [("sku", "key", "P", 5), ("product", "combo", ADJ, NOUN), ("supplier_code", "fk"),
                              ("category", "category", CATEGORIES), ("price", "float", 1.0, 999.99),
                              ("stock", "int", 0, 5000), ("released", "date", "2010-01-01", "2024-06-30")]),
        "side": ("suppliers", [("supplier_code", "key", "S", 3), ("supplier", "unique", COMPANIES),
                               ("country", "category", COUNTRIES), ("rating", "int", 1, 100),
                               ("since", "date", "1990-01-01", "2020-12-31")]),
    },
}
NUMERIC = ("int", "float")
MIN_ROWS = 6


def _value(col: tuple, rng, row: int, fk_keys: list[str]) -> str:
    kind = col[1]
    if kind == "person":
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if kind == "category":
        return rng.choice(col[2])
    if kind == "combo":
        return f"{rng.choice(col[2])} {rng.choice(col[3])} {rng.randint(100, 999)}"
    if kind == "unique":
        base = col[2][row % len(col[2])]
        return base if row < len(col[2]) else f"{base} {row // len(col[2]) + 1}"
    if kind == "fk":
        return rng.choice(fk_keys)
    if kind == "int":
        return str(rng.randint(col[2], col[3]))
    if kind == "float":
        return f"{rng.uniform(col[2], col[3]):.2f}"
    if kind == "date":
        lo, hi = dt.date.fromisoformat(col[2]), dt.date.fromisoformat(col[3])
        return (lo + dt.timedelta(days=rng.randint(0, (hi - lo).days))).isoformat()
    raise ValueError(f"unknown column type {kind!r}")


def _keys(col: tuple, rng, n: int) -> list[str]:
    """n unique keys like E04817 (prefix + zero-padded digits), in random order."""
    width = col[3]
    return [f"{col[2]}{k:0{width}d}" for k in rng.sample(range(10 ** width), n)]


def serialize_line(values: list[str], fmt: str) -> str:
    return ("| " + " | ".join(values) + " |\n") if fmt == "markdown" else (",".join(values) + "\n")


def serialize_header(names: list[str], fmt: str) -> str:
    if fmt == "markdown":
        return serialize_line(names, fmt) + "| " + " | ".join("---" for _ in names) + " |\n"
    return serialize_line(names, fmt)


def _numeric(text: str) -> float:
    return float(text)


def _fmt_like(col: tuple, x: float) -> str:
    return str(int(x)) if col[1] == "int" else f"{x:.2f}"


class TableSampleBuilder:
    """Builds one SynL sample for (seed, index): sized table(s), a question, the computed answer."""

    def __init__(self, tokenizer: str, seed: int, settings: dict):
        self.chat = ChatTokens(tokenizer)
        self.seed = seed
        self.s = settings

    def build(self, index: int) -> dict:
        s, rng = self.s, item_rng(self.seed, KIND, index)
        u, depth = spread(self.seed, KIND, index)
        target = target_length(u, s["min_tokens"], s["max_tokens"])
        qtype = s["questions"][index % len(s["questions"])]
        fmt = s["formats"][(index // len(s["questions"])) % len(s["formats"])]
        theme = THEMES[rng.choice(sorted(THEMES))]
        (main_title, main_cols), (side_title, side_cols) = theme["main"], theme["side"]
        side_keys = _keys(side_cols[0], rng, 12)
        side_rows = [[side_keys[r]] + [_value(c, rng, r, side_keys) for c in side_cols[1:]] for r in range(12)]
        # The second table takes at most a fifth of the target (at least 3 rows); the main table fills the rest.
        side_tokens = np.cumsum(self.chat.count_many([serialize_line(r, fmt) for r in side_rows]))
        side_n = max(3, int(np.searchsorted(side_tokens, 0.2 * target, side="right")))
        side_rows, side_keys = side_rows[:side_n], side_keys[:side_n]
        side_text = serialize_header([c[0] for c in side_cols], fmt) + "".join(
            serialize_line(r, fmt) for r in side_rows) if qtype == "multi_hop" else ""
        # Budget for the main table's rows: target minus everything else (question estimated by a stand-in).
        probe_q = "Q" * 200
        fixed = self._messages(main_title, "", side_title, side_text, probe_q, "0000000000", fmt)
        header = serialize_header([c[0] for c in main_cols], fmt)
        budget = target - self.chat.sample_tokens(fixed) - self.chat.count(header) + self.chat.count(probe_q) - 24
        rows, row_tokens = self._sized_rows(main_cols, rng, side_keys, max(budget, 3 * 8), fmt)
        # The answer row: the row holding the token at the requested depth of the table body.
        starts = np.concatenate([[0], np.cumsum(row_tokens)])
        a = int(np.clip(np.searchsorted(starts, depth * starts[-1], side="right") - 1, 0, len(rows) - 1))
        question, answer, qmeta = self._question(qtype, rng, main_cols, rows, a, side_cols, side_rows)
        table_text = header + "".join(serialize_line(r, fmt) for r in rows)
        messages = self._messages(main_title, table_text, side_title, side_text, question, answer, fmt)
        tokens = self.chat.sample_tokens(messages)
        # Measured depth of the answer row: body tokens before its line / body tokens (header excluded).
        row_char = len(header) + sum(len(serialize_line(r, fmt)) for r in rows[:a])
        enc = self.chat.encode(table_text)
        starts_chars = [o[0] for o in enc.offsets]
        head, at = bisect.bisect_left(starts_chars, len(header)), bisect.bisect_left(starts_chars, row_char)
        measured = (at - head) / (len(enc.ids) - head)
        meta = {"task": qtype, "format": fmt, "theme": main_title, "target_tokens": target, "tokens": tokens,
                "requested_depth": round(depth, 6), "answer_depth": round(measured, 6), "answer_row": a,
                "rows": len(rows), "question": qmeta}
        rec = chat_record(KIND, self.seed, index, messages[0]["content"], answer, meta)
        return {"index": index, "line": json.dumps(rec, ensure_ascii=False), "tokens": tokens, "task": qtype,
                "target_tokens": target, "depth": measured}

    def _messages(self, title, table_text, side_title, side_text, question, answer, fmt) -> list[dict]:
        plural = "s" if side_text else ""
        parts = [f"Read the table{plural} below ({fmt}) and answer the question using only the table{plural}.", ""]
        parts += [f"Table 1: {title}", table_text.rstrip("\n"), ""]
        if side_text:
            parts += [f"Table 2: {side_title}", side_text.rstrip("\n"), ""]
        parts += [f"Question: {question}", "Answer with the value only."]
        return [{"role": "user", "content": "\n".join(parts)}, {"role": "assistant", "content": answer}]

    def _sized_rows(self, cols, rng, side_keys, budget: int, fmt: str) -> tuple[list[list[str]], list[int]]:
        """Rows whose serialized lines add up to `budget` tokens (each line counted once, in batches); at least
        MIN_ROWS rows, even when that overshoots a small target."""
        rows, counts, used = [], [], 0
        key_pool: list[str] = []
        step = 16
        while used < budget or len(rows) < MIN_ROWS:
            if len(key_pool) < step:
                key_pool += _keys(cols[0], rng, 4 * step)
                key_pool = list(dict.fromkeys(key_pool))  # sampled per call: drop the rare repeats
            new = [[k] + [_value(c, rng, len(rows) + i, side_keys) for c in cols[1:]]
                   for i, k in enumerate(key_pool[:step])]
            taken = {r[0] for r in rows}
            new = [r for r in new if r[0] not in taken]
            key_pool = key_pool[step:]
            for r, n in zip(new, self.chat.count_many([serialize_line(r, fmt) for r in new])):
                if used + n > budget and len(rows) >= MIN_ROWS and (used + n - budget) > (budget - used):
                    return rows, counts
                rows.append(r)
                counts.append(n)
                used += n
                if used >= budget and len(rows) >= MIN_ROWS:
                    break
            step = min(256, 2 * step)
        return rows, counts

    def _question(self, qtype, rng, cols, rows, a, side_cols, side_rows) -> tuple[str, str, dict]:
        key_col = cols[0][0]
        names = [c[0] for c in cols]
        row = rows[a]
        if qtype == "lookup":
            ci = rng.randrange(1, len(cols))
            return (f"What is the {names[ci]} of the row whose {key_col} is {row[0]}?", row[ci],
                    {"type": "lookup", "key_column": key_col, "key": row[0], "column": names[ci]})
        numeric = [i for i, c in enumerate(cols) if c[1] in NUMERIC]
        if qtype == "extremum":
            ci = rng.choice(numeric)
            highest = rng.random() < 0.5
            sign = 1 if highest else -1
            vals = [sign * _numeric(r[ci]) for r in rows]
            best = int(np.argmax(vals))
            row[ci], rows[best][ci] = rows[best][ci], row[ci]  # the answer row takes the extreme value
            top = sign * _numeric(row[ci])
            step = 1 if cols[ci][1] == "int" else 0.01
            for j, r in enumerate(rows):  # the extreme must be unique
                if j != a and _numeric(r[ci]) == top:
                    r[ci] = _fmt_like(cols[ci], top - sign * step)
            word = "highest" if highest else "lowest"
            return (f"Which {key_col} has the {word} {names[ci]}?", row[0],
                    {"type": "extremum", "key_column": key_col, "column": names[ci], "direction": word})
        if qtype == "filter_count":
            cat = [i for i, c in enumerate(cols) if c[1] == "category"][0]
            ci = rng.choice(numeric)
            lo = min(_numeric(r[ci]) for r in rows)
            value = _numeric(row[ci])
            threshold = _fmt_like(cols[ci], lo + rng.random() * max(value - lo, 0) - (1 if cols[ci][1] == "int" else 0.01))
            if _numeric(threshold) >= value:  # keep the answer row inside the filter
                threshold = _fmt_like(cols[ci], value - (1 if cols[ci][1] == "int" else 0.01))
            count = sum(1 for r in rows if r[cat] == row[cat] and _numeric(r[ci]) > _numeric(threshold))
            return (f"How many rows have {names[cat]} equal to {row[cat]} and {names[ci]} greater than {threshold}?",
                    str(count), {"type": "filter_count", "key_column": key_col, "category_column": names[cat], "category": row[cat],
                                 "column": names[ci], "threshold": threshold})
        if qtype == "multi_hop":
            fk = [i for i, c in enumerate(cols) if c[1] == "fk"][0]
            side = {r[0]: r for r in side_rows}
            bi = rng.randrange(1, len(side_cols))
            b_name = side_cols[bi][0]
            return (f"In table 1, find the row whose {key_col} is {row[0]} and take its {names[fk]}; in table 2, "
                    f"what is the {b_name} of the row with that {side_cols[0][0]}?", side[row[fk]][bi],
                    {"type": "multi_hop", "key_column": key_col, "key": row[0], "fk_column": names[fk],
                     "side_key_column": side_cols[0][0], "column": b_name})
        raise ValueError(f"unknown SynL question type {qtype!r}")


class TableSamples:
    """Ray Data actor: batch {"id": sample indices} -> SynL samples (index, line, tokens, task, ...)."""

    def __init__(self, tokenizer: str, seed: int, settings: dict):
        self.builder = TableSampleBuilder(tokenizer, seed, settings)

    def __call__(self, batch: dict) -> dict:
        out = [self.builder.build(int(i)) for i in batch["id"]]
        return {k: np.array([o[k] for o in out]) for k in ("index", "line", "tokens", "task", "target_tokens", "depth")}


def table_settings(cfg) -> dict:
    t = cfg.synth.tables
    return {"min_tokens": t.min_tokens, "max_tokens": t.max_tokens, "formats": list(t.formats),
            "questions": list(t.questions)}


def synth_tables(cfg, output: str | None = None, overwrite: bool = False) -> dict:
    """Generate `synth.tables.num_samples` SynL chat samples and publish them at `output` (default
    `synth.output/tables`). Returns the manifest plus `uri` and `timings`."""
    storage.configure(cfg.storage)
    dest = output or (storage.join(cfg.synth.output, "tables") if cfg.synth.output else None)
    if not dest:
        raise ValueError("no output location: set synth.output (local folder or s3:// prefix) or pass output=")
    settings = table_settings(cfg)
    t = cfg.synth.tables
    return generate_sft_set(cfg, "tables", TableSamples,
                            {"tokenizer": cfg.data.tokenizer, "seed": cfg.synth.seed, "settings": settings},
                            t.num_samples, dest, settings, (t.min_tokens, t.max_tokens), overwrite=overwrite)
