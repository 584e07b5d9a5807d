"""Every command the README shows works as written.

The README's commands are: every line of a ```bash block (a `&&` chain is one command, a `# comment` is not part of
it, `\\` continuations are joined), the first code span of every row of the "Command line" table, and every inline
code span elsewhere that is a `longctx` or `python` command with an option (`--...`). `README_COMMANDS` maps each
one to how it is checked, one line per command:

- `Run(cmd)`: run here, exit 0. `cmd` is the README's command with tiny settings appended (or placeholders such as
  FILE filled in); `{...}` names something the shared environment provides (see `_env_values`).
- `Run(cmd, ray=True)`: the same, against one Ray head that the README's own laptop flow starts (`ray start --head
  --block`, then `ray job submit ... python jobs/long_pt.py`): the tiny Long-PT run it submits is shared, so
  `python jobs/long_pt.py` and `longctx train` with the same settings find it finished, and `longctx eval run`
  evaluates its model. These commands join the head through RAY_ADDRESS instead of each starting a local cluster
  (that path has its own tests: tests/test_local_ray.py, tests/test_long_pt_job.py).
- `Covered(test)`: run by that test (CI's install line, the sweep and the study, which take minutes even
  shortened); the test must exist.

A README command missing from `README_COMMANDS` fails `test_every_readme_command_has_a_check` (add its line), and
so does an entry whose command the README no longer shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from longctx.config import EMBEDDED_DEFAULT, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    cmd: str
    ray: bool = False
    background: bool = False
    """Started and left running (the head); stopped with Ctrl-C (SIGINT) at the end."""
    slow: bool = False
    """Over ~30 s without Ray: marked slow (out of the quick lane)."""


@dataclass(frozen=True)
class Covered:
    test: str
    """`tests/test_x.py::test_name` that runs the command."""


TINY_PT = ("--set train.global_batch_tokens=2048 --set 'data.sources={{c: {corpus}}}' "
           "--set eval.num_documents=2 --set eval.passkey.trials=1 --set 'eval.passkey.lengths=[256, 1024]' "
           "--set 'eval.passkey.depths=[0.5]' --set train.val_num_documents=2")
TINY_SFT = "--set train.max_steps=2 --set train.global_batch_tokens=2048 --set train.checkpoint_every=0"
HEAD = ("ray start --head --block --num-cpus=4 --port={gcs_port} --dashboard-port={dashboard_port} "
        "--dashboard-agent-listen-port={agent_port} --ray-client-server-port={client_port}")  # ports: tests run beside others
SUBMIT = "ray job submit --address http://127.0.0.1:{dashboard_port} --working-dir . --"

README_COMMANDS: dict[str, Run | Covered] = {
    # ---- ```bash blocks
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-ci.txt -e ".[test]" && '
    'python jobs/long_pt.py': Run(f"python jobs/long_pt.py --set train.max_steps=2 {TINY_PT}", ray=True),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-ci.txt -e ".[test]" && '
    'python -m pytest': Covered("tests/test_readme.py::test_ci_runs_the_readme_install_and_test_commands"),
    'python -m pytest -m "not ray and not slow"': Run('python -m pytest -m "not ray and not slow" --collect-only -q'),
    "python jobs/long_sft.py": Run(f"python jobs/long_sft.py {TINY_SFT}", ray=True),
    "python jobs/long_pt.py --config jobs/configs/index-1.9b-32k-pt.yaml --set model.path=s3://my-bucket/models/my-1.9b/ "
    "--set data.sources.web=s3://my-bucket/corpus/web/ --set data.sources.code='s3://my-bucket/corpus/github/*.jsonl.zst' "
    "--set output_dir=s3://my-bucket/runs/":  # a 1.9B model on 32 GPUs: its config is what can be checked here
    Run("longctx config validate --schema-only --config jobs/configs/index-1.9b-32k-pt.yaml "
        "--set model.path=s3://my-bucket/models/my-1.9b/ --set data.sources.web=s3://my-bucket/corpus/web/ "
        "--set data.sources.code='s3://my-bucket/corpus/github/*.jsonl.zst' --set output_dir=s3://my-bucket/runs/"),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/long_pt.py --config "
    "jobs/configs/index-1.9b-32k-pt.yaml": Run("longctx config validate --schema-only --config "
                                               "jobs/configs/index-1.9b-32k-pt.yaml"),
    "ray get-auth-token --generate >/dev/null && export RAY_AUTH_MODE=token":
    Run("ray get-auth-token --generate >/dev/null && export RAY_AUTH_MODE=token", ray=True),
    "ray start --head --block": Run(HEAD, ray=True, background=True),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/long_pt.py --set train.max_steps=2":
    Run(f"{SUBMIT} python jobs/long_pt.py --set train.max_steps=2 {TINY_PT}", ray=True),
    "longctx plan --config jobs/configs/llama2-7b-80k-per-source.yaml --set model.path=builtin:model-shapes/llama-2-7b":
    Run("longctx plan --config jobs/configs/llama2-7b-80k-per-source.yaml --set model.path=builtin:model-shapes/llama-2-7b"),
    "longctx plan --config jobs/configs/llama2-7b-80k-per-source.yaml --set model.path=builtin:model-shapes/llama-2-7b "
    "--max-seq-len --json": Run("longctx plan --config jobs/configs/llama2-7b-80k-per-source.yaml --set "
                                "model.path=builtin:model-shapes/llama-2-7b --max-seq-len --json", slow=True),
    "python jobs/sweep.py --config jobs/configs/sweep-rope-budget.yaml":
    Covered("tests/test_sweep.py::test_sweep_interrupted_and_resumed_runs_every_trial_once"),
    "python jobs/study.py --output runs/study":
    Covered("tests/test_study.py::test_short_study_reports_verdicts_first_and_numbers_recomputable"),
    "python jobs/long_pt.py --config jobs/configs/tiny-two-stage.yaml":
    Covered("tests/test_long_pt_job.py::test_two_stage_job_killed_in_stage_2_and_resubmitted_on_s3"),
    "python jobs/study.py --quick --output runs/study-quick":
    Covered("tests/test_study.py::test_short_study_reports_verdicts_first_and_numbers_recomputable"),
    # ---- the "Command line" table
    "longctx data prepare --config FILE [--overwrite]":  # the submitted run's data settings: its data is reused
    Run("longctx data prepare --config {tiny_yaml} --set data.output={packed}", ray=True),
    "longctx data stats --config FILE": Run("longctx data stats --config {tiny_yaml}", ray=True),
    "longctx data synth cip|tables|retrieval --config FILE [--output URI] [--packed URI]":
    Run("longctx data synth tables --config {tiny_yaml} --output {tmp}/synth/tables && "
        "longctx data synth retrieval --config {tiny_yaml} --output {tmp}/synth/retrieval && "
        "longctx data synth cip --config {tiny_yaml} --output {tmp}/synth/cip --packed {packed}", ray=True),
    "longctx data clean [--path FOLDER] [--prefix S3_URI]": Run("longctx data clean --tmp {tmp} --path {tmp}"),
    "longctx train --config FILE": Run(f"longctx train --set train.max_steps=2 {TINY_PT}", ray=True),
    "longctx sft --config FILE": Run(f"longctx sft {TINY_SFT}", ray=True),
    "longctx eval run --config FILE --set eval.model=URI":
    Run(f"longctx eval run --set eval.model={{final_model}} {TINY_PT} --set 'eval.baselines=[naive]'", ray=True),
    "longctx eval score --predictions FILE --output FILE":
    Run("longctx eval score --predictions {predictions} --output {tmp}/scores.json"),
    "longctx eval ruler generate --config FILE --set eval.ruler.lengths=[4096,8192] --output DIR":
    Run("longctx eval ruler generate --config {tiny_yaml} --set eval.ruler.lengths=[4096,8192] --set "
        "eval.ruler.num_samples=2 --set 'eval.ruler.tasks=[niah_single_1, vt]' --output {tmp}/ruler"),
    "longctx tune --config FILE [--fresh]":
    Covered("tests/test_sweep.py::test_sweep_interrupted_and_resumed_runs_every_trial_once"),
    "longctx study [--output DIR] [--quick] [--seeds N] [--steps N] [--parts abcde]":
    Covered("tests/test_study.py::test_short_study_reports_verdicts_first_and_numbers_recomputable"),
    "longctx rope suggest --head-dim N --train-len N --target-len N":
    Run("longctx rope suggest --head-dim 32 --train-len 256 --target-len 1024"),
    "longctx plan --config FILE [--gpu h100] [--max-seq-len] [--json]":
    Run("longctx plan --config jobs/configs/llama2-7b-80k-per-source.yaml --set "
        "model.path=builtin:model-shapes/llama-2-7b --gpu h100 --json"),
    "longctx config show|validate|schema --config FILE [--output FILE]":
    Run("longctx config show --config {tiny_yaml} && longctx config validate --config {tiny_yaml} && "
        "longctx config schema --output {tmp}/schema.json"),
    # ---- inline commands
    "longctx rope suggest --head-dim 128 --train-len 4096 --target-len 32768":
    Run("longctx rope suggest --head-dim 128 --train-len 4096 --target-len 32768"),
    "longctx config validate --kind pt|sft|eval|prepare|sweep":
    Run("for k in pt sft eval prepare sweep; do longctx config validate --kind $k || exit 1; done"),
    "python jobs/long_pt.py --config .../best_config.yaml":
    Covered("tests/test_sweep.py::test_write_results_table_plots_and_best_recipe"),
    "longctx --version": Run("longctx --version"),
}


# ------------------------------------------------------------------------------------------- reading README
def _norm(cmd: str) -> str:
    return re.sub(r"\s+", " ", cmd.replace("\\|", "|")).strip()


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return [b.split("```", 1)[0].strip() for b in text.split("```bash")[1:]]


def readme_commands() -> list[str]:
    """Every command the README shows (see the module docstring), normalised."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in _readme_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            cmd = _norm(re.sub(r"\s#.*$", "", line))
            if cmd:
                out.append(cmd)
    table = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    out += [_norm(m.group(1)) for m in re.finditer(r"^\|\s*`([^`]+)`", table, re.M)]
    prose = re.sub(r"```.*?```", "", re.sub(r"^\|.*$", "", text, flags=re.M), flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = _norm(span)
        if span.startswith(("longctx ", "python ")) and " --" in f" {span}":
            out.append(span)
    return list(dict.fromkeys(out))


def test_every_readme_command_has_a_check():
    shown = readme_commands()
    missing = [c for c in shown if c not in README_COMMANDS]
    assert not missing, "README commands without a line in README_COMMANDS (tests/test_readme.py): " + "; ".join(
        repr(c) for c in missing)
    stale = [c for c in README_COMMANDS if c not in shown]
    assert not stale, f"README_COMMANDS lists commands the README no longer shows: {stale}"


def test_the_command_check_sees_a_new_command(monkeypatch, tmp_path):
    """Negative control: a command added to the README without a line here is found."""
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text() + "\n```bash\nlongctx plan --config FILE\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert "longctx plan --config FILE" in readme_commands()
    assert "longctx plan --config FILE" not in README_COMMANDS


def test_readme_starts_with_the_two_commands():
    blocks = _readme_blocks()
    assert blocks[0].endswith("python jobs/long_pt.py"), blocks[0]
    assert blocks[1].endswith("python -m pytest"), blocks[1]


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -c constraints-ci.txt -e ".[test]"'
    assert install in _readme_blocks()[0] and install in _readme_blocks()[1]
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert install in ci_lines
    assert "python -m pytest" in ci_lines


@pytest.mark.parametrize("command", [c for c, v in README_COMMANDS.items() if isinstance(v, Covered)])
def test_commands_covered_elsewhere_have_their_test(command):
    path, name = README_COMMANDS[command].test.split("::")
    assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), README_COMMANDS[command]


# ---------------------------------------------------------------------------------------------- running them
def _environment(tmp: Path, ray_tmp: str) -> dict[str, str]:
    """What every README command runs with: a home, run folder and caches of its own, in the repository root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "LONGCTX_"))}
    env.update(HOME=str(tmp / "home"), LONGCTX_HOME=str(tmp / "home" / "longctx"), RAY_TMPDIR=ray_tmp,
               LONGCTX_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT / "platform"))
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _shell(cmd: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _env_values(tmp: Path) -> dict[str, str]:
    """Files the commands name: a tiny corpus (the first 24 records of the shipped C headers), a tiny recipe with the
    data settings of the tiny Long-PT run (so `data prepare` into that run's data folder reuses it), predictions."""
    import gzip

    corpus = tmp / "corpus.jsonl"
    with gzip.open(ROOT / "platform" / "longctx" / "assets" / "corpus" / "c.jsonl.gz", "rt") as f:
        corpus.write_text("".join(line for _, line in zip(range(24), f)))
    tiny = tmp / "tiny.yaml"
    tiny.write_text(dump_config(load_config(EMBEDDED_DEFAULT, [
        "ray.num_cpus=2", f"data.sources={{c: '{corpus}'}}", "synth.tables.num_samples=2", "synth.tables.max_tokens=512",
        "synth.retrieval.num_samples=2", "synth.retrieval.max_tokens=512", "synth.retrieval.haystack_max_chars=100000"])))
    preds = tmp / "preds.jsonl"
    preds.write_text(json.dumps({"pred": "Paris", "answers": ["Paris"], "all_classes": None,
                                 "dataset": "multifieldqa_en"}) + "\n")
    return {"tmp": str(tmp), "tiny_yaml": str(tiny), "predictions": str(preds), "corpus": str(corpus),
            "packed": str(tmp / "packed")}


QUICK = [c for c, v in README_COMMANDS.items() if isinstance(v, Run) and not v.ray]
LAPTOP_FLOW = ["ray get-auth-token --generate >/dev/null && export RAY_AUTH_MODE=token", "ray start --head --block",
               "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/long_pt.py --set "
               "train.max_steps=2"]
"""Run first, in this order (the README's laptop flow); the other commands with Ray follow in README order."""
WITH_RAY = LAPTOP_FLOW + [c for c, v in README_COMMANDS.items() if isinstance(v, Run) and v.ray and c not in LAPTOP_FLOW]


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if README_COMMANDS[c].slow else [])
                                     for c in QUICK])
def test_readme_command_runs(command, tmp_path):
    values = _env_values(tmp_path)
    proc = _shell(README_COMMANDS[command].cmd.format(**values), _environment(tmp_path, str(tmp_path / "ray")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def laptop_flow(tmp_path_factory, free_ports):
    """The README's laptop flow and every command that needs Ray, in README order, against one head; yields
    {command: CompletedProcess}. The head is stopped as the README says: Ctrl-C on `ray start --head --block`."""
    tmp = tmp_path_factory.mktemp("readme")
    ray_tmp = tempfile.mkdtemp(prefix="lcx", dir="/tmp")  # short: Ray's socket paths live under it
    env = _environment(tmp, ray_tmp)
    ports = dict(zip(("gcs_port", "dashboard_port", "agent_port", "client_port"), free_ports(4)))
    values = {**_env_values(tmp), **{k: str(v) for k, v in ports.items()}}
    results: dict[str, subprocess.CompletedProcess] = {}
    head = None
    try:
        for command in WITH_RAY:
            run = README_COMMANDS[command]
            done = sorted(Path(env["LONGCTX_HOME"], "runs").glob("long-pt-*/final_model.txt"))
            if done:  # the submitted Long-PT run: its model, and its data (prepared with the tiny recipe's settings)
                values.update(final_model=done[0].read_text().strip(), packed=str(done[0].parent / "data"))
            cmd = run.cmd.format(**values)
            t0 = time.time()
            if run.background:
                head = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=ROOT, env=env, start_new_session=True,
                                        stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
                deadline = time.time() + 180
                while not Path(ray_tmp, "ray", "ray_current_cluster").exists() and time.time() < deadline:
                    assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
                    time.sleep(0.5)
                status = subprocess.run(["ray", "status", f"--address=127.0.0.1:{values['gcs_port']}"], env=env,
                                        capture_output=True, text=True, timeout=120)
                results[command] = subprocess.CompletedProcess(cmd, 0 if head.poll() is None else 1,
                                                               status.stdout, status.stderr)
                env = {**env, "RAY_ADDRESS": f"127.0.0.1:{values['gcs_port']}"}
                continue
            if "export RAY_AUTH_MODE=token" in cmd:
                env = {**env, "RAY_AUTH_MODE": "token"}
            results[command] = _shell(cmd, env)
            with open(tmp / "commands.log", "a") as log:  # what ran, how long, how it ended (for a failure's reader)
                log.write(f"rc={results[command].returncode} {time.time() - t0:.1f}s {cmd}\n")
        yield results
    finally:
        if head is not None and head.poll() is None:
            os.killpg(head.pid, signal.SIGINT)  # Ctrl-C: the README's way to stop this head (and only it)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("command", WITH_RAY)
def test_readme_command_runs_with_ray(command, laptop_flow):
    proc = laptop_flow[command]
    out = (proc.stdout or "") + (proc.stderr or "")
    assert proc.returncode == 0, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    if "jobs/long_pt.py" in command and "ray job submit" in command:
        # the job's last line is the final model's URI; Ray's own status lines follow it (the README says so)
        job = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        uri = next(ln for ln in reversed(job) if ln.endswith("/train/final_model"))
        assert Path(uri).is_dir() and "succeeded" in proc.stdout.split(uri, 1)[1]
    if command.startswith(("python jobs/long_pt.py", "longctx train", "longctx sft")) and "submit" not in command:
        assert proc.stdout.strip().splitlines()[-1].endswith("/train/final_model")


# -------------------------------------------------------------------------------------- pointers into the docs
def _text_files():
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml"))
            and (ROOT / n).is_file()]


def _section_refs(text: str) -> list[tuple[str, str]]:
    """("number", n) and ("title", t) for every pointer into docs/architecture.md in `text`."""
    refs = [("number", m) for m in re.findall(r"architecture\.md\)?,?\s+sections?\s+(\d+)", text)]
    refs += [("title", m) for m in re.findall(r"architecture\.md\s+\(\"([^\"]+)\"\)", text)]
    return refs


def _sections() -> dict[str, str]:
    heads = re.findall(r"^## (\d+)\. (.+)$", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    return dict(heads)


def test_pointers_into_architecture_md_name_sections_that_exist():
    sections = _sections()
    assert len(sections) >= 6 and "Runs" in sections.values()
    bad, seen = [], 0
    for path in _text_files():
        for kind, ref in _section_refs(path.read_text(errors="replace")):
            seen += 1
            ok = ref in sections if kind == "number" else any(t.startswith(ref) for t in sections.values())
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}: docs/architecture.md section {ref!r}")
    assert seen >= 8, "the pointer pattern found almost nothing: has the wording changed?"
    assert not bad, f"pointers to sections that do not exist ({sorted(sections.items())}): {bad}"
    # negative control: a pointer to a section that is not there is found
    assert _section_refs("see docs/architecture.md sect" + "ion 9") == [("number", "9")] and "9" not in sections
    assert _section_refs('docs/architecture.md ("Runs")') == [("title", "Runs")]


def test_data_modules_name_the_step_of_the_data_readme_they_do():
    readme = (ROOT / "platform" / "longctx" / "data" / "README.md").read_text()
    # the data path's numbered steps: from its step 1 to the next section (the Long-SFT section numbers its own)
    readme = readme[re.search(r"^1\. \*\*", readme, re.M).start():]
    readme = readme.split("\n## ", 1)[0]
    steps = {int(n): where for n, where in re.findall(r"^(\d+)\. \*\*[^*]+\*\* \(([^)]*)\)", readme, re.M)}
    assert len(steps) >= 9, steps
    claims = 0
    for path in sorted((ROOT / "platform" / "longctx" / "data").glob("*.py")):
        first = path.read_text().split("\n", 1)[0]
        m = re.match(r'"""Steps? (\d+)(?:-(\d+))? of the data path', first)
        if not m:
            continue
        claims += 1
        for n in range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1):
            assert path.name in steps.get(n, "") or path.stem in steps.get(n, ""), \
                f"{path.name} says step {n}, data/README.md's step {n} is done by ({steps.get(n)})"
    assert claims >= 6
