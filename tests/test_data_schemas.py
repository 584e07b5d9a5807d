"""The data contracts in schemas/ agree with the code: packed rows (Arrow types and JSON Schema), manifest.json,
corpus records. Pass 2 (mix, pack, publish) runs here from a hand-made token cache, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest

from longctx.config import load_config
from longctx.data.pack import PACKED_SCHEMA
from longctx.data.pipeline import TokenCache, pack_and_publish

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def _schema(name):
    return json.loads((SCHEMAS / name).read_text())


def _cache(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    docs = {}
    for src, median, n in [("web", 60, 300), ("book", 900, 20)]:
        lengths = np.clip(rng.lognormal(np.log(median), 0.8, n).astype(int), 2, None)
        docs[src] = [(f"{src}-{i}", np.append(rng.integers(1, 500, k - 1), 0).astype(np.int32))
                     for i, k in enumerate(lengths)]
    return TokenCache.from_documents(str(tmp_path / "cache"), docs), docs


def _publish(tmp_path, name, **over):
    cache, docs = _cache(tmp_path)
    cfg = load_config(None, ["data.seq_len=256", "data.long_threshold=128", "data.rows_per_shard=100",
                             *[f"{k}={v}" for k, v in over.items()]])
    out = str(tmp_path / name)
    manifest = pack_and_publish(cfg, cache, out, quiet=True)
    rows = pq.read_table([str(Path(out) / s["path"]) for s in manifest["shards"]]) if len(manifest["shards"]) > 1 \
        else pq.read_table(str(Path(out) / manifest["shards"][0]["path"]))
    return manifest, rows, docs


def test_packed_row_schema_matches_the_code(tmp_path):
    schema = _schema("packed_sequence.schema.json")
    assert schema["required"] == PACKED_SCHEMA.names
    assert {k: v["x-arrow"] for k, v in schema["properties"].items()} == {f.name: str(f.type) for f in PACKED_SCHEMA}
    manifest, rows, _ = _publish(tmp_path, "out")
    assert pq.read_schema(str(tmp_path / "out" / "part-00000.parquet")).remove_metadata() == PACKED_SCHEMA
    for row in rows.slice(0, 50).to_pylist():
        jsonschema.validate(row, schema)
    assert manifest["columns"] == PACKED_SCHEMA.names


@pytest.mark.parametrize("over", [{}, {"data.strategy": "cut-4k"}, {"data.upsample_mode": "keep_prob"},
                                  {"data.strategy": "sources", "data.upsample_sources": "[web]"},
                                  {"data.strategy": "global", "data.token_budget": 50000}])
def test_manifest_validates_against_its_schema(tmp_path, over):
    manifest, _, _ = _publish(tmp_path, "out", **over)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    jsonschema.validate(on_disk, _schema("manifest.schema.json"))
    assert on_disk["strategy"] == (over.get("data.strategy") or "per-source")
    assert sum(s["rows"] for s in on_disk["shards"]) == on_disk["totals"]["rows"]
    assert [s["row_id_start"] for s in on_disk["shards"]] == list(range(0, on_disk["totals"]["rows"], 100))


def test_full_attention_rows_and_cut_4k_chunks(tmp_path):
    _, rows, _ = _publish(tmp_path, "full", **{"data.attention": "full"})
    pos = np.stack(rows.column("position_ids").to_numpy(zero_copy_only=False))
    assert (pos == np.arange(256)).all()
    manifest, rows, docs = _publish(tmp_path, "cut", **{"data.strategy": "cut-4k", "data.seq_len": 8192})
    seg_doc_tokens = [t for r in rows.column("seg_doc_tokens").to_pylist() for t in r]
    assert max(seg_doc_tokens) <= 4096  # every emitted document is at most one 4K chunk
    assert manifest["totals"]["tokens"] == sum(len(t) for v in docs.values() for _, t in v)


def test_corpus_record_schema_accepts_what_the_reader_accepts():
    schema = _schema("corpus_record.schema.json")
    jsonschema.validate({"text": "hello", "id": 3, "meta": {"redpajama_set_name": "RedPajamaBook"}}, schema)
    jsonschema.validate({"text": "hello", "source": "web", "extra": [1, 2]}, schema)
    for bad in [{"text": ""}, {"text": "   "}, {"title": "x"}, {"text": 5}]:  # the reader quarantines these
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
