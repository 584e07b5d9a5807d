"""Shared machinery of the synthetic generators (SynL tables, retrieval instructions).

- `item_rng(seed, kind, index)`: every sample is a pure function of (seed, generator, index), so a Ray Data
  batch can be generated anywhere, in any order, and the same seed gives byte-identical output.
- `spread(seed, kind, index)`: (u, v) in [0, 1)^2 from the R2 low-discrepancy sequence (Roberts 2018), so the
  lengths and answer/needle depths of any prefix of n samples cover their ranges evenly (uniform, no clumps).
- `ChatTokens`: token counts of chat samples with the model's own tokenizer and chat template (the template is
  rendered with jinja2 the way transformers' `apply_chat_template` renders it, then encoded with the Rust
  tokenizer, so Ray actors never import transformers).
- `generate_sft_set(...)`: runs a generator class over `ray.data.range(n)` in an actor pool and publishes
  chat-JSONL shards plus `manifest.json` (counts, token and depth histograms) atomically.

Chat JSONL record (what Long-SFT reads): `{"id", "source", "messages": [{"role": "user", ...},
{"role": "assistant", ...}], "meta": {...}}`; the loss goes on the assistant turn only (the SFT path masks
the rest). `meta` holds what a test or an analysis needs to check the sample (task, depths, parameters).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Callable

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

import longctx
from longctx import storage
from longctx.data.tokenize import load_fast_tokenizer, local_tokenizer_dir
from longctx.raycluster import connect as ensure_ray

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
# R2 sequence constants: 1/g and 1/g^2 for the plastic number g (the 2-D golden ratio).
_G = 1.32471795724474602596
_A1, _A2 = 1.0 / _G, 1.0 / (_G * _G)


def item_rng(seed: int, kind: str, index: int) -> random.Random:
    """Python RNG of one sample; string seeds hash with SHA-512, independent of PYTHONHASHSEED."""
    return random.Random(f"longctx-synth:{seed}:{kind}:{index}")


def spread(seed: int, kind: str, index: int) -> tuple[float, float]:
    """(u, v): the index-th point of a seed-shifted R2 sequence; u drives the length, v the depth."""
    off = random.Random(f"longctx-synth:{seed}:{kind}:offset")
    u0, v0 = off.random(), off.random()
    return (u0 + _A1 * index) % 1.0, (v0 + _A2 * index) % 1.0


def target_length(u: float, min_tokens: int, max_tokens: int) -> int:
    return int(round(min_tokens + u * (max_tokens - min_tokens)))


class ChatTokens:
    """Token counts of chat samples with a tokenizer folder's Rust tokenizer and its chat template."""

    def __init__(self, tokenizer: str):
        self.uri = tokenizer
        self.backend, self.eos, self.pad = load_fast_tokenizer(tokenizer)
        folder = local_tokenizer_dir(tokenizer)
        tcfg_path = os.path.join(folder, "tokenizer_config.json")
        tcfg = json.load(open(tcfg_path)) if os.path.exists(tcfg_path) else {}
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_path):
            template = open(jinja_path, encoding="utf-8").read()
        self.template = template
        self.special = {k: (v.get("content") if isinstance(v, dict) else v)
                        for k, v in tcfg.items() if k.endswith("_token") and isinstance(v, (str, dict))}
        self._compiled = None
        if template:
            # NOTE: same environment options as transformers' _compile_jinja_template (trim/lstrip blocks), so
            # the rendered text, and therefore the token count, is the one the SFT path will see.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])

            def raise_exception(msg):
                raise jinja2.exceptions.TemplateError(msg)

            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(template)

    def render(self, messages: list[dict]) -> str:
        """The chat-templated text of a conversation (contents joined by blank lines without a template)."""
        if self._compiled is None:
            return "\n\n".join(m["content"] for m in messages)
        return self._compiled.render(messages=messages, add_generation_prompt=False, **self.special)

    def count(self, text: str) -> int:
        return self.count_many([text])[0]

    def count_many(self, texts: list[str]) -> list[int]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [len(e.ids) for e in encode(texts, add_special_tokens=False)]

    def encode(self, text: str):
        """Encoding with character offsets (ids, offsets)."""
        return self.backend.encode(text, add_special_tokens=False)

    def sample_tokens(self, messages: list[dict]) -> int:
        return self.count(self.render(messages))


def chat_record(source: str, seed: int, index: int, user: str, answer: str, meta: dict) -> dict:
    return {"id": f"{source}-{seed}-{index:08d}", "source": source,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "meta": meta}


# --------------------------------------------------------------------------------------- run and publish
def histogram(values: list[float], lo: float, hi: float, bins: int = 10) -> dict:
    """{"edges": [...], "counts": [...]} over [lo, hi] (values outside fall in the end bins)."""
    hi = hi if hi > lo else lo + 1
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(np.asarray(values, np.float64), lo, hi), bins=edges)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def run_generator(cfg, generator_cls: type, ctor_kwargs: dict, n: int):
    """Batches {index, line, tokens, task, target_tokens, depth} from `generator_cls` over ray.data.range(n),
    in index order (an actor pool of synth.num_actors actors, data_cpus_per_task CPUs each)."""
    import ray.data  # deferred: heavy import, used only here

    ensure_ray(cfg)
    s = cfg.synth
    remote: dict[str, Any] = {"num_cpus": cfg.ray.data_cpus_per_task}
    if cfg.ray.data_resources:
        remote["resources"] = dict(cfg.ray.data_resources)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shards are written in index order
    try:
        blocks = max(1, min(math.ceil(n / s.batch_size), 4 * s.num_actors * 8))
        ds = ray.data.range(n, override_num_blocks=blocks)
        ds = ds.map_batches(generator_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=s.batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=s.num_actors), **remote)
        expected = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx = batch["index"]
            if len(idx) and int(idx[0]) != expected:
                raise RuntimeError(f"synthetic generator returned sample {int(idx[0])}, expected {expected}")
            expected += len(idx)
            yield batch
        if expected != n:
            raise RuntimeError(f"synthetic generator returned {expected} samples, expected {n}")
    finally:
        ctx.execution_options.preserve_order = old_order


def generate_sft_set(cfg, kind: str, generator_cls: type, ctor_kwargs: dict, n: int, dest: str,
                     params: dict, length_range: tuple[int, int], overwrite: bool = False,
                     extra_stats: Callable[[list[dict]], dict] | None = None) -> dict:
    """Generate n chat samples and publish them atomically at `dest` as `part-NNNNN.jsonl` + manifest.json.

    Returns the manifest plus `uri` and `timings` (seconds, samples/s, tokens/s; not in manifest.json, which
    stays deterministic)."""
    s = cfg.synth
    t0 = time.time()
    stats: list[dict] = []
    shards: list[dict] = []
    with storage.publish_dir(dest, overwrite=overwrite, kind=f"longctx.synthetic.{kind}") as staging:
        out, written = None, 0

        def close():
            nonlocal out
            if out is not None:
                out.close()
                path = out.name
                shards[-1].update(bytes=os.path.getsize(path), sha256=storage.sha256_file(path))
                out = None

        for batch in run_generator(cfg, generator_cls, ctor_kwargs, n):
            for line, tokens, task, target, depth in zip(batch["line"], batch["tokens"], batch["task"],
                                                         batch["target_tokens"], batch["depth"]):
                if out is None:
                    name = f"part-{len(shards):05d}.jsonl"
                    out = open(os.path.join(staging, name), "w", encoding="utf-8")
                    shards.append({"path": name, "samples": 0})
                out.write(str(line) + "\n")
                shards[-1]["samples"] += 1
                stats.append({"tokens": int(tokens), "task": str(task), "target": int(target), "depth": float(depth)})
                written += 1
                if shards[-1]["samples"] == s.samples_per_shard:
                    close()
        close()
        manifest = sft_manifest(cfg, kind, params, stats, shards, length_range)
        if extra_stats:
            manifest.update(extra_stats(stats))
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    secs = time.time() - t0
    total = manifest["totals"]["tokens"]
    return {**manifest, "uri": storage.normalize(dest),
            "timings": {"seconds": round(secs, 3), "samples_per_s": round(n / secs, 2),
                        "tokens_per_s": round(total / secs, 1)}}


def sft_manifest(cfg, kind: str, params: dict, stats: list[dict], shards: list[dict],
                 length_range: tuple[int, int]) -> dict:
    tokens = [r["tokens"] for r in stats]
    errors = [r["tokens"] - r["target"] for r in stats]
    by_task: dict[str, int] = {}
    for r in stats:
        by_task[r["task"]] = by_task.get(r["task"], 0) + 1
    lo, hi = length_range
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": f"longctx.synthetic.{kind}",
        "format": "chat-jsonl",
        "longctx_version": longctx.__version__,
        "tokenizer": cfg.data.tokenizer,
        "seed": cfg.synth.seed,
        "params": params,
        "totals": {"samples": len(stats), "tokens": int(sum(tokens)),
                   "min_tokens": int(min(tokens)) if tokens else 0, "max_tokens": int(max(tokens)) if tokens else 0,
                   "mean_tokens": round(float(np.mean(tokens)), 3) if tokens else 0.0,
                   "max_abs_length_error": int(max((abs(e) for e in errors), default=0))},
        "by_task": dict(sorted(by_task.items())),
        "length_histogram": histogram(tokens, lo, hi),
        "depth_histogram": histogram([r["depth"] for r in stats], 0.0, 1.0),
        "shards": shards,
    }


def load_chat_jsonl(uri: str) -> list[dict]:
    """Every record of a committed synthetic SFT set (tests, small sets)."""
    def read(root: str) -> list[dict]:
        manifest = json.loads(storage.read_text(storage.join(root, MANIFEST)))
        records = []
        for shard in manifest["shards"]:
            records.extend(json.loads(l) for l in storage.read_text(storage.join(root, shard["path"])).splitlines() if l)
        return records

    return storage.read_committed(uri, read)
