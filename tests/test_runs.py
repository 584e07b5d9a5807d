"""Runs you can trust, the parts that need no Ray: where outputs go, run names that a rerun finds, the refusal of
a changed config, the checks of prepared data against a job, and a committed data folder found before pass 1.
(The kill-and-resubmit chain itself is in test_long_pt_job.py.)"""

from __future__ import annotations

import json
import os

import pytest

from longctx import storage
from longctx.config import load_config


# ------------------------------------------------------------------------------------------- where outputs go
def test_relative_outputs_never_land_in_rays_working_dir_copy(tmp_path, monkeypatch):
    from longctx.workflow import resolve_output, resolve_outputs

    monkeypatch.delenv("LONGCTX_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ray_copy = str(tmp_path / "ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc123")
    os.makedirs(ray_copy)
    assert resolve_output("runs", cwd=ray_copy) == str(tmp_path / "home" / "longctx" / "runs")
    assert resolve_output("runs", cwd=str(tmp_path / "work")) == str(tmp_path / "work" / "runs")
    assert resolve_output("/abs/runs", cwd=ray_copy) == "/abs/runs"
    assert resolve_output("s3://b/runs", cwd=ray_copy) == "s3://b/runs"
    monkeypatch.setenv("LONGCTX_HOME", str(tmp_path / "lh"))
    assert resolve_output("runs", cwd=ray_copy) == str(tmp_path / "lh" / "runs")
    assert resolve_output("runs", cwd=str(tmp_path / "work")) == str(tmp_path / "lh" / "runs")

    monkeypatch.chdir(ray_copy)
    monkeypatch.delenv("LONGCTX_HOME")
    cfg = resolve_outputs(load_config(None, ["train.storage_path=ckpt", "data.output=packed"]))
    for path in (cfg.output_dir, cfg.train.storage_path, cfg.data.output):
        assert "_ray_pkg_" not in path and path.startswith(str(tmp_path / "home" / "longctx"))


def test_storage_path_takes_checkpoints_and_final_model(tmp_path):
    from longctx.train.trainer import train_root_for

    cfg = load_config(None, [])
    assert train_root_for(cfg, f"{tmp_path}/runs/r1") == (f"{tmp_path}/runs/r1", "train")
    cfg = load_config(None, [f"train.storage_path={tmp_path}/ckpt"])
    assert train_root_for(cfg, f"{tmp_path}/runs/r1") == (f"{tmp_path}/ckpt/r1", "train")
    assert train_root_for(load_config(None, ["train.storage_path=s3://b/ck"]), "s3://b/runs/r2") == ("s3://b/ck/r2", "train")


# ---------------------------------------------------------------------------------- names and fingerprints
def test_default_run_name_follows_the_settings_that_shape_results():
    from longctx.workflow import run_id_for

    a = run_id_for(load_config(None, []), "long-pt")
    assert a.startswith("long-pt-") and len(a) == len("long-pt-") + 10
    # where and how fast it runs, and how much it logs, do not change the run
    same = load_config(None, ["ray.num_cpus=8", "output_dir=/elsewhere", "train.log_every=5",
                              "train.checkpoint_every=7", "eval.num_actors=3", "data.num_tokenize_actors=4",
                              "tune.max_concurrent_trials=2"])
    assert run_id_for(same, "long-pt") == a
    for change in ("train.lr=1e-3", "data.seed=1", "model.rope_theta=1e6", "eval.num_documents=3"):
        assert run_id_for(load_config(None, [change]), "long-pt") != a, change
    assert run_id_for(load_config(None, ["run_name=mine"]), "long-pt") == "mine"


def test_changed_settings_are_named_and_refused(tmp_path):
    from longctx.resume import ResumeRefused, differences
    from longctx.workflow import open_run

    base = [f"output_dir={tmp_path}", "run_name=r"]
    run = open_run(load_config(None, base), "long-pt")
    assert run.attempt_no == 1 and run.finished is None
    # speed and placement settings may change between attempts
    again = open_run(load_config(None, base + ["ray.num_cpus=3", "train.max_failures=2"]), "long-pt")
    assert again.attempt_no == 2
    with pytest.raises(ResumeRefused, match=r"train.global_batch_tokens: 8192 -> 16384.*data.seed: 0 -> 1|"
                                            r"data.seed: 0 -> 1.*train.global_batch_tokens: 8192 -> 16384"):
        open_run(load_config(None, base + ["data.seed=1", "train.global_batch_tokens=16384"]), "long-pt")
    assert differences(load_config(None, []), load_config(None, ["ray.num_cpus=2", "storage.read_retries=1"])) == []
    events = [json.loads(x)["event"] for x in (tmp_path / "r" / "attempts.jsonl").read_text().splitlines()]
    assert events == ["started", "started"]  # the refused attempt wrote nothing


def test_a_finished_run_says_so(tmp_path, capsys):
    from longctx.workflow import already_finished, open_run, record_attempt

    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=done"])
    run = open_run(cfg, "long-pt")
    storage.write_json(run.path("metrics.json"), {"run_id": "done"})
    record_attempt(run.root, "finished", attempt=1, final_model="s3://b/m", report=run.path("report.md"))
    capsys.readouterr()
    again = open_run(cfg, "long-pt")
    assert again.finished and again.finished["final_model"] == "s3://b/m"
    assert already_finished(again) == {"run_id": "done"}
    out = capsys.readouterr().out.strip().splitlines()
    assert "already finished" in out[0] and out[-1] == "s3://b/m"


# ---------------------------------------------------------------------------------------- prepared data
def _manifest(cfg, **over) -> dict:
    from longctx.handoff import tokenizer_fingerprint
    from longctx.resume import data_fingerprint, data_tree

    m = {"kind": "longctx.packed_sequences", "seq_len": cfg.data.seq_len, "attention": cfg.data.attention,
         "tokenizer": {"uri": cfg.data.tokenizer, "vocab_size": 256,
                       "fingerprint": tokenizer_fingerprint(cfg.data.tokenizer)},
         "data_fingerprint": data_fingerprint(cfg), "data_config": data_tree(cfg)}
    m.update(over)
    return m


def test_prepared_data_is_checked_against_the_job():
    from longctx.handoff import PreparedDataMismatch, check_packed_data, model_vocab_size, require_packed_data

    cfg = load_config(None, [])
    assert check_packed_data(cfg, _manifest(cfg), "pt", same_config=True) == []
    vocab = model_vocab_size(cfg.model.path)
    assert vocab and vocab >= 256
    bad = _manifest(cfg, seq_len=2048, attention="full", kind="sft")
    bad["tokenizer"] = {**bad["tokenizer"], "fingerprint": "0" * 64, "vocab_size": vocab + 1}
    problems = check_packed_data(cfg, {**bad, "uri": "s3://b/packed"}, "pt")
    text = "\n".join(problems)
    assert len(problems) == 5, problems  # kind, seq_len, attention, tokenizer, vocabulary: all at once
    assert "Long-SFT chats" in text and "2048 tokens, data.seq_len is 1024" in text
    assert "another tokenizer" in text and f"the model {cfg.model.path} has {vocab}" in text
    assert "data.attention" in "\n".join(check_packed_data(cfg, _manifest(cfg, attention="full"), "pt"))
    # a rerun reusing its own data: the recorded data settings must match, the differing keys are named
    other = load_config(None, ["data.seed=3", "data.strategy=global"])
    with pytest.raises(PreparedDataMismatch, match=r"data.seed: 3 -> 0.*data.strategy: 'global' -> 'per-source'"):
        require_packed_data(cfg, _manifest(other), "pt", same_config=True)
    # ... which data.prepared (another job's data, by design) does not ask for
    assert check_packed_data(cfg, _manifest(other), "pt") == []


def test_a_committed_output_is_found_before_pass_1(tmp_path):
    from longctx.data.pipeline import prepare_data

    out = tmp_path / "packed"
    out.mkdir()
    (out / storage.COMMIT_MARKER).write_text("{}")
    # the source does not exist: reaching pass 1 would fail on it instead
    cfg = load_config(None, [f"data.sources.web={tmp_path}/missing/*.jsonl", f"data.output={out}"])
    with pytest.raises(storage.StorageError, match="already published"):
        prepare_data(cfg)


# ------------------------------------------------------------------------------------------------ imports
def _import_graph() -> dict[str, set[str]]:
    """module -> longctx modules it imports (module level or inside functions), from the source."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "platform"
    files = {}
    for path in (root / "longctx").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_package():
    graph = _import_graph()
    assert "longctx.workflow" in graph and len(graph) > 40
    assert _cycles(graph) == [], "modules that import each other (directly or through others)"
    # negative control: the checker does see a cycle
    assert _cycles({**graph, "longctx.storage": graph["longctx.storage"] | {"longctx.workflow"}})


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "platform"
    mods = sorted(m for m in _import_graph() if not m.endswith("__main__"))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code, *mods], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_preflight_checks_prepared_data_instead_of_the_corpus(tmp_path):
    from longctx import preflight

    data = tmp_path / "packed"
    data.mkdir()
    base = ["data.sources.web=/nonexistent/*.jsonl", f"data.prepared={data}", "eval.enabled=false"]
    cfg = load_config(None, base)
    lines = [p.line() for p in preflight.check_job(cfg, "pt")]
    assert any("not a committed packed dataset" in x for x in lines), lines
    assert not any("data.sources" in x for x in lines), "the corpus is not used with data.prepared"
    (data / "manifest.json").write_text(json.dumps(_manifest(load_config(None, ["data.seq_len=2048"]))))
    (data / storage.COMMIT_MARKER).write_text("{}")
    lines = [p.line() for p in preflight.check_job(cfg, "pt")]
    assert [x for x in lines if x.startswith("data.prepared")] == [
        f"data.prepared: {data}: rows are 2048 tokens, data.seq_len is 1024; fix: prepare data for this job's "
        f"settings (jobs/prepare_data.py), or match the job to the data"], lines
    assert not [p for p in preflight.check_job(load_config(None, base + ["data.seq_len=2048"]), "pt")
                if p.where == "data.prepared"]


def test_the_checkpoint_module_reads_the_evaluators_ledger_by_its_name():
    from longctx.eval.during_training import LEDGER
    from longctx.train.checkpoint import EVAL_LEDGER

    assert EVAL_LEDGER == LEDGER


def test_the_training_loop_gets_a_typed_spec():
    from longctx.train.spec import LoopSpec

    spec = LoopSpec(job={"train": {"lr": 0.5}}, layout={"world_size": 2, "data_parallel": 2, "sequence_parallel": 1,
                                                        "seq_len": 64, "micro_batch_size": 1, "grad_accum": 2},
                    total_steps=5, train_root="/tmp/r/train", fail_at={"step": 3, "trigger_file": "/tmp/x"})
    again = LoopSpec.from_dict(spec.to_dict())
    assert again == spec and again.config().train.lr == 0.5 and again.batch_layout().grad_accum == 2
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\]"):
        LoopSpec.from_dict({**spec.to_dict(), "steps": 3})
