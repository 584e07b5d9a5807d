"""Runs you can pick up again: fingerprints of the config that shapes the results, and the check that refuses to
continue a run (or a sweep) with settings that would compute something else.

    from longctx.resume import run_fingerprint, data_fingerprint, differences
    run_fingerprint(cfg)              # '3f9c1a2b7e': default run name long-pt-3f9c1a2b7e (same command, same run)
    data_fingerprint(cfg)             # what a committed packed dataset was made from (manifest `data_fingerprint`)
    differences(saved_cfg, cfg)       # ['train.lr: 1e-05 -> 0.001', ...]: keys that would change the results

Keys listed in `NON_RESULT_KEYS` say where and how fast a run goes, or how much it logs, never what it computes
(exact resume makes the checkpoint interval one of them): they may differ between attempts and do not enter the
fingerprints. See docs/architecture.md ("Runs").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from longctx.config import ConfigError, JobConfig
from longctx.data.budget import effective_data_config

NON_RESULT_KEYS: tuple[str, ...] = (
    "run_name", "output_dir", "storage", "ray",
    "data.output", "data.num_tokenize_actors", "data.tokenize_batch_size",
    "train.storage_path", "train.cpus_per_worker", "train.resources_per_worker", "train.max_failures",
    "train.log_every", "train.checkpoint_every", "train.nonfinite", "train.preemption_grace_s",
    "eval.num_actors", "eval.gpus_per_actor",
    "tune.max_concurrent_trials", "tune.trial_resources", "tune.max_failures",
)
"""Dotted keys that may change between two attempts of the same run: placement, storage, logging, resume cadence."""

DATA_NON_RESULT_KEYS: tuple[str, ...] = ("output", "num_tokenize_actors", "tokenize_batch_size", "prepared")
"""Keys of the `data` section that do not shape the packed rows (`prepared` names data instead of making it)."""


class ResumeRefused(ConfigError):
    """An existing run (or sweep) was made with settings that would change the results; the message names them."""


def _tree(cfg: JobConfig | dict) -> dict:
    return json.loads(cfg.model_dump_json()) if isinstance(cfg, JobConfig) else json.loads(json.dumps(cfg))


def _drop(tree: dict, dotted: Iterable[str]) -> dict:
    for key in dotted:
        node: Any = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


def result_tree(cfg: JobConfig | dict, *, ignore: Iterable[str] = ()) -> dict:
    """The config as a plain dict without the keys that cannot change results (and without `ignore`)."""
    return _drop(_tree(cfg), [*NON_RESULT_KEYS, *ignore])


def _digest(obj: Any, length: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def run_fingerprint(cfg: JobConfig, *, ignore: Iterable[str] = ("tune",), length: int = 10) -> str:
    """Hash of everything that shapes a job's results (data, model, train, eval ...); the `tune` section is ignored
    by default (only a sweep reads it)."""
    return _digest(result_tree(cfg, ignore=ignore), length)


def data_tree(cfg: JobConfig) -> dict:
    """The `data` section without the keys that do not shape the packed rows; `token_budget` as the data engine
    uses it (train.token_budget when data.token_budget is unset)."""
    d = json.loads(effective_data_config(cfg).model_dump_json())
    for k in DATA_NON_RESULT_KEYS:
        d.pop(k, None)
    return d


def data_fingerprint(cfg: JobConfig, length: int = 12) -> str:
    """Hash of the `data` settings that shape the packed rows (recorded in the manifest as `data_fingerprint`)."""
    return _digest(data_tree(cfg), length)


def tree_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain trees."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out += tree_differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif a != b:
        out.append(f"{path}: {a!r} -> {b!r}")
    return out


def differences(old: JobConfig | dict, new: JobConfig | dict, *, allowed: Iterable[str] = NON_RESULT_KEYS,
                ignore: Iterable[str] = ()) -> list[str]:
    """Keys (with old and new values) that differ between two configs, except those that cannot change results."""
    keys = [*allowed, *ignore]
    return tree_differences(_drop(_tree(old), keys), _drop(_tree(new), keys))


def check_same_run(saved: JobConfig, new: JobConfig, where: str, *, ignore: Iterable[str] = ("tune",)) -> None:
    """Refuse to continue the run recorded at `where` (its config.yaml) with settings that change its results."""
    diffs = differences(saved, new, ignore=ignore)
    if diffs:
        raise ResumeRefused(
            f"{where} was made with other settings, so this command cannot continue it "
            f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). Run with another run_name (or without "
            f"run_name: the default name follows the settings), or restore these settings to resume it.")
