"""A two-node Ray cluster on this machine, a shortened `jobs/long_pt.py` submitted with `ray job submit`, and
where its work ran.

The cluster is the development stack users start with `infra/local/` (the same script, run as a subprocess): a
loopback S3 server, a head node carrying the custom resource `data_node` (the CPU data pool) and a second node
carrying `trainer_node` (the training pool), dashboard on 127.0.0.1 with token authentication. The job pins its
Ray Data work with `ray.data_resources={data_node: 0.01}` and its training workers with
`train.resources_per_worker={trainer_node: 0.01}`, exactly as on the cloud clusters in `cluster/`. The Ray state
API then shows every task that asked for `data_node` on the head and every Ray Train worker on the trainer node.

Teardown stops only this test's processes (never `ray stop`, which kills every Ray process on the machine) and
the test checks that none is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.ray, pytest.mark.s3]

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "infra" / "local" / "local_stack.py"
BUCKET = f"lc-two-node-{uuid.uuid4().hex[:8]}"


def _clean_env() -> dict:
    """This process's environment without any Ray/AWS settings other tests (or the user) may have set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "AWS_")) and k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}
    env["PYTHONUNBUFFERED"] = "1"
    # The cluster and the job's `python` must be this interpreter's environment even when it is not activated
    # (CI activates its venv; a developer may run `.venv/bin/python -m pytest`).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _stack(state: Path, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(STACK), "--state-dir", str(state), *args], cwd=ROOT,
                          env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"local_stack {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _our_processes(temp_dir: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                found.append(f"{p.pid} {' '.join(p.info['cmdline'])[:160]}")
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """S3 server + two-node Ray cluster from infra/local; yields (state dir, client env, cluster info)."""
    state = tmp_path_factory.mktemp("local-stack")
    _stack(state, "s3", "start", "--bucket", BUCKET, timeout=120)
    info = None
    try:
        _stack(state, "cluster", "start", "--timeout", "240", timeout=600)
        info = json.loads((state / "cluster.json").read_text())
        env = _clean_env()
        env.update(line.removeprefix("export ").split("=", 1)
                   for line in _stack(state, "env").stdout.splitlines() if line.startswith("export "))
        yield state, env, info
    finally:
        try:
            if info is None and (state / "cluster.json").exists():
                info = json.loads((state / "cluster.json").read_text())
            _stack(state, "cluster", "stop", timeout=180)
        finally:
            _stack(state, "s3", "stop", timeout=60)
        if info is not None:
            left = _our_processes(info["temp_dir"])
            assert not left, f"processes of the test cluster survived teardown: {left}"


def test_dashboard_refuses_requests_without_the_token(stack):
    _, env, info = stack
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{info['dashboard_url']}/api/v0/nodes", timeout=10)
    assert err.value.code in (401, 403)
    ok = urllib.request.Request(f"{info['dashboard_url']}/api/v0/nodes",
                                headers={"Authorization": f"Bearer {Path(info['token_path']).read_text().strip()}"})
    assert json.loads(urllib.request.urlopen(ok, timeout=10).read())["result"] is True
    assert info["dashboard_url"].startswith("http://127.0.0.1:")


def _s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def _upload_tiny_model(env: dict, tmp_path: Path) -> str:
    """A tiny Llama (shipped tokenizer's vocabulary) on the stack's S3: the job loads its base model from s3://."""
    from train_helpers import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "tiny-llama"), hidden=32, layers=2, max_pos=256)
    s3 = _s3_client(env)
    for name in os.listdir(folder):
        s3.upload_file(os.path.join(folder, name), BUCKET, f"models/tiny-llama/{name}")
    return f"s3://{BUCKET}/models/tiny-llama"


def test_long_pt_submitted_to_two_nodes_places_data_and_training_on_their_pools(stack, tmp_path):
    state, env, info = stack
    submission = f"two-node-{uuid.uuid4().hex[:8]}"
    run_root = f"s3://{BUCKET}/runs"
    model = _upload_tiny_model(env, tmp_path)
    home = tmp_path / "home"  # the job's HOME: a relative output_dir must land under it, not in Ray's copy of "."
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--submission-id", submission,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": {"HOME": str(home)}}),
           "--", "python", "jobs/long_pt.py",
           "--set", "output_dir=runs", "--set", f"train.storage_path={run_root}", "--set", "run_name=two-node",
           "--set", f"model.path={model}",
           "--set", 'data.sources={c: "builtin:corpus/c.jsonl.gz"}',  # the smallest shipped source
           "--set", "ray.data_resources={data_node: 0.01}",
           "--set", "train.resources_per_worker={trainer_node: 0.01}",
           "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5",
           "--set", "train.max_steps=2", "--set", "train.global_batch_tokens=4096",
           "--set", "eval.enabled=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ray job submit failed:\n{log[-8000:]}"
    assert f"Job '{submission}' succeeded" in log, log[-4000:]
    assert "[longctx] data done" in log and "[longctx] train done" in log, log[-4000:]

    placement = json.loads(_stack(state, "placement", submission, env=env).stdout)
    assert placement["status"].endswith("SUCCEEDED")
    data_node = [n for n, r in placement["nodes"].items() if r.get("data_node")]
    trainer_node = [n for n, r in placement["nodes"].items() if r.get("trainer_node")]
    assert len(data_node) == 1 and len(trainer_node) == 1 and data_node != trainer_node, placement["nodes"]

    pinned = [t for t in placement["tasks"] if "data_node" in (t["required_resources"] or {})]
    assert pinned, "no task of the job asked for data_node: ray.data_resources did not reach Ray Data"
    wrong = [t for t in pinned if t["node_id"] not in (None, data_node[0])]
    assert not wrong, f"data tasks off the data node: {wrong[:5]}"
    assert any(t["node_id"] == data_node[0] for t in pinned)

    workers = [a for a in placement["actors"] if a["class_name"] == "RayTrainWorker"]
    assert len(workers) >= 2, placement["actors"]
    assert {a["node_id"] for a in workers} == {trainer_node[0]}, workers

    # the run folder is where the user looks (~/longctx/runs/two-node), not in Ray's temporary working-dir copy;
    # checkpoints and the final model went to train.storage_path, on the loopback S3 server the cluster's processes
    # inherited from the stack
    assert "Ray's temporary copy of the working dir" in log
    run = home / "longctx" / "runs" / "two-node"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2
    final = f"s3://{BUCKET}/runs/two-node/train/final_model"
    assert (run / "final_model.txt").read_text().strip() == final == metrics["train"]["final_model"]
    assert _s3_client(env).get_object(Bucket=BUCKET, Key="runs/two-node/train/final_model/_COMMITTED")
    # the final model's URI is printed after Ray's log streaming has ended: no worker output follows it
    assert final in proc.stdout
    after = proc.stdout.rsplit(final, 1)[1]
    assert "pid=" not in after and "Loading weights" not in after, after[:2000]


PREPARE = """
import json, sys
from longctx.config import load_config
from longctx.data import prepare_data
from longctx.data.pipeline import load_manifest

out, sets = sys.argv[1], json.loads(sys.argv[2])
result = prepare_data(load_config(None, sets), out)
print("RESULT " + json.dumps({"pass1": result["pass1"], "pass2": result["pass2"], "manifest": load_manifest(out)}))
"""


def _prepare(env: dict, info: dict, tmp_path: Path, out: str, sets: list[str]) -> dict:
    """prepare_data run by a driver connected to the stack's cluster (its GCS address, its auth settings)."""
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE)
    run_env = dict(env, RAY_ADDRESS=info["gcs_address"])
    proc = subprocess.run([sys.executable, str(script), out, json.dumps(sets)], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])


def test_data_preparation_runs_both_passes_on_both_nodes_and_gives_the_one_node_bytes(stack, tmp_path):
    """Pass 1 (tokenizer actors writing the token cache on s3://) and pass 2 (one task per partition writing
    shards to the s3:// staging prefix) on both nodes of the cluster, the output byte for byte the one a run kept
    on the head node gives. Each data task or actor asks for 1.2 of a node's 2 CPUs, so two cannot share a node:
    the two tokenizer actors and concurrent pass-2 tasks must use both nodes."""
    _, env, info = stack
    base = ["data.sources={code: builtin:corpus/code.jsonl.gz, records: builtin:corpus/records.jsonl.gz}",
            "data.seq_len=256", "data.long_threshold=512", "data.rows_per_shard=64", "data.pack_partitions=4",
            "data.seed=3"]
    spread = _prepare(env, info, tmp_path, f"s3://{BUCKET}/data/two-nodes", base + [
        "data.num_tokenize_actors=2", "ray.data_cpus_per_task=1.2"])
    one = _prepare(env, info, tmp_path, f"s3://{BUCKET}/data/one-node", base + [
        "data.num_tokenize_actors=1", "ray.data_cpus_per_task=0.5", "ray.data_resources={data_node: 0.01}"])
    assert len(set(spread["pass1"]["nodes"])) == 2, spread["pass1"]  # tokenizer actors (cache writers) on both
    assert len(set(spread["pass2"]["nodes"])) == 2, spread["pass2"]  # pack/write tasks on both
    assert len(set(one["pass1"]["nodes"])) == 1 and set(one["pass2"]["nodes"]) == set(one["pass1"]["nodes"])
    shards = [(s["path"], s["sha256"]) for s in spread["manifest"]["shards"]]
    assert len(shards) >= 4 and spread["pass2"]["partitions"] == 4
    assert shards == [(s["path"], s["sha256"]) for s in one["manifest"]["shards"]]
    assert spread["manifest"] == one["manifest"]  # the data settings that differ are speed settings only
    # no token cache or staging prefix left behind on the bucket
    left = [o["Key"] for o in _s3_client(env).list_objects_v2(Bucket=BUCKET, Prefix="data/").get("Contents", [])]
    assert all(k.startswith(("data/two-nodes/", "data/one-node/")) for k in left), left
