"""The regression gate's rules and verdict: which check passed, the report's line, the exit code.

    checks = compare(base_scores, after_scores, cfg.eval.gate)   # {"nll": {"base", "after", "limit", "passed"}}
    gate_line(verdict)     # 'Regression gate FAILED at 256 tokens (stage 2): nll 3.1 -> 3.4 (limit 3.15)'
    raise_if_failed(verdict)                                     # GateFailed (exit code 5) under action `fail`

The measurement (`longctx.eval.gate_checks.run_gate`) loads models; this module does not, so the report and the
jobs' exit-code mapping read a verdict without importing torch. Rules, per check:

    nll            mean token NLL within the gate length; passes when after <= before + max_nll_increase
    passkey        accuracy in points of 0-100; passes when after >= before - max_retrieval_drop
    ruler/<task>   RULER's 0-100 score; same rule as passkey
    choices        multiple-choice accuracy in points; passes when after >= before - max_choice_drop

Each check records `base`, `after`, `limit` (the bound `after` is held to) and `passed`; a NaN fails.
"""

from __future__ import annotations

import math

from longctx.config import GateConfig

GATE_FAILED_EXIT_CODE = 5
"""A job whose gate failed under `eval.gate.action: fail` exits with this code (`longctx.jobargs.exit_code`)."""


class GateFailed(RuntimeError):
    """The regression gate failed under `eval.gate.action: fail`: the stage's model is not published."""

    exit_code = GATE_FAILED_EXIT_CODE

    def __init__(self, verdict: dict):
        super().__init__(gate_line(verdict) + "; the stage's model is not published (eval.gate.action=fail)")
        self.verdict = verdict


def compare(base: dict[str, float], after: dict[str, float], gate: GateConfig) -> dict[str, dict]:
    """Per check: base, after, limit (the bound `after` is held to) and passed (a NaN fails)."""
    checks = {}
    for name, b in base.items():
        a = after.get(name, float("nan"))
        if name == "nll":
            limit, passed = b + gate.max_nll_increase, a <= b + gate.max_nll_increase
        else:
            drop = gate.max_choice_drop if name == "choices" else gate.max_retrieval_drop
            limit, passed = b - drop, a >= b - drop
        checks[name] = {"base": _round(b), "after": _round(a), "limit": _round(limit),
                        "passed": bool(passed and math.isfinite(a))}
    return checks


def judge(measured: dict, gate: GateConfig) -> dict:
    """The verdict on a measurement ({"scores": {"base": {...}, "after": {...}}, ...}) by `gate`'s limits and
    action: the measurement plus passed, action, checks and failed. A recorded measurement is judged again this way
    when a rerun changed only the limits or the action."""
    checks = compare(measured["scores"]["base"], measured["scores"]["after"], gate)
    failed = [name for name, c in checks.items() if not c["passed"]]
    return {**measured, "passed": not failed, "action": gate.action, "checks": checks, "failed": failed}


def _round(x: float) -> float | None:
    return round(float(x), 4) if math.isfinite(x) else None  # NaN/inf -> null in metrics.json


def gate_line(verdict: dict) -> str:
    """One line: `Regression gate FAILED at 256 tokens (stage 2): nll 3.10 -> 3.40 (limit 3.15); ...` (the failed
    checks), or `Regression gate passed ...`."""
    where = f" (stage {verdict['stage']})" if verdict.get("stage") else ""
    names = verdict["failed"] or list(verdict["checks"])
    parts = [f"{n} {_fmt(c['base'])} -> {_fmt(c['after'])} (limit {_fmt(c['limit'])})"
             for n, c in verdict["checks"].items() if n in names]
    state = "FAILED" if not verdict["passed"] else "passed"
    return f"Regression gate {state} at {verdict['length']} tokens{where}: {'; '.join(parts)}"


def _fmt(x) -> str:
    return "nan" if x is None else f"{x:.4g}"


def raise_if_failed(verdict: dict) -> None:
    """GateFailed when the verdict failed and its action is `fail`; a warning line when the action is `warn`."""
    if verdict["passed"]:
        return
    if verdict["action"] == "fail":
        raise GateFailed(verdict)
    print(f"[longctx] WARNING: {gate_line(verdict)} (eval.gate.action=warn: the run goes on)", flush=True)


def gate_metrics(verdicts: list[dict]) -> dict:
    """`gate` in metrics.json: passed (every stage's gate), the failed stages, each stage's verdict by name."""
    by_stage = {v.get("stage") or "train": v for v in verdicts}
    failed = [name for name, v in by_stage.items() if not v["passed"]]
    return {"passed": not failed, "failed_stages": failed, "verdicts": by_stage}
