"""Local development stack on one machine: a loopback S3 server and a two-node Ray cluster.

    python infra/local/local_stack.py s3 start --bucket longctx-dev   # moto server on 127.0.0.1:<free port>
    python infra/local/local_stack.py cluster start                   # head: CPU + data_node; worker: trainer_node
    eval "$(python infra/local/local_stack.py env)"                   # RAY_ADDRESS, token auth, AWS_* for clients
    ray job submit --working-dir . -- python jobs/long_pt.py \
        --set 'ray.data_resources={data_node: 0.01}' --set 'train.resources_per_worker={trainer_node: 0.01}'
    python infra/local/local_stack.py cluster stop
    python infra/local/local_stack.py s3 stop

(`infra/local/start_s3.sh`, `start_cluster.sh`, `stop_cluster.sh`, `stop_s3.sh` wrap these.)

The cluster mirrors the cloud layout in `cluster/*.yaml`: the head node carries the custom resource `data_node`
(the CPU data pool) and the second node carries `trainer_node` (the training pool), so a job that pins its Ray Data
work with `ray.data_resources` and its training workers with `train.resources_per_worker` lands exactly as it
would on AWS, GCP or KubeRay. Start the S3 server first: the Ray processes inherit its AWS_* variables, so tasks and
job drivers reach it through the same code paths as real S3.

Isolation on a shared machine (other people's Ray clusters and tests may be running beside this one):
- every node runs under this stack's own `--temp-dir`, so `ray.init()` elsewhere on the machine never finds and
  joins this cluster (it reads `<temp dir>/ray_current_cluster`, and ours is not /tmp/ray);
- all ports are chosen free on 127.0.0.1; the dashboard and Jobs API listen on 127.0.0.1 only; token
  authentication is on (a fresh token in the state dir, mode 0600);
- `cluster stop` NEVER runs `ray stop` (which kills every Ray process on the machine, by process name). It sends
  SIGTERM to the two `ray start --block` processes it launched (they shut their own children down), then SIGKILLs
  only leftovers that are provably ours: processes whose command line or working directory lies under our temp
  dir (Ray workers and job drivers) or that sit in our two process groups.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_STATE_DIR = os.environ.get("LONGCTX_LOCAL_STATE", f"/tmp/longctx-local-{os.getuid()}")
HEAD_NODE = {"num_cpus": 2, "resources": {"data_node": 4}}
"""The head node: the CPU data pool (logical CPUs; they may oversubscribe a small machine on purpose)."""
WORKER_NODE = {"num_cpus": 2, "num_gpus": 0, "resources": {"trainer_node": 4}}
"""The second node: the training pool."""


class StackError(RuntimeError):
    """The local stack could not be started or stopped; the message says why and where the logs are."""


# ------------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _is_ours(pid: int, marker: str) -> bool:
    """True when `pid` is alive and its command line mentions `marker` (guards against PID reuse)."""
    import psutil

    try:
        return marker in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _terminate(pid: int, marker: str, grace_s: float) -> None:
    """SIGTERM one process we started (if it still is ours) and wait up to `grace_s` for it to exit."""
    import psutil

    if not _is_ours(pid, marker):
        return
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except psutil.TimeoutExpired:
        proc.kill()


# ------------------------------------------------------------------------------------------------------ S3
def s3_start(state_dir: Path, bucket: str | None = None, timeout_s: float = 30.0) -> dict:
    """Start moto's S3 server on 127.0.0.1 (a free port); optionally create `bucket`. Returns s3.json."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if (info := _read_json(state_dir / "s3.json")) and _is_ours(info["pid"], "moto"):
        raise StackError(f"an S3 server of this stack already runs at {info['endpoint']} (pid {info['pid']})")
    port = free_port()
    log = state_dir / "s3.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise StackError(f"moto server did not come up on {endpoint}; log {log}:\n{_tail(log)}") from None
            time.sleep(0.3)
    info = {"pid": proc.pid, "endpoint": endpoint, "env": s3_env(endpoint)}
    _write_json(state_dir / "s3.json", info)
    if bucket:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs()).create_bucket(Bucket=bucket)
        info["bucket"] = f"s3://{bucket}"
        _write_json(state_dir / "s3.json", info)
    return info


def _boto_kwargs() -> dict:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def s3_env(endpoint: str) -> dict:
    """AWS variables that point every client (boto3, s3fs, pyarrow, Ray) at the loopback server.
    The keys are moto's dummy credentials, not secrets."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def s3_stop(state_dir: Path) -> None:
    info = _read_json(state_dir / "s3.json")
    if info:
        _terminate(info["pid"], "moto", grace_s=10)
        (state_dir / "s3.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- cluster
def _ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _alive_nodes(dashboard_url: str, token: str | None) -> list[dict]:
    req = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=100&detail=false")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    body = json.loads(urllib.request.urlopen(req, timeout=5).read())
    nodes = body["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def _launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # start_new_session: our own process group, and no terminal signals from the caller's shell.
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait_nodes(info: dict, want: int, procs: list[tuple[subprocess.Popen, Path]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise StackError(f"`ray start` exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            token = Path(info["token_path"]).read_text().strip() if info.get("token_path") else None
            if len(_alive_nodes(info["dashboard_url"], token)) >= want:
                return
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            last = e
        time.sleep(1.0)
    raise StackError(f"{want} Ray node(s) not alive after {timeout_s:.0f} s (last error: {last!r}); "
                     + "; ".join(f"log {log}:\n{_tail(log)}" for _, log in procs))


def cluster_start(state_dir: Path, head_cpus: int = HEAD_NODE["num_cpus"], head_resources: dict | None = None,
                  worker_cpus: int = WORKER_NODE["num_cpus"], worker_gpus: int = WORKER_NODE["num_gpus"],
                  worker_resources: dict | None = None,
                  object_store_mb: int = 512, auth: bool = True, timeout_s: float = 180.0) -> dict:
    """Start a head node (data pool) and one worker node (training pool) on this machine; returns cluster.json.

    Both are `ray start --block` processes in their own sessions; on any failure everything started so far is
    stopped again before the error is raised."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if (old := _read_json(state_dir / "cluster.json")) and _is_ours(old["head"]["pid"], old["temp_dir"]):
        raise StackError(f"a cluster of this stack already runs (dashboard {old['dashboard_url']}); stop it first")
    head_resources = dict(HEAD_NODE["resources"]) if head_resources is None else head_resources
    worker_resources = dict(WORKER_NODE["resources"]) if worker_resources is None else worker_resources
    # NOTE: Ray puts unix sockets under the temp dir and their paths must stay < 108 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="lcray-", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    info: dict = {
        "temp_dir": temp_dir,
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "head": {"pid": None, "resources": head_resources, "num_cpus": head_cpus},
        "worker": {"pid": None, "resources": worker_resources, "num_cpus": worker_cpus, "num_gpus": worker_gpus},
    }
    env = dict(os.environ)
    env.update({
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a dev cluster stops at once; nothing to drain to
        # In-cluster code that asks the state API without an address (Ray Train's placement-group cleaner) must
        # find THIS cluster, not "multiple active Ray instances" when other clusters run on the machine.
        "RAY_ADDRESS": info["gcs_address"],
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    env.pop("RAY_AUTH_TOKEN", None)
    if auth:
        token_path = state_dir / "auth_token"
        token_path.unlink(missing_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
        info["token_path"] = str(token_path)  # the token itself stays in its 0600 file
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    if s3 := _read_json(state_dir / "s3.json"):
        env.update(s3["env"])
        info["s3_endpoint"] = s3["endpoint"]
    info["env"] = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in env}
    ray = _ray_exe()
    # NOTE: each node gets its own temp dir. Two raylets sharing one session dir on one machine share
    # runtime_resources/: the second node re-extracts a job's working_dir over the directory the driver is
    # running in, the driver's cwd vanishes and torch dies at import ("Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so"). On real clusters every node has its own disk, so this only concerns one-machine setups.
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    head_cmd = [ray, "start", "--head", f"--port={gcs_port}", f"--num-cpus={head_cpus}",
                f"--resources={json.dumps(head_resources)}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}/head",
                f"--dashboard-agent-listen-port={free_port()}", *common]
    head_log, worker_log = state_dir / "head.log", state_dir / "worker.log"
    try:
        head = _launch(head_cmd, env, head_log)
        info["head"]["pid"] = head.pid
        _write_json(state_dir / "cluster.json", info)
        _wait_nodes(info, 1, [(head, head_log)], timeout_s)
        worker_cmd = [ray, "start", f"--address={info['gcs_address']}", f"--num-cpus={worker_cpus}",
                      f"--num-gpus={worker_gpus}", f"--resources={json.dumps(worker_resources)}",
                      f"--temp-dir={temp_dir}/worker", f"--dashboard-agent-listen-port={free_port()}", *common]
        worker = _launch(worker_cmd, env, worker_log)
        info["worker"]["pid"] = worker.pid
        _write_json(state_dir / "cluster.json", info)
        _wait_nodes(info, 2, [(head, head_log), (worker, worker_log)], timeout_s)
    except BaseException:
        cluster_stop(state_dir)
        raise
    return info


def cluster_stop(state_dir: Path, grace_s: float = 30.0, keep_logs: bool = False) -> int:
    """Stop this stack's cluster (only our processes); returns how many leftover processes had to be killed."""
    import psutil

    info = _read_json(state_dir / "cluster.json")
    if not info:
        return 0
    temp_dir = info["temp_dir"]
    pgids = set()
    for role in ("worker", "head"):  # worker first: the head's GCS should outlive its raylets
        pid = info[role]["pid"]
        if pid and _is_ours(pid, temp_dir):
            try:
                pgids.add(os.getpgid(pid))
            except OSError:
                pass
            _terminate(pid, temp_dir, grace_s)
    pgids.discard(os.getpgid(0))  # never our caller's own group
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            mine = temp_dir in " ".join(proc.info["cmdline"] or []) or os.getpgid(proc.pid) in pgids
            if not mine:
                cwd = proc.cwd()
                mine = cwd == temp_dir or cwd.startswith(temp_dir + "/")
        except (psutil.Error, OSError):
            continue
        if mine:
            leftovers.append(proc)
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    if not keep_logs:
        shutil.rmtree(temp_dir, ignore_errors=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    return len(leftovers)


def client_env(state_dir: Path) -> dict:
    """Variables a client (`ray job submit`, a driver) needs to reach this stack."""
    env: dict = {}
    if s3 := _read_json(state_dir / "s3.json"):
        env.update(s3["env"])
    if info := _read_json(state_dir / "cluster.json"):
        env["RAY_ADDRESS"] = info["dashboard_url"]
        env.update(info["env"])
    return env


def job_placement(submission_id: str) -> dict:
    """Where a submitted job's work ran: its status, the nodes with their resources, and every task and actor of
    the job with its node and requested resources (Ray state API; run with `env`'s variables set)."""
    from ray.util.state import list_actors, list_jobs, list_nodes, list_tasks

    address = os.environ["RAY_ADDRESS"]
    job = next((j for j in list_jobs(address=address) if j.submission_id == submission_id), None)
    if job is None or job.job_id is None:
        raise StackError(f"no job with submission id {submission_id!r} on {address}")
    only_job = [("job_id", "=", job.job_id)]
    return {
        "job_id": job.job_id,
        "status": str(job.status),
        "nodes": {n.node_id: n.resources_total for n in list_nodes(address=address)},
        "tasks": [{"name": t.name, "node_id": t.node_id, "required_resources": t.required_resources}
                  for t in list_tasks(address=address, filters=only_job, detail=True, limit=10_000)],
        "actors": [{"class_name": a.class_name, "node_id": a.node_id, "state": str(a.state)}
                   for a in list_actors(address=address, filters=only_job, detail=True, limit=10_000)],
    }


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where PIDs, ports, token and logs go")
    sub = p.add_subparsers(dest="what", required=True)
    s3 = sub.add_parser("s3")
    s3.add_argument("action", choices=["start", "stop"])
    s3.add_argument("--bucket", help="create this bucket after start")
    cl = sub.add_parser("cluster")
    cl.add_argument("action", choices=["start", "stop"])
    cl.add_argument("--head-cpus", type=int, default=HEAD_NODE["num_cpus"])
    cl.add_argument("--head-resources", type=json.loads, default=None, help=f"JSON, default {HEAD_NODE['resources']}")
    cl.add_argument("--worker-cpus", type=int, default=WORKER_NODE["num_cpus"])
    cl.add_argument("--worker-gpus", type=int, default=WORKER_NODE["num_gpus"])
    cl.add_argument("--worker-resources", type=json.loads, default=None,
                    help=f"JSON, default {WORKER_NODE['resources']}")
    cl.add_argument("--object-store-mb", type=int, default=512)
    cl.add_argument("--no-auth", action="store_true", help="disable token authentication (not recommended)")
    cl.add_argument("--keep-logs", action="store_true", help="stop: keep the Ray temp dir with its logs")
    cl.add_argument("--timeout", type=float, default=180.0)
    sub.add_parser("env", help="print `export` lines for clients")
    pl = sub.add_parser("placement", help="JSON: where a submitted job's tasks and actors ran")
    pl.add_argument("submission_id")
    a = p.parse_args(argv)
    state = Path(a.state_dir)
    try:
        if a.what == "s3" and a.action == "start":
            info = s3_start(state, a.bucket)
            print(f"S3 server at {info['endpoint']} (pid {info['pid']}){' bucket ' + info['bucket'] if a.bucket else ''}")
        elif a.what == "s3":
            s3_stop(state)
            print("S3 server stopped")
        elif a.what == "cluster" and a.action == "start":
            info = cluster_start(state, a.head_cpus, a.head_resources, a.worker_cpus, a.worker_gpus,
                                 a.worker_resources, a.object_store_mb, not a.no_auth, a.timeout)
            print(f"Ray cluster up: dashboard {info['dashboard_url']} (127.0.0.1 only), GCS {info['gcs_address']}, "
                  f"temp dir {info['temp_dir']}; clients: eval \"$(python {sys.argv[0]} env)\"")
        elif a.what == "cluster":
            killed = cluster_stop(state, keep_logs=a.keep_logs)
            print(f"Ray cluster stopped ({killed} leftover process(es) killed)")
        elif a.what == "placement":
            os.environ.update(client_env(state))
            print(json.dumps(job_placement(a.submission_id)))
        else:
            for k, v in client_env(state).items():
                print(f"export {k}={v}")
    except StackError as e:
        print(f"local_stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
