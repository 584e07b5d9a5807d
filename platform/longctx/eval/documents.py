"""Read held-out document texts for evaluation from a local path, glob, folder, s3:// prefix or `builtin:`.

Formats by suffix: .jsonl, .jsonl.gz, .jsonl.zst, .json (JSON lines), .parquet. Bad records (invalid JSON,
missing or non-string text field) are skipped and counted with the file and line in the log, never fatal.

    texts = iter_texts("builtin:corpus/heldout.jsonl.gz", text_field="text")
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from typing import Iterator

import pyarrow.parquet as pq
import zstandard

from longctx import storage

log = logging.getLogger(__name__)
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".parquet")


def _field(record: dict, dotted: str):
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _open_lines(uri: str, data: bytes) -> io.TextIOBase:
    if uri.endswith(".gz"):
        data = gzip.decompress(data)
    elif uri.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return io.StringIO(data.decode("utf-8", errors="strict"))


def iter_records(uri: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every valid JSON object / parquet row under `uri`; bad lines are logged."""
    files = storage.expand(uri, SUFFIXES)
    if not files:
        raise storage.StorageError(f"{uri}: no {', '.join(SUFFIXES)} files found")
    for f in files:
        if f.endswith(".parquet"):
            fs, path = storage.pyarrow_fs(f)
            table = pq.read_table(path, filesystem=fs)
            for i, rec in enumerate(table.to_pylist()):
                yield f"{f}:{i}", rec
            continue
        try:
            lines = _open_lines(f, storage.read_bytes(f))
        except (OSError, UnicodeDecodeError, EOFError) as e:
            log.warning("skipping %s: cannot decode (%s)", f, e)
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("skipping %s:%d: invalid JSON (%s)", f, n, e)
                continue
            if isinstance(rec, dict):
                yield f"{f}:{n}", rec
            else:
                log.warning("skipping %s:%d: not a JSON object", f, n)


def iter_texts(uri: str, text_field: str = "text") -> Iterator[str]:
    """Texts of the records under `uri` (records without a string `text_field` are skipped and logged)."""
    for where, rec in iter_records(uri):
        text = _field(rec, text_field)
        if isinstance(text, str) and text:
            yield text
        else:
            log.warning("skipping %s: field %r missing or not a non-empty string", where, text_field)
