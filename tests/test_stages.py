"""Multi-stage recipes (`stages:`): each stage's config, the preflight of every stage before Ray, the shipped
ProLong recipe's memory plan per stage. The laptop two-stage recipe run end to end, killed in stage 2 and resumed
there, is tests/test_long_pt_job.py (the main job's end-to-end test runs that recipe)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longctx import storage
from longctx.config import ConfigError, load_config, stage_config
from longctx.preflight import check_job

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGE = str(ROOT / "jobs" / "configs" / "tiny-two-stage.yaml")
PROLONG = str(ROOT / "jobs" / "configs" / "prolong-8b-512k.yaml")


def test_stage_config_applies_the_stage_keys_over_the_jobs():
    cfg = load_config(TWO_STAGE)
    first, second = stage_config(cfg, 0), stage_config(cfg, 1, model_path="/runs/x/stages/ctx512/train/final_model")
    assert (first.data.seq_len, first.model.rope_theta, first.model.path) == (512, 40000.0, "builtin:tiny-llama")
    assert (second.data.seq_len, second.model.rope_theta, second.model.max_position_embeddings) == (1024, 80000.0, 1024)
    assert second.model.path == "/runs/x/stages/ctx512/train/final_model" and second.stages == []
    assert second.train.lr == cfg.train.lr and second.eval.gate == cfg.eval.gate  # the rest: the job's


@pytest.mark.parametrize("stages, says", [
    ("[{name: a, data: {seq_lenn: 512}}]", "stages[0] (a)"),
    ("[{name: a, model: {path: x}}]", "stages.0.model.path: unknown key"),
    ("[{name: a}, {name: a}]", "names must differ"),
    ("[{name: a}, {name: b, train: {lr: -1}}]", "stages[1] (b)"),
    ("[{name: 'a b'}]", "stages.0.name"),
])
def test_a_bad_stage_is_named(stages, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, [f"stages={stages}"])


def test_preflight_checks_every_stage_and_names_it(tmp_path):
    ok = load_config(TWO_STAGE)
    assert check_job(ok, "pt") == []
    bad = load_config(TWO_STAGE, [f"stages=[{{name: s1}}, {{name: s2, data: {{sources: {{web: {tmp_path}/none/}}}}}}]"])
    problems = [p.line() for p in check_job(bad, "pt")]
    assert problems and all(p.startswith("stages[1] (s2) data.sources.web") for p in problems), problems


def test_prolong_recipe_fits_h100_in_every_stage(capsys):
    """`longctx plan` plans every stage of the shipped ProLong recipe on Llama-3-8B's shape (the preflight's memory
    check per stage); the 512K stage without its sequence parallelism does not fit (negative control)."""
    from longctx.cli import main
    from longctx.plan.planner import Planner

    cfg = load_config(PROLONG, ["model.path=builtin:model-shapes/llama-3.1-8b"])
    shape = json.loads(storage.read_text("builtin:model-shapes/llama-3.1-8b/config.json"))
    assert [s.name for s in cfg.stages] == ["64k", "512k"] and cfg.train.gpu_type == "h100"
    assert main(["plan", "--json", "--config", PROLONG, "--set", "model.path=builtin:model-shapes/llama-3.1-8b"]) == 0
    out = capsys.readouterr()
    plans = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [p["fits"] for p in plans] == [True, True]
    assert "stage 1/2 64k:" in out.err and "stage 2/2 512k:" in out.err
    assert stage_config(cfg, 1).model.rope_theta == 1.28e8 and stage_config(cfg, 0).model.rope_theta == 8e6
    no_sp = load_config(PROLONG, ["model.path=builtin:model-shapes/llama-3.1-8b",
                                  "stages=" + json.dumps([cfg.stages[0].model_dump(exclude_unset=True),
                                                          {**cfg.stages[1].model_dump(exclude_unset=True),
                                                           "train": {"global_batch_tokens": 8388608}}])])
    assert Planner(stage_config(no_sp, 1), model_config=shape).plan().fits is False
