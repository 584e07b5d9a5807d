"""The one Ray connector every job (and the data engine's token cache) goes through.

    from longctx import raycluster
    raycluster.connect(cfg)      # RAY_ADDRESS / ray.address, else a private local cluster this process owns
    ...
    raycluster.shutdown()        # ends a cluster this process started (a no-op on a cluster it only joined)

A local cluster started here is private to the job, so that several jobs and a `ray start --head` live side by
side on one machine, and so that nobody else on a shared host reaches it (`start_head`, then `ray.init` joins it):
- its own temp folder: `<tmp>/longctx-ray-<uid>/<pid>/` (0700, the per-user root 0700 and owned by the user),
  Ray's temp folder for it, with the session folder inside (0700);
- its own token: token authentication on, the token in `auth_token` (0600) in that folder
  (`RAY_AUTH_TOKEN_PATH`), never written to ~/.ray/auth_token;
- loopback only: the node's address is 127.0.0.1 (Ray's single-machine mode, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
  as on macOS and Windows), so GCS, raylet, workers, agents and the metrics exporter listen on 127.0.0.1;
- its own ports: GCS, dashboard, dashboard agent and client server at ports picked here, never Ray's fixed
  defaults (6379, 8265, 52365, 10001) that a `ray start --head` on the machine uses. Ray Train's placement-group
  cleaner polls the State API the dashboard serves: without it the worker group of a killed Train controller is
  never released;
- found by its own processes only: they get `RAY_ADDRESS` naming its GCS (and `RAY_TMPDIR` its folder, whose
  `ray/ray_current_cluster` names it too), so Ray code in them that looks for "the" local cluster (the State API
  client of that cleaner) reaches this one, never another job's or the head `ray start` recorded in Ray's shared
  temp folder ("Found multiple active Ray instances", a token that does not match, a timed-out GCS);
- it ends with the driver: `shutdown()` stops it and removes its folder; a small watchdog process
  (`python -m longctx.raycluster --watch ...`, in its own session so a Ctrl-C or a kill of the driver's process
  group does not take it along) waits for the driver to exit, however it exits (SIGKILL included), then
  terminates every process of that Ray session (GCS, raylet, dashboard, agents, workers). The folder of a driver
  that died is kept (Ray's logs are in it) until the next local cluster of this user starts.
The environment this sets is restored by `shutdown()`. Output is quiet unless verbose (`longctx.quiet`).
"""

from __future__ import annotations

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

from longctx import quiet
from longctx.cleanup import start_time
from longctx.config import ConfigError

LOCAL = "local"
ROOT_PREFIX = "longctx-ray-"
SOCKET_PATH_MAX = 107
"""AF_UNIX path limit: Ray's sockets live in the session folder, `<temp>/session_<date>_<pid>/sockets/...`."""
_state: dict = {"owned": False, "session": None, "dir": None, "env": None}


def _env_vars(cfg) -> dict[str, str]:
    from longctx import storage  # deferred: the watchdog process starts without it

    env = {"TOKENIZERS_PARALLELISM": "false", **quiet.process_env()}
    if storage.options().endpoint_url:
        env["AWS_ENDPOINT_URL"] = storage.options().endpoint_url
    return env


def connect(cfg=None, *, num_cpus: int | None = None):
    """Connect to RAY_ADDRESS / `ray.address`, or start a private local cluster sized by `ray.num_cpus`; returns
    `ray`. Joins an already initialised Ray (a test's cluster, a Tune trial) as is."""
    import ray  # deferred (as storage below): the watchdog, `python -m longctx.raycluster`, starts without them

    from longctx import storage  # deferred: as ray above

    if cfg is not None:
        storage.configure(cfg.storage)
    if ray.is_initialized():
        return ray
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": _env_vars(cfg)}
    if address and address != LOCAL:
        ray.init(address=address, runtime_env=runtime_env, **quiet.ray_init_kwargs())
        quiet.configure_driver()
        return ray
    folder = private_folder()
    _state["dir"], _state["env"] = folder, _private_env(folder)
    cpus = num_cpus if num_cpus is not None else (cfg.ray.num_cpus if cfg else None)
    try:
        gcs, dashboard = start_head(folder, cpus)
        # NOTE: RAY_ADDRESS in the job's processes: Ray code in them that looks for "the" cluster (the State API
        # of Ray Train's placement-group cleaner) goes straight to this one instead of scanning the machine's GCS
        # processes (several jobs: "Found multiple active Ray instances" every second) or reading the
        # ray_current_cluster file a `ray start` wrote in Ray's shared temp folder.
        runtime_env["env_vars"]["RAY_ADDRESS"] = gcs
        ray.init(address=gcs, runtime_env=runtime_env, **quiet.ray_init_kwargs())
    except BaseException:
        _abandon(folder)
        raise
    _state["owned"] = True
    node = ray._private.worker._global_node  # NOTE: the session name is only exposed on the node object
    _state["session"] = node.session_name
    _seal(folder, node)
    quiet.configure_driver()
    start_watchdog(os.getpid(), node.session_name)
    print(f"[longctx] local Ray cluster session_name={node.session_name} dashboard http://{dashboard} (private to "
          f"this job, ends with it; Ray logs: {node.get_session_dir_path()}/logs)", flush=True)
    return ray


def owns_cluster() -> bool:
    """True when this process started the Ray cluster it is connected to."""
    return bool(_state["owned"])


def shutdown() -> None:
    """Disconnect; a cluster this process started ends with it (so no worker output streams in after this), its
    folder is removed and the environment restored."""
    import ray  # deferred: the watchdog process starts without Ray

    if ray.is_initialized() and _state["owned"]:
        ray.shutdown()
        _state["owned"] = False
        if _state["session"]:
            end_session(_state["session"])  # the cluster `start_head` started (ray.shutdown only disconnects)
        _restore_env()
        if _state["dir"]:
            shutil.rmtree(_state["dir"], ignore_errors=True)
            _state["dir"] = None


# ------------------------------------------------------------------------------------------ private cluster
def start_head(folder: str, num_cpus: int | None = None, attempts: int = 2) -> tuple[str, str]:
    """`ray start --head` of a private cluster in `folder` (this process's environment: `_private_env`), every
    port on 127.0.0.1 and picked here: Ray's fixed defaults (GCS 6379, dashboard 8265, its agent 52365, the client
    server 10001) would collide with a `ray start --head` or another job on this machine. Returns (GCS address,
    dashboard address). Its output goes to `<folder>/ray_start.log`."""
    log = os.path.join(folder, "ray_start.log")
    for attempt in range(1, attempts + 1):
        flags = ("port", "dashboard-port", "dashboard-agent-listen-port", "ray-client-server-port")
        ports = dict(zip(flags, free_ports(len(flags))))
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--temp-dir={folder}",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()],
               *([f"--num-cpus={num_cpus}"] if num_cpus is not None else [])]
        with open(log, "a") as out:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode == 0:
            return f"127.0.0.1:{ports['port']}", f"127.0.0.1:{ports['dashboard-port']}"
        # (a port picked above can be taken before Ray binds it: once more with others)
    with open(log) as f:
        tail = "".join(f.readlines()[-20:])
    raise RuntimeError(f"starting the local Ray cluster failed {attempts} times (`ray start --head`, log "
                       f"{log}):\n{tail}")


def _abandon(folder: str) -> None:
    """A start that failed: end what it started, restore the environment, remove the folder."""
    for session in os.listdir(folder) if os.path.isdir(folder) else []:
        if session.startswith("session_2"):
            end_session(session, grace_s=2.0)
    _restore_env()
    shutil.rmtree(folder, ignore_errors=True)


def user_root() -> str:
    """`<tmp>/longctx-ray-<uid>`: created 0700; refused when another user owns it or others can enter it. `<tmp>`
    is RAY_TMPDIR when set, else /tmp (Ray's own choice, short enough for its socket paths)."""
    base = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())
    root = os.path.join(base, f"{ROOT_PREFIX}{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if st.st_uid != os.getuid() or not os.path.isdir(root) or os.path.islink(root) or st.st_mode & 0o077:
        raise PermissionError(f"{root}: not a private folder of this user (owner uid {st.st_uid}, mode "
                              f"{oct(st.st_mode & 0o777)}); remove it or set RAY_TMPDIR to a folder of your own")
    return root


def private_folder() -> str:
    """A fresh 0700 folder `<root>/<pid>[-n]` for one local cluster (Ray's temp folder: sessions go right in it),
    after removing those of dead drivers (their owner file names a process that is gone)."""
    root = user_root()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path) and _dead_owner(path):
            shutil.rmtree(path, ignore_errors=True)
    pid = os.getpid()
    # NOTE: short names on purpose: Ray's sockets live at <folder>/session_<date>_<pid>/sockets/<name>
    longest = os.path.join(root, f"{pid}-9", f"session_2000-01-01_00-00-00_000000_{pid}", "sockets", "plasma_store")
    if len(longest) > SOCKET_PATH_MAX:
        raise ConfigError(f"{root}: too deep for Ray's socket paths ({len(longest)} > {SOCKET_PATH_MAX} characters "
                          f"in {longest}); set RAY_TMPDIR to a shorter folder, e.g. /tmp")
    for n in range(100):
        folder = os.path.join(root, str(pid) if n == 0 else f"{pid}-{n}")
        try:
            os.mkdir(folder, 0o700)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{root}: no free folder name for process {pid}")
    with open(os.path.join(folder, "owner.json"), "w") as f:
        json.dump({"pid": pid, "start": start_time(pid) or 0}, f)
    return folder


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now (held open together, so none is returned twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _dead_owner(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "owner.json")) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return False  # not ours to judge
    start = start_time(int(owner.get("pid", 0)))
    return start is None or (start != 0 and int(owner.get("start") or 0) not in (0, start))


def _private_env(folder: str) -> dict[str, str | None]:
    """Point this process and the cluster it starts at `folder` (temp, token) and loopback; returns what to restore."""
    token = os.path.join(folder, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    env = {"RAY_TMPDIR": folder, "RAY_AUTH_TOKEN_PATH": token, "RAY_AUTH_TOKEN": None,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":  # an explicit opt-out is the user's to make
        env["RAY_AUTH_MODE"] = "token"
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _loopback_only(True)
    return old


def _restore_env() -> None:
    old = _state.get("env")
    if old is None:
        return
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _state["env"] = None
    _loopback_only(False)


def _loopback_only(on: bool) -> None:
    """Make this process see the environment `_private_env` set: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once at
    import, RAY_AUTH_MODE when its config is initialised, and caches the token of the first cluster."""
    from ray._private import ray_constants  # NOTE: private: the flag behind the node address is read at import
    from ray._raylet import AuthenticationTokenLoader, Config  # deferred: heavy import, used only here

    ray_constants.ENABLE_RAY_CLUSTER = not on
    Config.initialize("")  # as Ray's own token-auth setup does after changing RAY_AUTH_MODE
    AuthenticationTokenLoader.instance().reset_cache()


def _seal(folder: str, node) -> None:
    """After start: this cluster is the one its own processes find, and its session folder is private."""
    marker = os.path.join(folder, "ray")
    os.makedirs(marker, mode=0o700, exist_ok=True)
    with open(os.path.join(marker, "ray_current_cluster"), "w") as f:
        f.write(node.gcs_address)
    for path in (folder, marker, node.get_session_dir_path()):  # Ray makes its temp folders 0777 (shared)
        os.chmod(path, 0o700)


# ------------------------------------------------------------------------------------------------ watchdog
def start_watchdog(driver_pid: int, session: str) -> subprocess.Popen:
    """Start the process that ends Ray session `session` once `driver_pid` has exited."""
    cmd = [sys.executable, "-m", "longctx.raycluster", "--watch", str(driver_pid), str(start_time(driver_pid) or 0),
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        start = start_time(driver_pid)
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
