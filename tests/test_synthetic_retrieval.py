"""Retrieval instructions: each needle sits at its requested depth measured in tokens of the haystack
(re-measured here from the emitted text), answers match the needles, lengths hit their targets in tokens of the
chat-templated sample, lengths and depths cover their ranges, output published to (loopback) S3, and the same
seed gives the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from longctx import storage
from longctx.config import load_config
from longctx.data.synthetic.common import ChatTokens, load_chat_jsonl
from longctx.data.synthetic.retrieval import (CLOSE, OPEN, RetrievalSampleBuilder, load_haystack,
                                              retrieval_settings, synth_retrieval)

TOKENIZER = "builtin:tiny-tokenizer"
ROOT = Path(__file__).resolve().parents[1]


def needle_depths(user: str, needles: list[str], tok) -> tuple[list[float], int]:
    """Depth of each needle as a share of the haystack's own tokens, from the prompt text alone."""
    hay = user[user.index(OPEN) + len(OPEN): user.rindex(CLOSE)]
    blocks = ["\n" + n + "\n" for n in needles]
    # positions of the needle blocks in the haystack, mapped back to the filler (the haystack without them)
    found = sorted((hay.index(b), j) for j, b in enumerate(blocks))
    filler, last, cut_at = [], 0, {}
    removed = 0
    for pos, j in found:
        filler.append(hay[last:pos])
        cut_at[j] = pos - removed
        removed += len(blocks[j])
        last = pos + len(blocks[j])
    filler = "".join(filler) + hay[last:]
    n = len(tok.encode(filler).ids)
    return [len(tok.encode(filler[:cut_at[j]]).ids) / n for j in range(len(needles))], n


@pytest.mark.ray
@pytest.mark.s3
def test_retrieval_needles_at_requested_token_depth(ray_cluster, s3_bucket):
    n, lo, hi = 18, 300, 1200
    over = [f"synth.retrieval.num_samples={n}", f"synth.retrieval.min_tokens={lo}",
            f"synth.retrieval.max_tokens={hi}", "synth.retrieval.haystack_max_chars=200000", "synth.seed=3",
            "synth.batch_size=4", f"synth.output={s3_bucket}/synth"]
    cfg = load_config(None, over)
    result = synth_retrieval(cfg)
    assert result["uri"] == f"{s3_bucket}/synth/retrieval"
    records = load_chat_jsonl(result["uri"])
    manifest = json.loads(storage.read_text(storage.join(result["uri"], "manifest.json")))
    jsonschema.validate(manifest, json.loads((ROOT / "schemas" / "synthetic_sft_manifest.schema.json").read_text()))
    assert len(records) == n and manifest["by_task"] == {"kv": 6, "multi_needle": 6, "passkey": 6}
    chat = ChatTokens(TOKENIZER)
    first_depths, lengths = [], []
    for rec in records:
        meta, user, answer = rec["meta"], rec["messages"][0]["content"], rec["messages"][1]["content"]
        depths, hay_tokens = needle_depths(user, meta["needles"], chat.backend)
        assert hay_tokens == meta["haystack_tokens"]
        for got, want in zip(depths, meta["requested_depths"]):
            assert abs(got - want) <= 1.5 / hay_tokens, (rec["id"], got, want)
        assert depths == pytest.approx(meta["needle_depths"], abs=1e-6)
        # the answer is in the needles, as the question asks
        needles = meta["needles"]
        if meta["task"] == "passkey":
            assert needles[0] == f"The pass key is {answer}. Remember it. {answer} is the pass key."
        elif meta["task"] == "kv":
            key = user.rsplit("value of key ", 1)[1].split("?")[0]
            assert needles[0] == f"The value of key {key} is {answer}." and len(needles) == 4
            assert sum(f"key {key} " in nd for nd in needles) == 1
        else:
            asked = user.rsplit("secret numbers of ", 1)[1].split("?")[0].replace(" and ", ", ").split(", ")
            facts = dict(nd[len("The secret number of "):-1].split(" is ") for nd in needles)
            assert answer == ", ".join(facts[c] for c in asked) and len(asked) == 3
        for nd in needles:
            assert user.count(nd) == 1
        assert meta["tokens"] == chat.sample_tokens(rec["messages"])
        assert abs(meta["tokens"] - meta["target_tokens"]) <= 3, rec["id"]
        first_depths.append(depths[0])
        lengths.append(meta["tokens"])
    # lengths and depths spread over their ranges
    assert np.histogram(first_depths, bins=3, range=(0, 1))[0].min() >= 4
    assert np.histogram(lengths, bins=3, range=(lo, hi))[0].min() >= 4
    assert manifest["params"]["haystack_docs"] > 10
    # same seed -> same bytes (here vs the Ray actor); the haystack comes from the data engine's readers
    ids, texts = load_haystack(cfg)
    builder = RetrievalSampleBuilder(TOKENIZER, 3, retrieval_settings(cfg), ids, texts)
    assert builder.build(5)["line"] == storage.read_text(storage.join(result["uri"], "part-00000.jsonl")).splitlines()[5]
