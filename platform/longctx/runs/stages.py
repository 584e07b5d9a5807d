"""A run's training stages: the job's one stage, or the `stages:` list of a multi-stage recipe, each followed by
the regression gate.

    staged = run_stages(run, cfg, LONG_PT.stage, title="Long-PT run ...")   # in longctx.runs.recipes.run_recipe
    staged.result.outcome.final_model_uri       # the last stage's model: the run's final model
    staged.rows                                 # one row per stage (metrics.json `stages`, the report's table)

A multi-stage recipe (ProLong: 64K with RoPE base 8e6, then 512K with 1.28e8) runs every stage in a sub-run
folder `<run>/stages/<name>/` (id `<run id>-<name>`) with the stage's config (`longctx.config.stage_config`): the
job's keys with the stage's data, model (RoPE) and train keys, and the previous stage's final model as model.path.
Each step resumes what the stage's folder holds, so running the same command again walks through the finished
stages (committed data and final models are reused, a recorded gate is judged again) and continues training
the stage that was cut short from its last checkpoint. The gate after a stage compares the stage's output with
its input at the run's base length; under `eval.gate.action: fail` a failed gate stops the run there
(`stop_at_gate`, exit code 5) and no later stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longctx import storage
from longctx.config import JobConfig, stage_config
from longctx.runs.folder import METRICS, RunContext, open_run
from longctx.runs.steps import gate_step, prepare_step, stop_at_gate, train_step
from longctx.train.trainer import TrainOutcome

STAGES_DIR = "stages"


@dataclass
class StageResult:
    data_uri: str
    manifest: dict
    outcome: TrainOutcome


@dataclass
class StagesOutcome:
    cfg: JobConfig
    """The last stage's config with the run's first model as model.path (evaluation: its baselines)."""
    result: StageResult
    """The last stage's data and training."""
    rows: list[dict] = field(default_factory=list)
    """One per stage of a multi-stage recipe (empty for a one-stage job)."""
    verdicts: list[dict] = field(default_factory=list)
    """The gate's verdict after each stage (empty when eval.gate is off)."""


def run_stage(run: RunContext, cfg: JobConfig, data: str) -> StageResult:
    """Prepare the stage's data (`pt` or `sft`) and train on it; each step resumes what `run`'s folder holds."""
    data_uri, manifest = prepare_step(run, cfg, data)
    return StageResult(data_uri, manifest, train_step(run, cfg, data_uri))


def stage_row(name: str, kind: str, cfg: JobConfig, outcome: TrainOutcome, verdict: dict | None,
              seconds: float | None) -> dict:
    return {"stage": name, "kind": kind, "seq_len": cfg.data.seq_len, "rope_theta": cfg.model.rope_theta,
            "steps": outcome.steps, "tokens": outcome.tokens, "final_loss": outcome.final_loss,
            "final_model": outcome.final_model_uri,
            "gate": None if verdict is None else ("passed" if verdict["passed"] else "FAILED"),
            "train_s": seconds}


def run_stages(run: RunContext, cfg: JobConfig, stage, *, title: str, metrics: dict) -> StagesOutcome:
    """The job's stage (`stage`: a `longctx.runs.recipes.Stage`) or every stage of `cfg.stages`, each followed by
    the gate; a failed gate under action `fail` stops here (`stop_at_gate` raises GateFailed)."""
    first = cfg.model.path
    if not cfg.stages:
        scfg = stage.config(cfg)
        result = run_stage(run, scfg, stage.data)
        verdict = gate_step(run, scfg, scfg.model.path, result.outcome.final_model_uri)
        verdicts = [verdict] if verdict else []
        if verdict and not verdict["passed"] and verdict["action"] == "fail":
            stop_at_gate(run, metrics, verdicts, [], title)
        return StagesOutcome(scfg, result, [], verdicts)
    model, rows, verdicts, result, scfg = first, [], [], None, cfg
    for i, sc in enumerate(cfg.stages):
        scfg = stage_config(cfg, i, model_path=model)
        sub = open_run(scfg, f"{run.kind}-{sc.name}", root=run.path(STAGES_DIR, sc.name),
                       run_id=f"{run.run_id}-{sc.name}", owned_by=run.root, hint=run.hint)
        try:
            print(f"[longctx] stage {i + 1}/{len(cfg.stages)} {sc.name}: {sc.kind}, seq_len {scfg.data.seq_len}, "
                  f"rope_theta {scfg.model.rope_theta or 'unchanged'}, from {model}", flush=True)
            run.attempt("stage", stage=sc.name, index=i)
            result = run_stage(sub, sub.cfg, sc.kind)
            final = result.outcome.final_model_uri
            verdict = gate_step(sub, sub.cfg, model, final, first_model=first, stage=sc.name)
            if verdict:
                verdicts.append(verdict)
            rows.append(stage_row(sc.name, sc.kind, scfg, result.outcome, verdict, sub.timings.get("train")))
            storage.write_json(sub.path(METRICS), {"stage": rows[-1], **({"gate": verdict} if verdict else {})})
        finally:
            sub.close()
        if verdict and not verdict["passed"] and verdict["action"] == "fail":
            stop_at_gate(run, {**metrics, "stages": rows}, verdicts, [("Stages", stages_section(rows))], title)
        model = final
    return StagesOutcome(stage_config(cfg, len(cfg.stages) - 1, model_path=first), result, rows, verdicts)


def stages_section(rows: list[dict]) -> str:
    """The report's table: one row per stage."""
    out = ["| stage | kind | seq_len | rope_theta | steps | tokens | final loss | gate | train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        secs = f"{r['train_s']:.0f}" if r["train_s"] is not None else "reused"
        out.append(f"| {r['stage']} | {r['kind']} | {r['seq_len']:,} | {r['rope_theta'] or 'unchanged'} | "
                   f"{r['steps']} | {r['tokens']:,} | {loss} | {r['gate'] or 'off'} | {secs} |")
    return "\n".join(out) + "\n\nEach stage starts from the previous stage's final model (the first from model.path)."
