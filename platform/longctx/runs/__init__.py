"""Runs: a run's folder and identity, and the steps every job, sweep trial and study trial is composed of.

    folder.py      open_run, RunContext, the run id rule, the run folder's file names, where training state lives
    identity.py    which config keys change results, the fingerprint, content bindings, the resume refusals
    lease.py       one driver per run (lease.json with a heartbeat) and appends that lose no line
    steps.py       prepare_step, train_step, gate_step, evaluate_step, finish, stop_at_gate
    recipes.py     Long-PT, Long-SFT and evaluation as Recipe values over the steps; run_prepare
    stages.py      the job's stage or a recipe's `stages:`, each a sub-run, with the regression gate after each
    handoff.py     is a committed packed dataset the one this job can train on?
    study.py       the papers' orderings: every trial a sub-run; study_report.py: its numbers and report;
                   study_args.py: its options and tiers (light: `longctx --help` imports no engine)

See docs/architecture.md, section 4.
"""
