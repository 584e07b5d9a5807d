"""A run's identity: which config keys change its results, its fingerprint, what it is bound to, and the check
that refuses to continue a run (or a sweep) that would compute something else.

    from longctx.runs.identity import run_fingerprint, differences, content_bindings
    run_fingerprint(cfg, bindings)     # '3f9c1a2b7e': default run name long-pt-3f9c1a2b7e (same command, same run)
    differences(saved_cfg, cfg)        # ['train.lr: 1e-05 -> 0.001', ...]: keys that would change the results
    content_bindings(cfg)              # {'model.path': '5d0e...', 'train.deepspeed_config': 'a41c...'}

Every config key has one class (a test walks every key of the pydantic models and fails on one without):
`RESULT_KEYS` shape what a run computes and enter its fingerprint; `NOT_RESULT_KEYS` say where and how fast it
runs, what it logs, or name an input whose content is bound instead (`data.prepared`): they may differ between
attempts. `train.num_workers` is not a result key (the rows of a step and the mean over their tokens do not
depend on it) but a checkpoint is written per rank, so resuming a checkpoint on another number of workers is
refused by name (`PINNED_BY_CHECKPOINT`). `train.storage_path` moves the training state: changing it on a run
that has a checkpoint there is refused (`longctx.runs.folder`).

Content bindings tie the run to what its inputs hold, not to their names: the data's committed content (the
sha256 of every file its `_COMMITTED` marker lists), the bytes of a user DeepSpeed JSON, and a model's config.json
and weights listing (a committed model folder by its marker; otherwise file names and sizes, S3 ETags, and the
sha256 of a weights index). They are recorded in `identity.json` beside `config.yaml` in the run folder and in the
train root; a rerun whose inputs hold something else is refused, naming the input. See docs/architecture.md
("Runs").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from longctx import storage
from longctx.config import ConfigError, JobConfig


def digest(obj: Any, length: int) -> str:
    """The first `length` hex digits of the sha256 of `obj` as canonical JSON (the data engine's
    `data_fingerprint` hashes the same way)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _keys(by_section: dict[str, str]) -> frozenset[str]:
    return frozenset(f"{sec}.{k}" if sec else k for sec, names in by_section.items() for k in names.split())


NOT_RESULT_KEYS: frozenset[str] = _keys({
    "": "run_name output_dir",
    "storage": "read_retries retry_backoff_s retry_max_backoff_s",
    "ray": "address num_cpus data_cpus_per_task data_resources",
    "data": "output prepared tokenize_batch_size num_tokenize_actors",
    "train": "num_workers cpus_per_worker checkpoint_every storage_path max_failures log_every isolation_check "
             "isolation_tolerance nonfinite preemption_grace_s activation_checkpointing tiled_mlp "
             "activation_offload offload_params gpu_type gpu_memory_gib balance_batches",
    "eval": "batch_size num_actors gpus_per_actor",
    "eval.ruler": "save_inputs",
    "eval.gate": "action max_nll_increase max_retrieval_drop max_choice_drop",
    "eval.during_training": "actors num_cpus num_gpus poll_s keep_snapshots",
    "synth": "output num_actors batch_size",
    "tune": "name max_concurrent_trials trial_resources max_failures",
    "logging": "tensorboard flush_every_s",
    "logging.wandb": "enabled project entity group mode dir tags",
    "logging.mlflow": "enabled tracking_uri experiment_name tags",
})
"""Where and how fast a run goes, what it logs, what it does on a fault, and inputs bound by content instead of
name: may change between attempts. The memory savers (`train.activation_checkpointing`, `tiled_mlp`,
`activation_offload`, `offload_params`) say where activations and parameters live and what is recomputed: the same
math, like the number of workers (float summation order aside); so is `train.balance_batches` (the rows of a step
move between ranks and micro-steps, the step's rows, loss and gradient stay the same). `train.offload_optimizer`
is a result key (the offloaded step runs DeepSpeed's CPU Adam); `data.budget_read` is one too (it decides which
records are read, so which rows are packed). `data.prepared`: its content is a binding; `train.storage_path`:
refused when it would move a checkpoint; `train.num_workers`: pinned by a checkpoint; `storage.endpoint_url` and
`region` are result keys, they say which store an s3:// URI names. The regression gate's `action` and limits
(`eval.gate.max_*`) judge its measurement and do not change it: a rerun after a failed gate may loosen them or turn
`fail` into `warn` (the measurement recorded in the stage's `gate.json` is judged again)."""

RESULT_KEYS: frozenset[str] = _keys({
    "storage": "endpoint_url region",
    "data": "sources tokenizer seq_len attention packing strategy upsample_mode long_threshold long_share keep_prob "
            "cut_len upsample_sources token_budget budget_read read_margin seed max_bad_fraction max_record_bytes "
            "pack_buffer_rows pack_partitions rows_per_shard eval_fraction",
    "data.cip": "fraction k",
    "data.sft": "messages_field chat_template mix overlong",
    "model": "path rope_theta max_position_embeddings attn_implementation dtype trust_remote_code "
             "allow_pickle",
    "model.rope_scaling": "type factor original_max_position_embeddings extra",
    "train": "use_gpu resources_per_worker zero_stage offload_optimizer deepspeed_config "
             "micro_batch_size global_batch_tokens token_budget max_steps epochs lr min_lr_ratio warmup_ratio "
             "weight_decay adam_betas grad_clip seed sequence_parallel loss_chunk_tokens val_every val_documents "
             "val_num_documents",
    "eval": "enabled model documents text_field context_length bucket_edges num_documents base_context_length "
            "baselines scaling_factor prefill_chunk_tokens seed perplexity extra_context_lengths",
    "eval.passkey": "enabled lengths depths trials",
    "eval.needle": "enabled haystack text_field lengths depths variants num_needles trials",
    "eval.longbench": "enabled data datasets max_seq_len max_samples chat_template longbench_e code_sim_backend",
    "eval.ruler": "enabled lengths tasks num_samples seed essay essay_text_field squad hotpotqa cwe_words "
                  "tokens_to_generate haystack chat_template remove_newline_tab",
    "eval.infinitebench": "enabled data tasks max_seq_len max_samples chat_template",
    "eval.gate": "enabled length num_documents passkey passkey_depths passkey_trials ruler_tasks ruler_samples choices "
                 "choices_limit",
    "": "stages",
    "eval.during_training": "enabled context_length num_documents passkey_lengths passkey passkey_trials needle "
                            "objective early_stop_patience early_stop_min_delta",
    "synth": "seed samples_per_shard",
    "synth.tables": "num_samples min_tokens max_tokens formats questions",
    "synth.retrieval": "num_samples min_tokens max_tokens tasks num_needles kv_distractors haystack "
                       "haystack_max_chars",
    "tune": "params num_samples objective scheduler seed baselines",
    "tune.asha": "grace_period reduction_factor max_t",
})
"""Keys that shape what a run computes (its data, model, training, evaluation): they enter the fingerprint, and a
rerun that changes one is refused. (`train.resources_per_worker` picks the GPU, so the "auto" attention kernel.)"""

PINNED_BY_CHECKPOINT: tuple[str, ...] = ("train.num_workers",)
"""Not result keys, but a checkpoint holds per-rank state (ZeRO partitions, per-rank data streams): a run that has
one continues only with the same values."""

BOUND_INPUTS: tuple[str, ...] = ("data.prepared", "train.deepspeed_config", "model.path", "eval.model")
"""Config keys whose input is bound by content (`content_bindings`); the run's own data is bound as `data`."""


class ResumeRefused(ConfigError):
    """An existing run (or sweep) was made with settings or inputs that would change the results; the message
    names them."""


def key_class(dotted: str) -> str | None:
    """'result', 'not result', or None for a key without a class (treated as a result key)."""
    if dotted in RESULT_KEYS:
        return "result"
    if dotted in NOT_RESULT_KEYS:
        return "not result"
    return None


# ------------------------------------------------------------------------------------------ config trees
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
    return _drop(_tree(cfg), [*NOT_RESULT_KEYS, *ignore])


def run_fingerprint(cfg: JobConfig, bindings: dict | None = None, *, ignore: Iterable[str] = ("tune",),
                    length: int = 10) -> str:
    """Hash of everything that shapes a job's results: the result keys (the `tune` section is ignored by
    default: only a sweep reads it) and the content of the inputs bound by `bindings`."""
    tree = result_tree(cfg, ignore=ignore)
    bound = {k: v for k, v in sorted((bindings or {}).items()) if v}
    return digest({"config": tree, "bindings": bound} if bound else tree, length)


def tree_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain trees."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out += tree_differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif a != b:
        out.append(f"{path}: {a!r} -> {b!r}")
    return out


def differences(old: JobConfig | dict, new: JobConfig | dict, *, allowed: Iterable[str] = NOT_RESULT_KEYS,
                ignore: Iterable[str] = ()) -> list[str]:
    """Keys (with old and new values) that differ between two configs, except those that cannot change results."""
    keys = [*allowed, *ignore]
    return tree_differences(_drop(_tree(old), keys), _drop(_tree(new), keys))


RERUN_HINT = ("Run with another run_name (or without run_name: the default name follows the settings), or restore "
              "these settings to resume it.")


def check_same_run(saved: JobConfig, new: JobConfig, where: str, *, ignore: Iterable[str] = ("tune",),
                   hint: str = RERUN_HINT) -> None:
    """Refuse to continue the run recorded at `where` (its config.yaml) with settings that change its results."""
    diffs = differences(saved, new, ignore=ignore)
    if diffs:
        raise ResumeRefused(f"{where} was made with other settings, so this command cannot continue it "
                            f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). {hint}")


def check_pinned(saved: JobConfig, new: JobConfig, where: str, step: int) -> None:
    """Refuse to resume the checkpoint of `step` under `where` with another value of a `PINNED_BY_CHECKPOINT` key."""
    diffs = tree_differences(_pick(_tree(saved), PINNED_BY_CHECKPOINT), _pick(_tree(new), PINNED_BY_CHECKPOINT))
    if diffs:
        raise ResumeRefused(
            f"{where} has a checkpoint at step {step} written by another layout ({'; '.join(diffs)}): a checkpoint "
            f"holds per-rank optimizer partitions and data streams, so it resumes only on the same number of "
            f"workers. Restore the setting to resume, or start a new run (another run_name).")


def _pick(tree: dict, dotted: Iterable[str]) -> dict:
    out: dict = {}
    for key in dotted:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


# ------------------------------------------------------------------------------------------ content bindings
def committed_content(uri: str) -> str | None:
    """Fingerprint of a committed folder's content: the sha256 of every file its `_COMMITTED` marker lists (None
    when it is not committed)."""
    marker = storage.read_marker(uri)
    if marker is None:
        return None
    files = {rel: e.get("sha256") for rel, e in sorted(marker.get("files", {}).items())}
    return digest(files, 16)


def model_content(uri: str) -> str | None:
    """Fingerprint of a Hugging Face model folder: a committed one by its marker; otherwise config.json's bytes,
    the weights' names and sizes (and ETags on s3://) and the bytes of a weights index. None when unreadable."""
    try:
        committed = committed_content(uri)
        if committed:
            return committed
        folder = storage.normalize(uri)
        config = hashlib.sha256(storage.read_bytes(storage.join(folder, "config.json"))).hexdigest()
        fs, path = storage.fsspec_fs(folder)
        weights, index = [], None
        for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")):
                weights.append([name, entry.get("size"), (entry.get("ETag") or entry.get("etag") or "").strip('"')])
            elif name.endswith(".index.json"):
                index = hashlib.sha256(storage.read_bytes(storage.join(folder, name))).hexdigest()
        return digest({"config": config, "weights": weights, "index": index}, 16)
    except (storage.StorageError, OSError, ValueError):
        return None


def file_content(uri: str) -> str | None:
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]
    except (storage.StorageError, OSError):
        return None


def content_bindings(cfg: JobConfig) -> dict[str, str | None]:
    """The content of every input named by a `BOUND_INPUTS` key that is set (None where it cannot be read: the
    preflight checks report a missing input)."""
    out: dict[str, str | None] = {}
    if cfg.data.prepared:
        out["data.prepared"] = committed_content(cfg.data.prepared)
    if cfg.train.deepspeed_config:
        out["train.deepspeed_config"] = file_content(cfg.train.deepspeed_config)
    if cfg.model.path:
        out["model.path"] = model_content(cfg.model.path)
    if cfg.eval.model:
        out["eval.model"] = model_content(cfg.eval.model)
    return out


def binding_differences(recorded: dict, current: dict, cfg: JobConfig | None = None) -> list[str]:
    """`input (uri): content changed (old -> new)` for every input both records know with different content."""
    out = []
    for key in sorted(set(recorded) & set(current)):
        old, new = recorded[key], current[key]
        if old and new and old != new:
            uri = _pick(_tree(cfg), [key])[key] if cfg is not None and key in BOUND_INPUTS else None
            out.append(f"{key}{f' ({uri})' if uri else ''}: its content changed since the run was made "
                       f"(fingerprint {old} -> {new})")
    return out


def check_bindings(recorded: dict, current: dict, where: str, cfg: JobConfig | None = None,
                   hint: str = RERUN_HINT) -> None:
    """Refuse to continue the run recorded at `where` when an input it is bound to holds something else now."""
    diffs = binding_differences(recorded, current, cfg)
    if diffs:
        raise ResumeRefused(f"{where}: the run's inputs changed in place, so this command cannot continue it "
                            f"({'; '.join(diffs)}). {hint}")


def read_identity(uri: str) -> dict | None:
    """An `identity.json` (None when there is none)."""
    try:
        return json.loads(storage.read_text(uri))
    except (storage.StorageNotFound, FileNotFoundError):
        return None


def identity_record(run_id: str, kind: str, fingerprint: str, run_root: str, train_root: str,
                    bindings: dict) -> dict:
    return {"run_id": run_id, "kind": kind, "fingerprint": fingerprint, "run_root": run_root,
            "train_root": train_root, "bindings": {k: v for k, v in sorted(bindings.items()) if v}}
