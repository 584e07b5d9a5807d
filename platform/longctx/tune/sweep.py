"""Ray Tune sweeps: every trial is the real prepare -> Long-PT -> evaluate chain.

    from longctx.config import load_config
    from longctx.tune.sweep import run_sweep
    summary = run_sweep(load_config("jobs/configs/sweep-rope-budget.yaml"))

Layout under `<output_dir>/<tune.name>/` (local or s3://):

    config.yaml          the sweep's resolved config
    data/<hash>/         packed data, one folder per distinct data config (hash of the `data` section), shared
                         by every trial with those data settings and prepared once
    baselines/           the base model's training-free baselines (naive, dynamic NTK, ...), evaluated once
    trials/<key>/        one Long-PT run per trial: config.yaml, train/, eval/, metrics.json, attempts.jsonl.
                         <key> is a hash of the trial's parameter values: a re-run of a finished trial (after a
                         crash that lost Tune's own state) returns its committed metrics without training again
    tune/                Ray Tune's experiment state (what `Tuner.restore` resumes from)
    results/             published atomically at the end: trials.csv, trials.parquet, report.md, heatmap.png,
                         ppl_vs_length.png, objective_vs_rope_base.png, best_config.yaml

Ray 2.60 runs Ray Train V2, so the trial is a driver function that builds the `TorchTrainer` and forwards the
workers' reports to Tune with `TuneReportCallback` (validation loss while training: ASHA reads it), then runs the
evaluation and reports the objective once more at the end.
"""

from __future__ import annotations

import json
import time

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from longctx import storage
from longctx.config import JobConfig, slug
from longctx.eval.runner import ModelSpec, default_model_specs
from longctx.runs.folder import CONFIG, DATA_DIR, METRICS, RunContext, open_run, resolve_outputs
from longctx.runs.steps import connect_ray, evaluate_step, finish, prepare_step, setup_logging, train_step
from longctx.tune.report import write_results
from longctx.tune.space import (
    base_tree,
    data_key,
    param_space,
    trial_config,
    trial_key,
    trial_metrics,
    validate_space,
)


# -------------------------------------------------------------------------------------------------- trial
TRIAL_HINT = "The sweep's own check should have caught this: resume it with its settings, or choose a new tune.name."


def data_uri(cfg: JobConfig, root: str) -> str:
    """Where the trials with `cfg`'s data settings find their packed data (shared, prepared once)."""
    return storage.join(root, DATA_DIR, data_key(cfg))


def run_trial(params: dict, sweep: dict) -> dict:
    """The Tune trainable (a Ray Train driver function): a sub-run of the sweep through the run steps, data
    (shared by the trials with the same data settings) -> Long-PT -> evaluation.

    `params`: the trial's values by dotted config path (from Tune). `sweep`: {"base": config dict,
    "root": sweep folder, "objective": name}. Returns the trial's flat metrics (also reported to Tune).
    """
    setup_logging()
    params = dict(params)
    key = trial_key(params)
    root = sweep["root"]
    cfg = trial_config(sweep["base"], params, origin=f"trial {key}")
    tune_trial = tune.get_context().get_trial_id()
    run = open_run(cfg, "trial", root=storage.join(root, "trials", key), run_id=key, owned_by=root, hint=TRIAL_HINT,
                   note={"tune_trial": tune_trial, "params": params})
    if run.finished:  # finished before, but Tune's state did not record it (e.g. a killed driver)
        metrics = json.loads(storage.read_text(run.path(METRICS)))
        run.attempt("reused", tune_trial=tune_trial)
        print(f"[sweep] trial {key}: already finished, reusing {run.path(METRICS)}", flush=True)
        tune.report(metrics)
        return metrics
    cfg = run.cfg
    t0 = time.time()
    uri, _ = prepare_step(run, cfg, uri=data_uri(cfg, root))
    t_data = time.time() - t0
    # the same steps as a Long-PT run: a retried trial continues from its last checkpoint, and its evaluation is
    # reused when it finished before
    outcome = train_step(run, cfg, uri, callbacks=[TuneReportCallback()])
    t_train = time.time() - t0 - t_data
    ev = evaluate_step(run, cfg, {"Long-PT": ModelSpec(outcome.final_model_uri, role="trained")})
    metrics = trial_metrics(ev, outcome.history, sweep["objective"], outcome.checkpoint_evals)
    metrics.update(trial_key=key, params=json.dumps(params, sort_keys=True), final_model=outcome.final_model_uri,
                   data=uri, trial_dir=run.root, tokens_per_s=outcome.tokens_per_s,
                   time_data_s=round(t_data, 2), time_train_s=round(t_train, 2),
                   time_total_s=round(time.time() - t0, 2))
    # last: the trial counts as finished once its metrics.json and `finished` record exist
    finish(run, metrics, tune_trial=tune_trial, objective=metrics["objective"])
    tune.report(metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- the sweep
def sweep_root(cfg: JobConfig) -> str:
    return storage.join(cfg.output_dir, slug(cfg.tune.name or cfg.run_name or "sweep"))


def open_sweep(cfg: JobConfig) -> RunContext:
    """The sweep's own run folder `<output_dir>/<tune.name>/` (its config, attempts and lease: one driver per
    sweep), refused when it exists with settings its trials would compute something else with: `Tuner.restore`
    keeps the stored search space, so a changed grid would be silently ignored, and changed settings would reach
    the unfinished trials only. Where and how fast it runs may change (`longctx.runs.identity.NOT_RESULT_KEYS`)."""
    root = sweep_root(resolve_outputs(cfg))
    hint = (f"Choose a new tune.name for a new sweep, or restore the settings of {storage.join(root, CONFIG)} to "
            f"resume it.")
    return open_run(cfg, "sweep", root=root, run_id=root.rstrip("/").rsplit("/", 1)[-1], ignore=(), hint=hint)


def run_sweep(cfg: JobConfig, *, fresh: bool = False) -> dict:
    """Run (or resume) the sweep of `cfg.tune` and write its results; returns a summary.

    Resuming: when `<sweep>/tune` holds a Tune experiment with the same name, `Tuner.restore` continues it
    (finished trials are kept, unfinished and errored ones run again). `fresh=True` refuses an existing sweep.
    Returns {"root", "results", "trials", "complete", "best"}.
    """
    setup_logging()
    points = validate_space(cfg)
    exp_dir = storage.join(sweep_root(resolve_outputs(cfg)), "tune")
    if fresh and storage.exists(exp_dir):
        raise FileExistsError(f"{exp_dir}: a sweep of this name exists; choose another tune.name or resume it")
    run = open_sweep(cfg)
    try:
        return _run_sweep(run, points, fresh)
    finally:
        run.close()


def _run_sweep(run: RunContext, points: list[dict], fresh: bool) -> dict:
    cfg, root, tcfg = run.cfg, run.root, run.cfg.tune
    exp_dir = storage.join(root, "tune")
    connect_ray(cfg)
    n_trials = max(1, len(points)) * tcfg.num_samples
    print(f"[sweep] {root}: {n_trials} trials over {sorted(tcfg.space())}, objective {tcfg.objective}", flush=True)

    base = base_tree(cfg)
    # Data once per distinct data config of the grid (the random axes' data configs are prepared by their trials).
    t0 = time.time()
    keys_done: set[str] = set()
    for p in points or [{}]:
        c = trial_config(base, p)
        if (key := data_key(c)) not in keys_done:
            prepare_step(run, c, uri=data_uri(c, root))
            keys_done.add(key)
    t_data = time.time() - t0
    baselines = None
    if tcfg.baselines and cfg.eval.baselines:  # the base model's training-free baselines, once
        baselines = evaluate_step(run, cfg, default_model_specs(cfg, cfg.model.path),
                                  out=storage.join(root, "baselines"))

    trainable = tune.with_resources(
        tune.with_parameters(_tune_entry, sweep={"base": base, "root": root, "objective": tcfg.objective}),
        dict(tcfg.trial_resources))
    fs, exp_path = storage.pyarrow_fs(exp_dir)
    storage_path, name = exp_path.rstrip("/").rsplit("/", 1)
    if not fresh and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        storage.require_private(exp_dir, "resume a sweep from it (Tune unpickles its tuner.pkl)")
        print(f"[sweep] resuming {exp_dir} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = None
        if tcfg.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler  # deferred: heavy import, used only here

            # Rungs in optimizer steps: the validation reports carry `step`, the final (evaluation) report does
            # not, so ASHA never acts on it; stop_last_trials=False lets a trial past max_t finish its evaluation.
            scheduler = ASHAScheduler(metric="val_loss", mode="min", time_attr="step",
                                      grace_period=tcfg.asha.grace_period, reduction_factor=tcfg.asha.reduction_factor,
                                      max_t=tcfg.asha.max_t, stop_last_trials=False)
        search_alg = None
        if any(v.grid is None for v in tcfg.space().values()):
            from ray.tune.search.basic_variant import BasicVariantGenerator  # deferred: heavy import, used only here

            search_alg = BasicVariantGenerator(random_state=tcfg.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(tcfg.space()),
            tune_config=tune.TuneConfig(num_samples=tcfg.num_samples, max_concurrent_trials=tcfg.max_concurrent_trials,
                                        scheduler=scheduler, search_alg=search_alg,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
                                      verbose=1),
        )
    t1 = time.time()
    grid = tuner.fit()
    t_tune = time.time() - t1
    rows = []
    # NOTE: ResultGrid has no public per-trial status; its experiment analysis holds the Trial objects, in order.
    for trial, r in zip(grid._experiment_analysis.trials, grid):
        m = dict(r.metrics or {})
        if trial.status == "TERMINATED":
            status = "done" if "objective" in m else "stopped"  # stopped: ASHA ended it early
        else:
            status = "error" if trial.status == "ERROR" else "unfinished"
        rows.append({"params": dict(r.config or {}), "metrics": m, "status": status,
                     "error": None if r.error is None else str(r.error).strip().splitlines()[-1][:300],
                     "tune_dir": r.path})
    complete = all(row["status"] in ("done", "stopped", "error") for row in rows) and len(rows) >= n_trials
    summary = {"root": root, "trials": len(rows), "complete": complete,
               "timings_s": {"data": round(t_data, 2), "tune": round(t_tune, 2)}}
    if not complete:
        missing = sum(row["status"] == "unfinished" for row in rows) + max(0, n_trials - len(rows))
        print(f"[sweep] interrupted: {missing} of {n_trials} trials unfinished. Run the same command again to "
              f"resume {exp_dir}; results are written when every trial has finished.", flush=True)
        return summary
    results = write_results(cfg, root, rows, baselines)
    summary.update(results=results["uri"], best=results["best"])
    print(f"[sweep] results: {results['uri']}", flush=True)
    if results["best"]:
        print(f"[sweep] best trial {results['best']['trial_key']}: {tcfg.objective}={results['best']['objective']:.4f} "
              f"-> {results['best_config']}", flush=True)
    return summary


def _tune_entry(config: dict, sweep: dict) -> None:
    """Tune calls this (a module-level function, so trials pickle it by reference)."""
    run_trial(config, sweep)
