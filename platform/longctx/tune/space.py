"""A sweep's search space and trials as plain values: trial configs, folder keys, grid points, Tune's parameter
space, and a trial's flat metrics. No Ray Tune run here, so the sweep (`tune.sweep`) and its results
(`tune.report`) both build on it without importing each other.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from typing import Any

from longctx.config import JobConfig, SweepParam, config_from_dict, set_dotted, slug
from longctx.data.fingerprint import data_fingerprint

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
    """Hash of everything that shapes the packed data (`longctx.data.fingerprint.data_fingerprint`: the `data`
    section minus where it is written and how fast it is made)."""
    return data_fingerprint(cfg)


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
    from ray import tune  # deferred: heavy import, used only here

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
