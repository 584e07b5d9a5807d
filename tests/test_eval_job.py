"""jobs/eval_long.py: the thin job parses its config and reports config errors with exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from longctx.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("eval_long", ROOT / "jobs" / "eval_long.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_job_rejects_bad_config(capsys):
    assert _job().main(["--set", "eval.needle.variants=[bogus]"]) == 2
    assert "eval.needle.variants" in capsys.readouterr().err


def test_eval_long_recipe_loads():
    cfg = load_config(ROOT / "jobs" / "configs" / "eval-long.yaml",
                      ["eval.longbench.enabled=true", "eval.longbench.data=s3://bucket/longbench/"])
    assert cfg.eval.needle.enabled and cfg.eval.baselines == ["naive", "pi", "dynamic_ntk", "yarn"]
    assert cfg.eval.longbench.data == "s3://bucket/longbench/" and cfg.eval.scaling_factor == 8.0
