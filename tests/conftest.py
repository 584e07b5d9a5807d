"""Shared fixtures: a loopback S3 server (moto server mode on 127.0.0.1) and one local Ray cluster.

The S3 server starts before Ray so Ray's workers inherit the AWS_* variables that point at it, exactly as
a user's cluster would see a real endpoint. Nothing here talks to any address but 127.0.0.1.

The quick lane, `python -m pytest -m "not ray and not slow"`, starts no Ray: a test that uses the `ray_cluster`
fixture is marked `ray` here, and a test not marked `ray` that starts Ray in this process fails (one that starts
it in a subprocess, e.g. by running a job, must carry the mark itself).
"""

from __future__ import annotations

import os
import uuid

import pytest

from longctx.raycluster import free_ports

# Keep tests off any real account and any real endpoint, whatever the machine's environment says.
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session", name="free_ports")
def free_ports_fixture():
    """`free_ports(n)`: n distinct free ports on 127.0.0.1 (for a `ray start --head` beside other tests' Ray)."""
    return free_ports


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a moto S3 server on 127.0.0.1, with the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from longctx import storage

    storage.configure(None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.configure(None)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback server; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the whole session (4 logical CPUs oversubscribe the 2 cores on purpose)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    for item in items:  # the fixture that starts Ray marks its users (the quick lane deselects them)
        if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    """A test not marked `ray` must not start Ray (joining the session's cluster started earlier is fine)."""
    import sys

    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    yield
    if request.node.get_closest_marker("ray") is None and not before:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
            pytest.fail(f"{request.node.nodeid} started Ray but is not marked @pytest.mark.ray", pytrace=False)
