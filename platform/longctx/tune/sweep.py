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

import copy
import hashlib
import itertools
import json
import math
import time
from typing import Any

from longctx import storage
from longctx.config import JobConfig, SweepParam, config_from_dict, dump_config, load_config, set_dotted, slug

TRIAL_METRICS = "metrics.json"


# ------------------------------------------------------------------------------------------------ configs
def base_tree(cfg: JobConfig) -> dict:
    """The sweep's config as a plain dict without the `tune` section: what every trial starts from."""
    tree = json.loads(cfg.model_dump_json())
    tree.pop("tune", None)
    return tree


def trial_config(base: dict, params: dict[str, Any], origin: str = "trial") -> JobConfig:
    """The job config of one trial: the sweep's config with the trial's parameter values set by dotted path."""
    tree = copy.deepcopy(base)
    for k, v in params.items():
        set_dotted(tree, k.split("."), v, f"sweep parameter {k!r}")
    return config_from_dict(tree, origin)


def data_key(cfg: JobConfig) -> str:
    """Hash of everything that shapes the packed data (the `data` section minus where it is written)."""
    d = json.loads(cfg.data.model_dump_json())
    d.pop("output", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def trial_key(params: dict[str, Any]) -> str:
    """Folder name of a trial: readable parameter values plus a hash of all of them."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = []
    for k, v in sorted(params.items()):
        short = k.split(".")[-1]
        parts.append(f"{short}={compact_number(v)}")
    return slug("_".join(parts))[:80] + f"-{h}"


def compact_number(v: Any, spec: str = "g") -> str:
    """Floats as 1e6, not 1e+06 (a '+' would become '-' in a slug and read as a negative exponent); the rest as str."""
    if isinstance(v, float):
        return format(v, spec).replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return str(v)


def grid_points(space: dict[str, SweepParam]) -> list[dict[str, Any]]:
    """Every combination of the grid axes (the random axes are not enumerable)."""
    grid = {k: v.grid for k, v in space.items() if v.grid is not None}
    keys = sorted(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def param_space(space: dict[str, SweepParam]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for k, v in space.items():
        if v.grid is not None:
            out[k] = tune.grid_search(list(v.grid))
        elif v.choice is not None:
            out[k] = tune.choice(list(v.choice))
        elif v.loguniform is not None:
            out[k] = tune.loguniform(*v.loguniform)
        else:
            out[k] = tune.uniform(*v.uniform)
    return out


def validate_space(cfg: JobConfig) -> list[dict[str, Any]]:
    """Check every grid point (with each random axis at both ends) gives a valid config; returns the grid."""
    space = cfg.tune.space()
    if not space:
        raise ValueError("tune.params is empty: give at least one axis (e.g. rope_theta: [1.0e4, 1.0e5, 1.0e6])")
    if cfg.tune.num_samples > 1 and all(v.grid is not None for v in space.values()):
        raise ValueError("tune.num_samples > 1 with only grid axes repeats identical trials; sweep train.seed "
                         "instead (e.g. params: {train.seed: [0, 1, 2]})")
    base = base_tree(cfg)
    points = grid_points(space)
    ends = [{k: (v.loguniform or v.uniform or [v.choice[0], v.choice[-1]])[i] for k, v in space.items()
             if v.grid is None} for i in (0, 1)]
    for p in points:
        for e in ends:
            trial_config(base, {**p, **e}, origin=f"sweep trial {json.dumps({**p, **e}, default=str)}")
    return points


# ------------------------------------------------------------------------------------------------ metrics
def trial_metrics(eval_metrics: dict, history: list[dict], objective: str,
                  checkpoint_evals: list[dict] | None = None) -> dict[str, Any]:
    """Flat metrics of one trial from its evaluation and training log (what Tune and the table get);
    `checkpoint_evals`: eval.during_training's per-checkpoint records (best values over the run)."""
    entry = next(iter(eval_metrics.get("models", {}).values()), {})
    ppl = entry.get("perplexity") or {}
    out: dict[str, Any] = {
        "nll_beyond_base": ppl.get("nll_beyond_base"),
        "nll_within_base": ppl.get("nll_within_base"),
        "overall_nll": ppl.get("overall_nll"),
        "bucket_edges": json.dumps([hi for _, hi in ppl.get("buckets", [])]),
        "bucket_nll": json.dumps(ppl.get("mean_nll", [])),
        "bucket_tokens": json.dumps(ppl.get("tokens", [])),
        "passkey_accuracy": (entry.get("passkey") or {}).get("overall"),
        "needle_score": (sum(v["mean"] for v in entry["needle"].values()) / len(entry["needle"])
                         if entry.get("needle") else None),
        "final_train_loss": history[-1].get("loss") if history else None,
        "val_loss": next((h["val_loss"] for h in reversed(history) if h.get("val_loss") is not None), None),
        "train_steps": history[-1].get("step") if history else 0,
        "train_tokens": history[-1].get("tokens") if history else 0,
    }
    passkeys = [r["passkey"] for r in checkpoint_evals or [] if r.get("passkey") is not None]
    nlls = [r["nll_beyond_base"] for r in checkpoint_evals or [] if r.get("nll_beyond_base") is not None]
    out["ckpt_best_passkey"] = max(passkeys) if passkeys else None
    out["ckpt_best_nll_beyond_base"] = min(nlls) if nlls else None
    out["checkpoints_evaluated"] = len(checkpoint_evals or [])
    out["objective"] = out.get(objective)
    return out


def cumulative_perplexity(edges: list[int], nll: list[float], tokens: list[int]) -> list[float]:
    """Perplexity over positions [0, edge) for each bucket end: what evaluating at that context length gives."""
    out, s, c = [], 0.0, 0
    for m, t in zip(nll, tokens):
        if t and m is not None and not math.isnan(m):
            s += m * t
            c += t
        out.append(math.exp(s / c) if c else float("nan"))
    return out


# -------------------------------------------------------------------------------------------------- trial
def _attempt(trial_dir: str, event: str, **extra) -> None:
    """Append one line to the trial's attempts log (local) / rewrite it (s3): who ran it, when, what happened."""
    uri = storage.join(trial_dir, "attempts.jsonl")
    line = json.dumps({"event": event, "time": round(time.time(), 3), **extra})
    old = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, old + line + "\n")


def ensure_data(cfg: JobConfig, sweep_root: str) -> str:
    """The committed packed data for `cfg`'s data settings, prepared now if no trial has done so yet."""
    from longctx.data.pipeline import prepare_data

    uri = storage.join(sweep_root, "data", data_key(cfg))
    if storage.is_committed(uri):
        return uri
    print(f"[sweep] preparing data {data_key(cfg)} -> {uri}", flush=True)
    prepare_data(cfg, uri, overwrite=True)
    return uri


def run_trial(params: dict, sweep: dict) -> dict:
    """The Tune trainable (a Ray Train driver function): data (cached) -> Long-PT -> evaluation.

    `params`: the trial's values by dotted config path (from Tune). `sweep`: {"base": config dict,
    "root": sweep folder, "objective": name}. Returns the trial's flat metrics (also reported to Tune).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from longctx.eval.runner import ModelSpec, evaluate_models
    from longctx.train.trainer import run_training
    from longctx.workflow import setup_logging

    setup_logging()
    params = dict(params)
    key = trial_key(params)
    root = sweep["root"]
    trial_dir = storage.join(root, "trials", key)
    cfg = trial_config(sweep["base"], params, origin=f"trial {key}")
    storage.configure(cfg.storage)
    tune_trial = tune.get_context().get_trial_id()
    done_uri = storage.join(trial_dir, TRIAL_METRICS)
    if storage.exists(done_uri):  # finished before, but Tune's state did not record it (e.g. a killed driver)
        metrics = json.loads(storage.read_text(done_uri))
        _attempt(trial_dir, "reused", tune_trial=tune_trial)
        print(f"[sweep] trial {key}: already finished, reusing {done_uri}", flush=True)
        tune.report(metrics)
        return metrics
    _attempt(trial_dir, "started", tune_trial=tune_trial, params=params)
    storage.write_text(storage.join(trial_dir, "config.yaml"), dump_config(cfg))
    t0 = time.time()
    data_uri = ensure_data(cfg, root)
    t_data = time.time() - t0
    outcome = run_training(cfg, data_uri, trial_dir, callbacks=[TuneReportCallback()])
    t_train = time.time() - t0 - t_data
    ev = evaluate_models(cfg, {"Long-PT": ModelSpec(outcome.final_model_uri, role="trained")},
                         storage.join(trial_dir, "eval"))
    metrics = trial_metrics(ev, outcome.history, sweep["objective"], outcome.checkpoint_evals)
    metrics.update(trial_key=key, params=json.dumps(params, sort_keys=True), final_model=outcome.final_model_uri,
                   data=data_uri, trial_dir=trial_dir, tokens_per_s=outcome.tokens_per_s,
                   time_data_s=round(t_data, 2), time_train_s=round(t_train, 2),
                   time_total_s=round(time.time() - t0, 2))
    storage.write_json(done_uri, metrics)  # last: the trial counts as finished once this exists
    _attempt(trial_dir, "finished", tune_trial=tune_trial, objective=metrics["objective"])
    tune.report(metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- the sweep
def sweep_root(cfg: JobConfig) -> str:
    return storage.join(cfg.output_dir, slug(cfg.tune.name or cfg.run_name or "sweep"))


def _baselines(cfg: JobConfig, root: str) -> dict | None:
    from longctx.eval.runner import default_model_specs, evaluate_models

    if not cfg.tune.baselines or not cfg.eval.baselines:
        return None
    uri = storage.join(root, "baselines")
    done = storage.join(uri, TRIAL_METRICS)
    if storage.exists(done):
        return json.loads(storage.read_text(done))
    print("[sweep] evaluating the base model's training-free baselines", flush=True)
    return evaluate_models(cfg, default_model_specs(cfg, cfg.model.path), uri)


def run_sweep(cfg: JobConfig, *, fresh: bool = False) -> dict:
    """Run (or resume) the sweep of `cfg.tune` and write its results; returns a summary.

    Resuming: when `<sweep>/tune` holds a Tune experiment with the same name, `Tuner.restore` continues it
    (finished trials are kept, unfinished and errored ones run again). `fresh=True` refuses an existing sweep.
    Returns {"root", "results", "trials", "complete", "best"}.
    """
    from ray import tune

    from longctx.tune.report import write_results
    from longctx.workflow import connect_ray, setup_logging

    setup_logging()
    storage.configure(cfg.storage)
    tcfg = cfg.tune
    points = validate_space(cfg)
    root = sweep_root(cfg)
    exp_dir = storage.join(root, "tune")
    cfg_uri = storage.join(root, "config.yaml")
    if storage.exists(cfg_uri) and not fresh:
        resume_differences(load_config(cfg_uri), cfg, cfg_uri)
    storage.write_text(cfg_uri, dump_config(cfg))
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
            ensure_data(c, root)
            keys_done.add(key)
    t_data = time.time() - t0
    baselines = _baselines(cfg, root)

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
        if fresh and storage.exists(exp_dir):
            raise FileExistsError(f"{exp_dir}: a sweep of this name exists; choose another tune.name or resume it")
        scheduler = None
        if tcfg.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # Rungs in optimizer steps: the validation reports carry `step`, the final (evaluation) report does
            # not, so ASHA never acts on it; stop_last_trials=False lets a trial past max_t finish its evaluation.
            scheduler = ASHAScheduler(metric="val_loss", mode="min", time_attr="step",
                                      grace_period=tcfg.asha.grace_period, reduction_factor=tcfg.asha.reduction_factor,
                                      max_t=tcfg.asha.max_t, stop_last_trials=False)
        search_alg = None
        if any(v.grid is None for v in tcfg.space().values()):
            from ray.tune.search.basic_variant import BasicVariantGenerator

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


# Settings a resumed sweep may change: where and how fast it runs, not what its trials compute.
RESUMABLE_CHANGES = ("ray", "storage", "tune.max_concurrent_trials", "tune.trial_resources", "tune.max_failures",
                     "train.resources_per_worker", "train.cpus_per_worker", "eval.num_actors", "eval.gpus_per_actor")


def resume_differences(old: JobConfig, new: JobConfig, where: str) -> None:
    """Refuse to resume a sweep whose trials would compute something else than the finished ones did (Tuner.restore
    keeps the stored search space, so a changed grid would be silently ignored, and changed settings would apply
    to the unfinished trials only)."""
    a, b = json.loads(old.model_dump_json()), json.loads(new.model_dump_json())
    for dotted in RESUMABLE_CHANGES:
        for tree in (a, b):
            node = tree
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.get(part, {})
            node.pop(parts[-1], None)
    diffs: list[str] = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            diffs.append(f"{path}: {x!r} -> {y!r}")

    walk(a, b, "")
    if diffs:
        raise ValueError(f"sweep {where.rsplit('/', 2)[-2]!r} exists with other settings, so it cannot be resumed "
                         f"as is ({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). Choose a new tune.name "
                         f"for a new sweep, or restore the settings of {where} to resume it.")


def _tune_entry(config: dict, sweep: dict) -> None:
    """Tune calls this (a module-level function, so trials pickle it by reference)."""
    run_trial(config, sweep)
