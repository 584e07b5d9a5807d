"""SynL: answers recomputed here from the emitted table *text* (parsed independently of the generator), answer
rows spread over the table's depth, sample lengths in tokens of the tokenizer's chat template, and the same
samples whether generated in a Ray actor or in this process (same seed -> same bytes)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from longctx import storage
from longctx.cli import main
from longctx.config import load_config
from longctx.data.synthetic.common import ChatTokens, load_chat_jsonl
from longctx.data.synthetic.tables import TableSampleBuilder, table_settings

TOKENIZER = "builtin:tiny-tokenizer"
ROOT = Path(__file__).resolve().parents[1]


def parse_tables(user: str) -> tuple[list[list[dict]], str, str]:
    """(tables as lists of row dicts, table 1 text, format) from a SynL prompt."""
    fmt = "markdown" if "(markdown)" in user.split("\n", 1)[0] else "csv"
    tables, texts = [], []
    for block in user.split("\n\n"):
        if not block.startswith("Table "):
            continue
        lines = block.split("\n")[1:]
        texts.append("\n".join(lines) + "\n")
        if fmt == "markdown":
            cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
            header, body = cells[0], cells[2:]
            assert set(cells[1]) == {"---"}
        else:
            rows = list(csv.reader(io.StringIO("\n".join(lines))))
            header, body = rows[0], rows[1:]
        tables.append([dict(zip(header, r)) for r in body])
    return tables, texts[0], fmt


def expected_answer(tables: list[list[dict]], q: dict) -> str:
    main_rows = tables[0]
    if q["type"] == "lookup":
        (row,) = [r for r in main_rows if r[q["key_column"]] == q["key"]]
        return row[q["column"]]
    if q["type"] == "filter_count":
        return str(sum(1 for r in main_rows if r[q["category_column"]] == q["category"]
                       and float(r[q["column"]]) > float(q["threshold"])))
    if q["type"] == "extremum":
        vals = [float(r[q["column"]]) for r in main_rows]
        best = max(vals) if q["direction"] == "highest" else min(vals)
        winners = [r[q["key_column"]] for r, v in zip(main_rows, vals) if v == best]
        assert len(winners) == 1, "the extremum must be unique"
        return winners[0]
    if q["type"] == "multi_hop":
        (row,) = [r for r in main_rows if r[q["key_column"]] == q["key"]]
        (side,) = [r for r in tables[1] if r[q["side_key_column"]] == row[q["fk_column"]]]
        return side[q["column"]]
    raise AssertionError(q)


def answer_row_index(table: list[dict], q: dict, answer: str) -> int | None:
    key = q.get("key") or (answer if q["type"] == "extremum" else None)
    if key is None:
        return None
    return [r[q["key_column"]] for r in table].index(key)


@pytest.mark.ray
def test_synl_answers_depths_lengths_determinism(ray_cluster, tmp_path):
    n, lo, hi = 24, 400, 900
    over = [f"synth.tables.num_samples={n}", f"synth.tables.min_tokens={lo}", f"synth.tables.max_tokens={hi}",
            "synth.seed=7", "synth.batch_size=6", "synth.samples_per_shard=10"]
    dest = str(tmp_path / "tables")
    assert main(["data", "synth", "tables", *sum((["--set", o] for o in over), []), "--output", dest]) == 0
    records = load_chat_jsonl(dest)
    manifest = json.loads(storage.read_text(storage.join(dest, "manifest.json")))
    assert len(records) == n == manifest["totals"]["samples"]
    jsonschema.validate(manifest, json.loads((ROOT / "schemas" / "synthetic_sft_manifest.schema.json").read_text()))
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["by_task"] == {"extremum": 6, "filter_count": 6, "lookup": 6, "multi_hop": 6}
    chat = ChatTokens(TOKENIZER)
    tok = chat.backend
    depths = []
    for rec in records:
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        meta = rec["meta"]
        tables, text, fmt = parse_tables(user)
        assert fmt == meta["format"]
        assert len({r[meta["question"]["key_column"]] for r in tables[0]}) == len(tables[0]), "unique keys"
        assert answer == expected_answer(tables, meta["question"]), rec["id"]
        # depth of the answer row, re-measured: body tokens before its line / body tokens
        lines = text.split("\n")
        head = 2 if fmt == "markdown" else 1
        rows = [l + "\n" for l in lines[head:] if l]
        i = answer_row_index(tables[0], meta["question"], answer)
        if i is None:  # filter_count: the generator's answer row must be one the filter counts
            i = meta["answer_row"]
            q = meta["question"]
            assert tables[0][i][q["category_column"]] == q["category"] and float(tables[0][i][q["column"]]) > float(q["threshold"])
        assert i == meta["answer_row"]
        header = "".join(l + "\n" for l in lines[:head])
        n_head = len(tok.encode(header).ids)
        depth = (len(tok.encode(header + "".join(rows[:i])).ids) - n_head) / (len(tok.encode(text).ids) - n_head)
        assert depth == pytest.approx(meta["answer_depth"], abs=0.02)
        row_share = max(len(tok.encode(r).ids) for r in rows) / (len(tok.encode(text).ids) - n_head)
        assert abs(depth - meta["requested_depth"]) <= row_share + 0.02
        depths.append(depth)
        # length: the chat-templated sample, counted with the tokenizer
        assert meta["tokens"] == chat.sample_tokens(rec["messages"])
        assert lo <= meta["target_tokens"] <= hi
        if meta["task"] != "multi_hop":  # multi_hop keeps >= 6 main rows beside table 2, so may overshoot
            assert abs(meta["tokens"] - meta["target_tokens"]) <= 0.06 * meta["target_tokens"] + 10, rec["id"]
    # answer rows cover the table: every fifth of the depth range holds at least two
    counts, _ = np.histogram(depths, bins=5, range=(0, 1))
    assert counts.min() >= 2, counts
    assert manifest["depth_histogram"]["counts"] == list(np.histogram(
        [r["meta"]["answer_depth"] for r in records], bins=np.linspace(0, 1, 11))[0])
    # same seed -> the same bytes, in a Ray actor or here; another seed -> other samples
    cfg = load_config(None, over)
    builder = TableSampleBuilder(TOKENIZER, 7, table_settings(cfg))
    lines_on_disk = storage.read_text(storage.join(dest, "part-00001.jsonl")).splitlines()
    assert [builder.build(i)["line"] for i in (10, 13)] == [lines_on_disk[0], lines_on_disk[3]]
    assert TableSampleBuilder(TOKENIZER, 8, table_settings(cfg)).build(10)["line"] != lines_on_disk[0]


def test_chat_template_count_matches_transformers():
    """Token counts use the template exactly as transformers' apply_chat_template renders it."""
    from transformers import AutoTokenizer

    from longctx.data.tokenize import local_tokenizer_dir

    hf = AutoTokenizer.from_pretrained(local_tokenizer_dir(TOKENIZER))
    chat = ChatTokens(TOKENIZER)
    messages = [{"role": "user", "content": "Table 1: staff\n| a | b |\n\nQuestion: x?"},
                {"role": "assistant", "content": "E01234"}]
    assert chat.render(messages) == hf.apply_chat_template(messages, tokenize=False)
    ids = hf.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert chat.sample_tokens(messages) == len(ids)
