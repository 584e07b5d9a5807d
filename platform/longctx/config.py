"""Typed job configuration: one `JobConfig` with `data`, `model`, `train`, `eval` sections.

Configs are YAML files (see `jobs/configs/`) plus `--set a.b.c=value` overrides. Every section has defaults
that together make the *embedded default*: the shipped sample corpus, the shipped tiny model, local Ray, CPU.
Unknown keys and bad values fail with an error naming the key and what is allowed.

    cfg = load_config("jobs/configs/tiny.yaml", ["train.lr=3e-4", "data.seq_len=2048"])

Field docstrings are the help text and land in the exported JSON Schema (`schemas/job_config.schema.json`,
kept in sync by a test; regenerate with `longctx config schema --output schemas/job_config.schema.json`).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longctx.redact import CREDENTIALS_HELP, credential_fields, redact
from longctx.train.gpus import PLAN_KINDS


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and what is allowed (URL
    credentials in it are masked: `longctx.redact`)."""

    def __init__(self, message: str = "", *args):
        super().__init__(redact(str(message)), *args)


class _Section(BaseModel):
    # NOTE: inputs stay out of pydantic's own messages (a value may be a secret); ours name the key
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              hide_input_in_errors=True)

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_credentials(cls, value, info):
        """No field of any section holds a URL with userinfo (`user:password@`): see longctx.redact."""
        found = credential_fields(value, info.field_name)
        if found:
            raise ValueError(f"{', '.join(found)}: {CREDENTIALS_HELP}")
        return value


# ----------------------------------------------------------------------------------------------- storage / ray
class StorageConfig(_Section):
    endpoint_url: str | None = None
    """S3-compatible endpoint override (e.g. http://127.0.0.1:9000). Default: AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL from the environment, else AWS itself. Credentials never go here: use the standard AWS
    variables or an instance profile / IAM role."""
    region: str | None = None
    """S3 region; default from AWS_DEFAULT_REGION / AWS_REGION."""
    read_retries: int = Field(6, ge=0)
    """Retries of a failed corpus read (connection cut, timeout, I/O error) before the job fails with an I/O
    error naming the object. A read that outlasts them is never counted as bad data."""
    retry_backoff_s: float = Field(0.5, gt=0)
    """Wait before the first retry; doubled after each failure up to `retry_max_backoff_s` (defaults: about 30 s
    of outage are ridden out)."""
    retry_max_backoff_s: float = Field(8.0, gt=0)
    """Longest wait between two retries."""


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster address. Default: RAY_ADDRESS when set (as under `ray job submit`), else a local cluster."""
    num_cpus: int | None = None
    """CPUs for a local cluster started by the job (may oversubscribe the machine so Ray Data and the
    training workers can run side by side). Ignored when connecting to an existing cluster."""
    data_cpus_per_task: float = 0.25
    """CPUs each data task reserves (tokenize and pack tasks; a read task half of it). Fractional on small
    machines, so that data tasks and training workers fit side by side."""
    data_resources: dict[str, float] = Field(default_factory=dict)
    """Custom resources data tasks ask for (e.g. {"data_node": 0.01} to pin them to the CPU pool)."""


# ----------------------------------------------------------------------------------------------------- data
class SourceSpec(_Section):
    uri: str | list[str]
    """File, folder, glob or s3:// prefix (or a list of them). Formats by suffix (any case): .jsonl, .json,
    .ndjson, each also .gz/.zst, and .parquet; other files of a folder are listed as skipped.
    `builtin:corpus/NAME.jsonl.gz` names a shipped sample file."""
    text_field: str = "text"
    """Field holding the document text (dotted path for nested fields)."""
    source_field: str | None = None
    """Field holding the source label (dotted path, e.g. SlimPajama's `meta.redpajama_set_name`). Default:
    the name this source is listed under."""
    id_field: str | None = None
    """Field holding the document id (dotted path). Default: `path:line` (or `path:row` for parquet)."""


class CipConfig(_Section):
    fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Share of Long-PT rows built by chunk-interleaved pretraining (LongSkywork CIP-k): the documents packed
    into such a row are cut into `k` chunks each and emitted as all first chunks, then all second chunks, ...,
    with full causal attention over the row (position ids 0..seq_len-1). 0: off."""
    k: int = Field(2, ge=1)
    """Chunks per document in a CIP row (k=2 was best in LongSkywork; k=1 leaves documents whole)."""


Strategy = Literal["per-source", "cut-4k", "cut-seq", "global", "sources"]


class SftConfig(_Section):
    messages_field: str = "messages"
    """Long-SFT: field of each JSONL record holding the chat ([{"role", "content"}, ...])."""
    chat_template: str | None = None
    """Long-SFT: a Jinja chat template file (local, s3:// or builtin:) used instead of the tokenizer's own."""
    mix: dict[str, float] = Field(default_factory=dict)
    """Long-SFT: share of conversations per source (e.g. {long: 0.375, general: 0.625}, normalised). Empty: every
    conversation of every source once. A source asked for more than it has is repeated (counted)."""
    overlong: Literal["truncate_middle", "quarantine"] = "truncate_middle"
    """Long-SFT: a conversation longer than data.seq_len tokens. `truncate_middle` (the Index report's rule for
    prompts): cut its context in the middle, keeping the start (system prompt, first user turn's head) and the end
    (last question, assistant header) and the last answer whole with its loss; `quarantine`: quarantine it
    (`overlong_chat`, counts toward data.max_bad_fraction). A last answer longer than a row is quarantined either
    way. The manifest counts both (conversations.truncated, truncated_tokens, overlong_quarantined)."""


class DataConfig(_Section):
    sources: dict[str, str | SourceSpec] = Field(
        default_factory=lambda: {
            "code": "builtin:corpus/code.jsonl.gz",
            "c": "builtin:corpus/c.jsonl.gz",
            "records": "builtin:corpus/records.jsonl.gz",
        }
    )
    """Source name -> URI/glob (or a full SourceSpec). The name is the source label unless `source_field`
    says otherwise."""
    tokenizer: str = "builtin:tiny-tokenizer"
    """Hugging Face fast tokenizer directory: local path or s3:// prefix."""
    seq_len: int = Field(1024, ge=16)
    """Tokens per packed row (the training context length)."""
    attention: Literal["document", "full"] = "document"
    """`document`: position ids restart at every document and no token attends across documents (Index).
    `full`: documents are concatenated and attend to each other (Fu et al.)."""
    packing: Literal["best-fit", "concat"] = "best-fit"
    """`best-fit`: documents placed whole (unless longer than seq_len) best-fit decreasing over a bounded
    buffer, short rows padded. `concat`: Fu et al.'s packing, documents concatenated in stream order and cut
    every seq_len tokens regardless of document boundaries: no padding, the tail after the last full row
    dropped; needs `attention: full`."""
    strategy: Strategy = "per-source"
    """Length mixture: `per-source` upsampling (Fu et al., default), `cut-4k` (chunk every document at 4K),
    `cut-seq` (natural lengths), `global` (upsample long documents over the whole corpus), `sources`
    (upsample only `upsample_sources`)."""
    upsample_mode: Literal["target_share", "keep_prob"] = "target_share"
    """`target_share`: aim at `long_share` directly. `keep_prob`: Fu et al.'s released builder (keep every long
    document, keep a short one with probability `keep_prob`)."""
    long_threshold: int = Field(4096, ge=1)
    """A document with at least this many tokens is long."""
    long_share: float = Field(0.7, ge=0.0, le=1.0)
    """Target share of tokens from long documents (target_share mode); a source already above it keeps its
    natural share."""
    keep_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of keeping a short document (keep_prob mode)."""
    cut_len: int = Field(4096, ge=16)
    """Chunk length of strategy `cut-4k` (Fu et al. cut at 4096 tokens, their base model's length; a toy base
    trained at 256 tokens is cut at 256)."""
    upsample_sources: list[str] = Field(default_factory=list)
    """Sources to upsample with strategy `sources` (e.g. [book, arxiv, github])."""
    token_budget: int | None = Field(None, ge=1)
    """Tokens to emit (e.g. 500_000_000). Default: train.token_budget when that is set, else every token the
    strategy keeps, once."""
    budget_read: bool = True
    """With a token budget (data.token_budget, else train.token_budget): read each source, in a seeded shuffled
    file order, only as far as the length mixture needs for its share of the budget (long and short documents
    as upsampling will draw them, times 1 + read_margin), instead of tokenizing the whole corpus first; the
    manifest's input.read says what was read and skipped. false: read every file."""
    read_margin: float = Field(0.1, ge=0.0)
    """Extra reading beyond the mixture's need (budget_read): 0.1 reads 10% more long and short tokens than the
    plan draws, so estimates that move while reading do not make it repeat documents."""
    seed: int = 0
    """Seed for shuffling, sampling and packing order."""
    output: str | None = None
    """Where packed Parquet shards and manifest.json go (local or s3://). Default: `<run dir>/data`. A relative
    path is resolved like `output_dir`. When it already holds committed data made with the same data settings,
    that data is reused without reading the corpus."""
    prepared: str | None = None
    """A committed packed dataset to train on instead of preparing one (local or s3://, e.g. the output of
    `jobs/prepare_data.py`). Its manifest is checked against the job before Ray starts: kind (Long-PT / Long-SFT),
    row length vs seq_len, attention mode, tokenizer fingerprint vs data.tokenizer, vocabulary vs the model's
    embedding rows. The corpus settings (sources, mixture) are then not used."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Fail the job when more than this fraction of input records is quarantined."""
    max_record_bytes: int = Field(8 << 20, ge=1024)
    """Longest input record (JSONL line or Parquet text value) in bytes; longer ones are quarantined as
    `record_too_large` before tokenization (the tokenizer needs ~160 bytes of memory per input byte)."""
    pack_buffer_rows: int = Field(16, ge=1)
    """Rows of the bounded best-fit packing buffer (more rows: less padding, more memory)."""
    pack_partitions: int | None = Field(None, ge=1)
    """Pass-2 partitions, each packed and written by one Ray task (in parallel across the cluster); they shape
    the rows, never the cluster size: the same input, config and seed give the same bytes on any number of
    nodes. Default: one per 4,096 rows' worth of planned tokens (at least one)."""
    rows_per_shard: int = Field(4096, ge=1)
    """Packed rows per Parquet shard."""
    tokenize_batch_size: int = Field(256, ge=1)
    """Documents per tokenizer batch."""
    num_tokenize_actors: int = Field(1, ge=1)
    """Tokenize tasks running at once in pass 1 (one per record block; raise on a cluster). The name is kept
    from when they were actors."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of long documents held out (by id hash) for evaluation instead of training."""
    cip: CipConfig = Field(default_factory=CipConfig)
    """Chunk-interleaved pretraining (CIP-k) rows mixed into the packed Long-PT data."""
    sft: SftConfig = Field(default_factory=SftConfig)
    """Long-SFT data: chat JSONL sources (`sources`), their mix and the chat template (jobs/long_sft.py)."""

    @field_validator("sources")
    @classmethod
    def _nonempty_sources(cls, v: dict) -> dict:
        if not v:
            raise ValueError("data.sources is empty: name at least one source, e.g. --set data.sources.web=s3://bucket/web/")
        return v

    @model_validator(mode="after")
    def _packing_needs_full_attention(self) -> "DataConfig":
        if self.packing == "concat" and self.attention != "full":
            raise ValueError(
                f"data.packing=concat cuts documents at row ends regardless of document boundaries (Fu et al.), "
                f"so a document-masked row would hold pieces without their context: set data.attention=full with "
                f"it, or keep data.packing=best-fit for data.attention={self.attention}")
        return self

    def source_specs(self) -> dict[str, SourceSpec]:
        """Every source as a full SourceSpec."""
        return {k: (SourceSpec(uri=v) if isinstance(v, str) else v) for k, v in self.sources.items()}


# ---------------------------------------------------------------------------------------------------- model
class RopeScalingConfig(_Section):
    type: Literal["linear", "dynamic", "yarn", "llama3"]
    """RoPE scaling: `linear` (position interpolation), `dynamic` (dynamic NTK), `yarn`, `llama3`."""
    factor: float = Field(gt=0)
    """Scaling factor (target length / original length)."""
    original_max_position_embeddings: int | None = None
    """Context length the model was trained at; default: the model config's max_position_embeddings."""
    extra: dict[str, float] = Field(default_factory=dict)
    """Further rope_parameters for the type (e.g. beta_fast, beta_slow, low_freq_factor)."""


AttnImpl = Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]


class ModelConfig(_Section):
    path: str = "builtin:tiny-llama"
    """Hugging Face causal LM directory: local path or s3:// prefix."""
    rope_theta: float | None = Field(None, gt=0)
    """New RoPE base (Index: 10^4 -> 3.2*10^5 at 32K). Default: keep the model's."""
    rope_scaling: RopeScalingConfig | None = None
    """RoPE scaling to apply (PI, dynamic NTK, YaRN, llama3)."""
    max_position_embeddings: int | None = None
    """Set the model's max_position_embeddings (default: data.seq_len when training at a longer length)."""
    attn_implementation: AttnImpl = "auto"
    """Attention backend; `auto` picks flash_attention_2 (GPU, installed), flex_attention (GPU), else sdpa."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off: only architectures transformers itself implements load."""
    allow_pickle: bool = False
    """Allow pickle-based weights (.bin). Off: safetensors only."""


# ---------------------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel size x sequence_parallel)."""
    use_gpu: bool = False
    """One GPU per worker (nccl, bf16); else CPU (gloo, fp32)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each training worker reserves."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom resources per worker (e.g. {"trainer_node": 0.01} to land on the GPU pool)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (saves memory on long rows)."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON whose keys override the generated config."""
    micro_batch_size: int = Field(1, ge=1)
    """Rows per worker per forward pass."""
    global_batch_tokens: int = Field(8192, ge=1)
    """Tokens per optimizer step over all workers (Index: 4M for Long-PT, 1M for Long-SFT). Gradient
    accumulation = global_batch_tokens / (seq_len * micro_batch_size * data_parallel_size)."""
    token_budget: int | None = Field(None, ge=1)
    """Tokens to train on (steps = token_budget / global_batch_tokens). Default: one pass over the data."""
    max_steps: int | None = Field(None, ge=1)
    """Hard cap on optimizer steps (overrides token_budget when smaller)."""
    epochs: int = Field(1, ge=1)
    """Passes over the data (Long-SFT: 2)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (Index Long-PT 1e-5, Long-SFT 5e-6)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final LR of the cosine schedule as a fraction of the peak (1.0 with warmup_ratio 0: a constant LR, as Fu et
    al. train)."""
    warmup_ratio: float = Field(0.01, ge=0, lt=1)
    """Share of steps spent in linear warmup."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0: off)."""
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    storage_path: str | None = None
    """Where checkpoints and the final model go (local or s3://): `<storage_path>/<run id>/train/`. Default:
    the run folder (`<output_dir>/<run id>/train/`). A relative path is resolved like `output_dir`."""
    max_failures: int | None = Field(None, ge=0)
    """Worker-group restarts Ray Train allows; each resumes from the newest intact checkpoint. Default: 3 with
    GPUs (a spot node that goes away is retried; node preemptions Ray announces do not count against it), 0 on
    CPU."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm on any rank: `stop` ends the run naming the step and its rows (exit
    code 4; the model is not published); `skip` passes over the step's rows (not counted as consumed) without
    advancing the step or the LR schedule, and stops when more than 8 come in a row."""
    preemption_grace_s: float = Field(110.0, gt=0)
    """After SIGTERM/SIGINT the driver asks for a checkpoint at the next step boundary and waits this long for it
    before stopping anyway; then it exits with code 75 ("preempted, rerun to resume"). Keep it under the time
    your platform allows between its SIGTERM and its SIGKILL."""
    seed: int = 0
    """Seed for initialisation and data order."""
    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence-parallel degree (splits each row over this many workers)."""
    loss_chunk_tokens: int = Field(1024, ge=1)
    """Tokens per chunk of the chunked logits+loss (the full [seq, vocab] logits never exist)."""
    log_every: int = Field(1, ge=1)
    """Log metrics every N optimizer steps."""
    isolation_check: bool = True
    """Before the first optimizer step, run the first micro-batch packed and per document on the configured
    backend, micro-batch size and sequence-parallel degree, and refuse to train when packed documents see each
    other (data.attention=document only; cost printed, about two forwards)."""
    isolation_tolerance: float | None = Field(None, gt=0)
    """Largest allowed deviation of the isolation check (|packed - alone| / max(1, |alone|) of the final hidden
    states). Default: 1e-4 in float32, 3e-2 in bfloat16/float16."""
    val_every: int = Field(0, ge=0)
    """Validation loss every N optimizer steps and after the last one (0: off). Logged as `val_loss` and
    reported to Ray Train, so a Ray Tune sweep sees it (ASHA early stopping reads it)."""
    val_documents: str | None = None
    """Held-out documents for the validation loss (any corpus format, local or s3://). Default: eval.documents."""
    val_num_documents: int = Field(8, ge=1)
    """Validation documents: the first N with at least data.seq_len tokens, each cut to data.seq_len, one per row."""
    balance_batches: bool = True
    """Within each optimizer step, move rows between data-parallel ranks (and micro-steps) so every rank's share
    of attention cost (sum of squared document lengths, plus the per-token cost) is about equal: a step waits for
    its slowest rank. The step's rows, loss and gradient stay the same; metrics.jsonl records the step's
    max/mean rank cost before and after (`cost_max_over_mean[_unbalanced]`)."""

    # -- memory: ALST's savers (longctx.train.memory_savers) and the GPU the plan checks against (longctx.plan)
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over tiles of ~hidden_size tokens (DeepSpeed's TiledMLP, each tile recomputed
    in backward): the [tokens, intermediate_size] temporaries shrink about tokens/hidden_size-fold (ALST). Costs
    one more MLP forward per step."""
    activation_offload: bool = False
    """Keep the checkpointed input of every decoder layer in (pinned) CPU memory instead of on the GPU (ALST);
    needs activation_checkpointing. Each GPU then holds layers x tokens x hidden_size x 2 bytes of host memory:
    `longctx plan` prints the CPU memory per node."""
    offload_params: bool = False
    """ZeRO-3 parameter offload: the bf16 parameter partition lives in CPU memory and is gathered layer by layer;
    needs zero_stage: 3."""
    gpu_type: Literal[PLAN_KINDS] | None = None
    """GPU model of the workers, for the memory check before the job starts (`longctx plan`, preflight). Default:
    from a resource marker in resources_per_worker (gpu_h100 -> h100, gpu_a100 -> a100-40gb), else unknown (then
    the check needs gpu_memory_gib)."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU in GiB (as CUDA reports it, e.g. 79.1 for an H100 80GB); overrides gpu_type's."""

    @model_validator(mode="after")
    def _memory_savers(self) -> "TrainConfig":
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError("train.activation_offload moves the checkpointed layer inputs to CPU memory: set "
                             "train.activation_checkpointing=true with it")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params is ZeRO-3 parameter offload: set train.zero_stage=3 "
                             f"(it is {self.zero_stage})")
        return self


# ----------------------------------------------------------------------------------------------------- eval
Baseline = Literal["naive", "pi", "dynamic_ntk", "yarn"]


class PasskeyConfig(_Section):
    enabled: bool = True
    """Run passkey retrieval."""
    lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024])
    """Prompt lengths in tokens."""
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    """Relative depth of the passkey in the filler."""
    trials: int = Field(4, ge=1)
    """Prompts per (length, depth) cell."""


class NeedleConfig(_Section):
    enabled: bool = False
    """Run the needle-in-a-haystack grid."""
    haystack: str = "builtin:haystack/default.txt"
    """Haystack text: a .txt file, or a corpus (jsonl/parquet, local or s3://) whose `text_field` is joined."""
    text_field: str = "text"
    """Field holding the text when `haystack` is a corpus."""
    lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024])
    """Prompt lengths in tokens (grid columns)."""
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Depth of the (first) needle as a fraction of the haystack, in tokens (grid rows)."""
    variants: list[Literal["single", "multi_retrieval", "multi_reasoning"]] = Field(default_factory=lambda: ["single"])
    """NeedleBench variants: single needle, multi-needle retrieval, multi-needle reasoning (a chain of hops)."""
    num_needles: int = Field(3, ge=2)
    """Needles (or hops) of the multi-needle variants."""
    trials: int = Field(1, ge=1)
    """Prompts per (variant, length, depth) cell."""


class LongBenchConfig(_Section):
    enabled: bool = False
    """Run LongBench/LEval-format tasks (needs `data`)."""
    data: str | None = None
    """JSONL files, one per dataset named `<dataset>.jsonl` (LongBench, LongBench-E `_e`, or LEval format):
    a file, folder, glob or s3:// prefix."""
    datasets: list[str] = Field(default_factory=list)
    """Only these datasets (file names without suffix). Default: every file found."""
    max_seq_len: int | None = Field(None, ge=16)
    """Context window for prompts: longer prompts keep their first and last (max_seq_len - max_new_tokens)//2
    tokens. Default: eval.context_length."""
    max_samples: int | None = Field(None, ge=1)
    """At most this many samples per dataset (for quick runs)."""
    chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (chat/SFT models), except few-shot and code datasets."""
    longbench_e: bool = False
    """Score by LongBench-E length buckets (0-4k, 4-8k, 8k+) instead of one score per dataset."""
    code_sim_backend: Literal["difflib", "indel"] = "difflib"
    """Code similarity: `difflib` is fuzzywuzzy as LongBench's requirements install it; `indel` is the
    python-Levenshtein / rapidfuzz ratio (differs for some pairs)."""


RulerTask = Literal["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]
InfiniteBenchTask = Literal["passkey", "number_string", "kv_retrieval", "math_find", "code_debug",
                            "longbook_choice_eng"]


class RulerConfig(_Section):
    enabled: bool = False
    """Run RULER (NVIDIA/RULER's 13 synthetic tasks, `longctx.eval.ruler`): samples generated at each length
    with the evaluated model's tokenizer, greedy answers, RULER's string-match scores, and RULER's table
    (tasks x lengths, the average per length) in the report."""
    lengths: list[int] = Field(default_factory=list)
    """Sequence lengths in tokens (prompt + tokens to generate, as RULER counts them), e.g. [4096, 8192,
    16384, 32768, 65536, 131072]. Default: the base model's length and eval.context_length."""
    tasks: list[RulerTask] = Field(default_factory=list)
    """Tasks to run. Default: all 13, except qa_1 / qa_2 when `squad` / `hotpotqa` is not set (the report
    says so; the average is then over fewer tasks than RULER's). Naming qa_1 or qa_2 here without its file
    is an error."""
    num_samples: int = Field(500, ge=1)
    """Samples per task and length (RULER's default 500)."""
    seed: int = 42
    """Random seed of every task and length (RULER's `--random_seed`, default 42)."""
    essay: str = "builtin:haystack/default.txt"
    """Text of the `essay` haystack (niah_single_2/3, multikey_1, multivalue, multiquery): a .txt file, or a
    corpus whose `essay_text_field` is joined (RULER's PaulGrahamEssays.json, {"text": ...}, works as is).
    Default: the shipped filler prose (Paul Graham's essays are not shipped)."""
    essay_text_field: str = "text"
    """Field holding the text when `essay` is a corpus / JSON file."""
    squad: str | None = None
    """SQuAD 2.0 dev JSON (dev-v2.0.json, RULER's squad.json) for qa_1; local or s3://."""
    hotpotqa: str | None = None
    """HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json, RULER's hotpotqa.json) for qa_2."""
    cwe_words: str | None = None
    """RULER's english_words.json (Git LFS in NVIDIA/RULER), needed by cwe only at lengths that need more
    distinct words than the shipped lists hold (around 128K tokens for Llama-size vocabularies)."""
    tokens_to_generate: dict[str, int] = Field(default_factory=dict)
    """Generation budgets that replace RULER's (niah 128, variable_tracking 30, common_words_extraction 120,
    freq_words_extraction 50, qa 32), by task (`niah_single_1`) or base task (`niah`). They count in the
    length, so a smaller budget leaves room for more haystack; the report lists any change (not RULER's
    standard settings)."""
    haystack: dict[str, Literal["noise", "essay", "needle"]] = Field(default_factory=dict)
    """Haystack per task instead of RULER's (niah_single_1 and vt: noise; multikey_2/3: needle; the other
    niah tasks: essay); vt takes noise or essay."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (RULER's model templates for chat models); the
    answer prefix follows, in the assistant turn."""
    remove_newline_tab: bool = False
    """RULER's --remove_newline_tab: newlines and tabs become spaces."""
    save_inputs: bool = False
    """Keep each prompt's text in the prediction files (`input`; large at long lengths). Off: `input` is ""."""

    @field_validator("tokens_to_generate")
    @classmethod
    def _known_budget_keys(cls, v: dict[str, int]) -> dict[str, int]:
        known = set(RulerTask.__args__) | {"niah", "variable_tracking", "common_words_extraction",
                                           "freq_words_extraction", "qa"}
        bad = sorted(k for k in v if k not in known)
        if bad:
            raise ValueError(f"unknown task(s) {bad}; keys are tasks ({', '.join(RulerTask.__args__)}) or base "
                             "tasks (niah, variable_tracking, common_words_extraction, freq_words_extraction, qa)")
        if any(n < 1 for n in v.values()):
            raise ValueError("tokens to generate must be >= 1")
        return v

    @field_validator("haystack")
    @classmethod
    def _haystack_tasks(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = [t for t in RulerTask.__args__ if t.startswith("niah")] + ["vt"]
        bad = sorted(k for k in v if k not in allowed)
        if bad:
            raise ValueError(f"no haystack to choose for {bad}; tasks with one: {', '.join(allowed)}")
        if v.get("vt") == "needle":
            raise ValueError("vt takes the noise or essay haystack, not needle")
        return v


class InfiniteBenchConfig(_Section):
    enabled: bool = False
    """Run InfiniteBench's self-scored tasks (`longctx.eval.infinitebench`) from the user's files."""
    data: str | None = None
    """Folder, glob or s3:// prefix of InfiniteBench's JSONL files, named `<task>.jsonl` (passkey.jsonl,
    kv_retrieval.jsonl, ...): {"id", "context", "input", "answer", "options"} as InfiniteBench ships them."""
    tasks: list[InfiniteBenchTask] = Field(default_factory=list)
    """Tasks to run. Default: each of the six whose file is found under `data`."""
    max_seq_len: int | None = Field(None, ge=16)
    """Context window: longer prompts keep their first and last (max_seq_len - max_new_tokens) // 2 tokens
    (InfiniteBench middle-truncates to 128K). Default: eval.context_length."""
    max_samples: int | None = Field(None, ge=1)
    """At most this many samples per task (for quick runs)."""
    chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (chat/SFT models)."""


class DuringTrainingConfig(_Section):
    enabled: bool = False
    """Evaluate every committed checkpoint while training runs (`longctx.eval.during_training`): the training
    loop publishes each checkpoint's HF model to `<train root>/eval_snapshots/step_<N>/`; a pool of Ray actors
    (`actors`, each with its own `num_cpus`) evaluates them in step order while the workers keep training, and appends one record per
    checkpoint to `<train root>/checkpoint_eval.jsonl` (tokens trained, NLL beyond the base length, passkey,
    needle). A checkpoint already in that file is never evaluated again, also after a resume. Needs
    `train.checkpoint_every` > 0 for more than the final checkpoint."""
    actors: int = Field(1, ge=1)
    """Evaluation actors in the pool. Each evaluates one checkpoint at a time, so with N actors up to N
    checkpoints are evaluated at once: raise it when one evaluation takes longer than `train.checkpoint_every`
    steps of training (the backlog then stays bounded instead of growing until training ends)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each evaluation actor reserves (beside the training workers' `train.cpus_per_worker` each). When the
    cluster has none to spare the evaluations queue until training ends: training never waits for them."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each evaluation actor reserves."""
    context_length: int | None = Field(None, ge=16)
    """Context length for NLL by position (default: eval.context_length, else data.seq_len)."""
    num_documents: int = Field(8, ge=1)
    """Held-out documents (eval.documents) scored per checkpoint."""
    passkey_lengths: list[int] = Field(default_factory=list)
    """Passkey prompt lengths (default: [context_length]); empty with `passkey` false skips passkey."""
    passkey: bool = True
    """Run passkey retrieval on every checkpoint (eval.passkey.depths; `passkey_trials` per cell)."""
    passkey_trials: int = Field(2, ge=1)
    """Passkey prompts per (length, depth) cell."""
    needle: bool = False
    """Also run the needle grid (eval.needle settings) on every checkpoint."""
    poll_s: float = Field(2.0, gt=0)
    """How often the driver looks for newly committed checkpoints."""
    keep_snapshots: bool = False
    """Keep the published HF snapshots after they are evaluated (default: removed once their record is in
    checkpoint_eval.jsonl; Ray Train's own checkpoints are kept or pruned as usual)."""
    objective: Literal["passkey", "needle", "neg_nll_beyond_base"] = "passkey"
    """Retrieval metric offered to Ray Tune (reported as `ckpt_<objective>` with every checkpoint) and watched
    by the early stop; higher is better (`neg_nll_beyond_base` is minus the NLL beyond the base length)."""
    early_stop_patience: int = Field(0, ge=0)
    """Stop training when `objective` has not improved by more than `early_stop_min_delta` over this many
    evaluated checkpoints in a row (0: never). Decided at checkpoint steps from the evaluations finished by
    then (they lag training by the evaluation time)."""
    early_stop_min_delta: float = Field(0.0, ge=0)
    """Improvement needed to reset the early-stop patience."""


class GateConfig(_Section):
    """The regression gate after every training stage (`longctx.eval.gate`): a short-context check of the stage's
    output model against its input model on the same prompts, before the output is published as the run's model."""

    enabled: bool = True
    """Run the gate after Long-PT, Long-SFT and each stage of a multi-stage recipe."""
    action: Literal["warn", "fail"] = "warn"
    """`warn`: a failed gate is the report's first line and `gate` in metrics.json, the run goes on; `fail`: the
    same, then the job exits with code 5 before the stage's model is published (a recipe's later stages do not
    start)."""
    length: int | None = Field(None, ge=16)
    """Context length of the gate's documents and prompts. Default: eval.base_context_length, else the
    max_position_embeddings of the run's first model (its original training length)."""
    num_documents: int = Field(16, ge=1)
    """Held-out documents (eval.documents, the first N with `length` tokens) for the NLL check."""
    max_nll_increase: float = Field(0.05, ge=0)
    """Allowed rise of the mean token NLL within `length`, in nats (after - before)."""
    passkey: bool = True
    """Check passkey accuracy at `length` (eval.passkey's prompt)."""
    passkey_depths: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Relative depths of the pass key."""
    passkey_trials: int = Field(4, ge=1)
    """Prompts per depth (one prompt is 100 / (depths x trials) points)."""
    ruler_tasks: list[RulerTask] = Field(default_factory=lambda: ["niah_single_1"])
    """RULER tasks checked at `length` (eval.ruler's settings otherwise); [] for none. A task whose prompt and
    tokens to generate do not fit `length` is skipped and named in the verdict (`skipped`); at a short base
    length set eval.ruler.tokens_to_generate (e.g. {niah: 16} at 256 tokens)."""
    ruler_samples: int = Field(20, ge=1)
    """Samples per RULER task (one sample is 100 / N points)."""
    max_retrieval_drop: float = Field(5.0, ge=0)
    """Allowed drop of passkey accuracy and of each RULER task's score, in points of 0-100 (before - after)."""
    choices: str | None = None
    """Short multiple-choice tasks (MMLU-style JSONL: `question`, `choices` [str], `answer` index; local, glob or
    s3://), scored by log-likelihood: the choice whose text is likeliest after the question is the model's answer."""
    choices_limit: int | None = Field(None, ge=1)
    """Score the first N questions of `choices` (default: all)."""
    max_choice_drop: float = Field(2.0, ge=0)
    """Allowed drop of multiple-choice accuracy, in points of 0-100 (before - after)."""


class EvalConfig(_Section):
    enabled: bool = True
    """Evaluate at the end of the job."""
    model: str | None = None
    """Model to evaluate (local or s3://). Default: the job's trained model."""
    documents: str = "builtin:corpus/heldout.jsonl.gz"
    """Held-out long documents for perplexity by position (local or s3://, any corpus format)."""
    text_field: str = "text"
    """Field of `documents` holding the text."""
    context_length: int | None = None
    """Context length for perplexity (default: data.seq_len)."""
    bucket_edges: list[int] = Field(default_factory=lambda: [0, 256, 512, 1024])
    """Position bucket edges for perplexity ([0,256) [256,512) ...)."""
    num_documents: int = Field(64, ge=1)
    """Held-out documents to score (the first N long enough)."""
    base_context_length: int | None = None
    """Context length the base model was trained at (marks the extrapolation region; default: its
    max_position_embeddings)."""
    baselines: list[Baseline] = Field(default_factory=lambda: ["naive", "dynamic_ntk"])
    """Training-free baselines on the base model, beside the trained model."""
    scaling_factor: float | None = Field(None, gt=0)
    """Factor for PI / dynamic NTK / YaRN baselines (Index used 8). Default: context_length / base length."""
    passkey: PasskeyConfig = Field(default_factory=PasskeyConfig)
    """Passkey retrieval settings."""
    batch_size: int = Field(4, ge=1)
    """Sequences per forward pass."""
    num_actors: int | None = Field(None, ge=1)
    """Ray Data actors (one model replica each) evaluating in parallel. Default: one per GPU in the cluster,
    else min(number of models, cluster CPUs)."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """GPUs each evaluation actor reserves. Default: 1 when the cluster has GPUs, else 0 (CPU)."""
    prefill_chunk_tokens: int = Field(4096, ge=1)
    """Long prompts are prefilled into the KV cache this many tokens at a time before greedy decoding."""
    seed: int = 0
    """Seed for passkeys, needles and haystack offsets (evaluation prompts are reproducible)."""
    perplexity: bool = True
    """Run perplexity by position on `documents`."""
    extra_context_lengths: list[int] = Field(default_factory=list)
    """Further context lengths for perplexity (e.g. [4096, 16384] beside a 32K context_length); each gets its
    own bucket table under `perplexity_at` in metrics.json."""
    needle: NeedleConfig = Field(default_factory=NeedleConfig)
    """Needle-in-a-haystack grid settings."""
    longbench: LongBenchConfig = Field(default_factory=LongBenchConfig)
    """LongBench/LEval-format task settings."""
    during_training: DuringTrainingConfig = Field(default_factory=DuringTrainingConfig)
    """Evaluation of every committed checkpoint while training runs (off by default)."""
    ruler: RulerConfig = Field(default_factory=RulerConfig)
    """RULER (13 synthetic tasks at chosen lengths; off by default)."""
    infinitebench: InfiniteBenchConfig = Field(default_factory=InfiniteBenchConfig)
    """InfiniteBench's self-scored tasks from the user's files (off by default)."""
    gate: GateConfig = Field(default_factory=GateConfig)
    """The short-context regression gate after every training stage (on by default; `action: warn`)."""


# ---------------------------------------------------------------------------------------------------- synth
SynLQuestion = Literal["lookup", "filter_count", "extremum", "multi_hop"]
RetrievalTask = Literal["passkey", "kv", "multi_needle"]


class _SampleLengths(_Section):
    @model_validator(mode="after")
    def _check_lengths(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        for name in ("formats", "questions", "tasks"):
            if name in type(self).model_fields and not getattr(self, name):
                raise ValueError(f"{name} is empty: name at least one")
        return self


class SynLConfig(_SampleLengths):
    num_samples: int = Field(64, ge=1)
    """Table question-answer samples to generate."""
    min_tokens: int = Field(256, ge=64)
    """Shortest sample (chat-templated prompt + answer), in tokens of data.tokenizer."""
    max_tokens: int = Field(1024, ge=64)
    """Longest sample; sample lengths are spread uniformly over [min_tokens, max_tokens]."""
    formats: list[Literal["markdown", "csv"]] = Field(default_factory=lambda: ["markdown", "csv"])
    """Table serializations, used in turn."""
    questions: list[SynLQuestion] = Field(default_factory=lambda: ["lookup", "filter_count", "extremum", "multi_hop"])
    """Question types, used in turn: `lookup` (a cell by key), `filter_count` (rows matching a category and a
    threshold), `extremum` (key of the row with the highest/lowest value), `multi_hop` (a key in table 1 ->
    its foreign key -> a cell of table 2)."""


class RetrievalConfig(_SampleLengths):
    num_samples: int = Field(64, ge=1)
    """Retrieval samples to generate."""
    min_tokens: int = Field(256, ge=64)
    """Shortest sample (chat-templated prompt + answer), in tokens of data.tokenizer."""
    max_tokens: int = Field(1024, ge=64)
    """Longest sample; lengths and needle depths are spread uniformly (a 2-D low-discrepancy sequence)."""
    tasks: list[RetrievalTask] = Field(default_factory=lambda: ["passkey", "kv", "multi_needle"])
    """Tasks, used in turn: `passkey` (a 5-digit pass key), `kv` (the value of one key among distractor
    key-value needles), `multi_needle` (all values of `num_needles` needles)."""
    num_needles: int = Field(3, ge=2)
    """Needles of a multi_needle sample (the first at the requested depth, the others at random depths)."""
    kv_distractors: int = Field(3, ge=0)
    """Extra key-value needles of a kv sample (same form, other keys)."""
    haystack: dict[str, str | SourceSpec] | None = None
    """Corpus the haystacks are cut from (any data.sources-style mapping, read by the data engine's readers).
    Default: data.sources (the shipped sample corpus unless changed)."""
    haystack_max_chars: int = Field(20_000_000, ge=1000)
    """At most this many characters of haystack text are read (haystacks are drawn from them at seeded offsets)."""


class SynthConfig(_Section):
    output: str | None = None
    """Where generated sets go (local or s3://): `tables/`, `retrieval/`, `cip/` below it, each published
    atomically with a manifest.json. Default: `<run dir>/synth`."""
    seed: int = 0
    """Every sample is a function of (seed, generator, sample index): the same seed gives identical output."""
    num_actors: int = Field(1, ge=1)
    """Ray Data generator actors (raise on a cluster)."""
    batch_size: int = Field(16, ge=1)
    """Samples per generator batch."""
    samples_per_shard: int = Field(4096, ge=1)
    """Samples per JSONL shard (SFT sets)."""
    tables: SynLConfig = Field(default_factory=SynLConfig)
    """Synthetic lengthy tables (SynL): typed tables with questions answered from them, as chat SFT samples."""
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    """Passkey / key-value / multi-needle retrieval instructions over corpus haystacks, as chat SFT samples."""


# ----------------------------------------------------------------------------------------------------- tune
SWEEP_ALIASES = {"rope_theta": "model.rope_theta", "token_budget": "train.token_budget"}
"""Short names a sweep's `params` may use for the two axes the papers sweep."""
Objective = Literal["nll_beyond_base", "overall_nll", "val_loss", "passkey_accuracy", "needle_score",
                    "ckpt_best_passkey", "ckpt_best_nll_beyond_base"]
OBJECTIVE_MODE = {"nll_beyond_base": "min", "overall_nll": "min", "val_loss": "min", "passkey_accuracy": "max",
                  "needle_score": "max", "ckpt_best_passkey": "max", "ckpt_best_nll_beyond_base": "min"}


class SweepParam(_Section):
    """One axis of the search space: exactly one of grid, choice, loguniform, uniform."""

    grid: list[Any] | None = None
    """Every value, in every combination with the other grid axes (tune.grid_search)."""
    choice: list[Any] | None = None
    """One value drawn per sample (tune.choice)."""
    loguniform: tuple[float, float] | None = None
    """[low, high], drawn log-uniformly per sample (tune.loguniform); e.g. rope_theta [1e4, 1e7]."""
    uniform: tuple[float, float] | None = None
    """[low, high], drawn uniformly per sample (tune.uniform)."""

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform, uniform (got {given or 'none'})")
        for k in ("grid", "choice"):
            if getattr(self, k) is not None and not getattr(self, k):
                raise ValueError(f"{k} must list at least one value")
        for k in ("loguniform", "uniform"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k}: low must be below high, got {list(lo_hi)}")
            if k == "loguniform" and lo_hi is not None and lo_hi[0] <= 0:
                raise ValueError(f"loguniform needs a positive low, got {lo_hi[0]}")
        return self


class AshaConfig(_Section):
    grace_period: int = Field(1, ge=1)
    """Optimizer steps a trial trains before it can be stopped (the first rung)."""
    reduction_factor: float = Field(2.0, gt=1)
    """Keep the top 1/reduction_factor of trials at each rung (rungs at grace_period x reduction_factor^k steps)."""
    max_t: int = Field(100, ge=1)
    """Steps the rungs are laid out up to (no rung at or beyond it); a trial that gets there trains and is
    evaluated to the end, it is never stopped for reaching it."""


class TuneConfig(_Section):
    name: str | None = None
    """Sweep name: its folder under output_dir, and the key for resuming (same command, same name: finished
    trials are kept and only the missing ones run). Default: run_name, else `sweep`."""
    params: dict[str, SweepParam | list[Any]] = Field(default_factory=dict)
    """Search space by dotted config path (`rope_theta` and `token_budget` are short for model.rope_theta and
    train.token_budget; any other key works: data.long_share, train.lr, ...). A plain list is a grid."""
    num_samples: int = Field(1, ge=1)
    """Draws of the random axes (choice / loguniform / uniform), each crossed with the whole grid."""
    objective: Objective = "nll_beyond_base"
    """What "best" means: mean held-out NLL beyond the base model's training length (default), overall NLL,
    the final validation loss, passkey accuracy or needle score (the last two: higher is better), or, with
    eval.during_training.enabled, the best passkey accuracy / lowest NLL beyond base over the trial's evaluated
    checkpoints (`ckpt_best_passkey`, `ckpt_best_nll_beyond_base`)."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """`asha` stops trials early on `val_loss` (needs train.val_every > 0); `fifo` runs every trial to the end."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    """ASHA settings (used with scheduler: asha)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials in flight at once (1: one after another, as on a laptop). Default: as many as the cluster's
    resources allow, which on an autoscaling cluster grows the GPU pool."""
    trial_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 0.1})
    """What each trial's driver process reserves (the training workers reserve their own, from train.*).
    Put it on a safe node: e.g. {"CPU": 1, "head_node": 0.01}."""
    max_failures: int = Field(0, ge=0)
    """Times a failed trial is retried (resuming from its last training checkpoint)."""
    seed: int = 0
    """Seed of the random axes' draws."""
    baselines: bool = True
    """Evaluate the base model's training-free baselines (eval.baselines) once, for the report's curves."""

    @model_validator(mode="after")
    def _check(self):
        names = [SWEEP_ALIASES.get(k, k) for k in self.params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"params: {dup} given twice (alias and full path)")
        for k in names:
            if k.split(".")[0] not in _SECTIONS or k.split(".")[0] == "tune" or "." not in k:
                raise ValueError(f"params: {k!r} is not a config key path like model.rope_theta or train.lr "
                                 f"(sections: {sorted(_SECTIONS - {'tune'})})")
        return self

    def space(self) -> dict[str, SweepParam]:
        """The search space with aliases expanded, plain lists turned into grids and numeric strings (YAML 1.1
        reads `1e4` as a string) turned into numbers."""
        out = {}
        for k, v in self.params.items():
            v = v if isinstance(v, SweepParam) else SweepParam(grid=list(v))
            for kind in ("grid", "choice"):
                if getattr(v, kind) is not None:
                    v = v.model_copy(update={kind: [_number(x) for x in getattr(v, kind)]})
            out[SWEEP_ALIASES.get(k, k)] = v
        return out


def _number(x: Any) -> Any:
    if isinstance(x, str):
        try:
            f = float(x)
        except ValueError:
            return x
        return int(f) if f.is_integer() and "." not in x and "e" not in x.lower() else f
    return x


# -------------------------------------------------------------------------------------------------- logging
class WandbConfig(_Section):
    enabled: bool = False
    """Log the same scalars and the run config to Weights & Biases (Ray's `setup_wandb`, rank 0 only). Needs the
    `wandb` package (`pip install longctx[tracking]`); the API key comes from WANDB_API_KEY or `wandb login`,
    never from this file."""
    project: str = "longctx"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user). Default: the key's default entity."""
    group: str | None = None
    """W&B run group. Default: the run id (training and evaluation runs of one job side by side)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """`offline` writes the run under `dir` for a later `wandb sync` (no network)."""
    dir: str | None = None
    """Local folder for W&B's files. Default: W&B's own (./wandb)."""
    tags: list[str] = Field(default_factory=list)
    """Tags on the W&B run."""


class MlflowConfig(_Section):
    enabled: bool = False
    """Log the same scalars and the run config (as params) to MLflow (Ray's `setup_mlflow`, rank 0 only). Needs
    the `mlflow` package (`pip install longctx[tracking]`)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (a server, `sqlite:///path/mlflow.db`, or a `file:/path/mlruns` store with
    MLFLOW_ALLOW_FILE_STORE=true). Default: MLFLOW_TRACKING_URI, else `sqlite:///<output_dir>/mlflow.db` when
    output_dir is local (the full `mlflow` package; `mlflow-skinny` needs a server or a file store)."""
    experiment_name: str = "longctx"
    """MLflow experiment (created if missing)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags on the MLflow run (longctx.run_id and longctx.role are always set)."""


class LoggingConfig(_Section):
    tensorboard: bool = True
    """TensorBoard event files under the run folder (`train/tensorboard/`, `eval/tensorboard/`; local or s3://):
    `tensorboard --logdir <run folder>` shows the training, validation and evaluation scalars."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases (off by default)."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow (off by default)."""
    flush_every_s: float = Field(10.0, gt=0)
    """On object storage, event files and metrics.jsonl/csv are uploaded at most this often (and at every
    checkpoint and at the end); local files are appended at every step."""


# --------------------------------------------------------------------------------------------------- stages
class StageModelConfig(_Section):
    """The RoPE keys a stage may change (`model.path` is the previous stage's final model)."""

    rope_theta: float | None = Field(None, gt=0)
    """RoPE base of this stage (e.g. ProLong: 8e6 at 64K, 1.28e8 at 512K)."""
    rope_scaling: RopeScalingConfig | None = None
    """RoPE scaling of this stage."""
    max_position_embeddings: int | None = None
    """Positions the stage's model is saved with (usually its data.seq_len)."""


class StageConfig(_Section):
    """One stage of a multi-stage recipe: the job's config with this stage's `data`, `model` (RoPE) and `train`
    keys, starting from the previous stage's final model (the first from model.path)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The stage's name: its folder `<run>/stages/<name>/` and its row in the report."""
    kind: Literal["pt", "sft"] = "pt"
    """`pt`: Long-PT on packed documents; `sft`: Long-SFT on chats (data.sft)."""
    data: dict[str, Any] = Field(default_factory=dict)
    """data.* keys of this stage, e.g. {seq_len: 65536, token_budget: 20000000000} (the rest: the job's)."""
    model: StageModelConfig = Field(default_factory=StageModelConfig)
    """model.rope_* and max_position_embeddings of this stage (the keys it sets; the rest: the job's)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """train.* keys of this stage, e.g. {lr: 1.0e-5, token_budget: 20000000000} (the rest: the job's)."""


def stage_config(cfg: "JobConfig", index: int, model_path: str | None = None) -> "JobConfig":
    """The job's config for stage `index`: its data, model and train keys applied over the job's, `model_path`
    (the previous stage's final model) as model.path, no `stages`. Errors name the stage and the key."""
    stage = cfg.stages[index]
    tree = json.loads(cfg.model_dump_json())
    tree["stages"] = []
    where = f"stages[{index}] ({stage.name})"
    for section, keys in (("data", stage.data), ("train", stage.train),
                          ("model", stage.model.model_dump(mode="json", exclude_unset=True))):
        for key, value in keys.items():
            set_dotted(tree, [section, *str(key).split(".")], value, f"{where}: {section}.{key}")
    if model_path:
        tree["model"]["path"] = model_path
    return config_from_dict(tree, where)


# ------------------------------------------------------------------------------------------------------ job
class JobConfig(_Section):
    run_name: str | None = None
    """Run id (folder under output_dir). Default: `<job>-<fingerprint>`, a hash of the settings that shape the
    results (not of output paths, Ray placement or logging), so running the same command again finds the run and
    resumes it: committed data is reused, training continues from the last checkpoint, a finished run says so.
    A run continued with settings that change its results is refused, naming the keys."""
    output_dir: str = "runs"
    """Where run folders (report, metrics, data, logs) go: local or s3://. A relative path is taken under
    LONGCTX_HOME when that is set; else under the current folder, except inside the temporary copy of the
    working dir that `ray job submit --working-dir` runs in, where it goes under ~/longctx."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object storage settings."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray connection and CPU budgets."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data preparation (sources -> tokenize -> length mixture -> packed rows)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Base model and RoPE changes."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training (Ray Train + DeepSpeed)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Long-context evaluation."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    """Synthetic long-context data (LongSkywork): SynL tables and retrieval instructions for Long-SFT."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """Ray Tune sweep over any of the keys above (`jobs/sweep.py`, `longctx tune`); ignored by the other jobs."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Experiment tracking: TensorBoard event files (default), Weights & Biases, MLflow."""
    stages: list[StageConfig] = Field(default_factory=list)
    """A multi-stage recipe (e.g. ProLong: 64K with RoPE base 8e6, then 512K with 1.28e8): the stages run in order in
    one command, each from the previous stage's final model, with the regression gate (eval.gate) after each; the
    last stage's model is evaluated and published. Empty: one stage, the job's own config."""

    @model_validator(mode="after")
    def _check_consistency(self) -> "JobConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must differ, got {names}")
        for i in range(len(self.stages)):
            stage_config(self, i)  # each stage's config must be valid on its own (the error names the stage)
        if self.train.num_workers % self.train.sequence_parallel:
            raise ValueError(
                f"train.num_workers={self.train.num_workers} is not a multiple of "
                f"train.sequence_parallel={self.train.sequence_parallel}: the data-parallel size would be fractional"
            )
        if self.train.val_every == 0 and (self.tune.scheduler == "asha" or self.tune.objective == "val_loss"):
            raise ValueError("tune.scheduler=asha and tune.objective=val_loss read the validation loss: "
                             "set train.val_every > 0")
        if self.tune.objective.startswith("ckpt_") and not self.eval.during_training.enabled:
            raise ValueError(f"tune.objective={self.tune.objective} reads the evaluations of every checkpoint: "
                             "set eval.during_training.enabled=true (and train.checkpoint_every > 0)")
        return self


# ------------------------------------------------------------------------------------------------ loading
_SECTIONS = {"storage", "ray", "data", "model", "train", "eval", "synth", "tune", "logging", "stages"}


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, booleans, lists, null), keeping plain strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict (creating intermediate dicts)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError("an override has an empty key (the form is key.path=value)")
    if parts[:2] == ["tune", "params"] and len(parts) > 3:  # tune.params.train.lr=[...]: the key is a dotted path
        parts = [*parts[:2], ".".join(parts[2:])]
    # NOTE: errors name the key, never the value (it may be a secret)
    set_dotted(tree, parts, _parse_value(raw), f"override {key.strip()!r}")


def set_dotted(tree: dict, parts: list[str], value: Any, what: str) -> None:
    """Set `tree[parts[0]][parts[1]]... = value`, creating missing sections (`--set` overrides, sweep trials).
    `what` names the assignment in the error raised when a path goes through a value."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and parts[:2] == ["data", "sources"] and i == 2:
            child = node[part] = {"uri": child}  # data.sources.NAME.field=... on a plain-URI source
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(JobConfig, e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            msg = f"unknown key{did_you_mean(e['loc'][-1], allowed)}; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}{did_you_mean(e.get('input'), _literal_choices(e))}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def did_you_mean(given: Any, choices: list[str]) -> str:
    """` (did you mean 'x'?)` when `given` is close to one of `choices` (difflib), else ``."""
    if not isinstance(given, str) or not choices:
        return ""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(given.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _literal_choices(e: dict) -> list[str]:
    """The allowed values of a pydantic literal_error (its ctx lists them as `'a', 'b' or 'c'`)."""
    return re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found at a validation-error location (skipping dict keys / union tags)."""
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            continue
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            # dict[str, X | SourceSpec] and friends
            for c in candidates:
                for a in getattr(c, "__args__", ()):
                    for b in [a, *getattr(a, "__args__", ())]:
                        if isinstance(b, type) and issubclass(b, BaseModel):
                            nxt = b
            if nxt is None:
                return None
        model = nxt
    return model


def config_from_dict(tree: dict, origin: str = "<dict>") -> JobConfig:
    unknown = set(tree) - _SECTIONS - set(JobConfig.model_fields)
    if unknown:
        allowed = sorted(JobConfig.model_fields)
        hints = "".join(did_you_mean(k, allowed) for k in sorted(unknown))
        raise ConfigError(
            f"invalid configuration ({origin}): unknown top-level key(s) {sorted(unknown)}{hints}; "
            f"allowed: {allowed}"
        )
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


EMBEDDED_DEFAULT = "builtin:recipes/tiny-long-pt.yaml"
"""The embedded default recipe: shipped corpus and tiny model, local Ray, CPU, a few minutes."""
EMBEDDED_SFT_DEFAULT = "builtin:recipes/tiny-long-sft.yaml"
"""The embedded Long-SFT default: shipped chat data (synthetic long + general instructions), tiny model, CPU."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job config from YAML (local, builtin: or s3://; schema defaults when `path` is None) and
    apply `a.b=c` overrides."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        from longctx import storage  # config files may be local, builtin: (shipped recipes) or s3://

        p = str(path)
        try:
            text = storage.read_text(p)
        except (storage.StorageError, FileNotFoundError, IsADirectoryError):
            raise ConfigError(f"config file {p!r} does not exist") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p!r} must hold a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
        origin = p
    for assignment in overrides or []:
        apply_override(tree, assignment)
    if overrides:  # the keys only: a value may be a secret
        origin += " + --set " + " ".join(a.partition("=")[0].strip() for a in overrides)
    return config_from_dict(tree, origin)


def dump_config(cfg: JobConfig) -> str:
    """YAML of the full resolved config (what a run records beside its outputs)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def job_config_schema() -> dict:
    """JSON Schema of the job config (exported to schemas/job_config.schema.json)."""
    schema = JobConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://longctx.dev/schemas/job_config.schema.json"
    return schema


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"
