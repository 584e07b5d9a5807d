"""Reading and validating corpus files: every kind of bad input is quarantined with its reason and location,
good records around it are kept (longctx.data.sources; no Ray needed)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from longctx.config import SourceSpec
from longctx.data import sources as src


def _read(path, name="web", **spec):
    task = src.FileTask(0, str(path), name, SourceSpec(uri=str(path), **spec))
    table = pa.concat_tables(list(src.read_file(task)))
    good = table.filter(pa.compute.is_null(table.column("reason")))
    bad = table.filter(pa.compute.is_valid(table.column("reason")))
    return good.to_pylist(), bad.to_pylist()


def _lines(n, start=0):
    return [json.dumps({"text": f"document number {i} " * 5, "id": f"d{i}"}).encode() for i in range(start, start + n)]


def test_bad_records_are_quarantined_by_reason_and_good_ones_kept(tmp_path):
    lines = _lines(3) + [
        b'{"text": ""}',                       # empty text
        b'{"text": "   \\n  "}',                # whitespace only
        b'{"title": "no text"}',               # missing text
        b'{"text": 42}',                       # wrong type
        b'["not", "an", "object"]',            # not an object
        b'{"text": "broken',                   # not JSON
        b'{"text": "caf\xe9 latin-1"}',        # invalid UTF-8 bytes
        b'{"text": "lone \\ud800 surrogate"}', # valid JSON, invalid Unicode
        b"",                                   # blank line: skipped, not a record
    ] + _lines(2, start=3)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = _read(path)
    assert [r["rec_idx"] for r in good] == [1, 2, 3, 13, 14]
    assert [r["doc_id"] for r in good] == [f"{path}:{i}" for i in (1, 2, 3, 13, 14)]  # default id: path:line
    reasons = {r["rec_idx"]: r["reason"] for r in bad}
    assert reasons == {4: "empty_text", 5: "empty_text", 6: "missing_text", 7: "bad_type", 8: "bad_type",
                       9: "bad_json", 10: "invalid_utf8", 11: "invalid_utf8"}
    assert all(r["doc_id"] == f"{path}:{r['rec_idx']}" for r in bad)  # location of every bad record


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_keeps_records_before_the_cut(tmp_path, suffix):
    # big enough to span many zstd blocks (128 KiB each): only whole blocks before the cut can be decoded
    raw = b"\n".join(_lines(20000)) + b"\n"
    packed = gzip.compress(raw) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    good, bad = _read(path)
    assert 1000 < len(good) < 20000
    assert [r["rec_idx"] for r in good] == list(range(1, len(good) + 1))  # a clean prefix, in order
    assert all(r["text"].startswith(f"document number {i - 1} ") for i, r in ((r["rec_idx"], r) for r in good))
    file_level = [r for r in bad if r["rec_idx"] == -1]
    assert [r["reason"] for r in file_level] == ["truncated_file"]
    assert file_level[0]["doc_id"] == str(path)
    assert len(bad) <= 2  # at most the half line at the cut besides the file entry


def test_multi_member_gzip_and_multi_frame_zstd_read_fully(tmp_path):
    a, b = b"\n".join(_lines(5)) + b"\n", b"\n".join(_lines(5, start=5)) + b"\n"
    gz = tmp_path / "multi.jsonl.gz"
    gz.write_bytes(gzip.compress(a) + gzip.compress(b))
    zs = tmp_path / "multi.jsonl.zst"
    c = zstandard.ZstdCompressor()
    zs.write_bytes(c.compress(a) + c.compress(b))
    for path in (gz, zs):
        good, bad = _read(path, id_field="id")
        assert [r["doc_id"] for r in good] == [f"d{i}" for i in range(10)] and bad == []


def test_unreadable_and_corrupt_files_are_quarantined_not_raised(tmp_path):
    not_gz = tmp_path / "fake.jsonl.gz"
    not_gz.write_bytes(b"this is not gzip at all\n" * 10)
    good, bad = _read(not_gz)
    assert good == [] and [r["reason"] for r in bad] == ["corrupt_file"] and bad[0]["records"] >= 1
    good, bad = _read(tmp_path / "missing.jsonl")
    assert good == [] and [r["reason"] for r in bad] == ["unreadable_file"]
    assert "missing.jsonl" in bad[0]["detail"] or "No such file" in bad[0]["detail"]


def test_slimpajama_layout_source_and_id_from_nested_fields(tmp_path):
    rows = [{"text": "a book " * 20, "meta": {"redpajama_set_name": "RedPajamaBook"}, "doc": {"id": 7}},
            {"text": "some code " * 20, "meta": {"redpajama_set_name": "RedPajamaGithub"}, "doc": {"id": 8}},
            {"text": "no label " * 20, "meta": {}, "doc": {"id": 9}}]
    path = tmp_path / "chunk1.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(json.dumps(r).encode() for r in rows)))
    good, bad = _read(path, source_field="meta.redpajama_set_name", id_field="doc.id")
    assert [(r["source"], r["doc_id"]) for r in good] == [("RedPajamaBook", "7"), ("RedPajamaGithub", "8")]
    assert [(r["rec_idx"], r["reason"]) for r in bad] == [(3, "missing_source")]


def test_parquet_rows_nested_fields_and_bad_rows(tmp_path):
    table = pa.table({
        "content": ["first parquet doc " * 10, "", None, "fourth " * 10],
        "meta": [{"set": "arxiv"}, {"set": "arxiv"}, {"set": "book"}, {"set": "book"}],
    })
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=2)
    good, bad = _read(path, text_field="content", source_field="meta.set")
    assert [(r["rec_idx"], r["source"], r["doc_id"]) for r in good] == [(0, "arxiv", f"{path}:0"),
                                                                         (3, "book", f"{path}:3")]
    assert sorted((r["rec_idx"], r["reason"]) for r in bad) == [(1, "empty_text"), (2, "missing_text")]


def test_list_files_fixed_order_and_suffix_filter(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["b/2.jsonl", "b/10.jsonl.gz", "b/_SUCCESS", "b/notes.txt", "a.parquet"]:
        (tmp_path / name).write_bytes(b"")
    specs = {"zeta": SourceSpec(uri=str(tmp_path / "b")), "alpha": SourceSpec(uri=str(tmp_path / "*.parquet"))}
    tasks = src.list_files(specs)
    assert [(t.file_idx, t.source, t.uri.rsplit("/", 1)[-1]) for t in tasks] == [
        (0, "alpha", "a.parquet"), (1, "zeta", "10.jsonl.gz"), (2, "zeta", "2.jsonl"), (3, "zeta", "_SUCCESS"),
        (4, "zeta", "notes.txt")]
    assert [t.uri.startswith(src.SKIPPED_PREFIX) for t in tasks] == [False, False, False, True, True]
    with pytest.raises(Exception, match="no corpus files"):
        src.list_files({"empty": SourceSpec(uri=str(tmp_path / "*.zip"))})
