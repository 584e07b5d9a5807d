"""Checks before Ray starts: everything a job can find wrong from its config and its inputs, found at once.

    problems = check_job(cfg, "pt")       # [] when the job can start; else one Problem per mistake
    require(cfg, "pt")                    # raises PreflightError (a ConfigError: jobs exit 2) listing all of them

Every job (`jobs/*.py`, the `longctx` verbs) calls `require` right after loading its config, before `ray.init`,
and `longctx config validate --kind pt|sft|eval|prepare|sweep` runs the same checks. Each problem is one line:
where (the config key), what is wrong, and the fix. What is checked (per job kind, see `KIND_CHECKS`):

- the model folder (local or s3://) exists and holds config.json and *.safetensors; a Hugging Face hub id
  (`meta-llama/Llama-2-7b-hf`) gets "download it first";
- the tokenizer loads, and its vocabulary fits the model's embedding (and equals the tokenizer shipped with the
  model, when it ships one);
- every data source (and the evaluation documents) resolves to at least one file of a readable format, and its
  first records hold what the job reads: text in `text_field` (Long-PT), chats in `messages` (Long-SFT); a miss
  names the field found and the setting that fixes it (`longctx.probe`);
- S3: credentials exist and work (one line naming the missing variable or role; never a botocore traceback);
- the batch layout divides for the configured workers (with the nearest valid values);
- data.seq_len against the model's positions after the configured RoPE changes;
- attention backend x micro-batch x sequence-parallel combinations that cannot keep packed documents apart.

Warnings (printed, not fatal) cover things that are legal but rarely meant, e.g. training past the model's
positions with RoPE unchanged. `LONGCTX_PREFLIGHT=0` skips the checks (for an emergency; the job then fails
wherever the first mistake bites). Cost: about a second plus the tokenizer load (imports included), S3 listings
are bounded (one LIST of up to 1,000 keys per URI, 3 s connect timeout). The module is a little over 600 lines
on purpose: every check a job runs before Ray starts is listed here, per job kind, in one place.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

from longctx import storage
from longctx.config import ConfigError, JobConfig, config_from_dict, set_dotted, stage_config
from longctx.data.pipeline import load_manifest
from longctx.plan.planner import Planner, resolve_gpu
from longctx.plan.report import refusal
from longctx.probe import probe_source, probe_text_source
from longctx.runs.handoff import check_packed_data
from longctx.tracking import missing_packages
from longctx.train.schedule import BatchLayoutError, derive_layout

KINDS = ("pt", "sft", "eval", "prepare", "sweep")
CORPUS_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst",
                   ".ndjson.zst", ".parquet")
SFT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
EVAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Problem:
    where: str
    """The config key (or keys) at fault, e.g. `model.path` or `data.sources.web`."""
    what: str
    """What is wrong, with the value or file that shows it."""
    fix: str
    """What to change."""

    def line(self) -> str:
        return f"{self.where}: {self.what}; fix: {self.fix}"


class PreflightError(ConfigError):
    """The job cannot run as configured; `problems` lists every mistake found (the message: one line each)."""

    def __init__(self, problems: list[Problem], kind: str):
        self.problems = problems
        n = len(problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} found before starting the {kind} job (nothing was run):"]
        lines += [f"  - {p.line()}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class _State:
    cfg: JobConfig
    kind: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    s3_blocked: str | None = None
    """Why S3 cannot be used at all (no credentials, endpoint unreachable): later S3 checks are skipped."""
    model_config: dict | None = None
    """The model's config.json (text part), when it could be read."""
    model_config_full: dict | None = None
    """The whole config.json (what the memory plan builds the model from)."""
    model_dir: str | None = None
    """Local folder of the model (S3 models are not downloaded for the checks)."""

    def add(self, where: str, what: str, fix: str) -> None:
        self.problems.append(Problem(where, what, fix))

    def warn(self, where: str, what: str, fix: str) -> None:
        self.warnings.append(Problem(where, what, fix))


# ------------------------------------------------------------------------------------------------------ S3
def _s3_uris(cfg: JobConfig, kind: str) -> dict[str, str]:
    """Config key -> s3:// URI for every S3 location this kind of job touches."""
    keys: dict[str, str | None] = {"output_dir": cfg.output_dir}
    if kind in ("pt", "sft", "sweep", "eval"):
        keys["model.path"] = cfg.model.path
    if kind in ("pt", "sft", "sweep", "prepare"):
        keys["data.tokenizer"] = cfg.data.tokenizer
        keys["data.output"] = cfg.data.output
        for name, spec in cfg.data.source_specs().items():
            for i, uri in enumerate([spec.uri] if isinstance(spec.uri, str) else spec.uri):
                keys[f"data.sources.{name}" + (f"[{i}]" if not isinstance(spec.uri, str) else "")] = uri
    if kind == "eval" or (kind in ("pt", "sweep") and cfg.eval.enabled):
        keys["eval.documents"] = cfg.eval.documents
        keys["eval.model"] = cfg.eval.model
    if cfg.train.val_documents and kind in ("pt", "sft", "sweep"):
        keys["train.val_documents"] = cfg.train.val_documents
    return {k: v for k, v in keys.items() if v and storage.is_s3(str(v))}


_CLIENTS: dict[tuple, object] = {}


def _s3_client():
    """One boto3 client per endpoint/region/credentials (creating one takes a noticeable fraction of a second)."""
    import boto3  # deferred: boto3 (slow to import), needed only here
    from botocore.config import Config  # deferred: heavy import, used only here

    opts = storage.options()
    key = (opts.endpoint_url, opts.region, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if key not in _CLIENTS:
        _CLIENTS[key] = boto3.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region,
                                     config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
    return _CLIENTS[key]


def _missing_credentials_line() -> tuple[str, str]:
    env = os.environ
    has_id, has_secret = bool(env.get("AWS_ACCESS_KEY_ID")), bool(env.get("AWS_SECRET_ACCESS_KEY"))
    if has_id and not has_secret:
        return "AWS_SECRET_ACCESS_KEY is not set (AWS_ACCESS_KEY_ID is)", "export AWS_SECRET_ACCESS_KEY"
    if has_secret and not has_id:
        return "AWS_ACCESS_KEY_ID is not set (AWS_SECRET_ACCESS_KEY is)", "export AWS_ACCESS_KEY_ID"
    role = ("instance metadata is disabled (AWS_EC2_METADATA_DISABLED)" if env.get("AWS_EC2_METADATA_DISABLED")
            else "no IAM role / instance profile answered")
    return (f"no AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set, no AWS_PROFILE or "
            f"~/.aws/credentials entry, and {role}",
            "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an IAM role is attached")


def _check_s3_credentials(st: _State, uris: dict[str, str]) -> None:
    import botocore.exceptions  # deferred: heavy import, used only here
    import botocore.session  # deferred: heavy import, used only here

    where = "S3 (" + ", ".join(sorted(uris)) + ")"
    try:
        creds = botocore.session.get_session().get_credentials()
    except botocore.exceptions.ProfileNotFound as e:
        st.s3_blocked = "profile"
        st.add(where, f"AWS_PROFILE names a profile that does not exist ({e})",
               "set AWS_PROFILE to a profile in ~/.aws/config, or unset it")
        return
    except botocore.exceptions.PartialCredentialsError:
        st.s3_blocked = "credentials"
        st.add(where, *_missing_credentials_line())
        return
    except Exception as e:  # noqa: BLE001 - any credential-provider failure is one line, not a traceback
        st.s3_blocked = "credentials"
        st.add(where, f"AWS credentials could not be resolved: {type(e).__name__}: {e}",
               "fix the AWS credential settings (variables, profile, role)")
        return
    if creds is None:
        what, fix = _missing_credentials_line()
        st.s3_blocked = "credentials"
        st.add(where, what, fix)


def _s3_error(e: Exception, uri: str) -> tuple[str, str, bool]:
    """(what, fix, blocks_all_s3) for an exception of an S3 request on `uri`."""
    import botocore.exceptions as bx  # deferred: heavy import, used only here

    if isinstance(e, bx.NoCredentialsError):
        what, fix = _missing_credentials_line()
        return what, fix, True
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionError)):
        ep = storage.options().endpoint_url or "AWS"
        return (f"cannot reach the S3 endpoint {ep} ({type(e).__name__})",
                "check storage.endpoint_url / AWS_ENDPOINT_URL and the network", True)
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if code == "NoSuchBucket":
            return f"bucket {bucket!r} does not exist", "create the bucket or correct the URI", False
        if code in ("InvalidAccessKeyId", "InvalidClientTokenId"):
            return ("AWS_ACCESS_KEY_ID is not a key this endpoint knows", "use a valid access key", True)
        if code == "SignatureDoesNotMatch":
            return ("AWS_SECRET_ACCESS_KEY does not match AWS_ACCESS_KEY_ID", "use the secret of this access key",
                    True)
        if code in ("ExpiredToken", "TokenRefreshRequired", "RequestExpired"):
            return "the AWS session token has expired", "refresh the credentials (AWS_SESSION_TOKEN)", True
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return (f"access denied listing {uri}", f"grant s3:ListBucket and s3:GetObject on bucket {bucket!r} "
                    "to these credentials", False)
        return f"S3 error {code or type(e).__name__} on {uri}", "check the URI and permissions", False
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "check the URI", False


def _s3_files(uri: str, limit: int = 1000) -> list[str]:
    """Up to `limit` object URIs under an s3:// URI (an object, a prefix, or a glob). Raises botocore errors."""
    uri = storage.normalize(uri)
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = _s3_client()
    if any(ch in key for ch in "*?["):
        head = re.split(r"[*?\[]", key, maxsplit=1)[0]
        resp = client.list_objects_v2(Bucket=bucket, Prefix=head, MaxKeys=limit)
        return [f"s3://{bucket}/{o['Key']}" for o in resp.get("Contents", []) if fnmatch.fnmatch(o["Key"], key)]
    prefix = key.rstrip("/") + "/" if key else ""
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
    found = [f"s3://{bucket}/{o['Key']}" for o in resp.get("Contents", []) if not o["Key"].endswith("/")]
    if found or not key:
        return found
    try:
        client.head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        import botocore.exceptions as bx  # deferred: heavy import, used only here

        if isinstance(e, bx.ClientError) and str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey",
                                                                                              "NotFound"):
            return []
        raise
    return [uri]


def _files(st: _State, where: str, uri: str) -> list[str] | None:
    """Files under a URI (local or s3://, bounded listing on S3); None after recording a problem."""
    try:
        norm = storage.normalize(uri)
    except storage.StorageError as e:
        st.add(where, str(e), "correct the URI")
        return None
    if storage.is_s3(norm):
        if st.s3_blocked:
            return None
        try:
            return _s3_files(norm)
        except Exception as e:  # noqa: BLE001 - reported as one line
            what, fix, blocking = _s3_error(e, norm)
            if blocking:
                st.s3_blocked = what
                st.add(f"S3 ({where})", what, fix)
            else:
                st.add(where, what, fix)
            return None
    try:
        return storage.expand(norm, None, hidden=True)
    except storage.StorageError:
        st.add(where, f"{uri}: no such file, folder or glob match", "correct the path (relative paths are "
               f"relative to {os.getcwd()})")
        return None


def _check_files(st: _State, where: str, uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The readable files under `uri` (sorted); [] after recording a problem."""
    files = _files(st, where, uri)
    if files is None:
        return []
    readable = [f for f in files if f.lower().endswith(suffixes) and not os.path.basename(f).startswith(("_", "."))]
    if not readable:
        seen = f" ({len(files)} other file{'s' if len(files) != 1 else ''}, e.g. {os.path.basename(files[0])})" \
            if files else " (empty)"
        st.add(where, f"{uri} holds no readable files{seen}", f"point it at {', '.join(suffixes)} files")
    return sorted(readable)


def _probe(st: _State, findings) -> None:
    for f in findings:  # what longctx.probe found in a source's first records: fatal ones are problems
        (st.add if f.fatal else st.warn)(f.where, f.what, f.fix)


# ---------------------------------------------------------------------------------------------------- model
def _check_model(st: _State, where: str, uri: str, *, main: bool) -> None:
    """Folder exists and holds config.json + safetensors; reads config.json (main model only)."""
    raw = str(uri)
    try:
        norm = storage.normalize(raw)
    except storage.StorageError as e:
        st.add(where, str(e), "use a local folder, s3:// prefix or builtin: asset")
        return
    if storage.is_s3(norm):
        files = _files(st, where, norm.rstrip("/") + "/")
        if files is None:
            return
        names = {f[len(norm.rstrip("/")) + 1:] for f in files}
        if not names:
            st.add(where, f"{raw}: no objects under this prefix", "upload the model folder there or correct the URI")
            return
        if main and "config.json" in names:
            try:
                bucket, _, key = norm[len("s3://"):].partition("/")
                body = _s3_client().get_object(Bucket=bucket, Key=f"{key.rstrip('/')}/config.json")["Body"].read()
                st.model_config_full = json.loads(body)
                st.model_config = _text_config(st.model_config_full)
            except Exception as e:  # noqa: BLE001
                st.add(where, f"{raw}/config.json cannot be read: {type(e).__name__}: {e}", "re-upload config.json")
    else:
        if not os.path.isdir(norm):
            if not os.path.exists(norm) and _HUB_ID.fullmatch(raw) and not raw.startswith((".", "/", "~")):
                st.add(where, f"{raw!r} is not a local folder; it looks like a Hugging Face hub id, and longctx "
                       "loads models only from local folders or s3:// (no downloads at run time)",
                       f"download it first: `huggingface-cli download {raw} --local-dir models/{raw.split('/')[1]}` "
                       f"and set {where}=models/{raw.split('/')[1]} (or upload it to s3:// and point there)")
            else:
                st.add(where, f"{raw}: {'not a folder' if os.path.exists(norm) else 'folder does not exist'}",
                       "point it at a Hugging Face model folder (config.json + *.safetensors)")
            return
        names = set(os.listdir(norm))
        if main:
            st.model_dir = norm
            if "config.json" in names:
                try:
                    with open(os.path.join(norm, "config.json")) as f:
                        st.model_config_full = json.load(f)
                    st.model_config = _text_config(st.model_config_full)
                except (OSError, ValueError) as e:
                    st.add(where, f"{norm}/config.json is not valid JSON: {e}", "replace config.json")
    if "config.json" not in names:
        st.add(where, f"{raw} has no config.json", "point it at a Hugging Face model folder (save_pretrained output)")
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith((".bin", ".pt")) and not n.startswith("training_args")]
        allow = st.cfg.model.allow_pickle
        if pickled and not allow:
            st.add(where, f"{raw} has only pickle-based weights ({sorted(pickled)[0]}); loading them can run code",
                   "convert to safetensors, or set model.allow_pickle=true if you trust the source")
        elif not pickled:
            st.add(where, f"{raw} has no model weights (*.safetensors)", "point it at a folder with the weights")


def _text_config(d: dict) -> dict:
    return d.get("text_config") or d if isinstance(d, dict) else {}


def _vocab(folder: str) -> dict[str, int]:
    """Token -> id of the tokenizer in a local folder. Reads tokenizer.json with the `tokenizers` library (the
    Rust core of every fast tokenizer; importing transformers would import torch, seconds on a laptop); a folder
    without tokenizer.json goes through transformers (which may convert a slow tokenizer)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        import tokenizers  # deferred: heavy import, used only here

        return tokenizers.Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
    from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

    return load_tokenizer(folder).get_vocab()


def _check_tokenizer(st: _State) -> None:
    uri = st.cfg.data.tokenizer
    if storage.is_s3(str(uri)) and st.s3_blocked:
        return
    try:
        folder = storage.local_dir(uri)
        vocab_map = _vocab(folder)
    except Exception as e:  # noqa: BLE001 - reported as one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        st.add("data.tokenizer", f"{uri}: the tokenizer does not load ({type(e).__name__}: {msg[:200]})",
               "point it at a Hugging Face fast-tokenizer folder (tokenizer.json), e.g. the model folder")
        return
    if st.kind == "prepare" or st.model_config is None:
        return
    n_tok = max(vocab_map.values(), default=-1) + 1
    vocab = st.model_config.get("vocab_size")
    if isinstance(vocab, int) and n_tok > vocab:
        st.add("data.tokenizer", f"{uri} has {n_tok} tokens but {st.cfg.model.path} embeds only vocab_size={vocab}: "
               f"token ids >= {vocab} would index past the embedding",
               f"use the model's own tokenizer (data.tokenizer={st.cfg.model.path})")
        return
    if st.model_dir and folder != st.model_dir and os.path.exists(os.path.join(st.model_dir, "tokenizer.json")):
        try:
            own = _vocab(st.model_dir)
        except Exception:  # noqa: BLE001 - the model's own tokenizer is only used for the comparison
            return
        if own != vocab_map:
            st.add("data.tokenizer", f"{uri} differs from the tokenizer shipped with {st.cfg.model.path} "
                   f"({len(vocab_map)} vs {len(own)} tokens, different ids)",
                   f"use the model's own tokenizer (data.tokenizer={st.cfg.model.path})")


# -------------------------------------------------------------------------------------------- layout / model
def _check_layout(st: _State) -> None:
    t = st.cfg.train
    try:
        derive_layout(global_batch_tokens=t.global_batch_tokens, seq_len=st.cfg.data.seq_len,
                      micro_batch_size=t.micro_batch_size, num_workers=t.num_workers,
                      sequence_parallel=t.sequence_parallel)
    except BatchLayoutError as e:
        msg = str(e)
        what, _, fix = msg.partition("; use ")
        st.add("train.global_batch_tokens", what.split(": ", 1)[-1] if what.startswith("train.") else what,
               ("use " + fix) if fix else "make the numbers divide")


def _check_positions(st: _State) -> None:
    hc, m, seq_len = st.model_config, st.cfg.model, st.cfg.data.seq_len
    if m.max_position_embeddings is not None and m.max_position_embeddings < seq_len:
        st.add("model.max_position_embeddings", f"{m.max_position_embeddings} is below data.seq_len={seq_len}: "
               "rows would use positions the model is not configured for",
               f"set model.max_position_embeddings >= {seq_len} (or leave it unset: it defaults to data.seq_len)")
    if hc is None:
        return
    orig = hc.get("max_position_embeddings") or hc.get("n_positions") or hc.get("max_sequence_length")
    rope = any(k in hc for k in ("rope_theta", "rope_parameters", "rope_scaling")) or \
        hc.get("position_embedding_type", "rope") == "rope" and "n_positions" not in hc
    if not rope and isinstance(orig, int) and orig < seq_len:
        st.add("data.seq_len", f"{seq_len} exceeds the model's {orig} learned absolute positions (no RoPE to change)",
               f"use data.seq_len <= {orig}, or a RoPE model")
        return
    if m.rope_scaling is not None:
        base = m.rope_scaling.original_max_position_embeddings or orig
        if isinstance(base, int):
            covered = int(base * m.rope_scaling.factor)
            if covered < seq_len:
                st.add("model.rope_scaling.factor", f"{m.rope_scaling.type} x{m.rope_scaling.factor:g} over "
                       f"{base} original positions covers {covered} < data.seq_len={seq_len}",
                       f"use model.rope_scaling.factor >= {seq_len / base:g}")
    elif m.rope_theta is None and isinstance(orig, int) and orig < seq_len and st.kind != "eval":
        st.warn("model.rope_theta", f"data.seq_len={seq_len} is beyond the model's {orig} positions with RoPE "
                "unchanged (plain extrapolation)", "the recipes raise model.rope_theta (see `longctx rope suggest`)")


def _check_backend(st: _State) -> None:
    cfg, t = st.cfg, st.cfg.train
    attn = cfg.model.attn_implementation
    if attn == "auto":  # as longctx.model.load.pick_attn_implementation on the workers (no torch import here)
        attn = ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention") \
            if t.use_gpu else "sdpa"
    sp, mbs = t.sequence_parallel, t.micro_batch_size
    if attn == "flash_attention_2" and not t.use_gpu:
        st.add("model.attn_implementation", "flash_attention_2 runs only on GPUs but train.use_gpu=false",
               "use sdpa (or flex_attention) on CPU, or set train.use_gpu=true")
    if (cfg.data.attention == "document" and attn == "flash_attention_2" and sp > 1 and mbs > 1):
        st.add("train.micro_batch_size", f"{mbs} rows per micro-batch with flash_attention_2 and "
               f"train.sequence_parallel={sp}: the varlen kernel finds document starts only in a batch of one row, "
               "so packed documents would attend to each other",
               "set train.micro_batch_size=1 (gradient accumulation keeps the global batch), or use sdpa")
    if sp > 1:
        if cfg.data.seq_len % sp:
            st.add("data.seq_len", f"{cfg.data.seq_len} is not divisible by train.sequence_parallel={sp}",
                   f"use a data.seq_len that is a multiple of {sp}")
        hc = st.model_config or {}
        heads, kv = hc.get("num_attention_heads"), hc.get("num_key_value_heads") or hc.get("num_attention_heads")
        if isinstance(heads, int) and heads % sp:
            st.add("train.sequence_parallel", f"{sp} does not divide the model's num_attention_heads={heads} "
                   "(Ulysses splits heads over the group)", f"use a divisor of {heads}")
        elif isinstance(kv, int) and kv % sp and sp % kv:
            st.add("train.sequence_parallel", f"{sp} and the model's num_key_value_heads={kv} do not divide "
                   "either way", f"use a divisor or multiple of {kv}")
        if t.val_every:
            st.add("train.val_every", f"validation rows are not sharded over sequence-parallel ranks "
                   f"(train.sequence_parallel={sp})", "set train.val_every=0 or train.sequence_parallel=1")


def _check_memory(st: _State) -> None:
    """A GPU job whose layout does not fit the GPU's memory (longctx.plan): refused with predicted vs usable GiB,
    the dominant term and the nearest layout that fits. Needs the model's config.json and a known GPU memory."""
    cfg = st.cfg
    if not cfg.train.use_gpu or not isinstance(st.model_config_full, dict) or st.problems:
        return  # nothing to plan, or the job is refused already (a plan of a broken config would mislead)

    kind, memory, _ = resolve_gpu(cfg)
    if memory is None:
        st.warn("train.gpu_type", "the workers' GPU is not known, so whether this layout fits its memory was not "
                "checked", "set train.gpu_type (h100, h200, a100-80gb, a100-40gb, l40s) or train.gpu_memory_gib")
        return
    try:
        planner = Planner(cfg, model_config=st.model_config_full)
        plan = planner.plan()
    except Exception as e:  # noqa: BLE001 - a plan that cannot be made is a warning, never a crash of the checks
        st.warn("train", f"the memory plan could not be made ({type(e).__name__}: {str(e)[:200]})",
                "run `longctx plan` to see why")
        return
    if plan.fits is False:
        what, fix = refusal(plan, planner.nearest_fit())
        st.add("train (GPU memory)", what, fix + "; `longctx plan` shows the breakdown")


# ------------------------------------------------------------------------------------------------------ run
def _sources(st: _State, suffixes: tuple[str, ...]) -> None:
    """Every source resolves to readable files, and its first records fit the job (`longctx.probe`)."""
    for name, spec in sorted(st.cfg.data.source_specs().items()):
        uris = [spec.uri] if isinstance(spec.uri, str) else list(spec.uri)
        for i, uri in enumerate(uris):
            where = f"data.sources.{name}" + (f"[{i}]" if len(uris) > 1 else "")
            _probe(st, probe_source(st.cfg, st.kind, name, where, uri, _check_files(st, where, uri, suffixes)))


def _check_eval_suites(st: _State) -> None:
    """RULER's QA and essay files and InfiniteBench's folder exist before Ray starts (`longctx.eval.ruler`)."""
    ru, ib = st.cfg.eval.ruler, st.cfg.eval.infinitebench
    if ru.enabled:
        for task, field in (("qa_1", "squad"), ("qa_2", "hotpotqa")):
            uri = getattr(ru, field)
            if uri:
                _check_files(st, f"eval.ruler.{field}", uri, (".json",))
            elif task in ru.tasks:
                st.add("eval.ruler.tasks", f"{task} needs RULER's {field}.json, and eval.ruler.{field} is not set",
                       f"set eval.ruler.{field}=PATH, or leave {task} out of eval.ruler.tasks")
        _check_files(st, "eval.ruler.essay", ru.essay, EVAL_SUFFIXES + (".txt", ".md"))
    if ib.enabled:
        if not ib.data:
            st.add("eval.infinitebench.data", "not set (eval.infinitebench.enabled is true)",
                   "point it at a folder of InfiniteBench's <task>.jsonl files")
        else:
            _check_files(st, "eval.infinitebench.data", ib.data, EVAL_SUFFIXES)


def _check_sweep_grid(st: _State, limit: int = 512) -> None:
    """Layout, positions and backend of every grid point of a sweep (up to `limit`): a trial whose parameters do
    not divide would otherwise fail minutes into the sweep. Random axes (choice/uniform) are not enumerable."""
    grid = {k: v.grid for k, v in st.cfg.tune.space().items() if v.grid is not None}
    if not grid:
        return
    keys = sorted(grid)
    base = json.loads(st.cfg.model_dump_json())
    base.pop("tune", None)
    known = {p.line() for p in st.problems}
    found: dict[tuple[str, str, str], list[str]] = {}
    combos = list(itertools.islice(itertools.product(*(grid[k] for k in keys)), limit))
    for combo in combos:
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
        tree = copy.deepcopy(base)
        try:
            for k, v in zip(keys, combo):
                set_dotted(tree, k.split("."), v, f"tune.params.{k}")
            trial = config_from_dict(tree, f"sweep trial {label}")
        except ConfigError as e:
            found.setdefault(("tune.params", str(e).splitlines()[-1].strip(), "change the grid values"),
                             []).append(label)
            continue
        sub_st = _State(trial, "sweep", model_config=st.model_config, model_dir=st.model_dir)
        _check_layout(sub_st)
        _check_positions(sub_st)
        _check_backend(sub_st)
        for p in sub_st.problems:
            if p.line() not in known:
                found.setdefault((p.where, p.what, p.fix), []).append(label)
    for (where, what, fix), labels in found.items():
        example = labels[0] if len(labels) == 1 else f"{len(labels)} of {len(combos)} trials, e.g. {labels[0]}"
        st.add(f"tune.params ({example}) -> {where}", what, fix)


def _check_prepared(st: _State) -> None:
    """data.prepared: a committed packed dataset whose manifest fits the job (longctx.runs.handoff)."""
    uri = st.cfg.data.prepared
    fix = "prepare data for this job's settings (jobs/prepare_data.py), or match the job to the data"
    try:
        committed = storage.is_committed(uri)
        manifest = load_manifest(uri) if committed else None
    except Exception as e:  # noqa: BLE001 - one line, whatever the store says
        st.add("data.prepared", f"{uri}: cannot be read ({type(e).__name__}: {e})", "correct the path or credentials")
        return
    if manifest is None:
        st.add("data.prepared", f"{uri}: not a committed packed dataset (no {storage.COMMIT_MARKER} marker)", fix)
        return
    for line in check_packed_data(st.cfg, {**manifest, "uri": uri}, "sft" if st.kind == "sft" else "pt"):
        st.add("data.prepared", line, fix)


KIND_CHECKS = {
    "prepare": ("s3", "tokenizer", "sources"),
    "pt": ("s3", "model", "tokenizer", "sources", "layout", "positions", "backend", "eval_inputs"),
    "sweep": ("s3", "model", "tokenizer", "sources", "layout", "positions", "backend", "eval_inputs"),
    "sft": ("s3", "model", "tokenizer", "sources", "layout", "positions", "backend"),
    "eval": ("s3", "model", "eval_inputs"),
}
"""What each kind of job checks (`eval_inputs`: eval.model and eval.documents, when evaluation runs)."""


def check_job(cfg: JobConfig, kind: str) -> list[Problem]:
    """Every problem found in `cfg` for a job of this kind (empty: it can start). Never starts Ray."""
    return _run(cfg, kind).problems


def _run_stages(cfg: JobConfig, kind: str) -> _State:
    """A multi-stage recipe: every stage's checks (its own kind, data, layout and memory), each problem named by its
    stage. Later stages start from the previous stage's model, which has the first model's shape: each stage is
    checked with model.path (`longctx.config.stage_config`)."""
    st = _State(cfg, kind)
    for i, stage in enumerate(cfg.stages):
        sub = _run(stage_config(cfg, i), stage.kind)
        where = f"stages[{i}] ({stage.name})"
        st.problems += [Problem(f"{where} {p.where}", p.what, p.fix) for p in sub.problems]
        st.warnings += [Problem(f"{where} {p.where}", p.what, p.fix) for p in sub.warnings]
    return st


def _run(cfg: JobConfig, kind: str) -> _State:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cfg.stages and kind in ("pt", "sft"):
        return _run_stages(cfg, kind)
    storage.configure(cfg.storage)
    st = _State(cfg, kind)
    checks = KIND_CHECKS[kind]
    uris = _s3_uris(cfg, kind)
    if "s3" in checks and uris:
        _check_s3_credentials(st, uris)
    if "model" in checks:
        _check_model(st, "model.path", cfg.model.path, main=True)
    if "eval_inputs" in checks and (kind == "eval" or cfg.eval.enabled):
        if cfg.eval.model:
            _check_model(st, "eval.model", cfg.eval.model, main=False)
        elif kind == "eval":
            st.warn("eval.model", f"not set: only the base model {cfg.model.path} and its training-free baselines "
                    f"({', '.join(cfg.eval.baselines) or 'none'}) are evaluated", "set eval.model=URI to evaluate a "
                    "trained model beside them")
        if cfg.eval.perplexity and (docs := _check_files(st, "eval.documents", cfg.eval.documents, EVAL_SUFFIXES)):
            _probe(st, probe_text_source("eval.documents", docs[0], cfg.eval.text_field, "eval.text_field"))
        _check_eval_suites(st)
    if "tokenizer" in checks:
        _check_tokenizer(st)
    if "sources" in checks and cfg.data.prepared and kind in ("pt", "sft"):
        _check_prepared(st)  # the corpus settings are not used: the prepared data is checked instead
    elif "sources" in checks:
        _sources(st, SFT_SUFFIXES if kind == "sft" else CORPUS_SUFFIXES)
        if kind == "sft" and cfg.data.sft.chat_template:
            files = _files(st, "data.sft.chat_template", cfg.data.sft.chat_template)
            if files == []:
                st.add("data.sft.chat_template", f"{cfg.data.sft.chat_template}: no such file", "correct the path")
    if "layout" in checks:
        _check_layout(st)
    if "positions" in checks:
        _check_positions(st)
    if "backend" in checks:
        _check_backend(st)
    if kind == "sweep":
        _check_sweep_grid(st)
    if "backend" in checks:
        _check_memory(st)  # last: only a job that is otherwise right is planned
    if kind in ("pt", "sft", "sweep"):  # logging.wandb / logging.mlflow need their package (longctx.tracking)

        for name in missing_packages(cfg):
            st.add(f"logging.{name}.enabled", f"true, but the `{name}` package is not installed here",
                   f"pip install '{name}' (or `pip install longctx[tracking]`; on a cluster, in the image or the "
                   f"job's runtime_env), or set logging.{name}.enabled=false")
    if kind in ("pt", "sft") and cfg.eval.gate.enabled and cfg.eval.gate.choices:
        _check_files(st, "eval.gate.choices", cfg.eval.gate.choices, EVAL_SUFFIXES)
    if kind in ("pt", "sft", "sweep") and cfg.train.val_documents and cfg.train.val_every:
        _check_files(st, "train.val_documents", cfg.train.val_documents, EVAL_SUFFIXES)
    return st


def require(cfg: JobConfig, kind: str, *, echo: bool = True) -> None:
    """Run the checks of `kind`; raise PreflightError listing every problem. Warnings and the time taken are
    printed (stderr) when `echo`. `LONGCTX_PREFLIGHT=0` skips everything."""
    if os.environ.get("LONGCTX_PREFLIGHT", "1") == "0":
        print("[preflight] skipped (LONGCTX_PREFLIGHT=0)", file=sys.stderr, flush=True)
        return
    t0 = time.perf_counter()
    st = _run(cfg, kind)
    if echo:
        for w in st.warnings:
            print(f"[preflight] warning: {w.line()}", file=sys.stderr, flush=True)
    if st.problems:
        raise PreflightError(st.problems, kind)
    if echo:
        print(f"[preflight] {kind}: checks passed in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def default_kind(cfg: JobConfig) -> str:
    """The kind `longctx config validate` assumes without --kind: sweep when tune.params is set, else pt."""
    return "sweep" if cfg.tune.params else "pt"
