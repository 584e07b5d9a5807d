"""`longctx plan`: from a folder holding only config.json, no GPU, no weights, no Ray. What each term responds to,
the longest-row search, the ZeRO bookkeeping beside DeepSpeed's own estimators, and the preflight refusal.

Shapes are real (Index-1.9B, Llama-3.1-8B config.json shipped under assets/model-shapes) at short rows, so a plan
takes a second or two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from longctx import storage
from longctx.cli import main
from longctx.config import load_config
from longctx.plan.planner import GIB, Planner

SHAPES = "builtin:model-shapes"
GPU_JOB = ["train.use_gpu=true", "train.zero_stage=3", "train.activation_checkpointing=true",
           "model.attn_implementation=flash_attention_2", "train.loss_chunk_tokens=1024"]


def _config_only_folder(tmp_path, shapes="llama-3.1-8b"):
    folder = tmp_path / shapes
    folder.mkdir()
    shutil.copy(os.path.join(storage.normalize(f"{SHAPES}/{shapes}"), "config.json"), folder / "config.json")
    return str(folder)


def test_plan_json_from_a_config_json_only_folder(tmp_path, capsys):
    model = _config_only_folder(tmp_path)
    assert os.listdir(model) == ["config.json"]
    args = ["plan", "--gpu", "h100", "--json", "--set", f"model.path={model}", "--set", "data.seq_len=8192",
            "--set", "train.num_workers=8", "--set", "train.global_batch_tokens=65536",
            *[a for o in GPU_JOB for a in ("--set", o)]]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params_total", "per_gpu_gib", "gpu_memory_gib", "fits", "cpu_gib_per_node", "flops_per_step",
                "step_seconds", "mfu_assumed", "dominant"):
        assert key in out, key
    assert set(out["per_gpu_gib"]) >= {"model_states", "activations", "temporary", "total"}
    assert out["params_total"] == 8_030_261_248  # Llama-3.1-8B as published
    assert out["gpu_memory_gib"] == 79.11 and out["fits"] is True
    g = out["per_gpu_gib"]
    assert g["total"] == pytest.approx(g["model_states"] + max(g["activations"] + g["temporary"],
                                                               g["optimizer_step"]), abs=2e-3)
    # ZeRO-3 over 8 GPUs: 16 bytes per parameter / 8 plus DeepSpeed's buffers
    assert 16 * 8_030_261_248 / 8 / GIB < g["model_states"] < 16 * 8_030_261_248 / 8 / GIB + 4
    # FLOPs: the training step's own formula (causal), 8 rows of one 8K document
    assert out["flops_per_step"] == pytest.approx(6 * 7_504_924_672 * 65536 + 6 * 32 * 4096 * 8 * 8192**2, rel=1e-9)
    assert out["step_seconds"] == pytest.approx(out["flops_per_step"] / 8 / (989e12 * out["mfu_assumed"]), rel=1e-9)


def test_each_term_responds_to_its_setting():
    cfg = load_config(None, [f"model.path={SHAPES}/llama-3.1-8b", "data.seq_len=16384", "train.num_workers=8",
                             "train.global_batch_tokens=131072", "train.gpu_type=h100", *GPU_JOB])
    planner = Planner(cfg)
    base = planner.plan()
    per_layer = 16384 * 4096 * 2 / GIB  # a checkpointed layer keeps its bf16 input
    assert base.detail_gib["activations_per_layer"] == pytest.approx(per_layer, rel=1e-6)
    offload = planner.plan(activation_offload=True)
    assert base.per_gpu_gib["activations"] - offload.per_gpu_gib["activations"] == pytest.approx(32 * per_layer,
                                                                                                  rel=0.02)
    assert offload.detail_gib["cpu_activations_per_gpu"] == pytest.approx(32 * per_layer, rel=0.02)
    assert offload.cpu_gib_per_node == pytest.approx(8 * 32 * per_layer, rel=0.02)
    sp = planner.plan(sequence_parallel=4, seq_len=65536)
    assert sp.detail_gib["activations_per_layer"] == pytest.approx(per_layer, rel=1e-6)  # 64K / 4 ranks = 16K each
    tiled = planner.plan(tiled_mlp=True)
    assert tiled.per_gpu_gib["temporary"] < base.per_gpu_gib["temporary"]
    no_ckpt = planner.plan(activation_checkpointing=False)
    assert no_ckpt.per_gpu_gib["activations"] > 5 * base.per_gpu_gib["activations"]
    opt = planner.plan(offload_optimizer=True)
    assert opt.per_gpu_gib["model_states"] < base.per_gpu_gib["model_states"] - 1.5
    assert opt.detail_gib["cpu_optimizer_per_gpu"] == pytest.approx(18 * 8_030_261_248 / 8 / GIB, rel=1e-6)


def test_max_seq_len_is_the_boundary_of_fitting():
    cfg = load_config(None, [f"model.path={SHAPES}/index-1.9b", "data.seq_len=4096", "train.num_workers=8",
                             "train.global_batch_tokens=32768", "train.gpu_memory_gib=12", *GPU_JOB])
    planner = Planner(cfg)
    best = planner.max_seq_len()
    s = best.extra["max_seq_len"]
    assert best.fits and s % 1024 == 0 and s > 4096
    assert not planner.plan(seq_len=s + 1024).fits
    assert best.extra["probes"] <= 10
    from longctx.plan.report import render

    table = render(best, cfg.model.path, cfg.train.num_workers)
    assert f"longest data.seq_len that fits this layout: {s:,}" in table and "FITS" in table


def test_zero_states_beside_deepspeeds_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from longctx.config import TrainConfig
    from longctx.plan.states import model_states
    from longctx.train.deepspeed import REDUCE_BUCKET_ELEMENTS

    p, largest, w = 8_030_261_248, 525_336_576, 8
    # ZeRO-2: 2 bytes of parameters + 18 per parameter partitioned (DeepSpeed's breakdown: 16-bit grads, fp32
    # grads, fp32 params, Adam moments), ours the same; we add the two reduce buckets DeepSpeed allocates.
    _, ds2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=w, cpu_offload=False)
    s2 = model_states(params=p, largest_layer=largest, world=w, train=TrainConfig(zero_stage=2), dtype_bytes=2)
    ours2 = s2.gpu_total + s2.step_extra - s2.gpu["zero_buffers"]
    assert ours2 == pytest.approx(ds2, rel=1e-6)
    assert s2.gpu["zero_buffers"] == 2 * 2 * REDUCE_BUCKET_ELEMENTS
    # ZeRO-3: DeepSpeed estimates 18/W + 4 x largest layer; we count 20/W at the optimizer step (the 16-bit
    # parameter partition on top) and the reduce bucket it allocates: 15% more for an 8B model on 8 GPUs, and
    # exactly DeepSpeed's figure without those two.
    _, ds3, _ = estimate_zero3_model_states_mem_needs(p, largest, num_gpus_per_node=w, cpu_offload=False)
    s3 = model_states(params=p, largest_layer=largest, world=w, train=TrainConfig(zero_stage=3), dtype_bytes=2)
    ours3 = s3.gpu_total + s3.step_extra
    assert 1.0 < ours3 / ds3 < 1.16
    assert ours3 - 2 * p / w - 2 * REDUCE_BUCKET_ELEMENTS == pytest.approx(ds3, rel=1e-3)
    # ZeRO-3 with optimizer offload: DeepSpeed keeps 2/W (16-bit parameters) + 4 x largest layer on the GPU
    _, ds3o, _ = estimate_zero3_model_states_mem_needs(p, largest, num_gpus_per_node=w, cpu_offload=True,
                                                      cpu_offload_params=False)
    s3o = model_states(params=p, largest_layer=largest, world=w,
                       train=TrainConfig(zero_stage=3, offload_optimizer=True), dtype_bytes=2)
    assert s3o.gpu_total - 2 * REDUCE_BUCKET_ELEMENTS == pytest.approx(ds3o, rel=1e-3)


def _gpu_job_folder(tmp_path) -> str:
    folder = _config_only_folder(tmp_path, "index-1.9b")
    (tmp_path / "index-1.9b" / "model.safetensors").write_bytes(b"")  # preflight only looks for the file name
    return folder


def test_preflight_refuses_a_gpu_job_that_cannot_fit_with_the_nearest_layout(tmp_path):
    from longctx.preflight import check_job

    model = _gpu_job_folder(tmp_path)
    job = [f"model.path={model}", "data.seq_len=32768", "model.max_position_embeddings=32768",
           "train.num_workers=8", "train.global_batch_tokens=262144", "train.use_gpu=true", "train.zero_stage=3",
           "train.activation_checkpointing=true", "model.attn_implementation=flash_attention_2"]
    problems = check_job(load_config(None, [*job, "train.gpu_memory_gib=14"]), "pt")
    assert len(problems) == 1, [p.line() for p in problems]
    line = problems[0].line()
    assert "predicted" in line and "GiB per GPU >" in line and "usable" in line and "dominant:" in line
    assert "nearest layout that fits: train.sequence_parallel=" in line, line
    # the layout it names does fit: the same job with it passes
    fix = [w for w in line.split() if w.startswith("train.sequence_parallel=")][0]
    assert check_job(load_config(None, [*job, "train.gpu_memory_gib=14", fix]), "pt") == []
    assert check_job(load_config(None, [*job, "train.gpu_type=h100"]), "pt") == []  # 80 GB: fits as is


def test_preflight_refusal_exits_2_before_ray_in_one_line(tmp_path):
    model = _gpu_job_folder(tmp_path)
    cmd = [sys.executable, "-m", "longctx.cli", "config", "validate", "--kind", "pt",
           "--set", f"model.path={model}", "--set", "data.seq_len=4096", "--set", "model.max_position_embeddings=4096",
           "--set", "train.num_workers=1", "--set", "train.global_batch_tokens=4096", "--set", "train.use_gpu=true",
           "--set", "train.gpu_type=l40s", "--set", "model.attn_implementation=flash_attention_2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if "train (GPU memory)" in x]
    assert len(lines) == 1 and "l40s" in lines[0] and "dominant:" in lines[0], proc.stderr[-2000:]
    assert "ray" not in proc.stderr.lower().replace("array", "")  # nothing of Ray started


def test_unknown_gpu_is_a_warning_and_gpu_memory_gib_makes_it_checkable(tmp_path, capsys):
    from longctx import preflight

    model = _gpu_job_folder(tmp_path)
    job = [f"model.path={model}", "data.seq_len=8192", "model.max_position_embeddings=8192", "train.num_workers=2",
           "train.global_batch_tokens=16384", "train.use_gpu=true"]
    preflight.require(load_config(None, job), "pt")  # no problem: the memory check is skipped, and says so
    assert "train.gpu_type: the workers' GPU is not known" in capsys.readouterr().err
    problems = preflight.check_job(load_config(None, [*job, "train.gpu_memory_gib=4"]), "pt")
    assert [p.where for p in problems] == ["train (GPU memory)"]
