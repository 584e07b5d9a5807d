"""The regression gate (`longctx.eval.gate`, `longctx.eval.gate_checks`): the shipped tiny model against itself
lightly perturbed passes; against a deliberately damaged copy it fails, on NLL, retrieval and the multiple-choice
file. No Ray: the gate's measurement is plain PyTorch."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch

from longctx.config import GateConfig, load_config
from longctx.eval.choices import ChoiceFileError, load_choice_questions
from longctx.eval.gate import GATE_FAILED_EXIT_CODE, GateFailed, compare, gate_line, gate_metrics, raise_if_failed
from longctx.eval.gate_checks import load_gate_inputs, run_gate
from longctx.eval.runner import ModelSpec, tokenizer_uri
from longctx.jobargs import exit_code
from longctx.model.load import load_causal_lm, load_tokenizer, local_model_dir


def _copy_with_noise(src: str, dst, relative_std: float, seed: int = 0) -> str:
    """The model at `src` with Gaussian noise of `relative_std` x each weight matrix's std added (a damaged or a
    barely touched copy), saved with its tokenizer."""
    from longctx.model.load import load_tokenizer

    model = load_causal_lm(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * relative_std)
    model.save_pretrained(str(dst), safe_serialization=True)
    load_tokenizer(src).save_pretrained(str(dst))
    return str(dst)


def _choice_file(path) -> str:
    """Multiple choice from held-out documents the base never saw: the question shows 36 words of a document and
    then its first 30 again; the answer is the 6 words that followed (distractors: 6 words of other documents). A
    model that copies from its context finds it (the base: 56% on these 16; chance 25%)."""
    heldout = local_model_dir("builtin:corpus") + "/heldout.jsonl.gz"
    docs = [json.loads(x)["text"].split() for x in gzip.open(heldout, "rt")]
    rng = random.Random(0)
    rows = []
    for i in range(16):
        words, at = docs[i], rng.randrange(30, len(docs[i]) - 10)
        others = []
        for k in (1, 2, 3):
            o = docs[(i + k) % len(docs)]
            j = rng.randrange(0, len(o) - 6)
            others.append(" ".join(o[j:j + 6]))
        answer = rng.randrange(4)
        choices = others[:answer] + [" ".join(words[at:at + 6])] + others[answer:]
        rows.append({"question": " ".join(words[at - 30:at + 6]) + "\n" + " ".join(words[at - 30:at]),
                     "choices": choices, "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def gate_cfg(tmp_path_factory):
    torch.set_num_threads(1)  # a 1M-parameter model on 2 shared cores
    tmp = tmp_path_factory.mktemp("gate")
    choices = _choice_file(tmp / "choices.jsonl")
    return load_config(None, ["eval.gate.num_documents=4", "eval.gate.passkey_trials=1", "eval.gate.ruler_samples=8",
                              f"eval.gate.choices={choices}", "eval.gate.action=fail",
                              "eval.ruler.tokens_to_generate={niah: 16}"]), tmp


@pytest.fixture(scope="module")
def verdicts(gate_cfg):
    """The gate on a barely touched copy of the shipped model, and on a damaged copy (one measurement each)."""
    cfg, tmp = gate_cfg
    base = "builtin:tiny-llama"
    touched = _copy_with_noise(base, tmp / "touched", 0.002)
    damaged = _copy_with_noise(base, tmp / "damaged", 0.5)
    return run_gate(cfg, base, touched), run_gate(cfg, base, damaged)


def test_gate_passes_a_barely_changed_model_and_fails_a_damaged_one(gate_cfg, verdicts):
    cfg, _ = gate_cfg
    ok, bad = verdicts
    assert ok["length"] == 256  # the base's max_position_embeddings
    assert set(ok["checks"]) == {"nll", "passkey", "ruler/niah_single_1", "choices"}
    assert ok["passed"], gate_line(ok)
    nll = ok["checks"]["nll"]
    assert abs(nll["after"] - nll["base"]) < 0.01 and nll["limit"] == pytest.approx(nll["base"] + 0.05, abs=1e-3)
    # the base model can do each task (else the retrieval checks could not fail)
    assert ok["checks"]["passkey"]["base"] >= 60 and ok["checks"]["ruler/niah_single_1"]["base"] >= 10
    assert ok["checks"]["choices"]["base"] >= 45  # chance: 25
    raise_if_failed(ok)  # passes: nothing raised

    # negative control: the same gate on a damaged model
    assert not bad["passed"]
    assert bad["checks"]["nll"]["after"] > bad["checks"]["nll"]["base"] + 0.5
    assert {"nll", "passkey", "choices"} <= set(bad["failed"])
    assert bad["checks"]["nll"]["base"] == ok["checks"]["nll"]["base"]  # same prompts, same base scores
    with pytest.raises(GateFailed) as err:
        raise_if_failed(bad)
    assert exit_code(err.value) == GATE_FAILED_EXIT_CODE == 5
    assert "Regression gate FAILED at 256 tokens" in str(err.value) and "nll " in str(err.value)
    print(f"gate: {ok['seconds']}s (pass), {bad['seconds']}s (damaged)")


def test_compare_limits_and_nan():
    gate = GateConfig(max_nll_increase=0.05, max_retrieval_drop=5, max_choice_drop=2)
    checks = compare({"nll": 2.0, "passkey": 80.0, "choices": 60.0, "ruler/vt": 50.0},
                     {"nll": 2.06, "passkey": 75.0, "choices": 57.0, "ruler/vt": float("nan")}, gate)
    assert checks["nll"] == {"base": 2.0, "after": 2.06, "limit": 2.05, "passed": False}
    assert checks["passkey"]["passed"] and checks["passkey"]["limit"] == 75.0  # exactly at the limit passes
    assert not checks["choices"]["passed"] and checks["choices"]["limit"] == 58.0
    assert checks["ruler/vt"] == {"base": 50.0, "after": None, "limit": 45.0, "passed": False}  # NaN fails
    verdict = {"passed": False, "action": "warn", "length": 256, "stage": "s2", "checks": checks,
               "failed": ["nll", "choices", "ruler/vt"]}
    line = gate_line(verdict)
    assert line.startswith("Regression gate FAILED at 256 tokens (stage s2): nll 2 -> 2.06 (limit 2.05)")
    assert "passkey" not in line and "ruler/vt 50 -> nan" in line
    raise_if_failed(verdict)  # action warn: a line, no error
    m = gate_metrics([verdict, {**verdict, "stage": "s3", "passed": True, "failed": []}])
    assert m["passed"] is False and m["failed_stages"] == ["s2"] and list(m["verdicts"]) == ["s2", "s3"]
    assert math.isclose(m["verdicts"]["s2"]["checks"]["nll"]["limit"], 2.05)


def test_choice_file_errors_name_the_line(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n"
                 + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(ChoiceFileError, match=r"mc.jsonl:2: `answer` must be an index"):
        load_choice_questions(str(f))
    assert len(load_choice_questions(str(f), limit=1)) == 1


def test_failed_gate_stops_the_run_before_publishing_and_a_rerun_rejudges(gate_cfg, verdicts, tmp_path, capsys):
    """The gate step of a run (`longctx.runs.steps`): a failed measurement under action `fail` writes metrics.json
    and report.md (the gate's line first), no final model, and raises GateFailed; the same run again with
    `eval.gate.action=warn` judges the recorded measurement again (no model is loaded) and goes on."""
    from longctx import storage
    from longctx.runs.folder import FINAL_MODEL_FILE, METRICS, open_run, read_attempts
    from longctx.runs.steps import GATE, gate_step, stop_at_gate

    cfg, _ = gate_cfg
    bad = verdicts[1]
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path), "run_name": "gated"})
    run = open_run(cfg, "long-pt")
    storage.write_json(run.path(GATE), bad)  # the measurement an earlier attempt recorded
    v = gate_step(run, cfg, bad["before"], bad["after"])
    assert not v["passed"] and v["action"] == "fail" and v["checks"] == bad["checks"]
    with pytest.raises(GateFailed) as err:
        stop_at_gate(run, {"run_id": run.run_id}, [v], [], "Long-PT run gated")
    assert exit_code(err.value) == 5
    report = (tmp_path / "gated" / "report.md").read_text().splitlines()
    assert report[0].startswith("**Regression gate FAILED at 256 tokens") and "# Long-PT run gated" in report
    assert "## Regression gate" in "\n".join(report)
    metrics = json.loads((tmp_path / "gated" / METRICS).read_text())
    assert metrics["gate"]["passed"] is False
    assert metrics["gate"]["verdicts"]["train"]["checks"]["nll"]["passed"] is False
    assert not (tmp_path / "gated" / FINAL_MODEL_FILE).exists()
    assert [a["event"] for a in read_attempts(run.root)][-2:] == ["gate", "gate failed"]

    warn = load_config(None, [f"output_dir={tmp_path}", "run_name=gated", "eval.gate.action=warn",
                              *[f"eval.gate.{k}={getattr(cfg.eval.gate, k)}" for k in
                                ("num_documents", "passkey_trials", "ruler_samples", "choices")],
                              "eval.ruler.tokens_to_generate={niah: 16}"])
    run = open_run(warn, "long-pt")  # the limits and the action are not result keys: the same run
    v = gate_step(run, warn, bad["before"], bad["after"])
    run.close()
    assert v["action"] == "warn" and not v["passed"]
    assert read_attempts(run.root)[-1] == {**read_attempts(run.root)[-1], "event": "gate", "action": "rejudged"}
    assert "WARNING: Regression gate FAILED" in capsys.readouterr().out


def test_a_passkey_prompt_longer_than_the_gate_is_skipped_and_named():
    """At 64 tokens the passkey prompt (88 tokens) does not fit: the check is skipped with the reason, as a RULER
    task that does not fit, instead of failing the run after training (the Long-SFT job's test gates at 64)."""
    cfg = load_config(None, ["eval.gate.num_documents=2"])
    tok = load_tokenizer(tokenizer_uri(ModelSpec("builtin:tiny-llama"), cfg))
    short = load_gate_inputs(cfg, 64, tok)
    assert "passkey" not in short and "too short" in short["skipped"]["passkey"]
    fits = load_gate_inputs(cfg, 256, tok)  # control: at the base length the passkey check is built
    assert len(fits["passkey"]) >= 1 and "passkey" not in fits.get("skipped", {})
