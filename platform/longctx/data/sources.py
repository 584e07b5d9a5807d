"""Step 1 of the data path: list corpus files per source and read them into validated records.

Every file is read by our own code (never Ray Data's JSON reader, whose `max_errored_blocks` drops a whole file
silently, DESIGN.md 3b): we decompress in chunks, split lines, parse and validate each record, and turn every
problem into a *quarantine row* with its location and reason instead of an exception. Good records in the same
file are kept, including those before the point where a truncated .gz/.zst file ends.

Formats by suffix: `.jsonl`, `.json` (one object per line), `.jsonl.gz`, `.jsonl.zst`, `.parquet`.
Output batches (pyarrow) have the columns of `RECORD_SCHEMA`; `reason` is null for a good record.

    for table in read_file(FileTask(0, "s3://b/web/part-0.jsonl.gz", "web", SourceSpec(uri="...")), opts):
        ...
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from longctx import storage
from longctx.config import SourceSpec

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")

# Quarantine reasons (the manifest counts records by these names).
EMPTY_TEXT = "empty_text"
MISSING_TEXT = "missing_text"
BAD_TYPE = "bad_type"
BAD_JSON = "bad_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_SOURCE = "missing_source"
MISSING_ID = "missing_id"
TRUNCATED_FILE = "truncated_file"
UNREADABLE_FILE = "unreadable_file"
REASONS = (EMPTY_TEXT, MISSING_TEXT, BAD_TYPE, BAD_JSON, INVALID_UTF8, MISSING_SOURCE, MISSING_ID,
           TRUNCATED_FILE, UNREADABLE_FILE)
# Reasons that describe a whole file (or the rest of it) rather than one record.
FILE_REASONS = (TRUNCATED_FILE, UNREADABLE_FILE)

RECORD_SCHEMA = pa.schema([
    ("file_idx", pa.int32()),     # position of the file in the sorted listing (fixes the order)
    ("rec_idx", pa.int64()),      # line (JSONL, 1-based) or row (parquet, 0-based) in the file; -1: whole file
    ("source", pa.string()),      # source label
    ("doc_id", pa.string()),      # id field or path:line
    ("text", pa.large_string()),  # document text ("" for quarantined rows)
    ("reason", pa.string()),      # null: good record; else a quarantine reason
    ("detail", pa.string()),      # what exactly was wrong (for the quarantine file)
])

_CHUNK = 8 << 20        # compressed bytes per read
# NOTE: small output batches on purpose: Ray Data hands whole blocks to the tokenizer actors, so a file read
# into one big block would be tokenized by one actor while the others idle. ~1M characters is ~0.5 s of encoding.
_BATCH_CHARS = 1 << 20   # text characters per output batch
_BATCH_RECORDS = 4096    # records per output batch (many tiny or bad records)


@dataclass(frozen=True)
class FileTask:
    """One input file to read."""

    file_idx: int
    uri: str
    source: str  # the name the file's source is listed under
    spec: SourceSpec


def list_files(specs: dict[str, SourceSpec], opts: storage.StorageOptions | None = None) -> list[FileTask]:
    """Every input file of every source, in a fixed order (source names sorted, then paths sorted)."""
    tasks: list[FileTask] = []
    for name in sorted(specs):
        spec = specs[name]
        uris = [spec.uri] if isinstance(spec.uri, str) else list(spec.uri)
        found: list[str] = []
        for uri in uris:
            files = storage.expand(uri, SUFFIXES)
            if not files:
                raise storage.StorageError(
                    f"data.sources.{name}: {uri} holds no corpus files (looked for {', '.join(SUFFIXES)})")
            found.extend(files)
        for uri in sorted(dict.fromkeys(found)):
            tasks.append(FileTask(len(tasks), uri, name, spec))
    return tasks


def get_path(obj: Any, dotted: str) -> Any:
    """obj['a']['b'] for dotted path 'a.b' (None when any level is missing)."""
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
        if obj is None:
            return None
    return obj


class _Batcher:
    """Collects records (good and quarantined) into pyarrow tables of bounded size."""

    def __init__(self, task: FileTask):
        self.task = task
        self.cols: dict[str, list] = {n: [] for n in RECORD_SCHEMA.names}
        self.chars = 0

    def good(self, rec_idx: int, source: str, doc_id: str, text: str) -> None:
        self._add(rec_idx, source, doc_id, text, None, None)
        self.chars += len(text)

    def bad(self, rec_idx: int, reason: str, detail: str) -> None:
        loc = f"{self.task.uri}:{rec_idx}" if rec_idx >= 0 else self.task.uri
        self._add(rec_idx, self.task.source, loc, "", reason, detail[:500])

    def _add(self, rec_idx, source, doc_id, text, reason, detail) -> None:
        c = self.cols
        c["file_idx"].append(self.task.file_idx)
        c["rec_idx"].append(rec_idx)
        c["source"].append(source)
        c["doc_id"].append(doc_id)
        c["text"].append(text)
        c["reason"].append(reason)
        c["detail"].append(detail)

    def full(self) -> bool:
        return self.chars >= _BATCH_CHARS or len(self.cols["file_idx"]) >= _BATCH_RECORDS

    def flush(self) -> pa.Table | None:
        if not self.cols["file_idx"]:
            return None
        table = pa.table(self.cols, schema=RECORD_SCHEMA)
        self.cols = {n: [] for n in RECORD_SCHEMA.names}
        self.chars = 0
        return table


def _validate(obj: Any, rec_idx: int, task: FileTask, out: _Batcher, has_escape: bool) -> None:
    """Check one parsed record and add it to `out` as good or quarantined."""
    spec = task.spec
    if not isinstance(obj, dict):
        out.bad(rec_idx, BAD_TYPE, f"record is a {type(obj).__name__}, not an object")
        return
    text = get_path(obj, spec.text_field)
    if text is None:
        out.bad(rec_idx, MISSING_TEXT, f"no field {spec.text_field!r}")
        return
    if not isinstance(text, str):
        out.bad(rec_idx, BAD_TYPE, f"field {spec.text_field!r} is a {type(text).__name__}, not a string")
        return
    if not text.strip():
        out.bad(rec_idx, EMPTY_TEXT, f"field {spec.text_field!r} is empty")
        return
    if has_escape:
        # NOTE: a JSON escape like "\ud800" decodes to a lone surrogate: valid JSON, invalid Unicode, and the
        # Rust tokenizer would fail on the whole batch. Only lines with a \u escape can hold one.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            out.bad(rec_idx, INVALID_UTF8, f"lone surrogate in text: {e}")
            return
    source = task.source
    if spec.source_field:
        label = get_path(obj, spec.source_field)
        if not isinstance(label, str) or not label:
            out.bad(rec_idx, MISSING_SOURCE, f"no string field {spec.source_field!r}")
            return
        source = label
    if spec.id_field:
        doc_id = get_path(obj, spec.id_field)
        if doc_id is None or isinstance(doc_id, (dict, list)):
            out.bad(rec_idx, MISSING_ID, f"no scalar field {spec.id_field!r}")
            return
        doc_id = str(doc_id)
    else:
        doc_id = f"{task.uri}:{rec_idx}"
    out.good(rec_idx, source, doc_id, text)


def _decompressed_chunks(f, uri: str) -> Iterator[bytes]:
    """Decompressed bytes of a file object; raises EOFError when a .gz/.zst stream is cut short."""
    if uri.endswith(".gz"):
        def new():
            return zlib.decompressobj(wbits=31)
    elif uri.endswith(".zst"):
        import zstandard

        def new():
            return zstandard.ZstdDecompressor().decompressobj()
    else:
        while chunk := f.read(_CHUNK):
            yield chunk
        return
    d, fed = new(), False
    data = f.read(_CHUNK)
    while data:
        fed = True
        out = d.decompress(data)
        if out:
            yield out
        if d.eof:  # multi-member gzip / multi-frame zstd: start again on what is left
            data = d.unused_data or f.read(_CHUNK)
            d, fed = new(), False
        else:
            data = f.read(_CHUNK)
    if fed and not d.eof:
        raise EOFError("compressed stream ended before its end marker (truncated file)")


def _read_jsonl(task: FileTask, f, out: _Batcher) -> Iterator[pa.Table]:
    line_no = 0
    tail = b""
    try:
        for chunk in _decompressed_chunks(f, task.uri):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for raw in lines:
                line_no += 1
                yield from _parse_line(task, raw, line_no, out)
    except Exception as e:  # noqa: BLE001 - every failure becomes a quarantine row
        if tail.strip():
            line_no += 1
            out.bad(line_no, BAD_JSON, "incomplete last line before the file was cut off")
        reason = TRUNCATED_FILE if isinstance(e, EOFError) or "truncat" in str(e).lower() else UNREADABLE_FILE
        out.bad(-1, reason, f"after line {line_no}: {type(e).__name__}: {e}")
        return
    if tail.strip():
        line_no += 1
        yield from _parse_line(task, tail, line_no, out)


def _parse_line(task: FileTask, raw: bytes, line_no: int, out: _Batcher) -> Iterator[pa.Table]:
    if raw.strip():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad(line_no, INVALID_UTF8, str(e))
        else:
            try:
                obj = json.loads(line)
            except ValueError as e:
                out.bad(line_no, BAD_JSON, str(e))
            else:
                _validate(obj, line_no, task, out, "\\u" in line)
    if out.full():
        yield out.flush()


def _read_parquet(task: FileTask, f, out: _Batcher) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        try:
            records = pf.read_row_group(rg).to_pylist()
        except Exception as e:  # noqa: BLE001
            for r in range(row, row + n):
                out.bad(r, UNREADABLE_FILE, f"row group {rg} unreadable: {type(e).__name__}: {e}")
            row += n
            continue
        for obj in records:
            _validate(obj, row, task, out, has_escape=False)
            row += 1
            if out.full():
                yield out.flush()


def read_file(task: FileTask, opts: storage.StorageOptions | None = None) -> Iterator[pa.Table]:
    """Validated records of one file as pyarrow tables (RECORD_SCHEMA); never raises for bad data."""
    out = _Batcher(task)
    try:
        fs, path = storage.fsspec_fs(task.uri, opts)
        with fs.open(path, "rb") as f:
            reader = _read_parquet if task.uri.endswith(".parquet") else _read_jsonl
            for table in reader(task, f, out):
                yield table
    except Exception as e:  # noqa: BLE001 - an unreadable object is quarantined, the run goes on
        out.bad(-1, UNREADABLE_FILE, f"{type(e).__name__}: {e}")
    last = out.flush()
    if last is not None:
        yield last


def read_files_batch(batch: dict, specs: dict[str, dict], opts: dict) -> Iterator[pa.Table]:
    """Ray Data `map_batches` function: rows {file_idx, uri, source} -> validated record tables."""
    sopts = storage.StorageOptions(**opts)
    for file_idx, uri, source in zip(batch["file_idx"], batch["uri"], batch["source"]):
        task = FileTask(int(file_idx), str(uri), str(source), SourceSpec(**specs[str(source)]))
        yield from read_file(task, sopts)
