"""Data pipeline benchmark: tokens/s and peak memory of (a) the bare tokenizer's batch encode, (b) our full
pipeline (read + validate + tokenize + mix + pack + write, through Ray Data), (c) the Hugging Face baseline
(`datasets.map` tokenize + `group_texts` into fixed blocks, as transformers' run_clm example), on the same
corpus and cores, at 1x and 10x corpus size.

    python bench/data_pipeline.py                          # shipped sample corpus (~3.5M tokens) at 1x and 10x
    python bench/data_pipeline.py --scales 1 --variants bare ours

Every variant runs in a fresh subprocess; peak memory is the largest sum of PSS (proportional set size, so
shared pages and Ray's object store are not double counted) over that process and all its descendants (Ray's
raylet and workers included), sampled every 0.25 s. Throughput counts input tokens (EOS included) per
wall-clock second of the whole step: for (a) only the encode calls on texts already in memory; for (b) the
whole `prepare_data` call, Ray Data startup included (ray.init excluded); for (c) load_dataset + both maps.
`CPU s` is the user+sys time of the whole process tree (imports and Ray's own daemons included): on a busy
machine it is steadier than wall time.
NOTE: on a shared machine the figures are noisy; compare variants of one run, not runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

CORPUS = ["code", "c", "records"]


def make_corpus(root: str, scale: int) -> dict[str, list[str]]:
    """`scale` copies of the shipped sample corpus (as separate files, distinct ids) under root."""
    from longctx import storage

    files: dict[str, list[str]] = {}
    for name in CORPUS:
        raw = gzip.decompress(storage.read_bytes(f"builtin:corpus/{name}.jsonl.gz"))
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(scale):
            path = os.path.join(root, name, f"part-{k:03d}.jsonl.gz")
            with open(path, "wb") as f:
                f.write(gzip.compress(raw, compresslevel=1))
            files.setdefault(name, []).append(path)
    return files


def _texts(files: dict[str, list[str]]) -> list[str]:
    out = []
    for paths in files.values():
        for p in paths:
            with gzip.open(p, "rt", encoding="utf-8") as f:
                out.extend(json.loads(line)["text"] for line in f)
    return out


# --------------------------------------------------------------------------------------------- variants
def run_bare(files, tokenizer, threads: int) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from longctx.data.tokenize import load_fast_tokenizer

    backend, eos, _ = load_fast_tokenizer(tokenizer)
    texts = _texts(files)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 256):
        enc = backend.encode_batch_fast(texts[i:i + 256], add_special_tokens=False)
        tokens += sum(len(e.ids) + 1 for e in enc)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def run_ours(files, tokenizer, actors: int, out: str) -> dict:
    import ray

    from longctx.config import load_config
    from longctx.data import prepare_data

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    cfg = load_config(None, [f"data.tokenizer={tokenizer}", "data.seq_len=32768", "data.long_threshold=4096",
                             f"data.num_tokenize_actors={actors}", "data.strategy=cut-seq", "data.rows_per_shard=64"])
    cfg.data.sources = {name: {"uri": os.path.dirname(paths[0])} for name, paths in files.items()}
    t0 = time.perf_counter()
    manifest = prepare_data(cfg, out)
    return {"tokens": manifest["input"]["tokens"], "seconds": time.perf_counter() - t0,
            "tokenize_s": manifest["timings"]["tokenize_s"], "pack_write_s": manifest["timings"]["pack_write_s"],
            "rows": manifest["rows"], "pad_fraction": manifest["pad_fraction"]}


def run_hf(files, tokenizer, procs: int, block: int, cache: str) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets
    from transformers import AutoTokenizer

    from longctx.model.load import local_model_dir

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(local_model_dir(tokenizer))
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[p for ps in files.values() for p in ps], split="train",
                               cache_dir=cache)

    def tokenize(batch):  # run_clm appends nothing; we add EOS per document like our pipeline does
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [tok.eos_token_id] for x in ids]}

    def group_texts(examples):  # transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: [t for ex in examples[k] for t in ex] for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        return {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

    tokenized = ds.map(tokenize, batched=True, num_proc=procs, remove_columns=ds.column_names)
    tokens = sum(len(x) for x in tokenized["input_ids"])
    t_tok = time.perf_counter()
    grouped = tokenized.map(group_texts, batched=True, num_proc=procs)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "tokenize_s": t_tok - t0,
            "rows": len(grouped)}


# ----------------------------------------------------------------------------------------- harness
def _tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """Sum of PSS over the process tree; updates `cpu` with each process's cumulative user+sys seconds."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
            t = p.cpu_times()
            cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass
    return total


def measure(variant: str, args: list[str]) -> dict:
    """Run one variant in a subprocess; return its JSON result plus peak PSS of its process tree."""
    cmd = [sys.executable, __file__, "--child", variant, *args]
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    peak = 0
    cpu: dict[int, float] = {}
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_sample(proc.pid, cpu))
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        err.seek(0)
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}): {out[-1000:]}{err.read()[-3000:]}")
    return {**json.loads(lines[-1]), "peak_mib": peak / 2**20, "cpu_s": sum(cpu.values())}


def child(variant: str, corpus_json: str, tokenizer: str, workdir: str, n: int) -> None:
    files = json.loads(corpus_json)
    if variant == "bare":
        r = run_bare(files, tokenizer, n)
    elif variant == "ours":
        r = run_ours(files, tokenizer, n, os.path.join(workdir, f"ours-{time.time_ns()}"))
    else:
        r = run_hf(files, tokenizer, n, 32768, os.path.join(workdir, f"hf-{time.time_ns()}"))
    print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--variants", nargs="+", default=["bare", "ours", "hf"], choices=["bare", "ours", "hf"])
    ap.add_argument("--tokenizer", default="builtin:tiny-tokenizer")
    ap.add_argument("--cores", type=int, default=2, help="threads (bare), tokenizer actors (ours), procs (hf)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, corpus_json, tokenizer, workdir, n = args.child
        child(variant, corpus_json, tokenizer, workdir, int(n))
        return
    work = tempfile.mkdtemp(prefix="longctx-bench-")
    try:
        print(f"{'scale':>5} {'variant':<34} {'tokens':>12} {'seconds':>8} {'Mtok/s':>7} {'vs bare':>8} "
              f"{'peak MiB':>9} {'CPU s':>7}", flush=True)
        peaks: dict[str, dict[int, float]] = {}
        for scale in args.scales:
            files = make_corpus(os.path.join(work, f"corpus-x{scale}"), scale)
            bare_rate = None
            for v in args.variants:
                r = measure(v, [json.dumps(files), args.tokenizer, work, str(args.cores)])
                rate = r["tokens"] / r["seconds"]
                bare_rate = rate if v == "bare" else bare_rate
                label = {"bare": f"(a) bare encode_batch_fast, {args.cores} thr",
                         "ours": f"(b) longctx prepare_data, {args.cores} act",
                         "hf": f"(c) HF datasets.map+group_texts, {args.cores}p"}[v]
                rel = f"{100 * rate / bare_rate:7.1f}%" if bare_rate else f"{'':>8}"
                print(f"{scale:>5} {label:<34} {r['tokens']:>12,} {r['seconds']:>8.1f} {rate / 1e6:>7.3f} {rel} "
                      f"{r['peak_mib']:>9.0f} {r['cpu_s']:>7.1f}", flush=True)
                extra = {k: r[k] for k in ("tokenize_s", "pack_write_s", "pad_fraction") if k in r}
                if extra:
                    print(f"{'':>5}   {extra}", flush=True)
                peaks.setdefault(v, {})[scale] = r["peak_mib"]
        if len(args.scales) > 1:
            lo, hi = min(args.scales), max(args.scales)
            for v, p in peaks.items():
                print(f"peak memory {v}: x{hi} / x{lo} = {p[hi] / p[lo]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
