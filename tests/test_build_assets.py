"""scripts/build_sample_assets.py: the shipped sample corpus is rebuilt from a fresh clone, and the build trains
with the library's packing and schedule (the pieces it carried its own copies of before)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_sample_assets.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_sample_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed(build) -> int:
    return json.loads(build.BUILD_INFO.read_text())["seed"]


def test_the_shipped_records_corpus_is_rebuilt_byte_for_byte_from_the_seed(build):
    seed = _seed(build)
    train, held = build.build_records(random.Random(f"{seed}/records"))
    assert build.jsonl_gz_bytes(train) == (build.CORPUS_DIR / "records.jsonl.gz").read_bytes()
    shipped_held = {r["id"]: r for r in build.read_jsonl_gz(build.CORPUS_DIR / f"{build.HELDOUT}.jsonl.gz")}
    assert len(held) == build.RECORDS_HELDOUT_DOCS and all(shipped_held[r["id"]] == r for r in held)
    other, _ = build.build_records(random.Random(f"{seed + 1}/records"))  # negative control: the seed matters
    assert build.jsonl_gz_bytes(other[: len(train)]) != build.jsonl_gz_bytes(train)


def test_training_windows_are_the_documents_joined_with_eos_and_cut_every_256_tokens(build):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build.TOKENIZER_DIR))
    docs = build.read_jsonl_gz(build.CORPUS_DIR / "records.jsonl.gz")[:60]
    windows, tokens = build.training_windows(tok, docs, seed=7)
    order = list(range(len(docs)))
    random.Random("7/pack").shuffle(order)  # the reference: one flat stream, doc + EOS after doc, in that order
    flat = [t for i in order for t in tok(docs[i]["text"])["input_ids"] + [tok.eos_token_id]]
    n = len(flat) // build.BASE_SEQ_LEN
    assert tokens == len(flat) and n > 10
    assert windows.dtype == torch.int64 and torch.equal(windows, torch.tensor(flat[: n * 256]).view(n, 256))


@pytest.mark.parametrize("steps,peak,warmup", [(800, 3e-3, 60), (600, 2e-3, 30), (79, 3e-3, 60), (10**9, 3e-3, 60)])
def test_the_build_schedule_is_the_closed_form_the_shipped_runs_used(build, steps, peak, warmup):
    """The library's schedule the build calls (`warmup_cosine_lr`, warmup in steps: any step count works, 79
    included, where a ratio would not round-trip) against the closed form the shipped weights were trained with
    (float64 values agree to the last bits; the float32 AdamW updates they give are identical)."""
    def closed_form(s: int, w: int) -> float:
        if s < w:
            return peak * (s + 1) / w
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, steps - w)))))

    for s in list(range(0, min(steps, 2000))) + [steps - 1]:
        got = build.warmup_cosine_lr(s, total_steps=steps, warmup_steps=warmup, peak=peak, min_lr_ratio=0.1)
        assert got == pytest.approx(closed_form(s, warmup), rel=1e-15, abs=0)
    assert closed_form(warmup - 2, warmup + 1) != pytest.approx(  # negative control: one step more warmup shows
        build.warmup_cosine_lr(warmup - 2, total_steps=steps, warmup_steps=warmup, peak=peak, min_lr_ratio=0.1),
        rel=1e-15, abs=0)
