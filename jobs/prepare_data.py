"""Prepare packed long-context training data: sources -> tokenize -> length mixture -> packed Parquet shards.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare_data.py --config jobs/configs/prepare-slimpajama.yaml --set data.output=s3://your-bucket/packed/sp-32k-1b/
    python jobs/prepare_data.py --set data.output=runs/demo-data --set data.long_threshold=512   # laptop: shipped sample corpus

A config file with only a `data:` section is enough. Sources come from the config or from
`--set data.sources.NAME=URI` (local folder, file, glob or s3:// prefix; .jsonl, .jsonl.gz, .jsonl.zst, .parquet).
`--stats` prints the per-source length table only (nothing written). The last line printed is the output URI.
"""

from __future__ import annotations

import json
import sys

from longctx.jobargs import run_job


def _prepare(cfg, args) -> int:
    from longctx.data.pipeline import length_stats, prepare_data
    from longctx.workflow import connect_ray, resolve_output

    if not args.stats and not cfg.data.output:
        print("prepare_data: set data.output (a local folder or s3:// prefix) for the packed shards", file=sys.stderr)
        return 2
    connect_ray(cfg)
    if args.stats:
        stats = length_stats(cfg)
        print(json.dumps(stats["quarantine"]))
        return 0
    manifest = prepare_data(cfg, resolve_output(cfg.data.output), overwrite=args.overwrite)
    print(json.dumps({"rows": manifest["rows"], "tokens": manifest["tokens"],
                      "pad_fraction": manifest["pad_fraction"], "quarantined": manifest["quarantine"]["by_reason"],
                      "timings": manifest["timings"]}))
    print(manifest["uri"])
    return 0


def _args(p) -> None:
    p.add_argument("--stats", action="store_true", help="print per-source length statistics only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing committed output")


def main(argv: list[str] | None = None) -> int:
    return run_job("prepare_data", __doc__, _prepare, argv, default_config=None, kind="prepare",
                   example="data.sources.web=s3://bucket/web/", add_args=_args)

if __name__ == "__main__":
    sys.exit(main())
