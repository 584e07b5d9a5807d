"""The jobs as data over the same steps: Long-PT, Long-SFT and evaluation are `Recipe` values that `run_recipe`
composes from `longctx.runs.steps`, not three copies of the composition.

    from longctx.runs.recipes import LONG_PT, run_recipe
    metrics = run_recipe(LONG_PT, load_config("jobs/configs/index-1.9b-32k-pt.yaml"))   # = run_long_pt(cfg)

A recipe names its run kind (the default run name's prefix), an optional training `Stage` (which data it
prepares, and config overrides), what is evaluated afterwards, and the report's title and sections. A config
with `stages:` (ProLong: 64K, then 512K with a new RoPE base) runs each stage in a sub-run folder
`<run>/stages/<name>/` whose `model.path` is the previous stage's final model, the regression gate after each
(`longctx.runs.stages`); `run_recipe` then evaluates and reports the last stage's model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from longctx import tracking
from longctx.config import JobConfig, config_from_dict, set_dotted
from longctx.eval.during_training import PLOT, checkpoint_eval_section
from longctx.eval.gate import gate_metrics
from longctx.runs.folder import open_run
from longctx.runs.stages import run_stages, stages_section
from longctx.runs.steps import already_finished, connect_ray, evaluate_step, finish, prepare_step, setup_logging
from longctx.train.trainer import TrainOutcome


@dataclass(frozen=True)
class Stage:
    """One training stage: the data it prepares ("pt": packed Long-PT rows, "sft": Long-SFT chats) and config
    overrides by dotted key (e.g. {"data.seq_len": 32768, "model.rope_theta": 3.2e5}) applied to the job's."""

    name: str
    data: Literal["pt", "sft"]
    overrides: dict = field(default_factory=dict)

    def config(self, cfg: JobConfig, model_path: str | None = None) -> JobConfig:
        """The job's config with this stage's overrides; `model_path`: start from another model (the previous
        stage's final model)."""
        if not self.overrides and model_path is None:
            return cfg
        tree = cfg.model_dump(mode="json")
        for key, value in {**self.overrides, **({"model.path": model_path} if model_path else {})}.items():
            set_dotted(tree, key.split("."), value, f"stage {self.name!r}: {key}")
        return config_from_dict(tree, f"stage {self.name!r}")


@dataclass(frozen=True)
class Recipe:
    kind: str
    """Run kind: the default run name is `<kind>-<fingerprint>`."""
    title: str
    """Report title (the run id follows)."""
    stage: Stage | None
    """The training stage (None: nothing is trained)."""
    evaluate: Literal["trained", "given"] | None
    """`trained`: the base model, its baselines and the trained model; `given`: `eval.model` beside the
    baselines; None: no evaluation."""
    data_section: bool = False
    """Report the data manifest (lengths, sources in and out)."""


LONG_PT = Recipe("long-pt", "Long-PT run", Stage("long-pt", "pt"), evaluate="trained", data_section=True)
LONG_SFT = Recipe("long-sft", "Long-SFT run", Stage("long-sft", "sft"), evaluate=None)
EVAL = Recipe("eval", "Long-context evaluation", None, evaluate="given")


def data_metrics(kind: str, uri: str, manifest: dict) -> dict:
    totals = manifest.get("totals", {})
    if kind == "sft":
        return {"uri": uri, **totals, "conversations": manifest.get("conversations"),
                "quarantined": manifest.get("quarantine", {}).get("records", 0)}
    return {"uri": uri, **{k: totals.get(k) for k in ("rows", "tokens", "pad_fraction", "long_share", "split_docs")},
            "quarantined": manifest.get("quarantine", {}).get("records", 0)}


def train_metrics(kind: str, outcome: TrainOutcome) -> dict:
    out = {"steps": outcome.steps, "tokens": outcome.tokens, "final_loss": outcome.final_loss,
           "final_model": outcome.final_model_uri, "metrics_log": outcome.metrics_log_uri}
    if kind == "sft":
        out["tokens_per_s"] = outcome.tokens_per_s
    return {**out, "layout": outcome.layout}


def run_recipe(recipe: Recipe, cfg: JobConfig) -> dict:
    """Open the run, run the recipe's stage, evaluate, report; a finished run says so. Returns the metrics."""
    from longctx.eval.runner import default_model_specs  # deferred: torch + transformers; a finished run needs none
    from longctx.report.sections import data_section, train_section  # deferred: matplotlib (seconds)

    setup_logging()
    run = open_run(cfg, recipe.kind)
    if run.finished:
        return already_finished(run)
    try:
        cfg = run.cfg
        tracking.check_available(cfg)  # a missing wandb / mlflow package fails here, before Ray is started
        connect_ray(cfg)
        metrics: dict = {"run_id": run.run_id}
        sections: list = []
        result = None
        title = f"{recipe.title} {run.run_id}"
        if recipe.stage is not None:
            staged = run_stages(run, cfg, recipe.stage, title=title, metrics=metrics)
            result, outcome = staged.result, staged.result.outcome
            kind = cfg.stages[-1].kind if cfg.stages else recipe.stage.data
            cfg = staged.cfg  # the last stage's settings (evaluation: its seq_len; baselines of the first model)
            metrics["data"] = data_metrics(kind, result.data_uri, result.manifest)
            metrics["train"] = train_metrics(kind, outcome)
            if staged.rows:
                metrics["stages"] = staged.rows
                sections.append(("Stages", stages_section(staged.rows)))
            if staged.verdicts:
                metrics["gate"] = gate_metrics(staged.verdicts)
            if kind == "sft":
                totals = result.manifest.get("totals", {})
                print(f"[longctx] SFT: {totals.get('rows')} rows, {totals.get('loss_tokens')} loss tokens, "
                      f"{outcome.steps} steps, final loss "
                      + (f"{outcome.final_loss:.4f}" if outcome.final_loss is not None else "-"), flush=True)
        if recipe.evaluate == "trained" and cfg.eval.enabled:
            specs = default_model_specs(cfg, cfg.model.path, result.outcome.final_model_uri)
            metrics["eval"] = evaluate_step(run, cfg, specs)
        elif recipe.evaluate == "given":
            trained = cfg.eval.model
            name = f"evaluated ({os.path.basename(str(trained).rstrip('/'))})" if trained else "evaluated"
            metrics["eval"] = evaluate_step(run, cfg, default_model_specs(cfg, cfg.model.path, trained,
                                                                          trained_name=name))
        if result is not None:
            outcome = result.outcome
            if "eval" in metrics:  # (checkpoint evaluations reached the trackers live: eval.during_training)
                tracking.log_evaluation(cfg, run.root, run.run_id, metrics["eval"], step=outcome.steps)
            if recipe.data_section:
                sections.append(("Data", data_section(result.manifest, run.root, result.data_uri)))
            rows = staged.rows  # a multi-stage run: the last stage started from the one before it
            sections.append(("Training", train_section(
                cfg, outcome, run.timings, run.root, stage=rows[-1]["stage"] if rows else None,
                from_model=rows[-2]["final_model"] if len(rows) > 1 else None)))
            if outcome.checkpoint_evals:  # eval.during_training: every checkpoint, evaluated while training ran
                sections.append(("Checkpoints evaluated during training",
                                 checkpoint_eval_section(outcome.checkpoint_evals, f"train/{PLOT}")))
        final = result.outcome.final_model_uri if result is not None else None
        return finish(run, metrics, sections, title=title, final_model=final)
    finally:
        run.close()


def run_prepare(cfg: JobConfig, *, replace: bool = False) -> tuple[str, dict]:
    """`longctx data prepare` / jobs/prepare_data.py: the prepare step alone, in a run of kind `prepare` (data at
    data.output, else `<run>/data`; committed data of the same settings is reused, `replace` prepares it again).
    Returns (uri, manifest)."""
    run = open_run(cfg, "prepare")
    try:
        connect_ray(run.cfg)
        return prepare_step(run, run.cfg, replace=replace)
    finally:
        run.close()


def prepare_summary(manifest: dict) -> dict:
    """The line `longctx data prepare` prints: rows, tokens, padding, quarantined records by reason (and the
    timings when the data was prepared now)."""
    totals = manifest.get("totals", {})
    out = {"rows": totals.get("rows"), "tokens": totals.get("tokens"), "pad_fraction": totals.get("pad_fraction"),
           "quarantined": manifest.get("quarantine", {}).get("by_reason", {})}
    return {**out, **({"timings": manifest["timings"]} if "timings" in manifest else {})}


def run_long_pt(cfg: JobConfig) -> dict:
    """Prepare data, run Long-PT, evaluate base vs baselines vs trained, write the report. Returns metrics."""
    return run_recipe(LONG_PT, cfg)


def run_long_sft(cfg: JobConfig) -> dict:
    """Long-SFT: chat data (packed, loss on answers) -> training from a Long-PT model. Returns metrics."""
    return run_recipe(LONG_SFT, cfg)


def run_eval(cfg: JobConfig) -> dict:
    """`longctx eval run` / jobs/eval_long.py: evaluate `eval.model` beside baselines of `model.path` (without it,
    only the base model and its training-free baselines). Writes `<output_dir>/<run>/eval/metrics.json`,
    `metrics.json`, `report.md` and PNGs; returns the metrics."""
    return run_recipe(EVAL, cfg)
