"""The study's command-line options and its two tiers (`jobs/study.py`, `longctx study`), apart from the study's
code so that `longctx --help` builds the study's parser without importing the engines (torch, Ray)."""

from __future__ import annotations

import argparse

from longctx.config import EMBEDDED_DEFAULT

NIAH_TASKS = ("niah_single_1", "niah_single_2")  # RULER's single-needle NIAH: noise and essay haystacks

# The two tiers: the full study (seeds and intervals) and `--quick` (one seed, fewer steps, prompts and RoPE
# points: under 15 minutes on 2 CPU cores). Both write the same report layout.
# Passkey: 17 trials x 3 depths = 51 prompts per model (12 could not decide "passkey >= 90%" either way short of 12/12).
FULL = {"seeds": 3, "steps": 10, "niah_samples": 25, "passkey_trials": 17, "rope_factors": "0.1,1,10"}
QUICK = {"seeds": 1, "steps": 6, "niah_samples": 10, "passkey_trials": 7, "rope_factors": "1"}


def add_study_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's command-line options (`jobs/study.py` and `longctx study`)."""
    p.add_argument("--config", default=EMBEDDED_DEFAULT, help="base job config (default: the embedded tiny recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial (repeatable)")
    p.add_argument("--output", default="runs/study", help="study folder (local or s3://)")
    p.add_argument("--quick", action="store_true", help="the quick tier: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " unless given (one seed: its verdicts rest on "
        "items only; what CI's shortened study runs)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds of part a's Long-PT and part b's trials "
                   f"(default {FULL['seeds']}; --quick: 1); the intervals then cover seeds x items")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per trial (default {FULL['steps']})")
    p.add_argument("--niah-samples", type=int, default=None, help="RULER NIAH samples per task at 4x base in parts "
                   f"a and c ({len(NIAH_TASKS)} tasks; default {FULL['niah_samples']}, so "
                   f"{len(NIAH_TASKS) * FULL['niah_samples']} prompts per model; 0: off)")
    p.add_argument("--passkey-trials", type=int, default=None, help="passkey prompts per depth at 4x base "
                   f"(default {FULL['passkey_trials']}: {3 * FULL['passkey_trials']} prompts at the 3 default depths)")
    p.add_argument("--parts", default="abcde", help="parts to run: a (baselines vs Long-PT), b (data strategies), "
                   "c (Long-PT + synthetic long-SFT, from part a's model), d (RoPE base sweep), e (retrieval vs "
                   "tokens trained, from part a's run)")
    p.add_argument("--sft-steps", type=int, default=None, help="part c: Long-SFT steps of each format (default: "
                   "twice --steps)")
    p.add_argument("--rope-factors", default=None, help="RoPE bases of part d as multiples of the "
                   f"`rope suggest` bound (default {FULL['rope_factors']}; part a's rope_theta is one more point)")
    p.add_argument("--corpus-max-documents", type=int, default=200,
                   help="part b: read only the first N documents per source of the shipped corpus (default 200; "
                   "0: all of it)")
    p.add_argument("--eval-documents", type=int, default=8, help="held-out documents per evaluation (default 8; "
                   "0: the config's eval.num_documents)")
    return p
