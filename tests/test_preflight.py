"""Checks before Ray starts (longctx.preflight): every mistake of a config reported at once, one line each, exit 2,
within seconds and without a Ray process, on real files and a loopback S3 server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longctx import preflight, storage
from longctx.config import EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = storage.normalize("builtin:tiny-llama")


def _problems(cfg, kind="pt", limit_s: float = 10) -> dict[str, str]:
    t0 = time.perf_counter()
    found = preflight.check_job(cfg, kind)
    print(f"check_job({kind}): {len(found)} problems in {time.perf_counter() - t0:.2f}s")
    assert time.perf_counter() - t0 < limit_s
    return {p.where: p.line() for p in found}


def _model_copy(tmp_path: Path, name: str, **config_changes) -> Path:
    dest = tmp_path / name
    shutil.copytree(TINY, dest)
    if config_changes:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(config_changes)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_embedded_default_passes_quickly():
    t0 = time.perf_counter()
    cfg = load_config(EMBEDDED_DEFAULT)
    assert preflight.check_job(cfg, "pt") == []
    for kind in ("eval", "prepare"):
        assert preflight.check_job(cfg, kind) == [], kind
    assert time.perf_counter() - t0 < 10


def test_every_local_problem_reported_at_once(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a corpus")
    cfg = load_config(EMBEDDED_DEFAULT, [
        "model.path=meta-llama/Llama-2-7b-hf",
        f"data.sources.gone={tmp_path / 'missing'}",
        f"data.sources.empty={empty}",
        "train.global_batch_tokens=5000",
        "model.attn_implementation=flash_attention_2",
        "model.max_position_embeddings=512",
        f"eval.documents={tmp_path / 'heldout.jsonl'}",
    ])
    found = _problems(cfg)
    assert "download it first" in found["model.path"] and "huggingface-cli download meta-llama/Llama-2-7b-hf" \
        in found["model.path"]
    assert "no such file" in found["data.sources.gone"]
    assert "holds no readable files" in found["data.sources.empty"] and "notes.txt" in found["data.sources.empty"]
    assert "not a multiple" in found["train.global_batch_tokens"] and "4096 or 6144" in found["train.global_batch_tokens"]
    assert "train.use_gpu=false" in found["model.attn_implementation"]
    assert "below data.seq_len=1024" in found["model.max_position_embeddings"]
    assert "no such file" in found["eval.documents"]
    assert len(found) == 7
    assert all("; fix: " in line and "\n" not in line for line in found.values())


def test_model_folder_tokenizer_and_positions(tmp_path):
    no_weights = _model_copy(tmp_path, "no-weights")
    (no_weights / "model.safetensors").unlink()
    found = _problems(load_config(EMBEDDED_DEFAULT, [f"model.path={no_weights}"]))
    assert "no model weights" in found["model.path"]

    pickled = _model_copy(tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "pickle" in _problems(load_config(EMBEDDED_DEFAULT, [f"model.path={pickled}"]))["model.path"]

    no_config = _model_copy(tmp_path, "no-config")
    (no_config / "config.json").unlink()
    assert "no config.json" in _problems(load_config(EMBEDDED_DEFAULT, [f"model.path={no_config}"]))["model.path"]

    small_vocab = _model_copy(tmp_path, "small-vocab", vocab_size=1000)
    line = _problems(load_config(EMBEDDED_DEFAULT, [f"model.path={small_vocab}"]))["data.tokenizer"]
    assert "2048 tokens" in line and "vocab_size=1000" in line

    # Same size, different ids: a tokenizer that is not the one the model was trained with.
    other_tok = tmp_path / "other-tok"
    shutil.copytree(storage.normalize("builtin:tiny-tokenizer"), other_tok)
    tj = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    (a, ia), (b, ib) = [(k, v) for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = ib, ia
    (other_tok / "tokenizer.json").write_text(json.dumps(tj))
    line = _problems(load_config(EMBEDDED_DEFAULT, [f"data.tokenizer={other_tok}"]))["data.tokenizer"]
    assert "differs from the tokenizer shipped with" in line

    broken_tok = tmp_path / "broken-tok"
    broken_tok.mkdir()
    (broken_tok / "tokenizer.json").write_text("{not json")
    assert "does not load" in _problems(load_config(EMBEDDED_DEFAULT, [f"data.tokenizer={broken_tok}"]))["data.tokenizer"]

    # RoPE scaling that does not reach seq_len; learned absolute positions cannot be stretched at all.
    found = _problems(load_config(EMBEDDED_DEFAULT, ["model.rope_scaling.type=linear", "model.rope_scaling.factor=2",
                                                      "data.seq_len=1024", "model.max_position_embeddings=null"]))
    assert "covers 512 < data.seq_len=1024" in found["model.rope_scaling.factor"] and ">= 4" in found["model.rope_scaling.factor"]
    absolute = _model_copy(tmp_path, "absolute", n_positions=256, position_embedding_type="absolute")
    cfg_abs = json.loads((absolute / "config.json").read_text())
    for k in ("rope_theta", "rope_parameters", "rope_scaling"):
        cfg_abs.pop(k, None)
    (absolute / "config.json").write_text(json.dumps(cfg_abs))
    assert "learned absolute positions" in _problems(load_config(EMBEDDED_DEFAULT, [f"model.path={absolute}"]))["data.seq_len"]


def test_backend_microbatch_sequence_parallel_combinations():
    base = ["train.use_gpu=true", "model.attn_implementation=flash_attention_2", "train.num_workers=4",
            "train.global_batch_tokens=8192"]
    found = _problems(load_config(EMBEDDED_DEFAULT, [*base, "train.sequence_parallel=2", "train.micro_batch_size=2"]))
    assert "attend to each other" in found["train.micro_batch_size"]
    # micro_batch_size > 1 without sequence parallelism is fine: the micro-batch is flattened into one varlen row.
    assert "train.micro_batch_size" not in _problems(load_config(EMBEDDED_DEFAULT, [*base, "train.micro_batch_size=2"]))
    # Full attention over a packed row needs no document boundaries.
    assert "train.micro_batch_size" not in _problems(load_config(EMBEDDED_DEFAULT, [
        *base, "train.sequence_parallel=2", "train.micro_batch_size=2", "data.attention=full"]))
    # The tiny model has 4 heads (2 KV heads): sp=8 cannot split them; sp needs a divisible seq_len; no validation.
    found = _problems(load_config(EMBEDDED_DEFAULT, ["train.num_workers=8", "train.sequence_parallel=8",
                                                     "data.seq_len=1020", "train.global_batch_tokens=1020",
                                                     "train.val_every=5"]))
    assert "num_attention_heads=4" in found["train.sequence_parallel"]
    assert "not divisible by train.sequence_parallel=8" in found["data.seq_len"]
    assert "train.val_every" in found


def _upload(s3_bucket: str, local: Path, prefix: str) -> str:
    for f in sorted(local.iterdir()):
        storage.write_bytes(f"{s3_bucket}/{prefix}/{f.name}", f.read_bytes())
    return f"{s3_bucket}/{prefix}"


def test_s3_inputs(s3_bucket, tmp_path):
    model = _upload(s3_bucket, Path(TINY), "models/tiny")
    storage.write_bytes(f"{s3_bucket}/corpus/a.jsonl", b'{"text": "hello"}\n')
    storage.write_bytes(f"{s3_bucket}/other/readme.txt", b"x")
    cfg = load_config(EMBEDDED_DEFAULT, [f"model.path={model}", f"data.tokenizer={model}",
                                         f"data.sources.web={s3_bucket}/corpus/", f"data.sources.glob={s3_bucket}/corpus/*.jsonl",
                                         f"data.sources.file={s3_bucket}/corpus/a.jsonl"])
    # NOTE: the moto server runs in this process and shares its GIL with the check: S3 requests are slower than
    # against a real endpoint, and much slower on a loaded machine; hence the wider bound here.
    assert _problems(cfg, limit_s=30) == {}

    storage.write_bytes(f"{s3_bucket}/half/config.json", (Path(TINY) / "config.json").read_bytes())
    found = _problems(load_config(EMBEDDED_DEFAULT, [
        f"model.path={s3_bucket}/half", f"data.sources.none={s3_bucket}/nothing-here/",
        f"data.sources.txt={s3_bucket}/other/", "data.sources.nobucket=s3://no-such-bucket-longctx/x/"]),
        limit_s=30)
    assert "no model weights" in found["model.path"]
    assert "holds no readable files (empty)" in found["data.sources.none"]
    assert "readme.txt" in found["data.sources.txt"]
    assert "does not exist" in found["data.sources.nobucket"]


def _run_job(script: str, args: list[str], tmp_path: Path, env_drop=(), **env_set) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(PYTHONPATH=str(ROOT / "platform"), RAY_TMPDIR=str(tmp_path / "ray-tmp"), **env_set)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - t0


def test_job_without_s3_credentials_exits_2_with_one_line_and_no_ray(s3_bucket, tmp_path):
    storage.write_bytes(f"{s3_bucket}/corpus/a.jsonl", b'{"text": "hello"}\n')
    proc, wall = _run_job("long_pt.py", ["--set", f"data.sources.web={s3_bucket}/corpus/",
                                         "--set", "train.global_batch_tokens=3000"], tmp_path,
                          env_drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), AWS_EC2_METADATA_DISABLED="true",
                          AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    print(f"long_pt.py without credentials: exit {proc.returncode} in {wall:.1f}s\n{proc.stderr}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and "NoCredentialsError" not in proc.stderr
    cred = [ln for ln in lines if "S3 (data.sources.web)" in ln]
    assert len(cred) == 1 and "AWS_ACCESS_KEY_ID" in cred[0] and "instance metadata is disabled" in cred[0]
    assert any("train.global_batch_tokens" in ln for ln in lines)  # the other problem, in the same report
    assert not (tmp_path / "ray-tmp").exists() and "Ray" not in proc.stdout  # no Ray session was started
    assert not (tmp_path / "runs").exists()  # nor a run folder
    assert wall < 20  # the check itself is timed (< 10 s) in-process above; this adds interpreter start-up

    # Only the secret missing: the line names that variable.
    proc, _ = _run_job("prepare_data.py", ["--set", f"data.sources.web={s3_bucket}/corpus/"], tmp_path,
                       env_drop=("AWS_SECRET_ACCESS_KEY",), AWS_EC2_METADATA_DISABLED="true",
                       AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    assert proc.returncode == 2 and "AWS_SECRET_ACCESS_KEY is not set (AWS_ACCESS_KEY_ID is)" in proc.stderr


@pytest.mark.parametrize("script,args", [
    ("long_sft.py", ["--set", "data.sources.chat=/no/such/chats.jsonl"]),
    ("eval_long.py", ["--set", "eval.model=/no/such/model"]),
])
def test_other_jobs_check_first(script, args, tmp_path):
    proc, wall = _run_job(script, args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "problem" in proc.stderr and "/no/such/" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray-tmp").exists()


def test_config_validate_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"), RAY_TMPDIR=str(tmp_path / "ray-tmp"))
    cmd = [sys.executable, "-m", "longctx.cli", "config", "validate"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "valid for a pt job" in ok.stdout
    bad = subprocess.run([*cmd, "--set", "model.path=/nope", "--set", f"data.sources.x={tmp_path}/none",
                          "--set", "train.num_workers=3", "--set", "train.global_batch_tokens=4096"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "3 problems" in bad.stderr and "model.path" in bad.stderr and "data.sources.x" in bad.stderr
    assert "3072" in bad.stderr  # nearest valid global batch for 3 workers
    schema_only = subprocess.run([*cmd, "--schema-only", "--set", "model.path=/nope"], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert schema_only.returncode == 0
    prep = subprocess.run([*cmd, "--kind", "prepare", "--set", "model.path=/nope"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr  # data preparation does not need the model
    assert not (tmp_path / "ray-tmp").exists()


def test_sweep_grid_points_are_checked():
    cfg = load_config(EMBEDDED_DEFAULT, ["tune.params.data.seq_len=[1024, 3000]", "tune.params.train.lr=[1e-3, 1e-4]"])
    found = _problems(cfg, "sweep")
    assert len(found) == 2, found  # seq_len 3000: the batch does not divide, and the recipe's 1024 positions
    assert all(w.startswith("tune.params (2 of 4 trials, e.g. data.seq_len=3000") for w in found)
    assert "not a multiple" in found["tune.params (2 of 4 trials, e.g. data.seq_len=3000, train.lr=0.001) -> "
                                     "train.global_batch_tokens"]
    assert any(w.endswith("-> model.max_position_embeddings") for w in found)
    assert _problems(load_config(EMBEDDED_DEFAULT, ["tune.params.train.lr=[1e-3, 1e-4]"]), "sweep") == {}


# ------------------------------------------------------------------------ the records themselves (longctx.probe)
def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_content_corpus_is_refused_in_seconds_with_the_fix_named(tmp_path):
    corpus = _jsonl(tmp_path / "web.jsonl", [{"id": i, "content": f"def f{i}():\n    return {i}\n" * 40,
                                              "meta": {"lang": "py"}} for i in range(20)])
    proc, wall = _run_job("long_pt.py", ["--set", f"data.sources.web={corpus}"], tmp_path)
    print(f"long_pt.py on a `content` corpus: exit {proc.returncode} in {wall:.1f}s\n{proc.stderr}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if "data.sources.web:" in ln)
    assert "no text in field 'text'" in line and "(fields: id, content, meta, meta.lang)" in line
    assert "fix: set data.sources.web.text_field=content" in line
    assert "1 problem found" in proc.stderr  # the three shipped sources pass
    assert not (tmp_path / "ray-tmp").exists() and not (tmp_path / "runs").exists()
    assert wall < 20
    # the fix it names is the fix
    assert _problems(load_config(EMBEDDED_DEFAULT, [f"data.sources.web={corpus}",
                                                    "data.sources.web.text_field=content"])) == {}


def test_long_sft_on_plain_text_is_refused_and_its_default_passes(tmp_path):
    proc, wall = _run_job("long_sft.py", ["--config", EMBEDDED_DEFAULT], tmp_path)  # the Long-PT recipe's corpus
    assert proc.returncode == 2 and "3 problems" in proc.stderr, proc.stderr[-3000:]
    assert "data.sources.code: the first 5 records of" in proc.stderr and "hold plain text ('text')" in proc.stderr
    assert not (tmp_path / "ray-tmp").exists() and wall < 20
    assert _problems(load_config(EMBEDDED_SFT_DEFAULT), "sft") == {}


def test_probe_names_the_fix_for_chats_in_other_shapes(tmp_path):
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    other = _jsonl(tmp_path / "conv.jsonl", [{"conversations": turns}] * 6)
    sharegpt = _jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]}] * 6)
    no_answer = _jsonl(tmp_path / "noans.jsonl", [{"messages": turns[:1]}] * 6)
    found = _problems(load_config(EMBEDDED_SFT_DEFAULT, [f"data.sources.conv={other}", f"data.sources.sg={sharegpt}",
                                                         f"data.sources.noans={no_answer}"]), "sft")
    assert set(found) == {"data.sources.conv", "data.sources.sg", "data.sources.noans"}
    assert "fix: set data.sft.messages_field=conversations" in found["data.sources.conv"]
    assert "from/value (ShareGPT" in found["data.sources.sg"]
    assert "no assistant turn" in found["data.sources.noans"]
    # chats given to Long-PT: named as chats, with the job that reads them
    found = _problems(load_config(EMBEDDED_DEFAULT, [f"data.sources.conv={other}"]))
    assert "these records are chats ('conversations'" in found["data.sources.conv"]
    assert "longctx sft" in found["data.sources.conv"]


def test_probe_reads_compressed_and_parquet_samples_and_only_warns_on_some_bad_records(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    recs = [{"body": "x" * 500, "title": "t"} for _ in range(8)]
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    overrides = [f"data.sources.{k}={tmp_path / n}" for k, n in (("gz", "a.jsonl.gz"), ("zst", "b.jsonl.zst"),
                                                                 ("pq", "c.parquet"))]
    found = _problems(load_config(EMBEDDED_DEFAULT, overrides))
    assert set(found) == {"data.sources.gz", "data.sources.zst", "data.sources.pq"}
    assert all("set data.sources." in v and ".text_field=body" in v for v in found.values())
    # some records without text among good ones: a warning (the data engine quarantines them), not a problem
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": "hello world"}, {"body": "no text"}] * 4)
    preflight.require(load_config(EMBEDDED_DEFAULT, [f"data.sources.mixed={mixed}"]), "pt")  # no PreflightError
    assert "[preflight] warning: data.sources.mixed: 2 of the first 5 records" in capsys.readouterr().err
    # a first record longer than what the probe reads is not mistaken for bad JSON
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * (5 << 20)}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert _problems(load_config(EMBEDDED_DEFAULT, [f"data.sources.big={big}"])) == {}
    # a source_field that no record has is named
    found = _problems(load_config(EMBEDDED_DEFAULT, [f"data.sources.mixed={mixed}",
                                                     "data.sources.mixed.source_field=meta.set"]))
    assert "no field 'meta.set'" in found["data.sources.mixed.source_field"]


@pytest.mark.s3
def test_probe_reads_a_sample_from_s3(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/web/part-0.jsonl", b"".join(
        json.dumps({"content": "some text " * 50}).encode() + b"\n" for _ in range(10)))
    found = _problems(load_config(EMBEDDED_DEFAULT, [f"data.sources.web={s3_bucket}/web/"]), limit_s=30)
    assert f"of {s3_bucket}/web/part-0.jsonl" in found["data.sources.web"]
    assert "fix: set data.sources.web.text_field=content" in found["data.sources.web"]
