"""Long-PT: prepare data (Ray Data) -> continual pretraining at a long context (Ray Train + DeepSpeed) ->
evaluation against training-free baselines -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/long_pt.py --config jobs/configs/index-1.9b-32k-pt.yaml
    python jobs/long_pt.py                      # laptop: the embedded default (shipped corpus, tiny model, CPU)
    python jobs/long_pt.py --set train.max_steps=10 --set data.seq_len=512

Without --config the embedded default recipe (longctx/assets/recipes/tiny-long-pt.yaml) runs. The last line
printed is the URI of the final Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import sys

from longctx import preflight
from longctx.config import EMBEDDED_DEFAULT, ConfigError, load_config
from longctx.workflow import run_long_pt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=EMBEDDED_DEFAULT, help="YAML job config (local, builtin: or s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=2e-5 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.require(cfg, "pt")  # every checkable mistake, before Ray starts
    except ConfigError as e:
        print(f"long_pt: {e}", file=sys.stderr)
        return 2
    run_long_pt(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
