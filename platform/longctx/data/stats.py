"""Step 5 of the data path: length statistics per source, documents and tokens by length bucket, long share.

Buckets (tokens, EOS included): 0-4K, 4-8K, 8-16K, 16-32K, 32-64K, 64-128K, >128K; this is the table the Index
report shows for its corpus. The same function describes the input (pass 1) and the output (what the packed
rows hold, counted per segment by the length of the document it came from).

    stats = source_length_stats({"web": np.array([812, 9000, ...])}, long_threshold=4096)
    print(format_length_table(stats))
    plot_length_histogram({"web": lengths}, "lengths.png", seq_len=1024, long_threshold=4096)
"""

from __future__ import annotations

import numpy as np

BUCKET_EDGES = [0, 4096, 8192, 16384, 32768, 65536, 131072]
BUCKET_NAMES = ["0-4K", "4-8K", "8-16K", "16-32K", "32-64K", "64-128K", ">128K"]


def _bucket_index(lengths: np.ndarray) -> np.ndarray:
    return np.searchsorted(BUCKET_EDGES, lengths, side="right") - 1


def describe_lengths(lengths: np.ndarray, long_threshold: int, weights: np.ndarray | None = None) -> dict:
    """{docs, tokens, long_docs, long_tokens, long_share, buckets: {name: {docs, tokens}}}.

    `weights` (tokens per document, default its length) lets the output side count tokens actually emitted
    for documents of a given length (repeats and cuts included)."""
    lengths = np.asarray(lengths, np.int64)
    tokens = lengths if weights is None else np.asarray(weights, np.int64)
    b = _bucket_index(lengths)
    is_long = lengths >= long_threshold
    total = int(tokens.sum())
    long_tokens = int(tokens[is_long].sum())
    return {
        "docs": int(len(lengths)),
        "tokens": total,
        "long_docs": int(is_long.sum()),
        "long_tokens": long_tokens,
        "long_share": long_tokens / total if total else 0.0,
        "buckets": {
            name: {"docs": int((b == i).sum()), "tokens": int(tokens[b == i].sum())}
            for i, name in enumerate(BUCKET_NAMES)
        },
    }


def source_length_stats(lengths_by_source: dict[str, np.ndarray], long_threshold: int) -> dict:
    """Per-source `describe_lengths` plus an `__all__` total."""
    out = {s: describe_lengths(v, long_threshold) for s, v in sorted(lengths_by_source.items())}
    allv = [np.asarray(v) for v in lengths_by_source.values()]
    out["__all__"] = describe_lengths(np.concatenate(allv) if allv else np.zeros(0, np.int64), long_threshold)
    return out


def format_length_table(stats: dict, long_threshold: int | None = None) -> str:
    """Fixed-width table: one line per source, token share per bucket, long share."""
    header = f"{'source':<16} {'docs':>9} {'tokens':>13} " + " ".join(f"{n:>8}" for n in BUCKET_NAMES)
    long_name = f"long>={long_threshold}" if long_threshold else "long"
    header += f" {long_name:>11}"
    lines = [header, "-" * len(header)]
    for s, st in stats.items():
        tot = st["tokens"] or 1
        shares = " ".join(f"{100 * st['buckets'][n]['tokens'] / tot:7.1f}%" for n in BUCKET_NAMES)
        name = "ALL" if s == "__all__" else s
        lines.append(f"{name:<16} {st['docs']:>9,} {st['tokens']:>13,} {shares} {100 * st['long_share']:10.1f}%")
    lines.append("(bucket columns: share of the source's tokens in documents of that length)")
    return "\n".join(lines)


def _short(n: int) -> str:
    """1024 -> 1K, 1536 -> 1.5K, 131072 -> 128K, 300 -> 300."""
    if n >= 1024 and n % 512 == 0:
        k = n / 1024
        return f"{k:g}K"
    return str(n)


def length_bins(seq_len: int, long_threshold: int, max_length: int = 0) -> list[int]:
    """Histogram edges (tokens) around the two lengths that matter for this run: powers of two from seq_len / 16
    up past the longest document (at most ~12 bars), with `seq_len` and `long_threshold` always edges, so the
    bars show what is shorter than a training row, what is long, and what is longer still. The last bar is open."""
    lo = max(16, min(seq_len, long_threshold) // 16)
    edges = {0, seq_len, long_threshold}
    e = 1 << (lo - 1).bit_length()
    top = max(seq_len, long_threshold, max_length)
    while e <= top and len(edges) < 14:
        if all(not (0.8 < e / k < 1.25) or e == k for k in (seq_len, long_threshold)):  # no sliver bars
            edges.add(e)
        e *= 2
    return sorted(edges)


def plot_length_histogram(lengths_by_source: dict[str, np.ndarray], path: str, *, seq_len: int,
                          long_threshold: int, title: str = "tokens by document length") -> str:
    """PNG bar chart (matplotlib Agg): each source's share of tokens per document-length bin, with bins derived
    from `seq_len` and `long_threshold` (`length_bins`); bins at or beyond long_threshold are hatched."""
    import matplotlib  # deferred: heavy import, used only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy import, used only here

    sources = sorted(lengths_by_source)
    arrays = {s: np.asarray(lengths_by_source[s], np.int64) for s in sources}
    longest = max((int(a.max()) for a in arrays.values() if len(a)), default=0)
    edges = length_bins(seq_len, long_threshold, longest)
    labels = [f"{_short(a)}-{_short(b)}" for a, b in zip(edges[:-1], edges[1:])] + [f">={_short(edges[-1])}"]
    x = np.arange(len(labels))
    width = 0.8 / max(len(sources), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(labels) + 2), 4.2), dpi=100)
    for i, s in enumerate(sources):
        a = arrays[s]
        idx = np.searchsorted(edges, a, side="right") - 1
        tokens = np.bincount(idx, weights=a, minlength=len(labels))[: len(labels)] if len(a) else np.zeros(len(labels))
        total = tokens.sum() or 1.0
        long_share = float(a[a >= long_threshold].sum()) / total if len(a) else 0.0
        bars = ax.bar(x + i * width - 0.4 + width / 2, 100.0 * tokens / total, width,
                      label=f"{s}: {len(a):,} docs, {int(a.sum()):,} tokens, long {100 * long_share:.0f}%")
        for j, bar in enumerate(bars):
            if edges[j] >= long_threshold:
                bar.set_hatch("//")
    for value, what, color in ((seq_len, f"seq_len {seq_len}", "0.25"), (long_threshold, f"long >= {long_threshold}",
                                                                         "#c0392b")):
        pos = edges.index(value) - 0.5
        ax.axvline(pos, color=color, linestyle="--", linewidth=1)
        ax.annotate(what, xy=(pos, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color=color)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_xlabel("document length (tokens, EOS included)")
    ax.set_ylabel("share of the source's tokens (%)")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the PNG is reproducible
    plt.close(fig)
    return path


class LengthAccumulator:
    """Streaming version of `describe_lengths` for the output side: one `add` per emitted document (or cut-4k
    chunk); `docs` counts emissions (a repeated document counts each time)."""

    def __init__(self, long_threshold: int):
        self.long_threshold = long_threshold
        self.docs = np.zeros(len(BUCKET_NAMES), np.int64)
        self.tokens = np.zeros(len(BUCKET_NAMES), np.int64)
        self.long_docs = 0
        self.long_tokens = 0

    def add(self, doc_tokens: int, tokens: int, docs: int = 1) -> None:
        """`tokens` of a document of `doc_tokens` tokens; `docs=0` for a later piece of a document already counted."""
        b = int(np.searchsorted(BUCKET_EDGES, doc_tokens, side="right")) - 1
        self.docs[b] += docs
        self.tokens[b] += tokens
        if doc_tokens >= self.long_threshold:
            self.long_docs += docs
            self.long_tokens += tokens

    def merge(self, other: "LengthAccumulator") -> None:
        """Add the counts of another accumulator (e.g. one pass-2 partition's) to this one."""
        self.docs += other.docs
        self.tokens += other.tokens
        self.long_docs += other.long_docs
        self.long_tokens += other.long_tokens

    def result(self) -> dict:
        total = int(self.tokens.sum())
        return {
            "docs": int(self.docs.sum()),
            "tokens": total,
            "long_docs": self.long_docs,
            "long_tokens": self.long_tokens,
            "long_share": self.long_tokens / total if total else 0.0,
            "buckets": {n: {"docs": int(self.docs[i]), "tokens": int(self.tokens[i])}
                        for i, n in enumerate(BUCKET_NAMES)},
        }
