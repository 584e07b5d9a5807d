"""Long-SFT data through the data engine: chat JSONL -> chat template, loss on the answers only -> packed rows.

    manifest = prepare_sft_data(cfg, "runs/sft1/data")   # packed Parquet shards, manifest.json, _COMMITTED

1. Read: the data engine's read path (`data/sources.py` in chat mode, one Ray read task per file) over every
   file of every URI of every source of `data.sources`; each line holds `{"messages": [{"role": "system"|"user"|
   "assistant"|"tool", "content": str}, ...]}` (field: data.sft.messages_field). Bad lines (invalid JSON, no
   messages, no assistant turn, bad roles/contents, damaged files) are quarantined with file:line and a reason
   into `_quarantine/records.jsonl`, never fatal unless more than data.max_bad_fraction of the records are bad.
   A published folder's bookkeeping (`manifest.json`, anything under an `_underscore/` folder) is not read.
2. Tokenize: one Ray task per record block (`ChatTokenizer`, built once per worker process; data.num_tokenize_actors
   at a time, `data/pass1.py`) renders each conversation
   with the tokenizer's chat template (or data.sft.chat_template) and tokenizes it once with offsets. Label spans
   are the characters each assistant turn adds after the generation prompt (render(messages[:k],
   add_generation_prompt) vs render(messages[:k+1])): its content and end-of-turn marker get loss; the prompt,
   system and user turns and the assistant header get -100. A template whose renders are not prefixes of each
   other is refused with the record named. A conversation longer than data.seq_len follows data.sft.overlong:
   `truncate_middle` keeps the head of the context (system prompt, start of the first user turn) and its end
   (the last question and the assistant header) around a cut in the middle, and the last answer whole with its
   loss (the Index report's rule for prompts); `quarantine` quarantines it (`overlong_chat`). A last answer that
   alone exceeds a row is quarantined either way. Both are counted in the manifest; nothing is cut silently.
   The tasks write the tokens (ids, labels) to a token cache next to the output; the driver gets metadata only.
3. Mix (driver, metadata only): data.sft.mix gives each source's share of the conversations (Index: ~30K long +
   ~50K general); sampled without replacement while a source lasts, then repeated (counted). Empty mix: every
   conversation once.
4. Pack: first-fit decreasing over the lengths into rows of data.seq_len with document attention (position ids
   restart per conversation; the trainer masks across conversations), planned on the driver; one Ray task per
   shard reads its conversations from the token cache, builds the rows (`longctx.data.pack.PACKED_SCHEMA`) and
   writes the shard (sha256 in the manifest).
5. Publish: shards, manifest.json (with the data fingerprint) and the quarantine list are committed atomically
   (`storage.publish_dir`, `_COMMITTED` last). A run finding committed data of the same settings reuses it, and
   `data.prepared` trains on it (`runs.steps.prepare_step`).
Epochs are the trainer's (train.epochs): the same rows are read again. Same input + config + seed -> the same
shards (input order is kept through pass 1, the mix is seeded, the packing plan is deterministic).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longctx import cleanup, storage
from longctx.data import sources as src
from longctx.data.fingerprint import data_fingerprint, data_tree, tokenizer_fingerprint
from longctx.data.pack import PACKED_SCHEMA
from longctx.data.pipeline import shared_cache_root, write_shard
from longctx.data.sources import validate_messages  # noqa: F401 - re-exported: preflight's probe checks chats with it
from longctx.data.pass1 import record_stream
from longctx.data.token_cache import TokenCache, check_bad_fraction
from longctx.progress import Progress

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
SFT_KIND = "sft"
"""The `kind` of a Long-SFT dataset's manifest.json (Long-PT packed rows: `longctx.data.pack.PACKED_KIND`)."""
ROLES = set(src.ROLES)
QUARANTINE_FILE = "_quarantine/records.jsonl"
CHAT_CACHE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
CHAT_META_SCHEMA = pa.schema([
    ("file_idx", pa.int32()), ("rec_idx", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("records", pa.int64()),
    ("n_tokens", pa.int32()),          # tokens kept (<= seq_len)
    ("loss_tokens", pa.int32()),       # of which carry a label
    ("cut_tokens", pa.int32()),        # tokens removed from the middle (truncate_middle), else 0
    ("cache_file", pa.string()),       # the token-cache file (under the cache root) holding its ids and labels
    ("cache_row", pa.int32()),         # its row there
])


TEMPLATE_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "a2"}]
"""A two-turn chat every template is tried on before Ray starts (`prepare_sft_data`)."""


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
    cut_tokens: int = 0          # tokens removed from the middle of the context
    overlong: str | None = None  # why the conversation cannot be used (quarantined), else None


@dataclass
class SftStats:
    records: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    repeated: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def tokenize_chat(tokenizer, conv: Conversation, seq_len: int, chat_template: str | None = None,
                  overlong: str = "truncate_middle") -> TokenizedChat:
    """Token ids and labels (-100 except on assistant turns) of one conversation, at most seq_len tokens.

    Longer than seq_len: `truncate_middle` keeps the first half of the context budget from the start and the
    rest from the end of the context (everything before the last assistant turn's header), then the last turn
    whole (header, answer, end-of-turn; labels kept); `quarantine` returns it with `overlong` set and no tokens.
    A last turn longer than seq_len by itself is returned with `overlong` set under either policy."""

    def render(msgs, gen_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt,
                                             chat_template=chat_template)

    def refuse():
        raise ValueError(f"{conv.record_id}: the chat template's renders are not prefixes of each other; "
                         "cannot locate assistant turns (use data.sft.chat_template with a prefix-stable template)")

    text = render(conv.messages)
    spans = []
    for k, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(conv.messages[:k], gen_prompt=True), render(conv.messages[: k + 1])
        if not upto.startswith(prompt) or not text.startswith(upto):
            refuse()
        spans.append((len(prompt), len(upto)))
    last = max(k for k, m in enumerate(conv.messages) if m["role"] == "assistant")
    before_last = render(conv.messages[:last]) if last else ""
    if not spans[-1][0] >= len(before_last) or not text.startswith(before_last):
        refuse()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    learn = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        learn |= (starts >= a) & (starts < b)
    labels = np.where(learn, ids, IGNORE_INDEX).astype(np.int32)
    chat = TokenizedChat(conv.source, conv.record_id, ids, labels)
    if len(ids) <= seq_len:
        return chat
    empty = np.zeros(0, np.int32)
    if overlong == "quarantine":
        return replace(chat, input_ids=empty, labels=empty,
                       overlong=f"{len(ids)} tokens > data.seq_len={seq_len} (data.sft.overlong=quarantine)")
    tail_at = int(np.searchsorted(starts, len(before_last), side="left"))  # first token of the last turn
    budget = seq_len - (len(ids) - tail_at)
    if budget < 0:
        return replace(chat, input_ids=empty, labels=empty,
                       overlong=f"its last assistant turn alone holds {len(ids) - tail_at} tokens > "
                                f"data.seq_len={seq_len}: no context could be kept")
    head = budget - budget // 2
    keep = np.r_[0:head, tail_at - budget // 2:len(ids)]
    return replace(chat, input_ids=ids[keep], labels=labels[keep], truncated=True, cut_tokens=len(ids) - seq_len)


def mix_conversations(by_source: dict[str, list], mix: dict[str, float], seed: int, stats: SftStats) -> list:
    """The conversations (any items, listed per source) a run trains on, in a seeded order: `mix` shares
    (normalised) of the total count, without replacement while a source lasts, then repeated (counted)."""
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


def plan_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: rows of at most seq_len tokens, as lists of indices into `lengths` (ties keep
    input order, so the plan is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows


def build_rows(chats: list[TokenizedChat], rows: list[list[int]], seq_len: int, pad_id: int,
               row_offset: int = 0) -> pa.Table:
    """Packed rows (document attention, padding with label -100) in the packed-row schema."""
    cols = {k: [] for k in PACKED_SCHEMA.names}
    for row_id, members in enumerate(rows, start=row_offset):
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


def pack_chats(chats: list[TokenizedChat], seq_len: int, pad_id: int) -> pa.Table:
    """First-fit decreasing into rows of seq_len (document attention), in the packed-row schema."""
    return build_rows(chats, plan_rows([len(c.input_ids) for c in chats], seq_len), seq_len, pad_id)


# ------------------------------------------------------------------------------------- Ray workers
class ChatTokenizer:
    """Pass-1 transform (`data/pass1.py`, one instance per worker process): validated chat records (`sources.RECORD_SCHEMA`, chat mode) -> CHAT_META_SCHEMA rows.

    Good conversations are rendered, labelled and fitted to seq_len (`tokenize_chat`); their ids and labels go
    to one Parquet file per batch under `cache_root` (shared with every node, or s3://); an over-long one the
    policy cannot keep becomes a quarantine row (`overlong_chat`). Quarantine rows pass through."""

    def __init__(self, tokenizer: str, chat_template: str | None, seq_len: int, overlong: str, cache_root: str,
                 storage_cfg: dict):
        from longctx.model.load import load_tokenizer  # Ray worker side: transformers is imported here only

        storage.configure(SimpleNamespace(**storage_cfg))
        self.tok = load_tokenizer(tokenizer)
        self.template, self.seq_len, self.overlong, self.cache_root = chat_template, seq_len, overlong, cache_root

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {n: batch.column(n).to_pylist() for n in ("file_idx", "rec_idx", "source", "doc_id", "reason",
                                                          "detail", "records")}
        n = batch.num_rows
        extra = {"n_tokens": [0] * n, "loss_tokens": [0] * n, "cut_tokens": [0] * n, "cache_file": [None] * n,
                 "cache_row": [-1] * n}
        good = pc.is_null(batch.column("reason")).to_pylist()
        texts = batch.column("text").to_pylist()
        name = f"{uuid.uuid4().hex}.parquet"
        kept: list[TokenizedChat] = []
        for i in range(n):
            if not good[i]:
                continue
            conv = Conversation(cols["source"][i], cols["doc_id"][i], json.loads(texts[i]))
            chat = tokenize_chat(self.tok, conv, self.seq_len, self.template, self.overlong)
            if chat.overlong:
                cols["reason"][i], cols["detail"][i] = src.OVERLONG_CHAT, chat.overlong
                continue
            extra["n_tokens"][i], extra["cut_tokens"][i] = len(chat.input_ids), chat.cut_tokens
            extra["loss_tokens"][i] = int((chat.labels != IGNORE_INDEX).sum())
            extra["cache_file"][i], extra["cache_row"][i] = name, len(kept)
            kept.append(chat)
        if kept:
            table = pa.table({"input_ids": [c.input_ids for c in kept], "labels": [c.labels for c in kept]},
                             schema=CHAT_CACHE_SCHEMA)
            uri = storage.join(self.cache_root, name)
            fs, path = storage.pyarrow_fs(uri)

            def write():
                with fs.open_output_stream(path) as out:
                    pq.write_table(table, out, compression="none")

            storage.retry_io(write, f"write chat token cache {uri}")
        return pa.table({**cols, **extra}, schema=CHAT_META_SCHEMA)


def write_sft_shard(rows: list[list[tuple]], cache_root: str, staging: str, name: str, row_offset: int,
                    seq_len: int, pad_id: int, storage_cfg: dict) -> dict:
    """Ray task: build packed rows from the token cache and write one shard under `staging`. `rows`: per row,
    (cache_file, cache_row, source, doc_id) of each conversation in it. Memory: the shard's own tokens plus one
    cache file (one actor batch). Returns the manifest's shard entry."""
    storage.configure(SimpleNamespace(**storage_cfg))
    wanted: dict[str, set[int]] = {}
    for row in rows:
        for cache_file, cache_row, _, _ in row:
            wanted.setdefault(cache_file, set()).add(cache_row)
    tokens: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for cache_file in sorted(wanted):  # one cache file in memory at a time, only the rows this shard holds kept
        fs, path = storage.pyarrow_fs(storage.join(cache_root, cache_file))
        t = storage.retry_io(lambda: pq.read_table(path, filesystem=fs), f"read chat token cache {cache_file}")
        for r in sorted(wanted[cache_file]):
            tokens[(cache_file, r)] = (np.asarray(t.column("input_ids")[r].values, np.int32),
                                       np.asarray(t.column("labels")[r].values, np.int32))
        del t
    chats: list[TokenizedChat] = []
    plan: list[list[int]] = []
    for row in rows:
        plan.append([])
        for cache_file, cache_row, source, doc_id in row:
            plan[-1].append(len(chats))
            chats.append(TokenizedChat(source, doc_id, *tokens[(cache_file, cache_row)]))
    table = build_rows(chats, plan, seq_len, pad_id, row_offset)
    return {"path": name, "rows": table.num_rows, "row_id_start": row_offset, **write_shard(table, staging, name)}


# ------------------------------------------------------------------------------------- the driver
def chat_files(specs: dict) -> list[src.FileTask]:
    """The data engine's file list (`sources.list_files`: every URI of every source) without a published
    folder's bookkeeping: `manifest.json` (a synthetic set's summary, not a record), its `_COMMITTED` marker and
    anything under an `_underscore/` folder (e.g. `_quarantine/`)."""
    out = []
    for task in src.list_files(specs):
        path = task.uri.removeprefix(src.SKIPPED_PREFIX)
        uris = [task.spec.uri] if isinstance(task.spec.uri, str) else list(task.spec.uri)
        roots = [storage.normalize(u).rstrip("/") for u in uris]
        root = max((r for r in roots if path.startswith(r + "/")), key=len, default="")
        rel = path[len(root):] if root else path.rsplit("/", 1)[-1]
        if path.rsplit("/", 1)[-1] in ("manifest.json", storage.COMMIT_MARKER) or any(
                p.startswith("_") for p in rel.split("/")[:-1]):
            continue
        out.append(replace(task, file_idx=len(out)))
    return out


def _read_and_tokenize(cfg, tasks: list[src.FileTask], cache_root: str, qpath: str, template: str | None):
    """Pass 1 on Ray (the data engine's `record_stream`): read + validate, then `ChatTokenizer` on every block.
    Returns (metadata of the good conversations as a table, in input order; quarantined records by reason).
    Quarantine rows are written to `qpath` as they arrive."""
    d = cfg.data
    opts = src.ReadOptions(storage.options(), d.max_record_bytes, d.sft.messages_field).to_dict()
    kwargs = {"tokenizer": d.tokenizer, "chat_template": template, "seq_len": d.seq_len,
              "overlong": d.sft.overlong, "cache_root": cache_root, "storage_cfg": cfg.storage.model_dump()}
    bar = Progress("sft tokenize", total=len(tasks), unit="files")
    seen: set[int] = set()
    good: list[pa.Table] = []
    by_reason: dict[str, int] = {}
    with open(qpath, "w") as q:
        for batch in record_stream(cfg, tasks, ChatTokenizer, kwargs, opts):
            seen.update(batch.column("file_idx").to_pylist())
            bad = pc.is_valid(batch.column("reason"))
            for r in batch.filter(bad).to_pylist():
                n = r["records"] if r["reason"] not in src.NOT_RECORDS else 1
                by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + n
                q.write(json.dumps({"location": r["doc_id"], "reason": r["reason"], "detail": r["detail"],
                                    "records": n}) + "\n")
            good.append(batch.filter(pc.invert(bad)))
            bar.note = f"{sum(t.num_rows for t in good):,} conversations"
            bar.update(len(seen))
    meta = pa.concat_tables(good) if good else CHAT_META_SCHEMA.empty_table()
    return meta, by_reason


def prepare_sft_data(cfg, output: str, overwrite: bool = False) -> dict:
    """Read, tokenize, mix and pack the SFT sources of `cfg` on Ray; publish shards + manifest.json at `output`."""
    import ray  # deferred: this module is imported by preflight, which runs before Ray

    from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

    d = cfg.data
    storage.configure(cfg.storage)
    if storage.is_committed(output) and not overwrite:  # found before any corpus is read
        raise storage.StorageError(f"{output}: already published (pass overwrite=True or choose a fresh location)")
    storage.check_destination(output, overwrite, kind=SFT_KIND)  # a foreign folder: refused before any read
    t0 = time.time()
    tokenizer = load_tokenizer(d.tokenizer)  # fail fast, before any Ray work
    template = storage.read_text(d.sft.chat_template) if d.sft.chat_template else None
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{d.tokenizer}: tokenizer has no chat template; set data.sft.chat_template")
    # a template whose renders are not prefixes of each other is refused here, before Ray, not in an actor
    tokenize_chat(tokenizer, Conversation("", "the chat template check", TEMPLATE_PROBE), 1 << 30, template)
    tasks = chat_files(d.source_specs())
    work = cleanup.work_dir("sft")  # the quarantine list; those of dead runs are removed
    shared = shared_cache_root(output)
    try:
        qpath = os.path.join(work, "quarantine.jsonl")
        meta, by_reason = _read_and_tokenize(cfg, tasks, shared, qpath, template)
        cache = TokenCache(root=shared, files=len(tasks), good=meta.num_rows, bad_by_reason=by_reason,
                           quarantine_path=qpath)
        bad_fraction = check_bad_fraction(cache, d.max_bad_fraction)
        m = {k: meta.column(k).to_pylist() for k in ("source", "doc_id", "n_tokens", "loss_tokens", "cut_tokens",
                                                    "cache_file", "cache_row")}
        stats = SftStats()
        by_source: dict[str, list[int]] = {name: [] for name in d.source_specs()}
        for i, s in enumerate(m["source"]):
            by_source.setdefault(s, []).append(i)
        stats.records = {s: len(v) for s, v in by_source.items()}
        chosen = mix_conversations(by_source, d.sft.mix, d.seed, stats)
        rows = [[chosen[j] for j in r] for r in plan_rows([m["n_tokens"][i] for i in chosen], d.seq_len)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        opts = {"num_cpus": cfg.ray.data_cpus_per_task, "max_retries": 3, **(
            {"resources": dict(cfg.ray.data_resources)} if cfg.ray.data_resources else {})}
        write = ray.remote(write_sft_shard).options(**opts)
        with storage.publish_dir(output, overwrite=overwrite, shared=True, kind=SFT_KIND) as staging:
            refs = []
            for k, start in enumerate(range(0, len(rows), d.rows_per_shard)):
                spec = [[(m["cache_file"][i], m["cache_row"][i], m["source"][i], m["doc_id"][i]) for i in r]
                        for r in rows[start:start + d.rows_per_shard]]
                refs.append(write.remote(spec, shared, staging, f"sft-{k:05d}.parquet", start, d.seq_len,
                                         int(pad_id), cfg.storage.model_dump()))
            shards = ray.get(refs)
            tokens = int(sum(m["n_tokens"][i] for i in chosen))
            manifest = {
                "kind": SFT_KIND, "seq_len": d.seq_len, "attention": "document", "tokenizer": d.tokenizer,
                "tokenizer_fingerprint": tokenizer_fingerprint(d.tokenizer), "vocab_size": len(tokenizer),
                "data_fingerprint": data_fingerprint(cfg), "data_config": data_tree(cfg),
                "conversations": {"read": stats.records, "used": stats.used, "repeated": stats.repeated,
                                  "truncated": sum(1 for i in chosen if m["cut_tokens"][i]),
                                  "truncated_tokens": int(sum(m["cut_tokens"][i] for i in chosen)),
                                  "overlong": d.sft.overlong,
                                  "overlong_quarantined": by_reason.get(src.OVERLONG_CHAT, 0)},
                "input": {"files": len(tasks), "records": cache.good + cache.bad, "good_records": cache.good},
                "quarantine": {"records": cache.bad, "by_reason": dict(sorted(by_reason.items())),
                               "fraction": round(bad_fraction, 6), "max_bad_fraction": d.max_bad_fraction,
                               "file": QUARANTINE_FILE, "examples": _examples(qpath)},
                "totals": {"rows": len(rows), "tokens": tokens,
                           "loss_tokens": int(sum(m["loss_tokens"][i] for i in chosen)),
                           "pad_fraction": 1 - tokens / max(1, len(rows) * d.seq_len)},
                "shards": shards,
            }
            small = os.path.join(work, "publish")
            os.makedirs(os.path.join(small, "_quarantine"))
            shutil.copyfile(qpath, os.path.join(small, QUARANTINE_FILE))
            with open(os.path.join(small, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=2)
            storage.upload_dir(small, staging)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        storage.remove_tree(shared)
    c = manifest["conversations"]
    print(f"[longctx] SFT data: {len(rows)} rows from {len(chosen)} conversations ({c['truncated']} cut in the "
          f"middle, {cache.bad} records quarantined) in {time.time() - t0:.1f}s -> {storage.normalize(output)}",
          flush=True)
    return manifest


def _examples(qpath: str, n: int = 20) -> list[dict]:
    """The first quarantine entries (where, reason) for the manifest; the full list is QUARANTINE_FILE."""
    with open(qpath) as f:
        return [{"where": r["location"], "reason": f"{r['reason']}: {r['detail']}"}
                for r in (json.loads(line) for _, line in zip(range(n), f))]
