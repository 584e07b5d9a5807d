"""Budget-aware reading: read each source only as far as its share of the token budget, as the length mixture
will draw it, needs.

Without it, pass 1 reads, tokenizes and caches every listed file before the plan applies the budget: a 1B-token
budget over SlimPajama-627B would tokenize all 627B tokens. It is on whenever a token budget is set
(`data.token_budget`, else `train.token_budget`: `data_budget`) unless `data.budget_read` is false:

1. Every source's files are listed with their sizes and put in a seeded shuffled order; the sources' orders are
   merged so that each source's share of its bytes advances in step (the next file comes from the source that
   has listed the smallest fraction of its bytes).
2. Each source label (a configured source, or each value of its `source_field`) gets its share of the budget
   T = budget x (its estimated whole-corpus tokens / all of them), the estimate being the tokens per byte read so
   far x the bytes listed, as the plan splits it (mixture.plan_mixture). Its need is what the length mixture
   will draw from T, plus the margin (`data.read_margin`), in long (>= long_threshold) and short tokens:
   - natural lengths (cut-seq, cut-4k, sources not upsampled): T x (1 + margin) tokens;
   - `target_share`: q T x (1 + margin) long tokens and (1 - q) T x (1 + margin) short ones, q = max(long_share,
     the long share read), so the long pool is never drawn past its end while unread long documents remain;
   - `keep_prob`: long + keep_prob x short tokens >= T x (1 + margin) (every long document is kept, a short one
     with probability keep_prob), so the budget is met without repeats.
3. The driver consumes the ordered stream; a label's records are kept until it first has its need (the rest is
   counted as read but skipped; the margin absorbs later moves of the estimates), and the stream stops when every
   label has its need: the files after that point are never opened.
4. Length statistics and the plan use what was read; the budget split uses the whole-source estimates.

The manifest's `input.read` records, per source: files listed/read/skipped, bytes, records kept and skipped, the
need, the long and short tokens kept and the estimate; with the manifest's per-source `repeat_tokens`,
`repeats_while_unread` tells whether a document was repeated although unread ones remained. "Read" counts what
reached the driver; Ray Data's bounded read-ahead (a few blocks per reader) may open a few more files whose
records are discarded. NOTE: sources advance through their bytes in step, so a source that needs a larger share
of its bytes (few long documents) keeps the stream going while the others' files are read and skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longctx import storage
from longctx.data import sources as src


@dataclass
class SourceRead:
    """What budget-aware reading did for one configured source (the manifest's `input.read[source]`)."""

    files: int = 0             # corpus files listed
    bytes: int = 0             # their bytes (as stored: compressed files count compressed)
    need_tokens: int = 0       # its labels' budget shares x (1 + read_margin), at the end of reading
    files_read: int = 0        # files whose records reached the driver
    bytes_read: int = 0
    records_kept: int = 0      # good records tokenized and cached
    tokens_kept: int = 0
    long_tokens_kept: int = 0  # of which in documents >= long_threshold
    records_skipped: int = 0   # good records read after the need was met (rest of a file in flight): not cached
    tokens_skipped: int = 0
    estimated_tokens: int = 0  # tokens of the whole source, estimated from the tokens per byte read

    @property
    def files_skipped(self) -> int:
        return self.files - self.files_read


@dataclass(frozen=True)
class Need:
    """How the length mixture draws one source label's budget share (module docstring, step 2)."""

    mode: str                  # natural | target_share | keep_prob
    long_share: float = 0.0
    keep_prob: float = 1.0

    def met(self, long_tokens: int, short_tokens: int, need: float) -> bool:
        if self.mode == "keep_prob":
            return long_tokens + self.keep_prob * short_tokens >= need
        if self.mode == "target_share":
            total = long_tokens + short_tokens
            q = max(self.long_share, long_tokens / total if total else 0.0)
            return long_tokens >= q * need and short_tokens >= (1 - q) * need
        return long_tokens + short_tokens >= need


def mixture_needs(data_cfg) -> "callable":
    """label -> Need for the data config's strategy (which labels are upsampled, and how)."""
    d = data_cfg
    upsampled = {"per-source": None, "global": None, "sources": set(d.upsample_sources)}.get(d.strategy, set())

    def need(label: str) -> Need:
        if upsampled is not None and label not in upsampled:
            return Need("natural")
        if d.upsample_mode == "keep_prob":
            return Need("keep_prob", keep_prob=d.keep_prob)
        return Need("target_share", long_share=d.long_share)
    return need


def data_budget(cfg) -> tuple[int | None, str | None]:
    """(token budget of the data engine, where it comes from): `data.token_budget`, else `train.token_budget`
    (the data a run trains on is prepared to its training budget), else none."""
    if cfg.data.token_budget is not None:
        return int(cfg.data.token_budget), "data.token_budget"
    if cfg.train.token_budget is not None:
        return int(cfg.train.token_budget), "train.token_budget"
    return None, None


def effective_data_config(cfg):
    """`cfg.data` with `token_budget` set to `data_budget(cfg)` (what the plan and the manifest use)."""
    budget, _ = data_budget(cfg)
    return cfg.data if budget == cfg.data.token_budget else cfg.data.model_copy(update={"token_budget": budget})


def repeats_while_unread(manifest: dict) -> dict[str, int]:
    """Sources whose plan repeated documents (tokens emitted more than once) although budget-aware reading left
    some of their files or records unread: {source: repeated tokens}. Empty when reading honoured the mixture."""
    read = (manifest.get("input", {}).get("read") or {}).get("sources", {})
    out = {}
    for label, s in manifest.get("sources", {}).items():
        src_read = next((r for name, r in read.items() if name == label), None)
        unread = (any(r["files_skipped"] or r["records_skipped"] for r in read.values()) if src_read is None
                  else bool(src_read["files_skipped"] or src_read["records_skipped"]))
        if s.get("repeat_tokens", 0) > 0 and unread:
            out[label] = int(s["repeat_tokens"])
    return out


def _is_corpus(task: src.FileTask) -> bool:
    return not task.uri.startswith((src.SKIPPED_PREFIX, src.BAD_NAME_PREFIX))


def file_size(uri: str) -> int:
    """Stored size of one file (0 when it cannot be stat'ed: the reader then reports what is wrong with it)."""
    try:
        fs, path = storage.fsspec_fs(uri)
        return int(fs.size(path) or 0)
    except Exception:  # noqa: BLE001 - the read task quarantines the file with the reason
        return 0


class BudgetReader:
    """Orders pass 1's files for budget-aware reading and gates the tokenized stream (module docstring)."""

    def __init__(self, tasks: list[src.FileTask], budget: int, margin: float, seed: int,
                 sizes: dict[str, int] | None = None, data_cfg=None):
        self.budget, self.margin = int(budget), float(margin)
        self.need_of = mixture_needs(data_cfg) if data_cfg is not None else (lambda label: Need("natural"))
        self.threshold = int(data_cfg.long_threshold) if data_cfg is not None else 1 << 62
        sizes = sizes if sizes is not None else {t.uri: file_size(t.uri) for t in tasks if _is_corpus(t)}
        self.size = {t.file_idx: int(sizes.get(t.uri, 0)) for t in tasks}
        self.source_of = {t.file_idx: t.source for t in tasks}
        names = sorted({t.source for t in tasks})
        self.reads = {s: SourceRead() for s in names}
        by_source: dict[str, list[src.FileTask]] = {s: [] for s in names}
        for t in tasks:
            if _is_corpus(t):
                by_source[t.source].append(t)
                self.reads[t.source].files += 1
                self.reads[t.source].bytes += self.size[t.file_idx]
        # Files that are never opened (not corpus formats, bad names) go first: their quarantine rows are cheap.
        self.order: list[src.FileTask] = [t for t in tasks if not _is_corpus(t)]
        queues = []
        for i, s in enumerate(names):
            files = by_source[s]
            perm = np.random.default_rng([seed, 11, i]).permutation(len(files))
            queues.append([files[j] for j in perm])
        taken = np.zeros(len(names))
        whole = np.array([max(self.reads[s].bytes, 1) for s in names], np.float64)
        heads = [0] * len(names)
        while any(h < len(q) for h, q in zip(heads, queues)):
            score = [(taken[i] + self.size[q[heads[i]].file_idx] / 2) / whole[i] if heads[i] < len(q) else np.inf
                     for i, q in enumerate(queues)]
            i = int(np.argmin(score))
            t = queues[i][heads[i]]
            heads[i] += 1
            taken[i] += self.size[t.file_idx]
            self.order.append(t)
        self.label_tokens: dict[tuple[str, str], int] = {}  # (cache label, configured source) -> good tokens read
        self.kept: dict[tuple[str, str], list[int]] = {}     # (label, source) -> [long, short] tokens kept
        self.met: dict[tuple[str, str], bool] = {}
        self._seen: set[int] = set()
        self._pos = {t.file_idx: i for i, t in enumerate(self.order)}
        self._last = -1                                   # stream position of the newest file seen
        self._file_tokens: dict[int, int] = {}            # good tokens read per file (kept or skipped)
        self.exhausted = False                            # set when the stream ended without a stop
        self._corpus_idx = {t.file_idx for t in tasks if _is_corpus(t)}
        self._sources_with_files = {s for s, r in self.reads.items() if r.files}

    @property
    def done(self) -> bool:
        """Every label seen has what the mixture needs, and every source with files was seen: the rest of the
        stream need not be read."""
        seen = {s for _, s in self.kept}
        return bool(self.kept) and seen >= self._sources_with_files and all(self.met.values())

    def _targets(self) -> dict[tuple[str, str], float]:
        """Each (label, source)'s share of the budget by the whole-corpus estimate so far (module docstring)."""
        seen_bytes = {s: r.bytes_read for s, r in self.reads.items()}
        read = {s: sum(n for (_, t), n in self.label_tokens.items() if t == s) for s in self.reads}
        est = {}
        for (label, s), n in self.label_tokens.items():
            per_byte = read[s] / seen_bytes[s] if seen_bytes.get(s) else 0.0
            est[(label, s)] = n / read[s] * per_byte * self.reads[s].bytes if read[s] and per_byte else float(n)
        total = sum(est.values()) or 1.0
        return {k: self.budget * v / total for k, v in est.items()}

    def admit(self, batch: pa.Table) -> pa.Table:
        """The rows of a tokenized batch to keep: quarantine rows, and good records of labels still short of what
        the mixture needs (in stream order; the record that crosses the need is kept). Counts everything."""
        file_idx = batch.column("file_idx").to_numpy(zero_copy_only=False)
        good = pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
        n_tok = batch.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
        labels = batch.column("source").to_pylist()
        keep = np.ones(batch.num_rows, bool)
        for f, g, label in zip(file_idx.tolist(), good.tolist(), labels):  # counts first: the targets use them
            if f not in self._seen:
                self._seen.add(f)
                self._last = max(self._last, self._pos[f])
                if f in self._corpus_idx:
                    self.reads[self.source_of[f]].files_read += 1
                    self.reads[self.source_of[f]].bytes_read += self.size[f]
        for f, g, n in zip(file_idx.tolist(), good.tolist(), n_tok.tolist()):
            if g:
                self._file_tokens[f] = self._file_tokens.get(f, 0) + n
        for r, (f, g, n, label) in enumerate(zip(file_idx.tolist(), good.tolist(), n_tok.tolist(), labels)):
            if g:
                key = (label, self.source_of[f])
                self.label_tokens[key] = self.label_tokens.get(key, 0) + n
        targets = self._targets()
        for r, (f, g, n, label) in enumerate(zip(file_idx.tolist(), good.tolist(), n_tok.tolist(), labels)):
            if not g:
                continue
            s = self.source_of[f]
            rd, key = self.reads[s], (label, s)
            kept = self.kept.setdefault(key, [0, 0])
            if not self.met.get(key, False):
                rd.records_kept += 1
                rd.tokens_kept += n
                is_long = n >= self.threshold
                kept[0 if is_long else 1] += n
                rd.long_tokens_kept += n if is_long else 0
                # NOTE: met is final: a label's kept records are a prefix of its stream, so every cache row group
                # the tokenizer actors wrote keeps its first records (token_cache._index_batch relies on it)
                self.met[key] = self.need_of(label).met(kept[0], kept[1], targets[key] * (1 + self.margin))
            else:
                keep[r] = False
                rd.records_skipped += 1
                rd.tokens_skipped += n
        for s, rd in self.reads.items():
            rd.need_tokens = int(np.ceil(sum(t for (_, src_), t in targets.items() if src_ == s) * (1 + self.margin)))
        return batch if keep.all() else batch.filter(pa.array(keep))

    def estimate(self) -> dict[str, int]:
        """Whole-corpus token estimate per cache label: the tokens read from each configured source scaled by
        (its bytes x tokens per byte) / tokens read, tokens per byte measured on the files read whole (the newest
        file may have been cut off by the stop). Also fills `estimated_tokens` per source."""
        whole = {f for f in self._seen if f in self._corpus_idx and (self.exhausted or self._pos[f] < self._last)}
        scale = {}
        for s, r in self.reads.items():
            files = [f for f in (whole if any(self.source_of[f] == s for f in whole) else self._seen)
                     if self.source_of[f] == s and f in self._corpus_idx]
            ratio_bytes = sum(self.size[f] for f in files)
            ratio = sum(self._file_tokens.get(f, 0) for f in files) / ratio_bytes if ratio_bytes else 0.0
            r.estimated_tokens = int(round(ratio * r.bytes))
            read = r.tokens_kept + r.tokens_skipped
            scale[s] = r.estimated_tokens / read if read else 1.0
        out: dict[str, float] = {}
        for (label, s), n in self.label_tokens.items():
            out[label] = out.get(label, 0.0) + n * scale[s]
        return {k: int(round(v)) for k, v in sorted(out.items())}

    def report(self) -> dict:
        return {"read_margin": self.margin, "budget": self.budget,
                "sources": {s: {**asdict(r), "files_skipped": r.files_skipped} for s, r in sorted(self.reads.items())}}
