"""The one Ray connector every job (and the data engine's token cache) goes through.

    from longctx import raycluster
    raycluster.connect(cfg)      # RAY_ADDRESS / ray.address, else a local cluster this process owns
    ...
    raycluster.shutdown()        # ends a cluster this process started (a no-op on a cluster it only joined)

A local cluster started here:
- serves its dashboard on 127.0.0.1 at a port the OS picks (never 8265, the port `ray start --head` and
  `ray job submit --address http://127.0.0.1:8265` use), because Ray Train's placement-group cleaner polls the
  State API it serves: without it the worker group of a killed Train controller is never released;
- ends with the driver: a small watchdog process (`python -m longctx.raycluster --watch ...`, in its own session
  so a Ctrl-C or a kill of the driver's process group does not take it along) waits for the driver to exit, however
  it exits (SIGKILL included), then terminates every process of that Ray session (GCS, raylet, dashboard, agents,
  workers) instead of letting them linger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

LOCAL = "local"
_state: dict = {"owned": False, "session": None}


def _env_vars(cfg) -> dict[str, str]:
    from longctx import storage

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if storage.options().endpoint_url:
        env["AWS_ENDPOINT_URL"] = storage.options().endpoint_url
    return env


def connect(cfg=None, *, num_cpus: int | None = None):
    """Connect to RAY_ADDRESS / `ray.address`, or start a local cluster sized by `ray.num_cpus`; returns `ray`.

    Joins an already initialised Ray (a test's cluster, a Tune trial) as is."""
    import ray

    from longctx import storage

    if cfg is not None:
        storage.configure(cfg.storage)
    if ray.is_initialized():
        return ray
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": _env_vars(cfg)}
    if address and address != LOCAL:
        ray.init(address=address, runtime_env=runtime_env)
        return ray
    # NOTE: address="local" always starts a fresh cluster; a bare ray.init() would silently attach to the latest
    # `ray start` cluster on this machine (/tmp/ray/ray_current_cluster).
    ray.init(address=LOCAL, num_cpus=num_cpus if num_cpus is not None else (cfg.ray.num_cpus if cfg else None),
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0, runtime_env=runtime_env)
    _state["owned"] = True
    node = ray._private.worker._global_node  # NOTE: the session name is only exposed on the node object
    _state["session"] = node.session_name
    start_watchdog(os.getpid(), node.session_name)
    print(f"[longctx] local Ray cluster session_name={node.session_name} dashboard http://{node.webui_url or '-'} "
          f"(ends with this process)", flush=True)
    return ray


def owns_cluster() -> bool:
    """True when this process started the Ray cluster it is connected to."""
    return bool(_state["owned"])


def shutdown() -> None:
    """Disconnect; a cluster this process started ends with it (so no worker output streams in after this)."""
    import ray

    if ray.is_initialized() and _state["owned"]:
        ray.shutdown()
        _state["owned"] = False


# ------------------------------------------------------------------------------------------------ watchdog
def start_watchdog(driver_pid: int, session: str) -> subprocess.Popen:
    """Start the process that ends Ray session `session` once `driver_pid` has exited."""
    from longctx.cleanup import _start_time

    cmd = [sys.executable, "-m", "longctx.raycluster", "--watch", str(driver_pid), str(_start_time(driver_pid) or 0),
           session]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(name)] = (ppid, cmd)
    return out


def session_processes(session: str) -> list[int]:
    """Processes of a Ray session: those naming its session folder (GCS, raylet, dashboard, monitors) and all of
    their descendants (workers and agents rename themselves, so only their parents carry the name)."""
    table = _proc_table()
    me = os.getpid()
    roots = {pid for pid, (_, cmd) in table.items() if session in cmd and pid != me and "longctx.raycluster" not in cmd}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        todo += children.get(pid, [])
    return sorted(found)


def end_session(session: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after `grace_s`; returns the pids signalled."""
    pids = session_processes(session)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in set(pids) | set(session_processes(session)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _watch(driver_pid: int, driver_start: int, session: str, poll_s: float = 0.5) -> None:
    from longctx.cleanup import _start_time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        start = _start_time(driver_pid)
        if start is None or (driver_start and start != driver_start):
            break
        time.sleep(poll_s)
    time.sleep(1.0)  # a normal ray.shutdown() is already ending them: give it a moment
    end_session(session)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--watch":
        _watch(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        print("usage: python -m longctx.raycluster --watch DRIVER_PID DRIVER_START SESSION_NAME", file=sys.stderr)
        sys.exit(2)
