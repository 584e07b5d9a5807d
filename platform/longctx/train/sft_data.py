"""Long-SFT data: chat JSONL -> tokens with the chat template, loss on assistant turns only -> packed rows.

    manifest = prepare_sft_data(cfg, "runs/sft1/data")     # committed packed-Parquet shards + manifest.json

1. Read every source of `data.sources` (JSONL / JSONL.gz, local or s3://); each line holds
   `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (field name: data.sft.messages_field).
   Bad lines (invalid JSON, no messages, no assistant turn, bad roles/contents) are quarantined with file:line and
   a reason, never fatal unless more than data.max_bad_fraction of the records are bad.
2. Mix: data.sft.mix gives each source's share of the conversations (Index: ~30K long + ~50K general); sampled
   without replacement while a source lasts, then repeated (counted). Empty mix: every conversation once.
3. Tokenize: the conversation is rendered with the tokenizer's chat template (or data.sft.chat_template) and
   tokenized once with offsets. Label spans are the characters each assistant turn adds after the generation
   prompt (render(messages[:k], add_generation_prompt) vs render(messages[:k+1])): its content and end-of-turn
   marker get loss, the prompt, system and user turns and the assistant header get -100. A template whose
   renders are not prefixes of each other is refused with the record named.
4. Pack: first-fit decreasing into rows of data.seq_len with document attention (position ids restart per
   conversation; the trainer masks across conversations); a conversation longer than a row is truncated (counted).
   Rows use the packed-row schema of the data engine (`longctx.data.pack.PACKED_SCHEMA`).
Epochs are the trainer's (train.epochs): the same rows are read again.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx import storage
from longctx.data.fingerprint import data_fingerprint, data_tree, tokenizer_fingerprint

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
SFT_KIND = "sft"
"""The `kind` of a Long-SFT dataset's manifest.json (Long-PT packed rows: `longctx.data.pack.PACKED_KIND`)."""
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Conversation:
    source: str
    record_id: str
    messages: list[dict]


@dataclass
class TokenizedChat:
    source: str
    record_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False


@dataclass
class SftStats:
    records: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    repeated: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def _open_lines(uri: str):
    data = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        data = gzip.decompress(data)
    return io.StringIO(data.decode("utf-8"))


def validate_messages(messages) -> str | None:
    """Why a chat is unusable (None when it is fine)."""
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


def sft_files(uri: str) -> list[str]:
    """Chat files under `uri`, without a published folder's bookkeeping: `manifest.json` (the synthetic sets'
    summary, not a record) and anything under an `_underscore/` folder (e.g. `_quarantine/`)."""
    root = storage.normalize(uri).rstrip("/")
    out = []
    for path in storage.expand(uri, (".jsonl", ".jsonl.gz", ".json")):
        rel = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
        if path.rsplit("/", 1)[-1] == "manifest.json" or any(part.startswith("_") for part in rel.split("/")[:-1]):
            continue
        out.append(path)
    return out


def read_conversations(source: str, uri: str, messages_field: str, stats: SftStats) -> list[Conversation]:
    out = []
    for path in sft_files(uri):
        try:
            lines = _open_lines(path)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            stats.quarantined.append({"where": path, "reason": f"unreadable file: {e}"})
            continue
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.quarantined.append({"where": where, "reason": f"invalid JSON: {e.msg}"})
                continue
            messages = record.get(messages_field) if isinstance(record, dict) else None
            reason = validate_messages(messages)
            if reason:
                stats.quarantined.append({"where": where, "reason": reason})
                continue
            out.append(Conversation(source, str(record.get("id", where)), messages))
    stats.records[source] = len(out)
    return out


def tokenize_chat(tokenizer, conv: Conversation, seq_len: int, chat_template: str | None = None) -> TokenizedChat:
    """Token ids and labels (-100 except on assistant turns) of one conversation, truncated to seq_len."""

    def render(msgs, gen_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt,
                                             chat_template=chat_template)

    text = render(conv.messages)
    spans = []
    for k, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(conv.messages[:k], gen_prompt=True), render(conv.messages[: k + 1])
        if not upto.startswith(prompt) or not text.startswith(upto):
            raise ValueError(f"{conv.record_id}: the chat template's renders are not prefixes of each other; "
                             "cannot locate assistant turns (use data.sft.chat_template with a prefix-stable template)")
        spans.append((len(prompt), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    learn = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        learn |= (starts >= a) & (starts < b)
    labels = np.where(learn, ids, IGNORE_INDEX).astype(np.int32)
    truncated = len(ids) > seq_len
    return TokenizedChat(conv.source, conv.record_id, ids[:seq_len], labels[:seq_len], truncated)


def mix_conversations(by_source: dict[str, list[Conversation]], mix: dict[str, float], seed: int,
                      stats: SftStats) -> list[Conversation]:
    rng = random.Random(seed)
    if not mix:
        chosen = [c for convs in by_source.values() for c in convs]
        for s, convs in by_source.items():
            stats.used[s] = len(convs)
    else:
        unknown = sorted(set(mix) - set(by_source))
        if unknown:
            raise ValueError(f"data.sft.mix names unknown source(s) {unknown}; sources: {sorted(by_source)}")
        total_w = sum(mix.values())
        total_n = sum(len(v) for v in by_source.values())
        chosen = []
        for s, w in mix.items():
            want, pool = round(total_n * w / total_w), list(by_source[s])
            if not pool:
                raise ValueError(f"data.sft.mix asks for source {s!r} but it has no usable conversations")
            rng.shuffle(pool)
            take = pool[:want] + [rng.choice(pool) for _ in range(max(0, want - len(pool)))]
            stats.used[s], stats.repeated[s] = len(take), max(0, want - len(pool))
            chosen += take
    rng.shuffle(chosen)
    return chosen


def pack_chats(chats: list[TokenizedChat], seq_len: int, pad_id: int) -> pa.Table:
    """First-fit decreasing into rows of seq_len (document attention), in the packed-row schema."""
    from longctx.data.pack import PACKED_SCHEMA

    order = sorted(range(len(chats)), key=lambda i: -len(chats[i].input_ids))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(chats[i].input_ids)
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    cols = {k: [] for k in PACKED_SCHEMA.names}
    for row_id, members in enumerate(rows):
        ids = [chats[i].input_ids for i in members]
        labels = [chats[i].labels for i in members]
        lengths = [len(x) for x in ids]
        pad = seq_len - sum(lengths)
        sources, doc_ids = [chats[i].source for i in members], [chats[i].record_id for i in members]
        if pad:
            ids.append(np.full(pad, pad_id, np.int32))
            labels.append(np.full(pad, IGNORE_INDEX, np.int32))
            lengths.append(pad)
            sources.append("")
            doc_ids.append("")
        cols["row_id"].append(row_id)
        cols["input_ids"].append(np.concatenate(ids))
        cols["labels"].append(np.concatenate(labels))
        cols["position_ids"].append(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]))
        cols["seg_lengths"].append(lengths)
        cols["seg_sources"].append(sources)
        cols["seg_doc_ids"].append(doc_ids)
        cols["seg_doc_tokens"].append(lengths[: len(members)] + ([0] if pad else []))
    return pa.table({k: pa.array(v, PACKED_SCHEMA.field(k).type) for k, v in cols.items()}, schema=PACKED_SCHEMA)


def prepare_sft_data(cfg, output: str, overwrite: bool = False) -> dict:
    """Read, mix, tokenize and pack the SFT sources of `cfg`; publish shards + manifest.json at `output`."""
    from longctx.model.load import load_tokenizer

    d = cfg.data
    if storage.is_committed(output) and not overwrite:  # found before any corpus is read
        raise storage.StorageError(f"{output}: already published (pass overwrite=True or choose a fresh location)")
    storage.check_destination(output, overwrite, kind=SFT_KIND)  # a foreign folder: refused before any read
    stats = SftStats()
    by_source = {name: read_conversations(name, spec.uri if isinstance(spec.uri, str) else spec.uri[0],
                                          d.sft.messages_field, stats)
                 for name, spec in d.source_specs().items()}
    total = sum(stats.records.values()) + len(stats.quarantined)
    bad = len(stats.quarantined) / max(1, total)
    if bad > d.max_bad_fraction:
        raise ValueError(f"{len(stats.quarantined)} of {total} SFT records are bad ({bad:.1%} > data.max_bad_fraction="
                         f"{d.max_bad_fraction}); first: {stats.quarantined[:3]}")
    tokenizer = load_tokenizer(d.tokenizer)
    template = storage.read_text(d.sft.chat_template) if d.sft.chat_template else None
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{d.tokenizer}: tokenizer has no chat template; set data.sft.chat_template")
    chats = [tokenize_chat(tokenizer, c, d.seq_len, template) for c in mix_conversations(by_source, d.sft.mix, d.seed, stats)]
    stats.truncated = sum(c.truncated for c in chats)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = pack_chats(chats, d.seq_len, int(pad_id))
    loss_tokens = int(sum((c.labels != IGNORE_INDEX).sum() for c in chats))
    tokens = int(sum(len(c.input_ids) for c in chats))
    manifest = {
        "kind": SFT_KIND, "seq_len": d.seq_len, "attention": "document", "tokenizer": d.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(d.tokenizer), "vocab_size": len(tokenizer),
        "data_fingerprint": data_fingerprint(cfg), "data_config": data_tree(cfg),
        "conversations": {"read": stats.records, "used": stats.used, "repeated": stats.repeated,
                          "truncated": stats.truncated},
        "quarantine": {"records": len(stats.quarantined), "examples": stats.quarantined[:20]},
        "totals": {"rows": table.num_rows, "tokens": tokens, "loss_tokens": loss_tokens,
                   "pad_fraction": 1 - tokens / max(1, table.num_rows * d.seq_len)},
        "shards": [],
    }
    with storage.publish_dir(output, overwrite=overwrite, kind=SFT_KIND) as staging:
        for i, start in enumerate(range(0, table.num_rows, d.rows_per_shard)):
            name = f"sft-{i:05d}.parquet"
            part = table.slice(start, d.rows_per_shard)
            pq.write_table(part, os.path.join(staging, name))
            manifest["shards"].append({"path": name, "rows": part.num_rows})
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    log.info("SFT data: %s", manifest["totals"])
    return manifest
