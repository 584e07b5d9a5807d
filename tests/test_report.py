"""Reports that read true: loss as first/last-10% means with a loss curve, the layout as a table (no raw dict),
a metric that cannot discriminate said in one line instead of a flat plot, the lengths histogram binned around
seq_len and long_threshold and linked, and every path relative to the run folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pytest

from longctx import storage
from longctx.config import JobConfig
from longctx.data.stats import length_bins, plot_length_histogram
from longctx.report import write_report
from longctx.report.markdown import passkey_saturated
from longctx.report.sections import data_section, layout_table, loss_summary, relative, train_section

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class _Outcome:  # the fields of train.trainer.TrainOutcome the section reads
    steps: int
    tokens: int
    final_loss: float
    final_model_uri: str
    metrics_log_uri: str
    layout: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def _history(n=40, val_every=10):
    rng = np.random.default_rng(0)
    hist = []
    for s in range(1, n + 1):
        h = {"step": s, "loss": 4.0 - 1.5 * s / n + 0.2 * rng.standard_normal(), "tokens_per_s": 1000.0 + s}
        if s % val_every == 0:
            h["val_loss"] = 3.9 - 1.2 * s / n
        hist.append(h)
    return hist


def _layout():
    return {"world_size": 2, "data_parallel": 2, "sequence_parallel": 1, "seq_len": 1024, "micro_batch_size": 1,
            "grad_accum": 2, "rows_per_step": 4, "tokens_per_step": 4096}


def test_loss_summary_means_first_and_last_tenth():
    hist = [{"step": s, "loss": float(s)} for s in range(1, 21)]  # 20 steps: windows of 2
    s = loss_summary(hist)
    assert s["window"] == 2 and s["first"] == pytest.approx(1.5) and s["last"] == pytest.approx(19.5)
    assert loss_summary([{"step": 1, "loss": 3.0}])["first"] == 3.0 and loss_summary([]) is None


def test_relative_paths_local_and_s3(tmp_path):
    run = str(tmp_path / "runs" / "r1")
    assert relative(f"{run}/train/final_model", run) == "train/final_model"
    assert relative("s3://b/runs/r1/train/metrics.jsonl", "s3://b/runs/r1") == "train/metrics.jsonl"
    assert relative("s3://b/runs/r10/x", "s3://b/runs/r1") == "s3://b/runs/r10/x"  # a sibling, not inside
    assert relative("builtin:tiny-llama", run) == "builtin:tiny-llama"


def test_layout_is_a_table_not_a_dict():
    md = layout_table(_layout())
    assert "{" not in md and "'" not in md
    header, align, row = md.splitlines()
    assert "data parallel" in header and "tokens per step" in header and row.count("|") == header.count("|")
    assert "4,096" in row


def test_train_section_has_the_loss_curve_and_relative_paths(tmp_path):
    run = str(tmp_path / "runs" / "r1")
    out = _Outcome(steps=40, tokens=163840, final_loss=2.5, final_model_uri=f"{run}/train/final_model",
                   metrics_log_uri=f"{run}/train/metrics.jsonl", layout=_layout(), history=_history())
    md = train_section(JobConfig(), out, {"data": 1.0, "train": 2.0}, run)
    s = loss_summary(out.history)
    assert f"loss {s['first']:.3f} (mean of the first 4 steps) -> {s['last']:.3f} (mean of the last 4)" in md
    assert "validation loss 3.600 (step 10) -> 2.700 (step 40), 4 measurements on held-out documents" in md
    assert "![training loss](loss_curve.png)" in md
    assert (tmp_path / "runs" / "r1" / "loss_curve.png").read_bytes()[:8] == PNG
    assert str(tmp_path) not in md and "`train/final_model`" in md and "`train/metrics.jsonl`" in md
    assert not re.search(r"\{['\"]", md), "a raw dict in the report"
    assert md.startswith("- model `builtin:tiny-llama`, rope_theta")
    # a multi-stage run's last stage says which stage it is and the model it started from (not the run's first)
    staged = train_section(JobConfig(), out, {}, run, stage="ctx1k", from_model=f"{run}/stages/ctx512/train/final_model")
    assert staged.startswith("- stage ctx1k (the last), from `stages/ctx512/train/final_model`, rope_theta"), staged


def test_passkey_all_zero_is_one_line_not_a_plot(tmp_path):
    def model(role, acc, nll):
        return {"spec": {"uri": f"{tmp_path}/run/{role}", "role": role},
                "passkey": {"accuracy_by_length": {"256": acc, "1024": acc}, "overall": acc,
                            "key_nll_by_length": {"256": nll, "1024": nll + 1}, "depths": [0.5], "trials": 2}}

    flat = {"base_context_length": 512, "models": {"naive": model("naive", 0.0, 5.0), "Long-PT": model("trained", 0.0, 4.0)}}
    assert passkey_saturated(flat) == "0%"
    text = open(write_report(str(tmp_path / "run"), flat)).read()
    assert "Passkey exact match cannot discriminate here:** all 2 models score 0% at every length (256, 1024 tokens)" in text
    assert "passkey_accuracy.png" not in text and not (tmp_path / "run" / "passkey_accuracy.png").exists()
    assert "| Long-PT | 4.00 | 5.00 |" in text  # the key's NLL still separates them
    assert "`naive`" in text and str(tmp_path) not in text  # model paths relative to the run folder
    # negative control: one model that finds a key brings back the accuracy table and the plot
    mixed = {"base_context_length": 512, "models": {"naive": model("naive", 0.0, 5.0), "Long-PT": model("trained", 0.5, 4.0)}}
    assert passkey_saturated(mixed) is None
    text = open(write_report(str(tmp_path / "run2"), mixed)).read()
    assert "cannot discriminate" not in text and "![passkey accuracy](passkey_accuracy.png)" in text
    assert (tmp_path / "run2" / "passkey_accuracy.png").read_bytes()[:8] == PNG


def test_length_bins_follow_seq_len_and_long_threshold():
    bins = length_bins(1024, 4096, 200_000)
    assert 1024 in bins and 4096 in bins and bins[0] == 0 and bins == sorted(bins) and len(bins) <= 14
    # at 1024 tokens the short documents are spread over several bars, not lumped into one "0-4K"
    assert sum(1 for b in bins if 0 < b <= 1024) >= 4
    bins = length_bins(32768, 4096, 10**6)
    assert 32768 in bins and 4096 in bins
    bins = length_bins(1000, 3000, 5000)
    assert 1000 in bins and 3000 in bins and 1024 not in bins  # no sliver bar beside an edge


def test_data_section_links_the_lengths_histogram(tmp_path):
    run = tmp_path / "runs" / "r1"
    rng = np.random.default_rng(1)
    lengths = {"web": rng.lognormal(6.5, 1.0, 500).astype(int) + 1, "code": rng.lognormal(8.5, 1.0, 50).astype(int) + 1}
    manifest = {"seq_len": 1024, "params": {"long_threshold": 4096}, "strategy": "per-source",
                "totals": {"rows": 3, "tokens": 3072, "long_share": 0.5},
                "sources": {"web": {"in": {"tokens": 10}, "out": {"tokens": 5}}}}
    inside = run / "data"
    inside.mkdir(parents=True)
    plot_length_histogram(lengths, str(inside / "lengths.png"), seq_len=1024, long_threshold=4096)
    md = data_section(manifest, str(run), str(inside))
    assert "long-token share 50.0% (documents >= 4096 tokens)" in md
    assert "![input tokens by document length](data/lengths.png)" in md and "`data`" in md
    outside = tmp_path / "shared-data"
    outside.mkdir()
    plot_length_histogram(lengths, str(outside / "lengths.png"), seq_len=1024, long_threshold=4096)
    md = data_section(manifest, str(run), str(outside))
    assert "![input tokens by document length](data_lengths.png)" in md  # copied in: the link stays relative
    assert (run / "data_lengths.png").read_bytes() == (outside / "lengths.png").read_bytes()
    assert "Token budget" not in md  # read everything: no budget line
    manifest["token_budget"] = {"requested": 5000, "from": "train.token_budget", "repeat_tokens": 12}
    manifest["input"] = {"read": {"sources": {"web": {"files": 40, "files_read": 3, "tokens_kept": 5200}}}}
    md = data_section(manifest, str(run), str(inside))
    assert "Token budget 5,000 (`train.token_budget`): read web 3/40 files (5,200 tokens kept); 12 tokens repeat." in md


def test_histogram_has_no_axis_offset(tmp_path, monkeypatch):
    """The y axis is a share in %, printed plainly: no '1e6' offset text above it."""
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def spy(fig=None):
        if fig is not None and hasattr(fig, "axes"):
            fig.canvas.draw()
            seen["offset"] = fig.axes[0].yaxis.get_offset_text().get_text()
            seen["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        real_close(fig)

    monkeypatch.setattr(plt, "close", spy)
    big = {"web": np.full(2000, 3000), "books": np.full(400, 50_000)}  # 6M + 20M tokens
    plot_length_histogram(big, str(tmp_path / "h.png"), seq_len=1024, long_threshold=4096)
    assert seen["offset"] == ""
    assert "1K-2K" in seen["ticks"] and any(t.startswith(">=") for t in seen["ticks"])


def test_curve_summary_says_when_the_second_half_does_not_improve(tmp_path):
    from longctx.report.sections import curve_lines, halves

    # the default run's shape: down to 2.65 by step 15, back up to ~2.95 with spikes
    down_up = [{"step": s, "loss": 3.0 - 0.025 * s if s <= 15 else 2.65 + 0.02 * (s - 15) + (0.2 if s % 7 == 0 else 0)}
               for s in range(1, 41)]
    for h in down_up:
        if h["step"] % 10 == 0:
            h["val_loss"] = {10: 3.10, 20: 3.02, 30: 3.06, 40: 3.08}[h["step"]]
    h = halves(down_up)
    assert h["first_steps"] == (1, 20) and h["second_steps"] == (21, 40) and not h["improved"]
    lines = curve_lines(down_up)
    assert lines[0].startswith(f"- loss curve: mean {h['second']:.3f} over steps 21-40 (second half) vs "
                               f"{h['first']:.3f} over steps 1-20: the second half **did not improve**")
    assert lines[1] == ("- validation loss was lowest at step 20 (3.020); the last measurement (step 40) is 3.080")
    # negative control: a curve that keeps falling says so, and a val loss lowest at the end adds no line
    falling = _history()
    lines = curve_lines(falling)
    assert "the second half improved by" in lines[0] and len(lines) == 1
    run = str(tmp_path / "r")
    out = _Outcome(steps=40, tokens=1, final_loss=2.9, final_model_uri=f"{run}/m", metrics_log_uri=f"{run}/l",
                   history=down_up)
    assert "**did not improve**" in train_section(JobConfig(), out, {}, run)
