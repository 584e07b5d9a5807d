"""bench/train_mfu.py runs (CPU smoke run of the GPU benchmark: real model, DeepSpeed engine, packed documents)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_mfu_benchmark_runs_on_cpu():
    cmd = [sys.executable, str(ROOT / "bench" / "train_mfu.py"), "--preset", "tiny", "--seq-lens", "64,128",
           "--steps", "1", "--docs-per-row", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["seq_len"] for r in rows] == [64, 128]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["attn"] == "sdpa" and r["mfu"] is None
    assert "| tiny | 128 | sdpa |" in proc.stdout
