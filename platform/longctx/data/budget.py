"""Budget-aware reading (`data.read_margin`): read each source only as far as its share of the token budget needs.

Without it, pass 1 reads, tokenizes and caches every listed file before the plan applies the budget: a 1B-token
budget over SlimPajama-627B would tokenize all 627B tokens. With `data.token_budget` and `data.read_margin` set:

1. Every source's files are listed with their sizes and put in a seeded shuffled order; the sources' orders are
   merged so that each source's share of its bytes advances in step (the next file comes from the source that
   has listed the smallest fraction of its bytes), so all sources reach their needs at about the same point of
   the stream.
2. A source's need is its planned share of the budget plus the margin: budget x (its bytes / all bytes) x
   (1 + read_margin) tokens. The margin leaves the length plan room to draw long and short documents without
   repeating what was read more than the budget itself requires.
3. The driver consumes the ordered stream; a source's records stop being kept once it has its need (the rest
   of the files in flight is counted as read but skipped), and the stream stops when every source has its need:
   the files after that point are never opened.
4. Length statistics and the plan use what was read; the split of the budget between sources uses each
   source's tokens estimated for the whole source (tokens per byte measured on what was read x its bytes).

The manifest's `input.read` records, per source: files listed/read/skipped, bytes, records kept and skipped,
the need and the estimate. "Read" counts what reached the driver; Ray Data's bounded read-ahead (a few blocks
per reader) may open a few more files whose records are discarded.
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
    need_tokens: int = 0       # budget x byte share x (1 + read_margin)
    files_read: int = 0        # files whose records reached the driver
    bytes_read: int = 0
    records_kept: int = 0      # good records tokenized and cached
    tokens_kept: int = 0
    records_skipped: int = 0   # good records read after the need was met (rest of a file in flight): not cached
    tokens_skipped: int = 0
    estimated_tokens: int = 0  # tokens of the whole source, estimated from the tokens per byte read

    @property
    def files_skipped(self) -> int:
        return self.files - self.files_read


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
                 sizes: dict[str, int] | None = None):
        self.budget, self.margin = int(budget), float(margin)
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
        total = sum(r.bytes for r in self.reads.values()) or 1
        for s, r in self.reads.items():
            r.need_tokens = int(np.ceil(self.budget * r.bytes / total * (1 + self.margin)))
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
        self._seen: set[int] = set()
        self._pos = {t.file_idx: i for i, t in enumerate(self.order)}
        self._last = -1                                   # stream position of the newest file seen
        self._file_tokens: dict[int, int] = {}            # good tokens read per file (kept or skipped)
        self.exhausted = False                            # set when the stream ended without a stop
        self._corpus_idx = {t.file_idx for t in tasks if _is_corpus(t)}
        self._open = {s for s, r in self.reads.items() if r.files and r.need_tokens > 0}

    @property
    def done(self) -> bool:
        """Every source has what it needs: the rest of the stream need not be read."""
        return not self._open

    def admit(self, batch: pa.Table) -> pa.Table:
        """The rows of a tokenized batch to keep: quarantine rows, and good records of sources still short of
        their need (in stream order; the record that crosses the need is kept). Counts everything."""
        file_idx = batch.column("file_idx").to_numpy(zero_copy_only=False)
        good = pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
        n_tok = batch.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
        labels = batch.column("source").to_pylist()
        keep = np.ones(batch.num_rows, bool)
        for r, (f, g, n, label) in enumerate(zip(file_idx.tolist(), good.tolist(), n_tok.tolist(), labels)):
            s = self.source_of[f]
            rd = self.reads[s]
            if f not in self._seen:
                self._seen.add(f)
                self._last = max(self._last, self._pos[f])
                if f in self._corpus_idx:
                    rd.files_read += 1
                    rd.bytes_read += self.size[f]
            if not g:
                continue
            self.label_tokens[(label, s)] = self.label_tokens.get((label, s), 0) + n
            self._file_tokens[f] = self._file_tokens.get(f, 0) + n
            if rd.tokens_kept < rd.need_tokens:
                rd.records_kept += 1
                rd.tokens_kept += n
                if rd.tokens_kept >= rd.need_tokens:
                    self._open.discard(s)
            else:
                keep[r] = False
                rd.records_skipped += 1
                rd.tokens_skipped += n
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
