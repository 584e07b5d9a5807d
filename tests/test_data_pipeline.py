"""The whole data engine through real Ray Data against the loopback S3 server: s3:// corpus in, s3:// shards
out. Every invariant is recomputed from the written rows and from an independent tokenization of the input,
and checked as numbers (row length, position ids vs seg_lengths, labels on padding, source shares, long
shares, budget, determinism, quarantine counts by reason)."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from longctx import storage
from longctx.config import load_config
from longctx.data import length_stats, packed_dataset, prepare_data, read_packed
from longctx.data.token_cache import DataQualityError
from longctx.model.load import load_tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.s3]

SEQ, THR, Q = 256, 128, 0.7
WORDS = "the of and to in is for on that with as by at from it be this which or are an was".split() + [
    f"w{i}" for i in range(300)]


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words))


def _docs(rng, n, median_words, sigma):
    return [_text(rng, max(3, int(x))) for x in rng.lognormal(np.log(median_words), sigma, n)]


def _put(uri, data: bytes):
    storage.write_bytes(uri, data)


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_corpus(bucket: str, rng) -> tuple[dict, dict, dict, str]:
    """Three sources in three formats on S3, with injected bad input. Returns (sources config, good texts by
    source label, expected quarantine counts by reason, location of the bad-JSON line)."""
    web = _docs(rng, 260, 40, 0.8)          # mostly short
    code = _docs(rng, 90, 120, 0.9)         # mixed
    slim = [(t, "RedPajamaBook" if i % 2 else "RedPajamaArXiv") for i, t in enumerate(_docs(rng, 60, 200, 0.6))]
    # web: two gzip files, bad records in the first
    bad_lines = [b'{"text": ""}', b'{"nope": 1}', b"{not json", b'{"text": "bad \xff byte"}', b'{"text": 5}']
    first = _jsonl({"text": t} for t in web[:130]).splitlines()
    for i, line in enumerate(bad_lines):
        first.insert(10 * (i + 1), line)
    _put(f"{bucket}/corpus/web/part-0.jsonl.gz", gzip.compress(b"\n".join(first) + b"\n"))
    bad_json_line = first.index(b"{not json") + 1
    _put(f"{bucket}/corpus/web/part-1.jsonl.gz", gzip.compress(_jsonl({"text": t} for t in web[130:])))
    # code: zstd, plus a truncated zstd file whose surviving records count
    c = zstandard.ZstdCompressor()
    _put(f"{bucket}/corpus/code/a.jsonl.zst", c.compress(_jsonl({"text": t, "id": f"code-{i}"}
                                                                 for i, t in enumerate(code))))
    filler = _jsonl({"text": _text(rng, 30), "id": f"cut-{i}"} for i in range(3000))
    cut = c.compress(filler)
    _put(f"{bucket}/corpus/code/b.jsonl.zst", cut[: len(cut) // 2])
    survived = [json.loads(l)["text"] for l in _decode_prefix(cut[: len(cut) // 2])]
    # slim: SlimPajama layout in parquet, source label from meta.redpajama_set_name
    table = pa.table({"text": [t for t, _ in slim], "meta": [{"redpajama_set_name": s} for _, s in slim]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=25)
    _put(f"{bucket}/corpus/slim/chunk-0.parquet", buf.getvalue())
    sources = {
        "web": {"uri": f"{bucket}/corpus/web/"},
        "code": {"uri": f"{bucket}/corpus/code/*.jsonl.zst", "id_field": "id"},
        "slim": {"uri": f"{bucket}/corpus/slim/", "source_field": "meta.redpajama_set_name"},
    }
    good = {"web": web, "code": code + survived,
            "RedPajamaBook": [t for t, s in slim if s == "RedPajamaBook"],
            "RedPajamaArXiv": [t for t, s in slim if s == "RedPajamaArXiv"]}
    partial = 1 if len(survived) < 3000 and not _ends_on_line(cut[: len(cut) // 2]) else 0
    # a cut file counts the records it lost: unknown, estimated as many as were read (data/sources.py)
    expected_bad = {"empty_text": 1, "missing_text": 1, "bad_json": 1 + partial, "invalid_utf8": 1, "bad_type": 1,
                    "truncated_file": len(survived) + partial}
    return sources, good, expected_bad, f"{bucket}/corpus/web/part-0.jsonl.gz:{bad_json_line}"


def _decode_prefix(data: bytes) -> list[bytes]:
    """Complete lines a streaming zstd decoder can recover from a cut file (the test's own reference)."""
    out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return [l for l in out.split(b"\n")[:-1] if l]


def _ends_on_line(data: bytes) -> bool:
    out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out.endswith(b"\n") or not out


def _rows(uri: str, manifest: dict) -> pa.Table:
    return pa.concat_tables(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, s["path"]))))
                            for s in manifest["shards"])


@pytest.fixture(scope="module")
def tokenizer_on_s3(s3_endpoint):
    import boto3

    bucket = "tok-bucket"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    storage.upload_dir(storage.normalize("builtin:tiny-tokenizer"), f"s3://{bucket}/tiny-tokenizer")
    return f"s3://{bucket}/tiny-tokenizer"


def _cfg(sources, tokenizer, **over):
    sets = [f"data.tokenizer={tokenizer}", f"data.seq_len={SEQ}", f"data.long_threshold={THR}",
            f"data.long_share={Q}", "data.max_bad_fraction=0.05", "data.rows_per_shard=1000",
            "data.num_tokenize_actors=2", "ray.data_cpus_per_task=0.25", "data.seed=11"]
    sets += [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, sets)
    cfg.data.sources = sources
    return cfg


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3_endpoint, tokenizer_on_s3):
    """One s3:// -> s3:// run shared by the tests below, with an independent reference of the input."""
    import boto3

    bucket = "s3://data-e2e"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data-e2e")
    sources, good, expected_bad, bad_json_at = write_corpus(bucket, np.random.default_rng(0))
    tok = load_tokenizer(tokenizer_on_s3)
    # independent reference: token lengths of every good record (+ EOS), by source label
    lengths = {s: np.array([len(x) + 1 for x in tok(texts, add_special_tokens=False)["input_ids"]])
               for s, texts in good.items()}
    budget = int(sum(int(v.sum()) for v in lengths.values()) * 1.3)
    cfg = _cfg(sources, tokenizer_on_s3, **{"data.token_budget": budget, "data.max_bad_fraction": 0.9})
    out = f"{bucket}/packed/run1"
    manifest = prepare_data(cfg, out)
    return {"cfg": cfg, "out": out, "manifest": manifest, "lengths": lengths, "budget": budget,
            "expected_bad": expected_bad, "bad_json_at": bad_json_at, "eos": tok.eos_token_id,
            "rows": _rows(out, manifest)}


@pytest.mark.slow
def test_s3_in_s3_out_every_invariant_as_numbers(prepared):
    p = prepared
    out, manifest, lengths, budget, rows = p["out"], p["manifest"], p["lengths"], p["budget"], p["rows"]
    natural_tokens = {s: int(v.sum()) for s, v in lengths.items()}
    natural_long = {s: int(v[v >= THR].sum()) / int(v.sum()) for s, v in lengths.items()}
    total_in = sum(natural_tokens.values())

    # -- published atomically, manifest on S3 equals the returned one
    assert storage.is_committed(out)
    on_s3 = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert on_s3 == {k: v for k, v in manifest.items() if k not in ("uri", "rows", "tokens", "pad_fraction", "timings", "pass1", "pass2")}
    # -- quarantine: counted by reason, each with its location, in the manifest and under _quarantine/
    expected_bad = p["expected_bad"]
    assert manifest["quarantine"]["by_reason"] == expected_bad
    q = [json.loads(l) for l in storage.read_text(f"{out}/_quarantine/records.jsonl").splitlines()]
    assert sum(r["records"] for r in q) == sum(expected_bad.values())
    assert p["bad_json_at"] in {r["location"] for r in q if r["reason"] == "bad_json"}
    assert [r["location"] for r in q if r["reason"] == "truncated_file"] == ["s3://data-e2e/corpus/code/b.jsonl.zst"]
    assert manifest["input"]["good_records"] == sum(len(v) for v in lengths.values())

    n = rows.num_rows
    assert rows.column("row_id").to_pylist() == list(range(n))
    ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False))
    pos = np.stack(rows.column("position_ids").to_numpy(zero_copy_only=False))
    labels = np.stack(rows.column("labels").to_numpy(zero_copy_only=False))
    assert ids.shape == pos.shape == labels.shape == (n, SEQ)
    seg_len = rows.column("seg_lengths").to_pylist()
    seg_src = rows.column("seg_sources").to_pylist()
    seg_doc = rows.column("seg_doc_tokens").to_pylist()
    per_source = {s: 0 for s in lengths}
    per_source_long = {s: 0 for s in lengths}
    pad = 0
    for r in range(n):
        assert sum(seg_len[r]) == SEQ
        assert np.array_equal(pos[r], np.concatenate([np.arange(k) for k in seg_len[r]]))
        is_pad = np.concatenate([np.full(k, s == "") for k, s in zip(seg_len[r], seg_src[r])])
        assert "" not in seg_src[r][:-1]  # padding only as the last segment
        assert (labels[r][is_pad] == -100).all() and np.array_equal(labels[r][~is_pad], ids[r][~is_pad])
        pad += int(is_pad.sum())
        for k, s, dt in zip(seg_len[r], seg_src[r], seg_doc[r]):
            if s:
                per_source[s] += k
                per_source_long[s] += k if dt >= THR else 0
    emitted = n * SEQ - pad
    assert abs(emitted - budget) <= 0.01 * budget
    assert emitted == manifest["totals"]["tokens"]
    for s in lengths:
        in_share = natural_tokens[s] / total_in
        assert abs(per_source[s] / emitted - in_share) <= 0.01, (s, per_source[s] / emitted, in_share)
        want = max(Q, natural_long[s])
        assert abs(per_source_long[s] / per_source[s] - want) <= 0.02, (s, per_source_long[s] / per_source[s], want)
        assert manifest["sources"][s]["in"]["tokens"] == natural_tokens[s]
        assert manifest["sources"][s]["out"]["tokens"] == per_source[s]
    assert manifest["sources"]["web"]["repeated_docs"] > 0  # web's few long docs were drawn repeatedly
    assert manifest["totals"]["pad_fraction"] == pytest.approx(pad / (n * SEQ), abs=1e-6)
    # every whole document ends with EOS: at least one EOS per emitted document that was not split
    assert (ids == p["eos"]).sum() >= manifest["totals"]["pieces"] - 2 * manifest["totals"]["split_docs"]


@pytest.mark.slow
def test_same_input_config_seed_give_byte_identical_shards(prepared):
    out2 = "s3://data-e2e/packed/run2"
    manifest2 = prepare_data(prepared["cfg"], out2)
    shards = prepared["manifest"]["shards"]
    assert [s["sha256"] for s in manifest2["shards"]] == [s["sha256"] for s in shards]
    for s in shards:
        assert storage.read_bytes(f"{prepared['out']}/{s['path']}") == storage.read_bytes(f"{out2}/{s['path']}")
    # --overwrite of a committed S3 dataset (new generation folder, one marker PUT, old files deleted): the
    # training reader and read_packed see the same rows, and nothing of the first copy is left
    with pytest.raises(storage.StorageError, match="already published"):
        prepare_data(prepared["cfg"], out2)
    manifest3 = prepare_data(prepared["cfg"], out2, overwrite=True)
    root = storage.committed_root(out2)
    assert storage.GENERATION.match(root.rsplit("/", 1)[1])
    assert [s["sha256"] for s in manifest3["shards"]] == [s["sha256"] for s in shards]
    assert sorted(storage.listing(out2)[2]) == sorted(
        [storage.COMMIT_MARKER] + [f"{root.rsplit('/', 1)[1]}/{k}" for k in storage.require_committed(out2)["files"]])
    ids = np.stack(prepared["rows"].column("input_ids").to_numpy(zero_copy_only=False))
    batches = list(read_packed(out2).iter_batches(batch_size=64, batch_format="numpy"))
    row_ids = np.concatenate([b["row_id"] for b in batches])
    assert np.array_equal(np.concatenate([b["input_ids"] for b in batches])[np.argsort(row_ids)], ids)
    from longctx.train.trainer import packed_parquet_files

    files, rows = packed_parquet_files(out2)
    assert rows == len(ids) and all(f.startswith(root + "/") for f in files)


@pytest.mark.slow
def test_read_packed_gives_every_row_as_fixed_length_int32(prepared):
    ids = np.stack(prepared["rows"].column("input_ids").to_numpy(zero_copy_only=False))
    batches = list(read_packed(prepared["out"]).iter_batches(batch_size=64, batch_format="numpy"))
    row_ids = np.concatenate([b["row_id"] for b in batches])
    assert sorted(row_ids.tolist()) == list(range(len(ids)))
    assert batches[0]["input_ids"].shape[1] == SEQ and batches[0]["input_ids"].dtype == np.int32
    assert np.array_equal(np.concatenate([b["input_ids"] for b in batches])[np.argsort(row_ids)], ids)


@pytest.mark.slow
def test_streaming_dataset_yields_the_written_rows_without_writing(prepared):
    ids = np.stack(prepared["rows"].column("input_ids").to_numpy(zero_copy_only=False))
    stream = list(packed_dataset(prepared["cfg"]).iter_batches(batch_size=None, batch_format="numpy"))
    assert np.array_equal(np.concatenate([b["row_id"] for b in stream]), np.arange(len(ids)))
    assert np.array_equal(np.concatenate([b["input_ids"] for b in stream]), ids)


def test_too_many_bad_records_fail_with_counts_and_publish_nothing(ray_cluster, s3_bucket, tokenizer_on_s3):
    lines = [json.dumps({"text": f"fine document {i} " * 20}) for i in range(20)] + ["{broken"] * 3 + [
        json.dumps({"text": ""})]
    storage.write_bytes(f"{s3_bucket}/bad/a.jsonl", "\n".join(lines).encode())
    cfg = _cfg({"x": {"uri": f"{s3_bucket}/bad/"}}, tokenizer_on_s3, **{"data.max_bad_fraction": 0.1})
    with pytest.raises(DataQualityError, match=r"4 of 24 input records \(16\.67%\).*'bad_json': 3, 'empty_text': 1"):
        prepare_data(cfg, f"{s3_bucket}/out")
    assert not storage.exists(f"{s3_bucket}/out/_COMMITTED")
    with pytest.raises(storage.StorageError, match="_COMMITTED"):
        read_packed(f"{s3_bucket}/out")


@pytest.mark.slow
def test_length_stats_alone_match_the_manifest_and_draw_a_histogram(prepared, tmp_path, capsys):
    png = tmp_path / "lengths.png"
    stats = length_stats(prepared["cfg"], plot=str(png))
    manifest = prepared["manifest"]
    for s, v in manifest["sources"].items():
        assert stats["sources"][s] == v["in"]
    assert stats["quarantine"]["by_reason"] == manifest["quarantine"]["by_reason"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = capsys.readouterr().out
    assert "RedPajamaBook" in table and f"long>={THR}" in table
