"""The regression gate's measurement: the stage's input and output models answer the same short prompts.

    verdict = run_gate(cfg, before="builtin:tiny-llama", after="runs/long-pt-3f9c/train/final_model")
    verdict["passed"], verdict["checks"]["nll"]    # {"base": 3.12, "after": 3.15, "limit": 3.17, "passed": True}

The stage's input model (`before`, loaded as it is: no RoPE change of the stage) and its output model (`after`)
are measured at the gate length (`eval.gate.length`, else `eval.base_context_length`, else the first model's
max_position_embeddings), one model in memory at a time, with no Ray, by the evaluation code itself: token NLL of
held-out documents (`eval.perplexity`), passkey (`eval.passkey`), RULER tasks (`eval.ruler.evaluate`) and the
user's multiple-choice file (`eval.choices`). The rules and the verdict's shape are in `longctx.eval.gate`.
"""

from __future__ import annotations

import gc
import time

import torch

from longctx.config import JobConfig
from longctx.eval.choices import load_choice_questions, score_choices
from longctx.eval.documents import iter_texts
from longctx.eval.gate import judge
from longctx.eval.passkey import build_passkey_prompts, run_passkey
from longctx.eval.perplexity import position_nll_sums, select_documents
from longctx.eval.ruler.evaluate import evaluate_ruler
from longctx.eval.ruler.synthetic import RulerLengthError
from longctx.eval.runner import ModelSpec, base_max_positions, tokenizer_uri
from longctx.model.load import load_causal_lm, load_tokenizer


def gate_length(cfg: JobConfig, first_model: str) -> int:
    """eval.gate.length, else eval.base_context_length, else the first model's max_position_embeddings."""
    return int(cfg.eval.gate.length or cfg.eval.base_context_length or base_max_positions(first_model))


def load_gate_inputs(cfg: JobConfig, length: int, tokenizer) -> dict:
    """What both models answer: document token ids, passkey prompts, the multiple-choice questions."""
    gate = cfg.eval.gate
    docs, skipped = select_documents(tokenizer, iter_texts(cfg.eval.documents, cfg.eval.text_field), length,
                                     gate.num_documents)
    if not docs:
        raise ValueError(f"eval.gate: no document of {cfg.eval.documents} has {length} tokens ({skipped} too short); "
                         "set eval.gate.length lower or give longer eval.documents")
    out: dict = {"docs": docs}
    if gate.passkey:
        try:
            out["passkey"] = build_passkey_prompts(tokenizer, [length], gate.passkey_depths, gate.passkey_trials,
                                                   seed=cfg.eval.seed)
        except ValueError as e:  # the prompt does not fit the gate's length: skipped and named, as a RULER task
            out.setdefault("skipped", {})["passkey"] = str(e)
    if gate.choices:
        out["choices"] = load_choice_questions(gate.choices, gate.choices_limit)
    return out


def measure(model, tokenizer, cfg: JobConfig, length: int, inputs: dict) -> dict[str, float]:
    """The gate's scores of one model: {"nll": nats, "passkey": points, "ruler/<task>": points, "choices": points}."""
    gate, ev = cfg.eval.gate, cfg.eval
    nll_sum, count = position_nll_sums(model, inputs["docs"], ev.batch_size)
    scores = {"nll": float(nll_sum.sum() / count.sum())}
    if "passkey" in inputs:
        scores["passkey"] = 100.0 * run_passkey(model, tokenizer, inputs["passkey"], ev.batch_size)["overall"]
    for task in gate.ruler_tasks:
        try:
            ruler = evaluate_ruler(model, tokenizer, length, ev.ruler, tasks=[task], num_samples=gate.ruler_samples,
                                   prefill_chunk=ev.prefill_chunk_tokens, batch_size=ev.batch_size)
        except RulerLengthError as e:  # the same for both models (generation is seeded): the check is skipped
            inputs.setdefault("skipped", {})[f"ruler/{task}"] = str(e)
            continue
        scores[f"ruler/{task}"] = float(ruler[task])
    if "choices" in inputs:
        scores["choices"] = 100.0 * score_choices(model, tokenizer, inputs["choices"])["accuracy"]
    return scores


def run_gate(cfg: JobConfig, before: str, after: str, *, length: int | None = None, device: str | None = None,
             stage: str | None = None) -> dict:
    """Measure `before` and `after` on the same inputs and judge them by `cfg.eval.gate`; returns the verdict
    ({"passed", "action", "checks", "failed", "length", "before", "after", "stage", "scores", "skipped", "seconds"})."""
    started = time.time()
    gate = cfg.eval.gate
    length = int(length or gate_length(cfg, before))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(tokenizer_uri(ModelSpec(after), cfg), trust_remote_code=cfg.model.trust_remote_code)
    inputs = load_gate_inputs(cfg, length, tokenizer)
    # the stage's input as it is (no RoPE change of this stage): what the user had before the stage ran
    as_is = cfg.model.model_copy(update={"rope_theta": None, "rope_scaling": None, "max_position_embeddings": None})
    scores = {}
    for role, uri in (("base", before), ("after", after)):
        model = load_causal_lm(uri, as_is, device=device).eval()
        scores[role] = measure(model, tokenizer, cfg, length, inputs)
        del model  # one model in memory at a time
        gc.collect()
    skipped = inputs.get("skipped", {})
    for name, why in skipped.items():
        print(f"[longctx] gate: {name} skipped: {why}", flush=True)
    measured = {"length": length, "before": before, "after": after, "stage": stage, "scores": scores,
                "skipped": skipped, "seconds": round(time.time() - started, 2)}
    return judge(measured, gate)
