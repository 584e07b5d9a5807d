"""Faults and hostile input (longctx.data.sources, storage): an outage is never bad data, damage is counted as the
records it cost, and no file can crash, hang or exhaust a run.

Outages are real: a fault-injecting TCP proxy (tests/faultproxy.py) in front of the loopback S3 server cuts every
connection mid-read and refuses new ones for N seconds."""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faultproxy import FaultProxy
from longctx import storage
from longctx.config import SourceSpec, load_config
from longctx.data import sources as src
from longctx.data.token_cache import DataQualityError, TokenCache, check_bad_fraction


def _read(path, name="web", opts=None, **spec):
    task = src.FileTask(0, str(path), name, SourceSpec(uri=str(path), **spec))
    table = pa.concat_tables(list(src.read_file(task, opts)))
    good = table.filter(pa.compute.is_null(table.column("reason")))
    bad = table.filter(pa.compute.is_valid(table.column("reason")))
    return good.to_pylist(), bad.to_pylist()


def _lines(n, start=0, prefix="d"):
    return [json.dumps({"text": f"document number {i} " * 5, "id": f"{prefix}{i}"}).encode()
            for i in range(start, start + n)]


def _cache_of(good, bad) -> TokenCache:
    cache = TokenCache(root="", files=1, good=len(good))
    for r in bad:
        cache.bad_by_reason[r["reason"]] = cache.bad_by_reason.get(r["reason"], 0) + r["records"]
    return cache


# ------------------------------------------------------------------------------------- damaged files
def test_truncated_gz_that_lost_90_percent_fails_the_1_percent_gate(tmp_path):
    packed = gzip.compress(b"\n".join(_lines(20000)) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 10])
    good, bad = _read(path)
    assert 1000 < len(good) < 2500 and [r["rec_idx"] for r in good] == list(range(1, len(good) + 1))
    tail = [r for r in bad if r["rec_idx"] == -1]
    assert [r["reason"] for r in tail] == ["truncated_file"] and tail[0]["records"] >= len(good)
    cache = _cache_of(good, bad)
    with pytest.raises(DataQualityError, match=r"truncated_file"):
        check_bad_fraction(cache, 0.01)
    assert cache.bad / (cache.good + cache.bad) > 0.45
    # negative control: counted as one row, as before, the same loss passes the gate
    assert (len(bad)) / (len(good) + len(bad)) < 0.01


def test_corrupt_gz_keeps_records_before_the_damage_and_estimates_the_lost_tail(tmp_path):
    packed = bytearray(gzip.compress(b"\n".join(_lines(20000)) + b"\n", compresslevel=6))
    at = len(packed) // 2
    packed[at:at + 512] = b"\0" * 512  # a zeroed sector in the middle
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(bytes(packed))
    good, bad = _read(path, id_field="id")
    # deflate has no checksum before the end: a few lines right at the damage decode as garbage (quarantined or
    # not), everything before them is the clean prefix
    ids = [int(r["doc_id"][1:]) for r in good if r["doc_id"].startswith("d")]
    assert ids[:9000] == list(range(9000)) and ids == sorted(ids)
    tail = [r for r in bad if r["rec_idx"] == -1]
    assert [r["reason"] for r in tail] == ["corrupt_file"]
    lost = 20000 - len(good)
    assert 5000 < lost < 15000
    estimated = tail[0]["records"] + len(bad) - 1
    assert estimated == pytest.approx(lost, rel=0.1), tail[0]["detail"]  # later lines are longer
    assert "gzip trailer" in tail[0]["detail"]


def test_flipped_bytes_in_a_gz_count_at_least_the_records_lost(tmp_path):
    packed = bytearray(gzip.compress(b"\n".join(_lines(20000)) + b"\n"))
    at = len(packed) // 2
    packed[at:at + 8] = bytes(b ^ 0xFF for b in packed[at:at + 8])
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(bytes(packed))
    good, bad = _read(path, id_field="id")
    assert [int(r["doc_id"][1:]) for r in good][:9000] == list(range(9000))  # the records before the damage
    assert sum(r["records"] for r in bad) >= 20000 - len(good) > 0


def _with_trailing_garbage(member: bytes) -> bytes:
    # ends in 4 bytes that, read as a gzip trailer, claim 1.38 GB of text
    return member + b"garbage!" * 8 + bytes([0x10, 0x20, 0x50, 0x52])


@pytest.mark.parametrize("members", [1, 3])
def test_trailing_garbage_after_the_end_marker_loses_nothing(tmp_path, members):
    lines = _lines(2 * members)
    packed = b"".join(gzip.compress(b"\n".join(lines[2 * i:2 * i + 2]) + b"\n") for i in range(members))
    path = tmp_path / "garbage.jsonl.gz"
    path.write_bytes(_with_trailing_garbage(packed))
    good, bad = _read(path, id_field="id")
    assert [r["doc_id"] for r in good] == [f"d{i}" for i in range(2 * members)]
    assert [(r["reason"], r["records"]) for r in bad] == [("corrupt_file", 0)], bad
    assert "68 bytes of trailing garbage" in bad[0]["detail"] and "0 records lost" in bad[0]["detail"]
    check_bad_fraction(_cache_of(good, bad), 0.0)  # nothing was lost: even a zero gate passes


def test_a_damaged_member_after_a_good_one_is_estimated_within_what_its_bytes_can_hold(tmp_path):
    # the bytes after the first member claim to be a second member (gzip magic) but are garbage: records may be
    # lost, but never more than those bytes could hold
    tail = b"\x1f\x8b" + b"garbage!" * 8 + bytes([0x10, 0x20, 0x50, 0x52])
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(_lines(2)) + b"\n") + tail)
    good, bad = _read(path, id_field="id")
    assert [r["doc_id"] for r in good] == ["d0", "d1"]
    assert [r["reason"] for r in bad] == ["corrupt_file"]
    assert 1 <= bad[0]["records"] <= 1032 * len(tail) // 3, bad[0]["detail"]


def test_trailing_garbage_after_a_zstd_frame_loses_nothing(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "garbage.jsonl.zst"
    path.write_bytes(_with_trailing_garbage(zstandard.ZstdCompressor().compress(b"\n".join(_lines(2)) + b"\n")))
    good, bad = _read(path, id_field="id")
    assert [r["doc_id"] for r in good] == ["d0", "d1"]
    assert [(r["reason"], r["records"]) for r in bad] == [("corrupt_file", 0)], bad


def test_parquet_invalid_utf8_value_quarantines_only_its_row(tmp_path):
    table = pa.table({"text": [f"good parquet doc {i} XXYY" if i != 5 else "bad value XXYY" for i in range(10)]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=10)
    path.write_bytes(path.read_bytes().replace(b"bad value XXYY", b"bad value \xff\xfe\xff\xfe"))
    good, bad = _read(path)
    assert [r["rec_idx"] for r in good] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert [(r["rec_idx"], r["reason"]) for r in bad] == [(5, "invalid_utf8")]


# ------------------------------------------------------------------------------------------ hostile lines
def test_hostile_lines_are_each_one_quarantine_row_at_their_own_line(tmp_path):
    deep = b'{"text": "deep", "x": ' + b"[" * 2500 + b"]" * 2500 + b"}"  # 100k deep: in the Ray test
    big_int = json.dumps({"text": "a record with a huge number", "id": "big"}).encode()[:-1] + b', "n": ' + \
        b"7" * 5000 + b"}"
    lines = [b"\xef\xbb\xbf" + _lines(1)[0],                               # 1: BOM before the first record
             deep,                                                          # 2: nesting deeper than the parser
             _lines(1, 1)[0],                                               # 3
             big_int,                                                       # 4: valid JSON, 5000-digit int
             b'{"text": "over the cap ' + b"z" * 9000 + b'", "id": "x"}',  # 5: > max_record_bytes (6000 here)
             b'{"text": "lone surrogate id", "id": "\\ud800"}',            # 6: id that cannot be encoded
             _lines(1, 2)[0]]                                               # 7
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = _read(path, opts=src.ReadOptions(max_record_bytes=6000), id_field="id")
    assert [(r["rec_idx"], r["doc_id"]) for r in good] == [(1, "d0"), (3, "d1"), (4, "big"), (7, "d2")]
    assert [(r["rec_idx"], r["reason"]) for r in bad] == [(2, "bad_json"), (5, "record_too_large"),
                                                          (6, "invalid_utf8")]
    assert "nested" in bad[0]["detail"]


def test_one_huge_line_is_skipped_without_holding_it(tmp_path):
    """A 50 MB line with max_record_bytes 8 MB: quarantined at its line, the next records kept, and the reader
    never holds more than ~cap + one read chunk."""
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(_lines(1)[0] + b"\n" + b'{"text": "' + b"y" * (50 << 20) + b'"}\n' + _lines(1, 1)[0] + b"\n")
    peaks = []
    for cap in (8 << 20, 64 << 20):  # the default, and a cap above the line (negative control)
        tracemalloc.start()
        good, bad = _read(path, opts=src.ReadOptions(max_record_bytes=cap), id_field="id")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        if cap == 8 << 20:
            assert [r["doc_id"] for r in good] == ["d0", "d1"]
            assert [(r["rec_idx"], r["reason"]) for r in bad] == [(2, "record_too_large")]
    assert peaks[0] < 64 << 20 < 100 << 20 < peaks[1], [f"{p / 2**20:.0f} MiB" for p in peaks]


def test_fifo_device_link_and_folder_are_quarantined_never_read(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jsonl"
    os.symlink("/dev/zero", zero)
    import socket

    sock_path = tmp_path / "sock.jsonl"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    t0 = time.monotonic()
    for path, kind in ((fifo, "FIFO"), (zero, "device"), (sock_path, "socket"), (tmp_path, "folder")):
        good, bad = _read(path)
        assert good == [] and [r["reason"] for r in bad] == ["not_a_regular_file"] and kind in bad[0]["detail"]
    sock.close()
    assert time.monotonic() - t0 < 5  # neither blocks on a writer nor reads the endless device nor retries


def test_listing_reads_ndjson_and_upper_case_and_lists_the_rest_as_skipped(tmp_path):
    folder = tmp_path / "web"
    folder.mkdir()
    for name in ("a.ndjson", "B.JSONL", "c.jsonl.bz2", "_x", ".x", "notes.txt"):
        (folder / name).write_bytes(b"\n".join(_lines(2, prefix=name)) + b"\n")
    bad_name = os.fsencode(str(folder)) + b"/bad\xffname.jsonl"
    with open(bad_name, "wb") as f:
        f.write(b"\n".join(_lines(2)) + b"\n")
    tasks = src.list_files({"web": SourceSpec(uri=str(folder), id_field="id")})
    read = {}
    for t in tasks:
        table = pa.concat_tables(list(src.read_file(t))).to_pylist()
        read[os.path.basename(t.uri)] = [(r["reason"], r["records"]) for r in table]
    assert read["a.ndjson"] == read["B.JSONL"] == [(None, 1), (None, 1)]
    for name in ("c.jsonl.bz2", "_x", ".x", "notes.txt"):
        assert read[name] == [("skipped_file", 0)], name
    assert read["bad\\xffname.jsonl"] == [("bad_file_name", 1)]
    json.dumps([t.uri for t in tasks]).encode("utf-8")  # every listed name can travel through Ray and Arrow


# ----------------------------------------------------------------------------- outages (fault proxy)
@pytest.fixture
def proxy(s3_endpoint):
    p = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()
    storage.configure(None)  # a job run through the proxy set the process-wide endpoint to it


def _opts(proxy, **kw):
    return storage.StorageOptions(endpoint_url=proxy.endpoint, region="us-east-1", **kw)


@pytest.mark.s3
def test_a_read_survives_an_outage_by_retrying(s3_bucket, proxy, caplog):
    body = b"\n".join(_lines(30000)) + b"\n"  # ~2.4 MB
    storage.write_bytes(f"{s3_bucket}/web/a.jsonl", body)
    proxy.outage(3.0, after_bytes=500_000)  # cut in the middle of the object's body
    with caplog.at_level(logging.WARNING, logger="longctx.storage"):
        good, bad = _read(f"{s3_bucket}/web/a.jsonl", opts=_opts(proxy, retry_backoff_s=0.5, retry_max_backoff_s=2),
                          id_field="id")
    assert proxy.outage_started is not None and proxy.cut >= 1
    assert bad == [] and [r["doc_id"] for r in good] == [f"d{i}" for i in range(30000)]
    assert any("retry" in r.getMessage() and "a.jsonl" in r.getMessage() for r in caplog.records)


@pytest.mark.s3
def test_an_outage_longer_than_the_retries_is_an_io_error_naming_the_object(s3_bucket, proxy):
    storage.write_bytes(f"{s3_bucket}/web/b.jsonl", b"\n".join(_lines(100)) + b"\n")
    proxy.outage(60.0)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageIOError, match=r"web/b\.jsonl: read failed 3 times"):
        _read(f"{s3_bucket}/web/b.jsonl", opts=_opts(proxy, read_retries=2, retry_backoff_s=0.2))
    assert time.monotonic() - t0 < 45


# -------------------------------------------------------------------------------- end to end on Ray
def _tree_rss() -> int:
    """Memory of this process and all its descendants (the local Ray cluster's processes), from /proc: the sum of
    proportional set sizes (PSS), so pages shared between processes (Ray's object store, libraries) count once."""
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("Pss:")) * 1024
        except (OSError, StopIteration, ValueError):
            pass
    return total


class _PeakRss:
    def __enter__(self):
        self.peak, self._stop = _tree_rss(), threading.Event()
        self.start = self.peak
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _tree_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _write_hostile_folder(folder) -> set[str]:
    """Good records spread over files next to every hostile input; returns the ids of the good records."""
    folder.mkdir()
    good = set()

    def put(name, lines):
        with open(os.path.join(os.fsencode(str(folder)), name), "wb") as f:
            f.write(b"\n".join(lines) + b"\n")

    for name, prefix in ((b"plain.jsonl", "p"), (b"UPPER.JSONL", "u"), (b"nd.ndjson", "n")):
        put(name, _lines(40, prefix=prefix))
        good |= {f"{prefix}{i}" for i in range(40)}
    put(b"bom.jsonl", [b"\xef\xbb\xbf" + _lines(1, prefix="bom")[0]])
    good.add("bom0")
    put(b"deep.jsonl", [b'{"text": "deep", "id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                        *_lines(3, prefix="afterdeep")])
    good |= {f"afterdeep{i}" for i in range(3)}
    big = json.dumps({"text": "a record with a huge number", "id": "bigint"}).encode()[:-1] + b', "n": ' + \
        b"9" * 5000 + b"}"
    put(b"bigint.jsonl", [big])
    good.add("bigint")
    put(b"surrogate.jsonl", [b'{"text": "lone surrogate id", "id": "\\udc80"}', *_lines(2, prefix="sur")])
    good |= {"sur0", "sur1"}
    with open(os.path.join(str(folder), "huge.jsonl"), "wb") as f:  # one 50 MB record between two good ones
        f.write(_lines(1, prefix="h")[0] + b"\n" + b'{"id": "huge", "text": "' + b"w " * (25 << 20) + b'"}\n'
                + _lines(1, 1, prefix="h")[0] + b"\n")
    good |= {"h0", "h1"}
    with open(os.path.join(str(folder), "garbage.jsonl.gz"), "wb") as f:  # both records read: nothing lost
        f.write(_with_trailing_garbage(gzip.compress(b"\n".join(_lines(2, prefix="g")) + b"\n")))
    good |= {"g0", "g1"}
    put(b"bad\xffname.jsonl", _lines(5, prefix="badname"))
    put(b"notes.txt", [b"not a corpus file"])
    os.mkfifo(os.path.join(str(folder), "pipe.jsonl"))
    os.symlink("/dev/zero", os.path.join(str(folder), "zero.jsonl"))
    return good


@pytest.mark.ray
@pytest.mark.slow
def test_hostile_folder_publishes_every_good_record_once_in_bounded_memory(ray_cluster, tmp_path):
    from longctx.data import prepare_data

    good_ids = _write_hostile_folder(tmp_path / "corpus")
    cfg = load_config(None, ["data.seq_len=256", "data.strategy=cut-seq", "data.max_bad_fraction=0.2",
                             "data.num_tokenize_actors=1", "ray.data_cpus_per_task=0.25"])
    cfg.data.sources = {"web": {"uri": str(tmp_path / "corpus"), "id_field": "id"}}
    t0 = time.monotonic()
    with _PeakRss() as rss:
        manifest = prepare_data(cfg, str(tmp_path / "out"))
    seconds = time.monotonic() - t0
    ids = [i for path in manifest["shards"] for row in pq.read_table(tmp_path / "out" / path["path"]).to_pylist()
           for i, s in zip(row["seg_doc_ids"], row["seg_sources"]) if s]
    assert sorted(ids) == sorted(good_ids)  # every good record, exactly once
    by_reason = manifest["quarantine"]["by_reason"]
    assert by_reason == {"bad_json": 1, "invalid_utf8": 1, "record_too_large": 1, "bad_file_name": 1,
                         "not_a_regular_file": 2, "skipped_file": 1, "corrupt_file": 0}, by_reason
    assert manifest["quarantine"]["records"] == 7  # the trailing garbage is listed, not counted as lost records
    q = [json.loads(l) for l in open(tmp_path / "out" / "_quarantine" / "records.jsonl")]
    assert {r["location"].rsplit("/", 1)[-1] for r in q if r["reason"] == "not_a_regular_file"} == {
        "pipe.jsonl", "zero.jsonl"}
    assert any(r["location"].endswith("deep.jsonl:1") and r["reason"] == "bad_json" for r in q)
    print(f"\nhostile folder: {seconds:.1f}s, peak PSS of the process tree {rss.peak / 2**30:.2f} GiB "
          f"(at start {rss.start / 2**30:.2f} GiB), quarantine {by_reason}")
    # What the job itself added (its actors, its reads), whatever this pytest process and the module's Ray cluster
    # already held from earlier tests (2.1 GiB at start in a full-suite run): an unbounded read (/dev/zero link, the
    # 50 MB record through the tokenizer: ~6 GB) would pass 1 GiB within seconds.
    assert rss.peak - rss.start < 1 << 30, f"the job grew the process tree by {(rss.peak - rss.start) / 2**30:.2f} GiB"


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_12s_outage_while_preparing_is_ridden_out_or_fails_with_nothing_published(ray_cluster, s3_bucket,
                                                                                      s3_endpoint, proxy, tmp_path):
    """The whole data job against S3 through the fault proxy: a 12 s outage in the middle of reading either ends
    in the same bytes as a run without it (default retries) or, with too few retries, in an I/O error naming the
    object and nothing published. Never in a smaller dataset."""
    from longctx.data import prepare_data

    total = 0
    for k in range(6):
        data = gzip.compress(b"\n".join(_lines(3000, start=3000 * k)) + b"\n")
        storage.write_bytes(f"{s3_bucket}/corpus/part-{k}.jsonl.gz", data)
        total += len(data)

    def cfg_for(endpoint, *sets):
        cfg = load_config(None, ["data.seq_len=256", "data.strategy=cut-seq", "data.num_tokenize_actors=1",
                                 "ray.data_cpus_per_task=0.25", f"storage.endpoint_url={endpoint}", *sets])
        cfg.data.sources = {"web": {"uri": f"{s3_bucket}/corpus/", "id_field": "id"}}
        return cfg

    base = prepare_data(cfg_for(s3_endpoint), str(tmp_path / "base"))
    assert base["input"]["good_records"] == 18000

    # too few retries: the outage fails the job, naming the object; nothing is published
    proxy.outage(12.0, after_bytes=total // 3)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"corpus/part-\d\.jsonl\.gz: read failed 2 times") as err:
        prepare_data(cfg_for(proxy.endpoint, "storage.read_retries=1"), str(tmp_path / "failed"))
    failed_after = time.monotonic() - t0
    assert proxy.outage_started is not None and not os.path.exists(tmp_path / "failed")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".staging-")]
    assert "quarantined" not in str(err.value)
    while proxy.down:
        time.sleep(0.2)

    # default retries (about 30 s of backoff): the same outage is ridden out, byte-identical output
    proxy.outage(12.0, after_bytes=total // 3)
    t0 = time.monotonic()
    out = prepare_data(cfg_for(proxy.endpoint), str(tmp_path / "retried"))
    retried_s = time.monotonic() - t0
    assert proxy.outage_started is not None and proxy.refused + proxy.cut > 0
    assert out["quarantine"]["records"] == 0 and out["input"]["good_records"] == 18000
    assert [s["sha256"] for s in out["shards"]] == [s["sha256"] for s in base["shards"]]
    print(f"\n12 s outage: too few retries failed after {failed_after:.1f}s; default retries finished in "
          f"{retried_s:.1f}s (base run {base['timings']['total_s']:.1f}s), byte-identical")


def test_manifest_schema_knows_every_quarantine_reason():
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "manifest.schema.json").read_text())
    enum = schema["properties"]["quarantine"]["properties"]["by_reason"]["propertyNames"]["enum"]
    assert sorted(enum) == sorted(src.REASONS)


def test_a_zstd_bomb_is_decoded_in_bounded_pieces(tmp_path):
    """1 GB of one repeated byte compresses to a few KB of zstd: decoding it never yields more than ~32 MB at once
    (then the over-long line is skipped without being held)."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    w = cctx.compressobj()
    packed = w.compress(_lines(1)[0] + b"\n")
    block = b"x" * (64 << 20)
    for _ in range(16):  # 1 GiB of 'x': one endless line
        packed += w.compress(block)
    packed += w.compress(b"\n" + _lines(1, 1)[0] + b"\n") + w.flush()
    path = tmp_path / "bomb.jsonl.zst"
    path.write_bytes(packed)
    sizes = []
    with open(path, "rb") as f:
        for out in src._Decompressed(f, str(path)):
            sizes.append(len(out))
    assert sum(sizes) > 1 << 30 and max(sizes) <= 48 << 20, (len(packed), max(sizes))
    good, bad = _read(path, id_field="id")
    assert [r["doc_id"] for r in good] == ["d0", "d1"] and [r["reason"] for r in bad] == ["record_too_large"]


def test_what_counts_as_an_outage():
    import errno

    for e in (ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "I/O error")):
        assert storage.is_transient(e), e
    for e in (FileNotFoundError(), PermissionError(), OSError(errno.ENXIO, "no device"), ValueError("bad"),
              storage.NotARegularFile("x"), storage.StorageIOError("x")):
        assert not storage.is_transient(e), e
