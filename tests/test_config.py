"""Job config: YAML + --set overrides, clear errors for unknown keys and bad values, every shipped YAML valid,
and the exported JSON Schema in sync with the code."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from longctx.config import EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT, ConfigError, JobConfig, job_config_schema, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_apply_with_types():
    cfg = load_config(None, ["train.lr=3e-4", "data.seq_len=2048", "train.adam_betas=[0.9, 0.99]",
                             "model.rope_scaling={type: yarn, factor: 4}", "eval.baselines=[naive, yarn]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.seq_len == 2048
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.model.rope_scaling.type == "yarn" and cfg.model.rope_scaling.factor == 4
    assert cfg.eval.baselines == ["naive", "yarn"]


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  seq_len: 4096\n  sources:\n    web: s3://bucket/web/\ntrain:\n  lr: 1.0e-5\n")
    cfg = load_config(p, ["train.lr=2e-5", "data.sources.books=/data/books/*.jsonl.gz"])
    assert cfg.data.seq_len == 4096
    assert cfg.train.lr == pytest.approx(2e-5)
    assert set(cfg.data.sources) == {"web", "books"}
    # a nested field on a source given as a plain URI keeps its URI
    cfg = load_config(p, ["data.sources.web.source_field=meta.redpajama_set_name"])
    spec = cfg.data.source_specs()["web"]
    assert spec.uri == "s3://bucket/web/" and spec.source_field == "meta.redpajama_set_name"


def test_data_only_config_is_valid(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("data:\n  sources: {web: /tmp/web}\n  token_budget: 1000000\n")
    assert load_config(p).data.token_budget == 1_000_000


@pytest.mark.parametrize(
    "override, must_say",
    [
        ("train.lrr=1", ["train.lrr", "unknown key", "lr", "min_lr_ratio"]),
        ("data.strategy=fu", ["data.strategy", "'per-source'", "'cut-4k'", "'fu'"]),
        ("data.attention=sliding", ["data.attention", "'document'", "'full'"]),
        ("train.zero_stage=4", ["train.zero_stage"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("data.long_share=1.5", ["data.long_share", "less than or equal to 1"]),
        ("model.rope_scaling={type: ntk, factor: 2}", ["model.rope_scaling.type", "'dynamic'", "'yarn'"]),
        ("bogus.key=1", ["bogus", "allowed"]),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_allowed(override, must_say):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    for part in must_say:
        assert part in msg, f"{part!r} missing from: {msg}"


@pytest.mark.parametrize(
    "override, hint",
    [
        ("train.lrr=1", "did you mean 'lr'?"),
        ("tarin.lr=1", "did you mean 'train'?"),
        ("data.sources.web.text_feild=content", "did you mean 'text_field'?"),
        ("data.strategy=per_source", "did you mean 'per-source'?"),
        ("model.rope_scaling={type: dynamc, factor: 2}", "did you mean 'dynamic'?"),
    ],
)
def test_unknown_keys_and_values_get_a_did_you_mean(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert hint in str(err.value)


def test_no_did_you_mean_when_nothing_is_close():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.attention=sliding"])
    assert "did you mean" not in str(err.value)


def test_inconsistent_parallel_layout_says_the_numbers():
    with pytest.raises(ConfigError, match=r"num_workers=3 .*sequence_parallel=2"):
        load_config(None, ["train.num_workers=3", "train.sequence_parallel=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.lr"])


SHIPPED = sorted(glob.glob(str(ROOT / "jobs" / "configs" / "*.yaml"))) + [EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def test_schema_file_matches_code():
    on_disk = json.loads((ROOT / "schemas" / "job_config.schema.json").read_text())
    assert on_disk == job_config_schema(), (
        "schemas/job_config.schema.json is stale: run "
        "`longctx config schema --output schemas/job_config.schema.json`"
    )


def test_schema_rejects_what_the_code_rejects():
    import jsonschema
    schema = job_config_schema()
    jsonschema.validate({"train": {"lr": 1e-5}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"lrr": 1e-5}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"data": {"strategy": "fu"}}, schema)
