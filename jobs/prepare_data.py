"""Prepare packed long-context training data: sources -> tokenize -> length mixture -> packed Parquet shards.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare_data.py --config jobs/configs/prepare-slimpajama.yaml --set data.output=s3://your-bucket/packed/sp-32k-1b/
    python jobs/prepare_data.py --set data.output=runs/demo-data --set data.long_threshold=512   # laptop: shipped sample corpus

A config file with only a `data:` section is enough. Sources come from the config or from
`--set data.sources.NAME=URI` (local folder, file, glob or s3:// prefix; .jsonl, .jsonl.gz, .jsonl.zst, .parquet).
`--stats` prints the per-source length table only (nothing written). The last line printed is the output URI.
"""

from __future__ import annotations

import argparse
import json
import sys

from longctx import preflight
from longctx.config import ConfigError, load_config
from longctx.data.pipeline import DataQualityError, length_stats, prepare_data
from longctx.workflow import connect_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (only `data:` is needed); default: built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.sources.web=s3://bucket/web/ (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print per-source length statistics only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing committed output")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.require(cfg, "prepare")  # every checkable mistake, before Ray starts
    except ConfigError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    connect_ray(cfg)
    if args.stats:
        stats = length_stats(cfg)
        print(json.dumps(stats["quarantine"]))
        return 0
    if not cfg.data.output:
        print("prepare_data: set data.output (a local folder or s3:// prefix) for the packed shards", file=sys.stderr)
        return 2
    try:
        manifest = prepare_data(cfg, overwrite=args.overwrite)
    except DataQualityError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"rows": manifest["rows"], "tokens": manifest["tokens"],
                      "pad_fraction": manifest["pad_fraction"], "quarantined": manifest["quarantine"]["by_reason"],
                      "timings": manifest["timings"]}))
    print(manifest["uri"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
