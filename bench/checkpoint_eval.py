"""Training throughput with and without `eval.during_training` (evaluation of every checkpoint beside training).

    python bench/checkpoint_eval.py                       # tiny model, 2 CPU workers + 1 evaluation CPU, 3 pairs
    python bench/checkpoint_eval.py --steps 24 --pairs 2 --num-cpus 4
    python bench/checkpoint_eval.py --workers 1 --num-cpus 2  # a 2-core machine: one core each

Runs the same small training (checkpoint every step, so the evaluator always has work) with the evaluation off
and on, alternating the order in each pair (A B, B A, ...) so slow drift of a shared machine's load hits both
variants alike. Throughput is the median per-step training time (`step_time_s` of train/metrics.jsonl: forward,
backward and optimizer; checkpoint saving excluded, because it is the same work in both variants) and the
wall-clock time of the whole training call. Prints one JSON line per run, then the ratio on/off of the medians
and the machine's load average before and after (the target: on/off steps/s >= 0.9 when the evaluation has CPUs
of its own; on a machine with fewer cores than workers + evaluator, expect contention, not waiting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def run_once(model_dir: str, data_uri: str, work: str, steps: int, with_eval: bool, workers: int = 2) -> dict:
    from longctx.config import load_config
    from longctx.eval.during_training import start_watcher
    from longctx.train.trainer import run_training

    overrides = [f"model.path={model_dir}", "data.seq_len=128", "train.global_batch_tokens=512",
                 f"train.num_workers={workers}",
                 f"train.max_steps={steps}", "train.lr=1e-3", "train.checkpoint_every=1",
                 f"eval.during_training.enabled={str(with_eval).lower()}", "eval.during_training.poll_s=0.5",
                 "eval.during_training.num_documents=8", "eval.during_training.passkey_lengths=[256,512]",
                 "eval.bucket_edges=[0,64]"]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    train_root = os.path.join(tempfile.mkdtemp(dir=work), "train")
    watcher = start_watcher(cfg, train_root, run_id="bench")  # as the train step does (longctx.runs.steps)
    out = run_training(cfg, data_uri, train_root, run_id="bench", watcher=watcher)
    wall = time.perf_counter() - t0
    step_times = [h["step_time_s"] for h in out.history[1:]]
    return {"eval": with_eval, "steps": len(out.history), "median_step_s": statistics.median(step_times),
            "steps_per_s": 1.0 / statistics.median(step_times), "wall_s": round(wall, 2),
            "evaluated": len(out.checkpoint_evals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=3, help="Ray CPUs: 2 training workers + 1 evaluator")
    ap.add_argument("--workers", type=int, default=2, help="training workers (1 on a 2-core machine gives the "
                    "evaluator a core of its own)")
    args = ap.parse_args()

    import ray
    from transformers import AutoConfig

    from train_helpers import make_tiny_model, packed_rows, write_packed_shards

    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-ckpt-eval-")
    model_dir = make_tiny_model(os.path.join(work, "model"), hidden=64, max_pos=64)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    data_uri = write_packed_shards(os.path.join(work, "data"), packed_rows(4 * args.steps, 128, vocab, seed=1))
    runs = []
    for i in range(args.pairs):
        for with_eval in ((False, True) if i % 2 == 0 else (True, False)):
            r = run_once(model_dir, data_uri, work, args.steps, with_eval, args.workers)
            print(json.dumps(r), flush=True)
            runs.append(r)
    med = {v: statistics.median(r["steps_per_s"] for r in runs if r["eval"] == v) for v in (False, True)}
    wall = {v: statistics.median(r["wall_s"] for r in runs if r["eval"] == v) for v in (False, True)}
    print(json.dumps({"steps_per_s_off": med[False], "steps_per_s_on": med[True],
                      "ratio_steps_per_s_on_off": med[True] / med[False], "wall_s_off": wall[False],
                      "wall_s_on": wall[True], "cpu_count": os.cpu_count(), "ray_cpus": args.num_cpus,
                      "training_workers": args.workers,
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
