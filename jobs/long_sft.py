"""Long-SFT: chat JSONL (long + general instruction sets) -> chat template, loss on assistant turns only, packed
with document attention -> Ray Train + DeepSpeed from a Long-PT output -> an HF model directory.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/long_sft.py --config jobs/configs/index-1.9b-32k-sft.yaml \
            --set model.path=s3://bucket/runs/<long-pt-run>/train/final_model
    python jobs/long_sft.py --set model.path=runs/<long-pt-run>/train/final_model \
        --set data.sources.chat=path/to/chats.jsonl --set data.seq_len=1024     # laptop

Sources are `data.sources` (JSONL with a `messages` list per line); `data.sft.mix` sets their shares; epochs are
`train.epochs` (Index: 2). The run folder holds config.yaml, data/ (packed shards + manifest.json), train/
(checkpoints, metrics.jsonl, final_model/) and metrics.json. The last line printed is the final model's URI.
"""

from __future__ import annotations

import argparse
import sys
import time

from longctx import preflight, storage
from longctx.config import ConfigError, load_config
from longctx.workflow import connect_ray, setup_logging, start_run


def run_long_sft(cfg) -> dict:
    from longctx.train.sft_data import prepare_sft_data
    from longctx.train.trainer import run_training

    setup_logging()
    run = start_run(cfg, "long-sft")
    connect_ray(cfg)
    with run.phase("sft data"):
        data_uri = cfg.data.output or run.path("data")
        manifest = prepare_sft_data(cfg, data_uri)
    with run.phase("train"):
        outcome = run_training(cfg, data_uri, run.root)
    metrics = {
        "run_id": run.run_id,
        "data": {"uri": data_uri, **manifest["totals"], "conversations": manifest["conversations"],
                 "quarantined": manifest["quarantine"]["records"]},
        "train": {"steps": outcome.steps, "tokens": outcome.tokens, "final_loss": outcome.final_loss,
                  "final_model": outcome.final_model_uri, "metrics_log": outcome.metrics_log_uri,
                  "tokens_per_s": outcome.tokens_per_s, "layout": outcome.layout},
        "timings_s": dict(run.timings, total=round(time.time() - run.started, 2)),
    }
    storage.write_json(run.path("metrics.json"), metrics)
    print(f"[longctx] SFT: {manifest['totals']['rows']} rows, {manifest['totals']['loss_tokens']} loss tokens, "
          f"{outcome.steps} steps, final loss {outcome.final_loss}", flush=True)
    print(outcome.final_model_uri, flush=True)  # last line: the final model
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML job config (e.g. jobs/configs/index-1.9b-32k-sft.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=5e-6 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.require(cfg, "sft")  # every checkable mistake, before Ray starts
    except ConfigError as e:
        print(f"long_sft: {e}", file=sys.stderr)
        return 2
    run_long_sft(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
