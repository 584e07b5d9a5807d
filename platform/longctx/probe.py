"""Preflight's look at the data itself: the first few records of every source, checked against the job's kind.

    findings = probe_text_source("data.sources.web", uri_of_first_file, spec)        # Long-PT / prepare / sweep
    findings = probe_chat_source("data.sources.chat", uri_of_first_file, "messages")  # Long-SFT

A listing says the files exist; only their records say whether the job can use them. A corpus whose text sits in
`content` while the job reads `text` would otherwise pass every check, start Ray, quarantine every record and
fail half a minute later pointing at `data.max_bad_fraction`. Here the first `SAMPLE` records of one file per
source are read (streamed: a few KiB of a local or s3:// JSONL / .gz / .zst file, or the first row group's first
rows of a Parquet file) and the problem comes back with the field that is there and the setting that fixes it:

    data.sources.web: no field 'text' in the first 5 records of web/part-0.jsonl (fields: id, content, meta);
        fix: set data.sources.web.text_field=content (YAML: text_field: content under data.sources.web)

A finding is fatal when no sampled record is usable (the job would quarantine everything); some bad records among
good ones are a warning (the data engine quarantines and counts them). A sample that cannot be read at all is a
warning too: the data engine, not preflight, decides about damaged files.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

from longctx import storage
from longctx.data.sources import get_path
from longctx.train.sft_data import validate_messages

SAMPLE = 5
"""Records read per source."""
_MAX_BYTES = 4 << 20
"""Decompressed bytes read at most per sample (a first record longer than this is not looked at)."""
_TEXT_NAMES = ("text", "content", "raw_content", "body", "document", "markdown", "code", "article", "passage")
"""Field names that usually hold a document's text: preferred, in this order, when several strings are long."""


@dataclass(frozen=True)
class Finding:
    where: str
    """The config key at fault, e.g. `data.sources.web`."""
    what: str
    fix: str
    fatal: bool
    """True: no sampled record is usable (the job would fail); False: a warning."""


# --------------------------------------------------------------------------------------------------- reading
def _lines(raw: io.BufferedIOBase, name: str) -> Iterator[bytes]:
    """Lines of a (possibly compressed) JSON-lines stream, at most `_MAX_BYTES` decompressed."""
    lower = name.lower()
    if lower.endswith(".gz"):
        stream: Any = gzip.GzipFile(fileobj=raw)
    elif lower.endswith(".zst"):
        import zstandard  # only a .zst sample needs it

        stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    else:
        stream = raw
    seen = 0
    while seen < _MAX_BYTES:
        line = stream.readline(_MAX_BYTES - seen)
        if not line:
            return
        seen += len(line)
        if not line.endswith(b"\n") and seen >= _MAX_BYTES:
            return  # cut by our read limit, not by the data: not looked at
        yield line


def sample_records(uri: str, n: int = SAMPLE) -> list[tuple[str, Any]]:
    """(location, parsed record or the parse error) of the first `n` non-empty records of one file."""
    opts = dataclasses.replace(storage.options(), read_retries=0)  # preflight answers in seconds, not after retries
    out: list[tuple[str, Any]] = []
    with storage.RetryingReader(uri, opts) as raw:
        if uri.lower().endswith(".parquet"):
            import pyarrow.parquet as pq  # a Parquet sample only

            pf = pq.ParquetFile(io.BufferedReader(raw))
            for batch in pf.iter_batches(batch_size=n):
                out += [(f"{uri}:row {i}", rec) for i, rec in enumerate(batch.to_pylist()[:n])]
                break
            return out
        for line_no, line in enumerate(_lines(io.BufferedReader(raw), uri), start=1):
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
            except ValueError as e:
                rec = ValueError(f"not JSON ({e})")
            out.append((f"{uri}:{line_no}", rec))
            if len(out) >= n:
                break
    return out


# ---------------------------------------------------------------------------------------------- describing
def _fields(records: list[Any]) -> list[str]:
    """Field names of the sampled objects, nested ones as dotted paths (one level), in first-seen order."""
    names: dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            names[k] = None
            if isinstance(v, dict):
                for k2 in v:
                    names[f"{k}.{k2}"] = None
    return list(names)


def _text_field(records: list[dict]) -> str | None:
    """The field most likely to hold the text: a string field non-empty in every sampled record, the longest on
    average, unless a usual text name (`_TEXT_NAMES`) is at least half as long."""
    means = {}
    for name in _fields(records):
        values = [get_path(r, name) for r in records]
        if all(isinstance(v, str) and v.strip() for v in values):
            means[name] = sum(len(v) for v in values) / len(values)
    if not means:
        return None
    longest = max(means, key=means.get)
    known = [n for n in means if n.split(".")[-1].lower() in _TEXT_NAMES and 2 * means[n] >= means[longest]]
    return min(known, key=lambda n: _TEXT_NAMES.index(n.split(".")[-1].lower())) if known else longest


def _is_turns(value: Any, keys: tuple[str, str]) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and keys[0] in m and keys[1] in m
                                                           for m in value)


def _chat_field(records: list[dict], keys: tuple[str, str] = ("role", "content")) -> str | None:
    """A top-level field holding chat turns with these keys in every sampled record."""
    for name in _fields(records):
        if "." not in name and all(_is_turns(r.get(name), keys) for r in records):
            return name
    return None


def _short(uri: str) -> str:
    return uri if len(uri) <= 100 else "..." + uri[-97:]


def _unreadable(where: str, uri: str, sample: list[tuple[str, Any]]) -> Finding | None:
    """A fatal finding when no sampled line is a JSON object."""
    if any(isinstance(rec, dict) for _, rec in sample):
        return None
    first = sample[0][1]
    what = (f"the first {len(sample)} lines of {_short(uri)} are not JSON objects ("
            + (str(first) if isinstance(first, Exception) else f"e.g. a {type(first).__name__}") + ")")
    return Finding(where, what, "point it at JSON lines (one object per line) or Parquet files", fatal=True)


def _sampled(where: str, uri: str) -> tuple[list[tuple[str, Any]], Finding | None]:
    try:
        sample = sample_records(uri)
    except Exception as e:  # noqa: BLE001 - a damaged file is the data engine's to quarantine and count
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [], Finding(where, f"could not read a sample of {_short(uri)} ({type(e).__name__}: {msg[:160]})",
                           "check the file; the job quarantines what it cannot read", fatal=False)
    if not sample:
        return [], None
    return sample, _unreadable(where, uri, sample)


# ------------------------------------------------------------------------------------------------- checks
def probe_text_source(where: str, uri: str, text_field: str, field_key: str | None = None, *,
                      extra_fields: dict[str, str | None] | None = None) -> list[Finding]:
    """Findings for a plain-text source read with `text_field` (Long-PT, data preparation, evaluation
    documents). `field_key` is the setting that names the field (default `<where>.text_field`); `extra_fields`
    maps other settings (`<where>.source_field`, `<where>.id_field`) to the field they name, when set."""
    sample, bad = _sampled(where, uri)
    if bad or not sample:
        return [bad] if bad else []
    field_key = field_key or f"{where}.text_field"
    objs = [rec for _, rec in sample if isinstance(rec, dict)]
    good = [r for r in objs if isinstance(get_path(r, text_field), str) and get_path(r, text_field).strip()]
    out: list[Finding] = []
    if not good:
        fields = ", ".join(_fields(objs)[:12]) or "none"
        head = f"no text in field {text_field!r} in the first {len(objs)} records of {_short(uri)} (fields: {fields})"
        chat = _chat_field(objs)
        candidate = _text_field(objs)
        if chat:
            out.append(Finding(where, f"{head}: these records are chats ({chat!r} holds role/content turns), and "
                               "this job reads plain text",
                               f"train on chats with Long-SFT (`longctx sft` / jobs/long_sft.py), or point {where} "
                               "at plain-text records", fatal=True))
        elif candidate:
            out.append(Finding(where, head, f"set {field_key}={candidate} (YAML: "
                               f"{field_key.rsplit('.', 1)[-1]}: {candidate} under {field_key.rsplit('.', 1)[0]})",
                               fatal=True))
        else:
            out.append(Finding(where, head + "; no field holds a non-empty string in every record",
                               f"set {field_key} to the field holding the text (dotted path for nested fields)",
                               fatal=True))
        return out
    if len(good) < len(objs) or len(objs) < len(sample):
        out.append(Finding(where, f"{len(sample) - len(good)} of the first {len(sample)} records of {_short(uri)} "
                           f"have no text in {text_field!r}: they will be quarantined and counted",
                           "fix those records, or expect them in the quarantine", fatal=False))
    for key, name in (extra_fields or {}).items():
        if name and not any(get_path(r, name) is not None for r in good):
            fields = ", ".join(_fields(good)[:12])
            out.append(Finding(key, f"no field {name!r} in the first {len(good)} records of {_short(uri)} "
                               f"(fields: {fields})", f"set {key} to one of those fields, or leave it unset",
                               fatal=True))
    return out


def probe_chat_source(where: str, uri: str, messages_field: str) -> list[Finding]:
    """Findings for a Long-SFT source: every record holds `messages_field`, a list of {role, content} turns with
    at least one assistant turn (`longctx.train.sft_data.validate_messages`)."""
    sample, bad = _sampled(where, uri)
    if bad or not sample:
        return [bad] if bad else []
    objs = [rec for _, rec in sample if isinstance(rec, dict)]
    reasons = [validate_messages(r.get(messages_field)) for r in objs]
    usable = sum(r is None for r in reasons)
    if usable == len(sample):
        return []
    head = f"the first {len(sample)} records of {_short(uri)}"
    if usable:
        first = next(r for r in reasons if r)
        return [Finding(where, f"{len(sample) - usable} of {head} are not usable chats (e.g. {first}): they will be "
                        "quarantined and counted", "fix those records, or expect them in the quarantine",
                        fatal=False)]
    fields = ", ".join(_fields(objs)[:12]) or "none"
    if any(messages_field in r for r in objs):
        first = next(r for r in reasons if r)
        return [Finding(where, f"{head} have {messages_field!r} but no usable chat ({first})",
                        'each record needs {"' + messages_field + '": [{"role": "user", "content": ...}, '
                        '{"role": "assistant", "content": ...}]}', fatal=True)]
    other = _chat_field(objs)
    if other:
        return [Finding(where, f"{head} have no field {messages_field!r}; their chats are in {other!r} (fields: "
                        f"{fields})", f"set data.sft.messages_field={other}", fatal=True)]
    if _chat_field(objs, ("from", "value")):
        return [Finding(where, f"{head} have no field {messages_field!r}; their turns use from/value (ShareGPT "
                        f"style; fields: {fields})", "convert the turns to {role, content} (human -> user, gpt -> "
                        "assistant)", fatal=True)]
    text = _text_field(objs)
    if text:
        return [Finding(where, f"{head} hold plain text ({text!r}), not chats (no {messages_field!r} list; fields: "
                        f"{fields})", "Long-SFT reads chat JSONL, one {\"messages\": [{\"role\", \"content\"}, ...]} "
                        f"per line: point {where} at chat data (e.g. `longctx data synth retrieval`), or train on "
                        "this text with Long-PT (`longctx train`)", fatal=True)]
    return [Finding(where, f"{head} have no field {messages_field!r} (fields: {fields})",
                    "point it at chat JSONL, or set data.sft.messages_field", fatal=True)]


def probe_source(cfg, kind: str, name: str, where: str, uri: str, files: list[str]) -> list[Finding]:
    """Findings for source `name` of `cfg` (given as `uri`, listed as `files`) for a job of `kind`: chats for
    Long-SFT, plain text in the source's `text_field` for the others. One file is sampled: the first in sorted
    order that the job reads (a published folder's `manifest.json` and `_underscore/` entries are not records)."""
    root = str(uri).rstrip("/")
    files = [f for f in files if f.rsplit("/", 1)[-1] != "manifest.json" and "/_" not in f[len(root):]]
    if not files:
        return []
    if kind == "sft":
        return probe_chat_source(where, files[0], cfg.data.sft.messages_field)
    spec = cfg.data.source_specs()[name]
    key = f"data.sources.{name}"
    return probe_text_source(where, files[0], spec.text_field, f"{key}.text_field",
                             extra_fields={f"{key}.source_field": spec.source_field, f"{key}.id_field": spec.id_field})
