"""jobs/eval_long.py: the thin job parses its config, reports config errors with exit code 2, and runs RULER end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
    assert cfg.eval.ruler.enabled and cfg.eval.ruler.lengths == [4096, 8192, 16384, 32768]


@pytest.mark.slow
@pytest.mark.ray
def test_eval_run_with_ruler_on_the_shipped_base(ray_cluster, tmp_path):
    """`eval run` end to end with RULER on: samples built with the model's tokenizer, answered through the
    actor pool, scored, written as RULER's prediction files and tabled in the report."""
    code = _job().main([
        "--set", f"output_dir={tmp_path}", "--set", "run_name=ruler", "--set", "eval.baselines=[naive]",
        "--set", "eval.perplexity=false", "--set", "eval.passkey.enabled=false", "--set", "eval.num_actors=1",
        "--set", "eval.ruler.enabled=true", "--set", "eval.ruler.lengths=[256]",
        "--set", "eval.ruler.tasks=[niah_single_1]", "--set", "eval.ruler.num_samples=20",
        "--set", "eval.ruler.tokens_to_generate={niah: 16}"])
    assert code == 0
    (metrics_file,) = tmp_path.glob("**/eval/metrics.json")
    ru = json.loads(metrics_file.read_text())["models"]["base (naive)"]["ruler"]
    assert ru["samples"] == {"256": {"niah_single_1": 20}} and ru["settings"]["tokens_to_generate"] == {"niah_single_1": 16}
    # the shipped base retrieves RULER's needle at its own length (chance for a 7-digit number is ~0; measured 20.0)
    assert ru["scores"]["256"]["niah_single_1"] >= 10.0
    preds = list(tmp_path.glob("**/eval/ruler/base-naive/256/niah_single_1.jsonl"))
    assert len(preds) == 1 and len(preds[0].read_text().splitlines()) == 20
    (report,) = tmp_path.glob("**/report.md")
    assert "### RULER" in report.read_text() and "| base (naive) |" in report.read_text()
