"""Runs: a run's folder and identity, and the steps every job, sweep trial and study trial is composed of.

    folder.py      open_run, RunContext, the run id rule, the run folder's file names, where training state lives
    identity.py    which config keys change results, the fingerprint, content bindings, the resume refusals
    lease.py       one driver per run (lease.json with a heartbeat) and appends that lose no line
    steps.py       prepare_step, train_step, evaluate_step, finish (and where the gate step goes)
    recipes.py     Long-PT, Long-SFT and evaluation as Recipe values over the steps; run_prepare
    handoff.py     is a committed packed dataset the one this job can train on?
    study.py       the papers' orderings: every trial a sub-run; study_report.py: its numbers and report

See docs/architecture.md, section 4.
"""
