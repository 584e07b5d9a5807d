"""Every cluster file validates offline, and every job fits the clusters it is meant to run on.

- `cluster/{aws,gcp,local}.yaml` against the cluster-config JSON Schema shipped inside the ray package
  (`ray/autoscaler/ray-schema.json`), then through Ray's own `prepare_config` (merge with the provider defaults,
  Docker checks) and `validate_config` (head type, min/max workers): what `ray up` does before it touches a cloud.
- `cluster/kuberay/*.yaml` against `schemas/kuberay_manifests.schema.json` (the fields the KubeRay operator
  requires), plus what the schema cannot say: custom resources parse, RayJobs point at the RayCluster, their
  entrypoints name scripts and configs that exist and whose `--set` overrides the config loader accepts.
- Resource fit: for every job config in `jobs/configs/` (and the embedded default), a training worker
  ({GPU: 1 if use_gpu, CPU: cpus_per_worker, **resources_per_worker}) x num_workers and one Ray Data task
  ({CPU: data_cpus_per_task, **data_resources}) fit some node type of each cluster at its maximum size, both as
  the config stands and pinned the way cluster/README.md and the RayJobs pin them.
- `infra/docker/Dockerfile`: parsed (no Docker engine here, the image is not built): stages, layer order,
  flash-attn built from source for sm80/sm90 in its own stage, deepspeed and longctx installed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from longctx.config import EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = sorted(p.name for p in CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted(p.name for p in (CLUSTER / "kuberay").glob("*.yaml"))
JOB_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jobs" / "configs").glob("*.yaml"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
PIN = {"data": {"data_node": 0.01}, "train": {"trainer_node": 0.01}}  # what README and the RayJobs add


def _load_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _kuberay_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def test_the_expected_cluster_files_exist():
    assert {"aws.yaml", "gcp.yaml", "local.yaml"} <= set(LAUNCHER_FILES)
    assert {"raycluster.yaml", "rayjob-long-pt.yaml", "rayjob-long-sft.yaml"} <= set(KUBERAY_FILES)


# ----------------------------------------------------------------------------------------- cluster launcher
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_cluster_file_validates_against_rays_own_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load_launcher(name)
    jsonschema.validate(raw, json.loads(RAY_SCHEMA.read_text()))  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # as `ray up` fills it in
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_a_broken_cluster_file_is_rejected():
    """The validation above can fail: a typo'd key and a fractional custom resource are caught."""
    raw = _load_launcher("aws.yaml")
    schema = json.loads(RAY_SCHEMA.read_text())
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["cpu_data"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["cpu_data"]["resources"]["data_node"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_pools(name):
    cfg = _load_launcher(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not run tasks"
    data = [t for t in types.values() if t["resources"].get("data_node")]
    gpu = {k: t for k, t in types.items() if t["resources"].get("trainer_node")}
    assert data and all(t["resources"].get("GPU", 0) == 0 and t.get("min_workers", 0) == 0 for t in data)
    assert len(gpu) >= 3 and all(t["resources"]["GPU"] >= 1 and t.get("min_workers", 0) == 0 for t in gpu.values())
    for pool, t in gpu.items():
        assert t["resources"].get(pool), f"{pool}: no pool marker resource named after it"
    machine = "InstanceType" if name == "aws.yaml" else "machineType"
    kinds = {t["node_config"][machine] for t in gpu.values()}
    assert kinds & {"p5.48xlarge", "a3-highgpu-8g"} and kinds & {"p4d.24xlarge", "a2-highgpu-8g"}, kinds
    spot = [t for t in types.values() if "InstanceMarketOptions" in t["node_config"]
            or t["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"]
    assert all(t in spot for t in data), "the data pool should use spot capacity"
    assert sum(t.get("max_workers", 0) for k, t in types.items() if k != cfg["head_node_type"]) <= cfg["max_workers"]
    assert cfg["docker"]["image"], "the project image"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_no_credentials_and_dashboard_on_localhost(name):
    text = (CLUSTER / name).read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"AWS_SECRET_ACCESS_KEY", r"private_key_id",
                    r"RAY_AUTH_TOKEN="):
        assert not re.search(pattern, text), f"{name}: credential-like text {pattern!r}"
    cfg = _load_launcher(name)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard/Jobs API must not listen on public interfaces"
    if cfg["provider"]["type"] == "aws":
        for t in cfg["available_node_types"].values():
            assert "IamInstanceProfile" in t["node_config"], "S3 access through instance profiles"
    if cfg["provider"]["type"] == "gcp":
        for k, t in cfg["available_node_types"].items():
            if k != cfg["head_node_type"]:
                assert t["node_config"]["serviceAccounts"][0]["email"].startswith("longctx-ray-worker@")


def test_local_cluster_assigns_the_pool_markers_by_hardware():
    cfg = _load_launcher("local.yaml")
    assert cfg["provider"]["type"] == "local"
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "nvidia-smi" in worker and "trainer_node" in worker and "data_node" in worker


# ---------------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    schema = json.loads((ROOT / "schemas" / "kuberay_manifests.schema.json").read_text())
    docs = _kuberay_docs(name)
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schema)


def test_kuberay_schema_rejects_what_the_operator_rejects():
    schema = json.loads((ROOT / "schemas" / "kuberay_manifests.schema.json").read_text())
    cluster = next(d for d in _kuberay_docs("raycluster.yaml") if d["kind"] == "RayCluster")
    for mutate in (lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"),
                   lambda c: c["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
                   lambda c: c["spec"]["headGroupSpec"].pop("rayStartParams"),
                   lambda c: c["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": 4}),
                   lambda c: c.update(apiVersion="ray.io/v1alpha1")):
        bad = copy.deepcopy(cluster)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    job = _kuberay_docs("rayjob-long-pt.yaml")[0]
    bad = copy.deepcopy(job)
    bad["spec"].pop("clusterSelector")
    with pytest.raises(jsonschema.ValidationError):  # neither rayClusterSpec nor clusterSelector
        jsonschema.validate(bad, schema)


def _raycluster() -> dict:
    return next(d for d in _kuberay_docs("raycluster.yaml") if d["kind"] == "RayCluster")


def _kuberay_custom_resources(params: dict) -> dict:
    """KubeRay's `resources: '"{\\"x\\": 1}"'` format: a JSON object inside a quoted string."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"KubeRay wants the resources JSON quoted: {raw!r}"
    return json.loads(json.loads(raw))


def test_raycluster_pools_autoscale_with_gpu_scheduling():
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu-data", "gpu-h100", "gpu-a100", "gpu-dev"} <= set(groups)
    for name, g in groups.items():
        assert g["minReplicas"] == 0 <= g.get("replicas", 0) <= g["maxReplicas"]
        custom = _kuberay_custom_resources(g["rayStartParams"])
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if name.startswith("gpu-"):
            assert custom.get("trainer_node") and int(limits["nvidia.com/gpu"]) >= 1
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert pod["nodeSelector"], f"{name}: GPU pods need a nodeSelector"
        else:
            assert custom.get("data_node") and "nvidia.com/gpu" not in limits
        assert pod["serviceAccountName"] == "longctx-ray"
    assert spec["rayVersion"] == ray.__version__, "the image's Ray must match the clients' Ray"


RAYJOBS = {"rayjob-long-pt.yaml": ("jobs/long_pt.py", "jobs/configs/index-1.9b-32k-pt.yaml"),
           "rayjob-long-sft.yaml": ("jobs/long_sft.py", "jobs/configs/index-1.9b-32k-sft.yaml"),
           "rayjob-sweep.yaml": ("jobs/sweep.py", "jobs/configs/sweep-index-rope-base.yaml")}


def _entrypoint(name: str) -> list[str]:
    job = _kuberay_docs(name)[0]
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": _raycluster()["metadata"]["name"]}
    return shlex.split(job["spec"]["entrypoint"])


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_runs_the_repos_job_with_its_config(name):
    script, config = RAYJOBS[name]
    argv = _entrypoint(name)
    assert argv[:2] == ["python", script] and argv[argv.index("--config") + 1] == config
    assert (ROOT / script).is_file(), f"{script} does not exist"
    assert (ROOT / config).is_file(), f"{config} does not exist"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert any(o.startswith("ray.data_resources=") for o in overrides)
    assert any(o.startswith("train.resources_per_worker=") for o in overrides)
    cfg = load_config(ROOT / config, overrides)
    assert cfg.output_dir.startswith("s3://") and cfg.ray.data_resources == {"data_node": 0.01}
    assert cfg.train.resources_per_worker.get("trainer_node") == 0.01


def test_rayjob_sweep_drivers_land_on_the_head_and_its_trials_fit_the_pools():
    argv = _entrypoint("rayjob-sweep.yaml")
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / "jobs/configs/sweep-index-rope-base.yaml", overrides)
    head = _kuberay_custom_resources(_raycluster()["spec"]["headGroupSpec"]["rayStartParams"])
    driver = cfg.tune.trial_resources
    assert driver and all(head.get(k, 0) >= v for k, v in driver.items()), (driver, head)
    # every trial's config (grid point) still fits one pool, concurrent trials included
    from longctx.tune.space import base_tree, trial_config, validate_space

    pools = _kuberay_node_types()
    for point in validate_space(cfg):
        trial = trial_config(base_tree(cfg), point)
        assert job_fits(trial, pools)[0], point
    worker_gpus = cfg.train.num_workers * cfg.tune.max_concurrent_trials
    h100 = next(res for res, n in pools.values() if res.get("gpu_h100"))
    assert worker_gpus <= h100["GPU"] * max(n for res, n in pools.values() if res.get("gpu_h100"))


# ------------------------------------------------------------------------------------------------ resource fit
def _launcher_node_types(name: str) -> dict[str, tuple[dict, int]]:
    cfg = _load_launcher(name)
    return {k: (t["resources"], t.get("max_workers", 0) if k != cfg["head_node_type"] else 1)
            for k, t in cfg["available_node_types"].items()}


def _kuberay_node_types() -> dict[str, tuple[dict, int]]:
    out = {}
    for g in _raycluster()["spec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)),
               **_kuberay_custom_resources(g["rayStartParams"])}
        out[g["groupName"]] = (res, g["maxReplicas"])
    return out


def _dev_stack_node_types() -> dict[str, tuple[dict, int]]:
    spec = importlib.util.spec_from_file_location("local_stack", ROOT / "infra" / "local" / "local_stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    return {"head": ({"CPU": stack.HEAD_NODE["num_cpus"], **stack.HEAD_NODE["resources"]}, 1),
            "worker": ({"CPU": stack.WORKER_NODE["num_cpus"], "GPU": stack.WORKER_NODE["num_gpus"],
                        **stack.WORKER_NODE["resources"]}, 1)}


CLUSTERS = {"aws.yaml": lambda: _launcher_node_types("aws.yaml"), "gcp.yaml": lambda: _launcher_node_types("gcp.yaml"),
            "kuberay": _kuberay_node_types, "infra/local": _dev_stack_node_types}


def _per_node(bundle: dict, resources: dict) -> int:
    """How many `bundle`s one node with `resources` holds (0 when it lacks a resource)."""
    counts = [int(resources.get(k, 0) // v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def job_fits(cfg, node_types: dict[str, tuple[dict, int]]) -> tuple[bool, str]:
    """(fits, why): all training workers fit within ONE node type at its max size (pools are not mixed), and one
    Ray Data task fits some node type."""
    worker = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {}),
              **cfg.train.resources_per_worker}
    data_task = {"CPU": cfg.ray.data_cpus_per_task, **cfg.ray.data_resources}
    capacity = {k: _per_node(worker, res) * n for k, (res, n) in node_types.items()}
    train_ok = [k for k, c in capacity.items() if c >= cfg.train.num_workers]
    data_ok = [k for k, (res, n) in node_types.items() if n >= 1 and _per_node(data_task, res) >= 1]
    why = (f"{cfg.train.num_workers} x {worker}: capacity per pool {capacity}; "
           f"data task {data_task} fits {data_ok or 'nothing'}")
    return bool(train_ok and data_ok), why


def _configs_for(cluster: str) -> list[str]:
    configs = [EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT, *JOB_CONFIGS]
    if cluster == "infra/local":  # the one-machine dev stack has no GPUs: CPU recipes only
        configs = [c for c in configs if not load_config(ROOT / c if c in JOB_CONFIGS else c).train.use_gpu]
    return configs


@pytest.mark.parametrize("pinned", [False, True], ids=["as-is", "pinned"])
@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_every_job_fits_some_node_type(cluster, pinned):
    node_types = CLUSTERS[cluster]()
    for config in _configs_for(cluster):
        overrides = ([f"ray.data_resources={json.dumps(PIN['data'])}",
                      f"train.resources_per_worker={json.dumps(PIN['train'])}"] if pinned else [])
        cfg = load_config(ROOT / config if config in JOB_CONFIGS else config, overrides)
        ok, why = job_fits(cfg, node_types)
        assert ok, f"{config} does not fit {cluster}: {why}"


def test_fit_check_catches_a_job_too_big_for_every_pool():
    cfg = load_config(ROOT / "jobs/configs/index-1.9b-32k-pt.yaml", ["train.num_workers=128"])
    ok, why = job_fits(cfg, _launcher_node_types("aws.yaml"))
    assert not ok and "capacity per pool" in why
    cfg = load_config(EMBEDDED_DEFAULT, ["train.resources_per_worker={gpu_h100: 0.01}"])
    assert not job_fits(cfg, _dev_stack_node_types())[0]  # no such pool on the dev stack


# ---------------------------------------------------------------------------------------------------- Docker
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, heredoc bodies kept with their RUN."""
    lines = (ROOT / "infra" / "docker" / "Dockerfile").read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?\s*$", line)
        if heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        op, _, args = line.partition(" ")
        out.append((op.upper(), args))
    return out


def test_dockerfile_stages_and_layer_order():
    ins = _dockerfile()
    ops = {op for op, _ in ins}
    assert ops <= {"ARG", "FROM", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "LABEL"}, ops
    stages = [args.split()[-1] for op, args in ins if op == "FROM"]
    assert stages == ["base", "torch", "deps", "flash-attn", "runtime"], stages
    first_from = next(args for op, args in ins if op == "FROM")
    assert first_from.startswith("nvidia/cuda:${CUDA_VERSION}-cudnn-devel")

    def index(pred):
        return next(i for i, (op, args) in enumerate(ins) if pred(op, args))

    torch_i = index(lambda op, a: op == "RUN" and "torch==${TORCH_VERSION}" in a)
    deps_copy = index(lambda op, a: op == "COPY" and a.startswith("pyproject.toml /tmp"))
    deps_i = index(lambda op, a: op == "RUN" and "-r /tmp/requirements.txt" in a)
    ds_i = index(lambda op, a: op == "RUN" and "deepspeed==" in a)
    fa_i = index(lambda op, a: op == "RUN" and "flash-attn==" in a)
    src_i = index(lambda op, a: op == "COPY" and "platform" in a)
    install_i = index(lambda op, a: op == "RUN" and "-e /opt/longctx" in a)
    assert torch_i < deps_copy < deps_i < ds_i < fa_i < src_i < install_i, "dependencies must come before source"
    # nothing from the source tree is copied before the dependency layers (only pyproject.toml)
    early_copies = [a for op, a in ins[:fa_i] if op == "COPY" and "--from=" not in a]
    assert early_copies == ["pyproject.toml /tmp/longctx/pyproject.toml"], early_copies
    assert ins[-1][0] == "CMD" and any(op == "USER" and a == "ray" for op, a in ins)


def test_dockerfile_builds_flash_attn_from_source_for_a100_and_h100():
    ins = _dockerfile()
    fa_stage = ins[next(i for i, (op, a) in enumerate(ins) if op == "FROM" and a.endswith("AS flash-attn")):]
    fa_stage = fa_stage[:next(i for i, (op, a) in enumerate(fa_stage[1:], 1) if op == "FROM")]
    text = "\n".join(f"{op} {a}" for op, a in fa_stage)
    assert "ARG MAX_JOBS=" in text and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text
    assert 'FLASH_ATTN_CUDA_ARCHS="80;90"' in text and "FLASH_ATTENTION_FORCE_BUILD=TRUE" in text
    assert "--no-build-isolation" in text and "--no-binary flash-attn" in text
    assert "--mount=type=cache" in text, "the flash-attn build should use a BuildKit cache"
    runtime = "\n".join(a for op, a in ins if op in ("COPY", "RUN"))
    assert "--from=flash-attn /wheels" in runtime
    requirements = next(a for op, a in ins if op == "RUN" and "tomllib" in a)
    assert '"torch", "deepspeed"' in requirements  # torch from the CUDA index, deepspeed in its own layer


def test_dockerignore_keeps_secrets_and_runs_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs"} <= set(ignored)


# ------------------------------------------------------------------------------------------ KubeRay exposure
def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _ray_containers() -> list[dict]:
    spec = _raycluster()["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_dashboard_on_the_pod_ip_behind_token_auth():
    head = _raycluster()["spec"]["headGroupSpec"]
    host = head["rayStartParams"]["dashboard-host"]
    assert host == "$POD_IP" and "0.0.0.0" not in host
    head_env = _env(head["template"]["spec"]["containers"][0])
    assert head_env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    submitters = [c for n in KUBERAY_FILES if n.startswith("rayjob")
                  for c in _kuberay_docs(n)[0]["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    for c in _ray_containers() + submitters:  # every Ray process and every client demands/sends the token
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"], "the token comes from the Secret, never from the manifest"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "longctx-ray-auth", "key": "auth_token"}
    for name in KUBERAY_FILES:
        assert not re.search(r"kind:\s*Secret", (CLUSTER / "kuberay" / name).read_text()), "no token ships"


def test_kuberay_network_policy_admits_only_the_cluster_and_the_submitters():
    policies = {d["metadata"]["name"]: d["spec"] for d in _kuberay_docs("raycluster.yaml")
                if d["kind"] == "NetworkPolicy"}
    internal, submit = policies["longctx-ray-internal"], policies["longctx-ray-submitters"]
    cluster = {"ray.io/cluster": "longctx"}
    assert internal["podSelector"]["matchLabels"] == cluster and internal["policyTypes"] == ["Ingress"]
    assert [f["podSelector"]["matchLabels"] for r in internal["ingress"] for f in r["from"]] == [cluster]
    assert submit["podSelector"]["matchLabels"] == {**cluster, "ray.io/node-type": "head"}
    (rule,) = submit["ingress"]
    assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [{"longctx.dev/submitter": "true"}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    for name in KUBERAY_FILES:  # every RayJob's submitter carries the admitted label
        if name.startswith("rayjob"):
            labels = _kuberay_docs(name)[0]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
            assert labels == {"longctx.dev/submitter": "true"}, name
