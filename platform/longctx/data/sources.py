"""Steps 1-2 of the data path: list corpus files per source and read them into validated records.

Every file is read by our own code (never Ray Data's JSON reader, whose `max_errored_blocks` drops a whole file
silently): we decompress in chunks, split lines, parse and validate each record, and turn every problem of the
data into a *quarantine row* with its location and reason instead of an exception. Good records in the same
file are kept, including those before the point where a truncated or corrupt .gz/.zst file ends; the lost tail is
counted as the records it (probably) held (`records` column) so `data.max_bad_fraction` sees the real loss.
Problems of the medium are not data: reads are retried (`storage.RetryingReader`) and an outage that outlasts the
retries raises `storage.StorageIOError`, failing the job. docs/faults.md lists every hostile input and its outcome.

Formats by suffix (any case): `.jsonl`, `.json`, `.ndjson` (one object per line), each also `.gz` / `.zst`, and
`.parquet`. Other files of a listed folder are `skipped_file` rows (listed, not records).
Output batches (pyarrow) have the columns of `RECORD_SCHEMA`; `reason` is null for a good record.

    for table in read_file(FileTask(0, "s3://b/web/part-0.jsonl.gz", "web", SourceSpec(uri="...")), opts):
        ...
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from longctx import storage
from longctx.config import SourceSpec

SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst",
            ".ndjson.zst", ".parquet")

# Quarantine reasons (the manifest counts records by these names).
EMPTY_TEXT = "empty_text"
MISSING_TEXT = "missing_text"
BAD_TYPE = "bad_type"
BAD_JSON = "bad_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_SOURCE = "missing_source"
MISSING_ID = "missing_id"
RECORD_TOO_LARGE = "record_too_large"
TRUNCATED_FILE = "truncated_file"
CORRUPT_FILE = "corrupt_file"
UNREADABLE_FILE = "unreadable_file"
NOT_A_REGULAR_FILE = "not_a_regular_file"
BAD_FILE_NAME = "bad_file_name"
SKIPPED_FILE = "skipped_file"
BAD_MESSAGES = "bad_messages"      # chat mode (Long-SFT): the messages list is unusable
OVERLONG_CHAT = "overlong_chat"    # Long-SFT, data.sft.overlong=quarantine: longer than data.seq_len tokens
REASONS = (EMPTY_TEXT, MISSING_TEXT, BAD_TYPE, BAD_JSON, INVALID_UTF8, MISSING_SOURCE, MISSING_ID, RECORD_TOO_LARGE,
           TRUNCATED_FILE, CORRUPT_FILE, UNREADABLE_FILE, NOT_A_REGULAR_FILE, BAD_FILE_NAME, SKIPPED_FILE,
           BAD_MESSAGES, OVERLONG_CHAT)
ROLES = ("system", "user", "assistant", "tool")
"""Chat roles a Long-SFT message may have."""
# Reasons that describe a whole file (or the rest of it) rather than one record.
FILE_REASONS = (TRUNCATED_FILE, CORRUPT_FILE, UNREADABLE_FILE, NOT_A_REGULAR_FILE, BAD_FILE_NAME, SKIPPED_FILE)
# Listed and counted, but not input records: they do not count toward data.max_bad_fraction.
NOT_RECORDS = (SKIPPED_FILE,)

RECORD_SCHEMA = pa.schema([
    ("file_idx", pa.int32()),     # position of the file in the sorted listing (fixes the order)
    ("rec_idx", pa.int64()),      # line (JSONL, 1-based) or row (parquet, 0-based) in the file; -1: whole file
    ("source", pa.string()),      # source label
    ("doc_id", pa.string()),      # id field or path:line
    ("text", pa.large_string()),  # document text ("" for quarantined rows)
    ("reason", pa.string()),      # null: good record; else a quarantine reason
    ("detail", pa.string()),      # what exactly was wrong (for the quarantine file)
    ("records", pa.int64()),      # input records this row stands for: 1, or the (estimated) lost tail of a file
])

_CHUNK = 8 << 20        # compressed bytes per read
_STEP = 64 << 10        # compressed bytes per decoder call: where a corrupt stream fails is known to 64 KiB
# NOTE: zstd's streaming decoder has no output limit per call and one 5-byte RLE block expands to 128 KiB, so it
# gets small steps: 1 KiB in -> ~32 MB out at worst (gzip is capped by max_length; ~1000x at most anyway).
_ZSTD_STEP = 1 << 10
# NOTE: small output batches on purpose: Ray Data hands whole blocks to the tokenizer actors, so a file read
# into one big block would be tokenized by one actor while the others idle. ~1M characters is ~0.5 s of encoding.
_BATCH_CHARS = 1 << 20   # text characters per output batch
_BATCH_RECORDS = 4096    # records per output batch (many tiny or bad records)
# NOTE: Python's int() refuses more than 4300 digits (CVE-2020-10735); such a number in a field we never use
# must not make the record bad JSON, so it is kept as its digit string.
_BIG_INT_DIGITS = 4000
BAD_NAME_PREFIX = "bad-name:"  # FileTask.uri of a file whose name is not UTF-8 (quarantined, never opened)
SKIPPED_PREFIX = "skipped:"    # FileTask.uri of a listed file whose name is not a corpus format
DEFAULT_MAX_RECORD_BYTES = 8 << 20


@dataclass(frozen=True)
class FileTask:
    """One input file to read."""

    file_idx: int
    uri: str
    source: str  # the name the file's source is listed under
    spec: SourceSpec
    messages_field: str | None = None  # chat mode (Long-SFT): the field holding the messages list


@dataclass(frozen=True)
class ReadOptions:
    """What a read task needs besides the file: storage settings (endpoint, retries), the record cap, and for
    Long-SFT chat data the field holding the messages (`messages_field`: chat mode, see `_validate`)."""

    storage: storage.StorageOptions = storage.StorageOptions()
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    messages_field: str | None = None

    def to_dict(self) -> dict:
        return {"storage": asdict(self.storage), "max_record_bytes": self.max_record_bytes,
                "messages_field": self.messages_field}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadOptions":
        if "storage" not in d:  # bare StorageOptions fields
            return cls(storage.StorageOptions(**d))
        return cls(storage.StorageOptions(**d["storage"]), int(d["max_record_bytes"]), d.get("messages_field"))


def read_options(cfg) -> dict:
    """ReadOptions of a JobConfig as a plain dict (Ray task argument)."""
    return ReadOptions(storage.options(), cfg.data.max_record_bytes).to_dict()


def _has_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _printable(path: str) -> str | None:
    """None when `path` is valid UTF-8 text; else its bytes with the undecodable ones written as \\xNN."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def list_files(specs: dict[str, SourceSpec], opts: storage.StorageOptions | None = None) -> list[FileTask]:
    """Every input file of every source, in a fixed order (source names sorted, then paths sorted).

    Files of a listed folder whose names are no corpus format (or hidden, `_`-prefixed) are not read but listed
    as `skipped_file` tasks, so the manifest counts them; a file whose name is not UTF-8 becomes a
    `bad_file_name` task (quarantined, never opened)."""
    tasks: list[FileTask] = []
    for name in sorted(specs):
        spec = specs[name]
        uris = [spec.uri] if isinstance(spec.uri, str) else list(spec.uri)
        found: list[str] = []
        for uri in uris:
            listed = storage.expand(uri, None, hidden=True)
            files = [f for f in listed if _has_suffix(f) and not os.path.basename(f).startswith(("_", "."))]
            if not files:
                raise storage.StorageError(
                    f"data.sources.{name}: {uri} holds no corpus files (looked for {', '.join(SUFFIXES)})")
            found.extend(f if f in files else SKIPPED_PREFIX + f for f in listed)
        for uri in sorted(dict.fromkeys(found), key=lambda u: u.removeprefix(SKIPPED_PREFIX)):
            shown = _printable(uri)
            if shown is not None:
                uri = BAD_NAME_PREFIX + shown
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
        self._add(rec_idx, source, doc_id, text, None, None, 1)
        self.chars += len(text)

    def bad(self, rec_idx: int, reason: str, detail: str, records: int = 1) -> None:
        loc = f"{self.task.uri}:{rec_idx}" if rec_idx >= 0 else self.task.uri
        # the detail may quote input: never let it carry text that cannot be encoded
        detail = detail[:500].encode("utf-8", "backslashreplace").decode("utf-8")
        self._add(rec_idx, self.task.source, loc, "", reason, detail, records)

    def _add(self, rec_idx, source, doc_id, text, reason, detail, records) -> None:
        c = self.cols
        c["file_idx"].append(self.task.file_idx)
        c["rec_idx"].append(rec_idx)
        c["source"].append(source)
        c["doc_id"].append(doc_id)
        c["text"].append(text)
        c["reason"].append(reason)
        c["detail"].append(detail)
        c["records"].append(records)

    def full(self) -> bool:
        return self.chars >= _BATCH_CHARS or len(self.cols["file_idx"]) >= _BATCH_RECORDS

    def flush(self) -> pa.Table | None:
        if not self.cols["file_idx"]:
            return None
        table = pa.table(self.cols, schema=RECORD_SCHEMA)
        self.cols = {n: [] for n in RECORD_SCHEMA.names}
        self.chars = 0
        return table


def validate_messages(messages) -> str | None:
    """Why a chat (a Long-SFT record's messages) is unusable; None when it is fine."""
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"message {i} has no valid role (allowed: {sorted(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"message {i} content is not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (nothing to learn from)"
    return None


def _chat_text(obj: dict, field: str, out: _Batcher, rec_idx: int) -> str | None:
    """Chat mode: the record's messages as canonical JSON text (the tokenizer actors render it with the chat
    template), or None after quarantining the record."""
    messages = get_path(obj, field)
    reason = validate_messages(messages)
    if reason:
        out.bad(rec_idx, BAD_MESSAGES, f"field {field!r}: {reason}")
        return None
    return json.dumps(messages, ensure_ascii=False)  # size and lone surrogates: checked as for any text


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _validate(obj: Any, rec_idx: int, task: FileTask, out: _Batcher, has_escape: bool,
              max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
    """Check one parsed record and add it to `out` as good or quarantined. Chat mode (`task.messages_field`):
    the text is the validated messages list as JSON, and the id defaults to the record's `id` field if any."""
    spec = task.spec
    id_field, text_field = spec.id_field, task.messages_field or spec.text_field
    if not isinstance(obj, dict):
        out.bad(rec_idx, BAD_TYPE, f"record is a {type(obj).__name__}, not an object")
        return
    if task.messages_field:
        text = _chat_text(obj, task.messages_field, out, rec_idx)
        if text is None:
            return
        if not id_field and isinstance(obj.get("id"), (str, int)):
            id_field = "id"
    else:
        text = get_path(obj, text_field)
    if text is None:
        out.bad(rec_idx, MISSING_TEXT, f"no field {text_field!r}")
        return
    if not isinstance(text, str):
        out.bad(rec_idx, BAD_TYPE, f"field {text_field!r} is a {type(text).__name__}, not a string")
        return
    if not text.strip():
        out.bad(rec_idx, EMPTY_TEXT, f"field {text_field!r} is empty")
        return
    if len(text) > max_bytes // 4 and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        out.bad(rec_idx, RECORD_TOO_LARGE, f"field {text_field!r} holds {len(text)} characters, more than "
                                           f"data.max_record_bytes={max_bytes} bytes")
        return
    # NOTE: a JSON escape like "\ud800" decodes to a lone surrogate: valid JSON, invalid Unicode, and the Rust
    # tokenizer (or Arrow, for an id) would fail on the whole batch. Only lines with a \u escape can hold one.
    if has_escape and not _encodable(text):
        out.bad(rec_idx, INVALID_UTF8, f"lone surrogate in field {text_field!r}")
        return
    source = task.source
    if spec.source_field:
        label = get_path(obj, spec.source_field)
        if not isinstance(label, str) or not label:
            out.bad(rec_idx, MISSING_SOURCE, f"no string field {spec.source_field!r}")
            return
        if has_escape and not _encodable(label):
            out.bad(rec_idx, INVALID_UTF8, f"lone surrogate in field {spec.source_field!r}")
            return
        source = label
    if id_field:
        doc_id = get_path(obj, id_field)
        if doc_id is None or isinstance(doc_id, (dict, list)):
            out.bad(rec_idx, MISSING_ID, f"no scalar field {id_field!r}")
            return
        doc_id = str(doc_id)
        if has_escape and not _encodable(doc_id):
            out.bad(rec_idx, INVALID_UTF8, f"lone surrogate in field {id_field!r}")
            return
    else:
        doc_id = f"{task.uri}:{rec_idx}"
    out.good(rec_idx, source, doc_id, text)


# NOTE: a member/frame starts with its magic bytes; what follows the end marker of the last one without them is
# trailing garbage (padding, an appended log, a torn copy), which `gzip -d` and `zstd -d` also ignore.
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# deflate's largest expansion is ~1032:1 (zstd's RLE blocks go further, which _ZSTD_STEP bounds differently), and
# the shortest JSONL record is `{}` plus its newline: what a damaged tail can have held is at most this many
# records per compressed byte.
_MAX_RATIO = 1032
_MIN_RECORD_BYTES = 3


class _Decompressed:
    """Decompressed bytes of a file object, with `consumed`: the compressed bytes the decoder has taken so far
    (to 64 KiB), so the size of an unreadable tail is known. Iterating raises EOFError when a .gz/.zst stream is
    cut short and the decoder's own error when it is corrupt. `members` counts the members (frames) read to
    their end marker, `member_start` / `member_produced` say where the current one began and what it yielded,
    and `garbage_at` is the offset of trailing garbage after the last end marker (None: there was none)."""

    def __init__(self, f, uri: str):
        self.f, self.uri, self.consumed, self.produced = f, uri.lower(), 0, 0
        self.members, self.member_start, self.member_produced = 0, 0, 0
        self.garbage_at: int | None = None

    def _new(self):
        if self.uri.endswith(".gz"):
            return zlib.decompressobj(wbits=31)

        return zstandard.ZstdDecompressor().decompressobj()

    def _is_member_start(self, head: bytes) -> bool:
        if self.uri.endswith(".gz"):
            return head[:2] == _GZIP_MAGIC
        # a zstd frame, or a skippable frame (magic 0x184D2A50..5F, little-endian)
        return head[:4] == _ZSTD_MAGIC or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18"
                                           and 0x50 <= head[0] <= 0x5F)

    def __iter__(self) -> Iterator[bytes]:
        if not self.uri.endswith((".gz", ".zst")):
            while chunk := self.f.read(_CHUNK):
                self.consumed += len(chunk)
                yield chunk
            return
        gz = self.uri.endswith(".gz")
        d, fed = self._new(), False
        buf, off = b"", 0
        while True:
            if off >= len(buf):
                buf, off = self.f.read(_CHUNK), 0
                if not buf:
                    break
            piece = memoryview(buf)[off:off + (_STEP if gz else _ZSTD_STEP)]
            off += len(piece)
            self.consumed += len(piece)
            fed = True
            if gz:  # bounded output per call: a small compressed piece can expand ~1000x
                out = d.decompress(piece, _CHUNK)
                while True:
                    if out:
                        self.produced += len(out)
                        self.member_produced += len(out)
                        yield out
                    if not d.unconsumed_tail:
                        break
                    out = d.decompress(d.unconsumed_tail, _CHUNK)
            else:
                out = d.decompress(piece)
                if out:
                    self.produced += len(out)
                    self.member_produced += len(out)
                    yield out
            if d.eof:  # multi-member gzip / multi-frame zstd: start again on what is left
                rest = d.unused_data
                self.consumed -= len(rest)
                self.members += 1
                buf, off = rest + bytes(memoryview(buf)[off:]), 0
                while len(buf) < 4 and (more := self.f.read(_CHUNK)):
                    buf += more
                if buf and not self._is_member_start(buf):
                    self.garbage_at = self.consumed  # the stream ended at its end marker: nothing was lost
                    return
                d, fed = self._new(), False
                self.member_start, self.member_produced = self.consumed, 0
        if fed and not d.eof:
            raise EOFError("compressed stream ended before its end marker (truncated file)")


def _gzip_isize(f, size: int) -> int | None:
    """The uncompressed size a gzip file's trailer records (mod 2**32; of its last member only)."""
    if size < 18:
        return None
    try:
        f.seek(size - 4)
        tail = f.read(4)
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    return int.from_bytes(tail, "little") if len(tail) == 4 else None


def _lost_tail(e: Exception, lines: int, line_bytes: int, dec: _Decompressed, f, size: int) -> tuple[str, int, str]:
    """(reason, estimated lost records, how) for a stream that failed after `lines` lines of `line_bytes` bytes.

    Every estimate is bounded by what the unread part of the file can hold (`_MAX_RATIO` uncompressed bytes per
    compressed byte, records of at least `_MIN_RECORD_BYTES`)."""
    if isinstance(e, EOFError):
        # NOTE: what followed a cut is gone and its size unknown; with the cut equally likely anywhere the median
        # loss equals what was read, so a cut file counts as losing as many records as it yielded.
        return TRUNCATED_FILE, max(1, lines), "the cut tail's size is unknown: counted as many records as were read"
    left = max(0, size - dec.consumed)
    est = -(-lines * left // dec.consumed) if dec.consumed and lines else left // 512
    how = f"{left} compressed bytes after the damage"
    # deflate often notices damage only at the final checksum, after decoding garbage: the trailer's size of the
    # member being read then tells how much of it never came out; a trailer larger than its member could hold
    # is not a trailer (garbage where one should be) and is not believed
    member_bytes = size - dec.member_start
    in_lines = max(0, line_bytes - (dec.produced - dec.member_produced))  # this member's bytes in whole lines
    isize = _gzip_isize(f, size) if dec.uri.endswith(".gz") and lines and line_bytes else None
    if isize and in_lines < isize <= _MAX_RATIO * member_bytes:
        by_size = -(-lines * (isize - in_lines) // line_bytes)
        if by_size > est:
            est, how = by_size, f"{isize - in_lines} of {isize} uncompressed bytes (gzip trailer) not in whole lines"
    room = max(1, _MAX_RATIO * member_bytes // _MIN_RECORD_BYTES)
    if est > room:
        est, how = room, f"{how}; at most what the damaged {member_bytes} compressed bytes can hold"
    est = max(1, est)
    return CORRUPT_FILE, est, f"{how}: ~{est} records estimated from the sizes"


def _read_jsonl(task: FileTask, f, out: _Batcher, size: int, max_bytes: int) -> Iterator[pa.Table]:
    line_no = line_bytes = 0
    tail = b""
    skipping = 0  # >0: bytes of an over-long line being skipped (never held in memory)
    dec = _Decompressed(f, task.uri)
    try:
        for chunk in dec:
            if skipping:
                nl = chunk.find(b"\n")
                if nl < 0:
                    skipping += len(chunk)
                    continue
                line_no += 1
                out.bad(line_no, RECORD_TOO_LARGE, f"line of {skipping + nl} bytes > data.max_record_bytes={max_bytes}")
                skipping, chunk = 0, chunk[nl + 1:]
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for raw in lines:
                line_no += 1
                line_bytes += len(raw) + 1
                yield from _parse_line(task, raw, line_no, out, max_bytes)
            if len(tail) > max_bytes:
                skipping, tail = len(tail), b""
    except Exception as e:  # noqa: BLE001 - damage of the data: quarantined and counted (I/O errors re-raised)
        if isinstance(e, storage.StorageIOError):
            raise
        if tail.strip() or skipping:
            line_no += 1
            out.bad(line_no, BAD_JSON, "incomplete last line before the damage")
        reason, lost, how = _lost_tail(e, line_no, line_bytes, dec, f, size)
        out.bad(-1, reason, f"after line {line_no}: {type(e).__name__}: {e}; {how}", records=lost)
        return
    if skipping:
        line_no += 1
        out.bad(line_no, RECORD_TOO_LARGE, f"line of {skipping} bytes > data.max_record_bytes={max_bytes}")
    elif tail.strip():
        line_no += 1
        yield from _parse_line(task, tail, line_no, out, max_bytes)
    if dec.garbage_at is not None:  # listed, but every member was read to its end marker: no record lost
        out.bad(-1, CORRUPT_FILE, f"after line {line_no}: {size - dec.garbage_at} bytes of trailing garbage after "
                                  f"the end marker of the last of {dec.members} compressed member(s), ignored: "
                                  "0 records lost", records=0)


def _big_int(digits: str):
    return int(digits) if len(digits) <= _BIG_INT_DIGITS else digits


def _parse_line(task: FileTask, raw: bytes, line_no: int, out: _Batcher, max_bytes: int) -> Iterator[pa.Table]:
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        raw = raw[3:]
    if len(raw) > max_bytes:
        out.bad(line_no, RECORD_TOO_LARGE, f"line of {len(raw)} bytes > data.max_record_bytes={max_bytes}")
    elif raw.strip():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad(line_no, INVALID_UTF8, str(e))
        else:
            try:
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    if "integer string conversion" not in str(e):
                        raise
                    obj = json.loads(line, parse_int=_big_int)
            except ValueError as e:
                out.bad(line_no, BAD_JSON, str(e))
            except RecursionError:
                out.bad(line_no, BAD_JSON, "nested deeper than the JSON parser allows")
            else:
                _validate(obj, line_no, task, out, "\\u" in line, max_bytes)
    if out.full():
        yield out.flush()


def _read_parquet(task: FileTask, f, out: _Batcher, max_bytes: int) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(f)
    row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        try:
            table = pf.read_row_group(rg)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, storage.StorageIOError):
                raise
            for r in range(row, row + n):
                out.bad(r, CORRUPT_FILE, f"row group {rg} unreadable: {type(e).__name__}: {e}")
            row += n
            continue
        try:
            records = table.to_pylist()
        except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 in one value: decode row by row
            records = None
        for i in range(n):
            if records is not None:
                obj = records[i]
            else:
                try:
                    obj = table.slice(i, 1).to_pylist()[0]
                except Exception as e:  # noqa: BLE001
                    out.bad(row, INVALID_UTF8 if isinstance(e, UnicodeDecodeError) else CORRUPT_FILE,
                            f"{type(e).__name__}: {e}")
                    row += 1
                    continue
            _validate(obj, row, task, out, has_escape=False, max_bytes=max_bytes)
            row += 1
            if out.full():
                yield out.flush()


def read_file(task: FileTask, opts: storage.StorageOptions | ReadOptions | None = None) -> Iterator[pa.Table]:
    """Validated records of one file as pyarrow tables (RECORD_SCHEMA); never raises for bad data.

    Failures of the medium (connection cut, timeout, EIO) are retried (storage.read_retries); one that outlasts
    the retries raises `storage.StorageIOError` naming the file: an outage must fail the job, not be counted as
    bad records. A missing or unreadable file, a FIFO/device/socket and a damaged file are quarantined."""
    ropts = opts if isinstance(opts, ReadOptions) else ReadOptions(opts or storage.options())
    if ropts.messages_field and not task.messages_field:
        task = replace(task, messages_field=ropts.messages_field)
    out = _Batcher(task)
    if task.uri.startswith(SKIPPED_PREFIX):
        out.bad(-1, SKIPPED_FILE, "not a corpus file name (reads .jsonl/.json/.ndjson[.gz|.zst], .parquet; "
                                  "hidden and _-prefixed files are skipped)", records=0)
    elif task.uri.startswith(BAD_NAME_PREFIX):
        out.bad(-1, BAD_FILE_NAME, "file name is not valid UTF-8 (shown with \\xNN escapes): rename the file")
    else:
        try:
            with storage.RetryingReader(task.uri, ropts.storage) as f:
                if task.uri.lower().endswith(".parquet"):
                    yield from _read_parquet(task, f, out, ropts.max_record_bytes)
                else:
                    yield from _read_jsonl(task, f, out, f.size, ropts.max_record_bytes)
        except storage.StorageIOError:
            raise
        except storage.NotARegularFile as e:
            out.bad(-1, NOT_A_REGULAR_FILE, str(e))
        except Exception as e:  # noqa: BLE001 - a missing or unreadable object is quarantined, the run goes on
            out.bad(-1, UNREADABLE_FILE, f"{type(e).__name__}: {e}")
    last = out.flush()
    if last is not None:
        yield last
