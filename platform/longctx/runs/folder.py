"""A run's home: its id, its folder and the names of the files in it, where its training state lives, and
`open_run`, which creates the folder or finds it again.

    run = open_run(cfg, "long-pt")       # <output_dir>/<run id>/, checked against what it holds, leased
    run.path(METRICS)                    # <output_dir>/<run id>/metrics.json
    run.train_root                       # <run>/train, or <train.storage_path>/<run id>/train

The run id is `run_name`, else `<kind>-<fingerprint>` (`longctx.runs.identity`), slugged: the one rule for the
folder, the trackers (W&B / MLflow run names) and Ray Train (the train root), which all receive `run.run_id`.

A run folder (local or s3://) holds `config.yaml` and `identity.json` (the resolved config, and the fingerprint
with the content bindings), `attempts.jsonl` (one line per event of every attempt), `lease.json` (the driver
that owns it now), `data/`, `train/` (the train root unless train.storage_path is set), `eval/`, `metrics.json`,
`report.md` and `final_model.txt`. The train root also holds `config.yaml` and `identity.json`, so no
combination of `output_dir` and `train.storage_path` reaches a checkpoint without the changed-settings check.
Running the same command again is resuming: see docs/architecture.md ("Runs").
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from longctx import storage
from longctx.config import JobConfig, dump_config, load_config, slug
from longctx.runs import identity
from longctx.runs.identity import RERUN_HINT, ResumeRefused
from longctx.runs.lease import Lease, append_line
from longctx.train.spec import FINAL_MODEL
from longctx.train.integrity import latest_intact_step

# ------------------------------------------------------------------------------------------ the run's files
CONFIG = "config.yaml"
IDENTITY = "identity.json"
ATTEMPTS = "attempts.jsonl"
METRICS = "metrics.json"
"""The run's metrics (and, under `eval/`, the evaluation's)."""
REPORT = "report.md"
FINAL_MODEL_FILE = "final_model.txt"
"""The URI of the final model, one line."""
DATA_DIR = "data"
TRAIN_DIR = "train"
EVAL_DIR = "eval"
SYNTH_DIR = "synth"

HOME_ENV = "LONGCTX_HOME"
DEFAULT_HOME = "~/longctx"


# --------------------------------------------------------------------------------------------- where runs go
def in_ray_working_dir(cwd: str | None = None) -> bool:
    """True inside the temporary copy of the working dir that `ray job submit --working-dir` runs a job in."""
    cwd = cwd or os.getcwd()
    return "_ray_pkg_" in cwd or f"{os.sep}runtime_resources{os.sep}" in cwd


def resolve_output(path: str | None, cwd: str | None = None) -> str | None:
    """A writable location users find again: s3:// and absolute paths as given; a relative path under
    $LONGCTX_HOME when set, else under the current folder, except inside Ray's temporary working-dir copy
    (`ray job submit --working-dir .`), where it goes under ~/longctx instead of where Ray may delete it."""
    if path is None or storage.is_s3(path) or str(path).startswith("builtin:") or os.path.isabs(path):
        return path
    home = os.environ.get(HOME_ENV)
    if not home and in_ray_working_dir(cwd):
        home = DEFAULT_HOME
    base = os.path.expanduser(home) if home else (cwd or os.getcwd())
    return os.path.normpath(os.path.join(os.path.abspath(base), path))


def resolve_outputs(cfg: JobConfig) -> JobConfig:
    """`cfg` with output_dir, data.output and train.storage_path resolved by `resolve_output`."""
    out = cfg.model_copy(deep=True)
    out.output_dir = resolve_output(cfg.output_dir)
    if cfg.data.output:
        out.data.output = resolve_output(cfg.data.output)
    if cfg.train.storage_path:
        out.train.storage_path = resolve_output(cfg.train.storage_path)
    if cfg.output_dir != out.output_dir and in_ray_working_dir() and not os.environ.get(HOME_ENV):
        print(f"[longctx] output_dir {cfg.output_dir!r} is relative and this job runs in Ray's temporary copy of "
              f"the working dir: writing under {out.output_dir} (set {HOME_ENV} or an absolute/s3:// "
              f"output_dir to choose)", flush=True)
    return out


def run_id_for(cfg: JobConfig, kind: str, bindings: dict | None = None) -> str:
    """The run id: `run_name`, else `<kind>-<fingerprint of the result keys and bound inputs>`, slugged (a rerun
    of the same command finds the same run)."""
    return slug(cfg.run_name or f"{kind}-{identity.run_fingerprint(cfg, bindings)}")


def train_root_for(cfg: JobConfig, run_root: str, run_id: str) -> str:
    """Where the run's checkpoints, metrics.jsonl and final model go: `<train.storage_path>/<run id>/train` when
    train.storage_path is set, else `<run folder>/train`."""
    base = storage.join(storage.normalize(cfg.train.storage_path), run_id) if cfg.train.storage_path else run_root
    return storage.join(base, TRAIN_DIR)


# ----------------------------------------------------------------------------------------------------- runs
@dataclass
class RunContext:
    """A run's id and folders (local or s3://), its config, and wall-clock phase timings for the report."""

    run_id: str
    root: str
    train_root: str
    cfg: JobConfig | None = None
    kind: str = "run"
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    finished: dict | None = None
    """The `finished` record of an earlier attempt (the run has nothing left to do), else None."""
    attempt_no: int = 1
    fingerprint: str = ""
    """Hash of the result keys and the bound inputs' content when the run was opened (`identity.run_fingerprint`)."""
    bindings: dict = field(default_factory=dict)
    """Content of the inputs the run is bound to (`longctx.runs.identity.content_bindings`, plus `data`)."""
    owned_by: str | None = None
    """The folder of the run this one is part of (a study or sweep trial): its driver's lease covers this one."""
    hint: str = RERUN_HINT
    """What to do when a rerun is refused (a sub-run names its parent's option)."""
    leases: list[Lease] = field(default_factory=list)

    @property
    def is_sub_run(self) -> bool:
        return self.owned_by is not None

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def attempt(self, event: str, **extra) -> None:
        """Append one event to `<run>/attempts.jsonl`."""
        record_attempt(self.root, event, attempt=self.attempt_no, **extra)

    def bind(self, key: str, content: str | None, where: str) -> None:
        """Bind the run to the content of an input it has now used (the data it trains on): refused when an
        earlier attempt recorded other content for it (in the run folder or beside the checkpoints)."""
        if not content:
            return
        for folder in (self.root, self.train_root):
            rec = identity.read_identity(storage.join(folder, IDENTITY)) or {}
            identity.check_bindings(rec.get("bindings", {}), {key: content}, f"{where} (recorded in {folder})",
                                    hint=self.hint)
        self.bindings[key] = content
        self.write_identity(self.root)

    def write_identity(self, folder: str) -> None:
        rec = identity.identity_record(self.run_id, self.kind, self.fingerprint, self.root, self.train_root,
                                       self.bindings)
        storage.write_json(storage.join(folder, IDENTITY), rec)

    def close(self) -> None:
        """Release the leases this run holds (the run's folder, its train root)."""
        while self.leases:
            self.leases.pop().release()


def record_attempt(root: str, event: str, **extra) -> None:
    line = json.dumps({"event": event, "time": round(time.time(), 3), **extra}, default=str)
    append_line(storage.join(root, ATTEMPTS), line)


def read_attempts(root: str) -> list[dict]:
    """The events of `<root>/attempts.jsonl`; a torn last line (a writer killed mid-write) is left out."""
    uri = storage.join(root, ATTEMPTS)
    if not storage.exists(uri):
        return []
    lines = [x for x in storage.read_text(uri).splitlines() if x.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            if n < len(lines):
                raise ValueError(f"{uri}: line {n} is not an attempt record") from None
    return out


class _Phase:
    def __init__(self, run: RunContext, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.t0 = time.time()
        print(f"[longctx] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc):
        dt = time.time() - self.t0
        self.run.timings[self.name] = round(dt, 2)
        if exc[0] is None:
            print(f"[longctx] {self.name} done in {dt:.1f}s", flush=True)


def open_run(cfg: JobConfig, kind: str, *, root: str | None = None, run_id: str | None = None,
             owned_by: str | None = None, hint: str = RERUN_HINT, ignore: tuple[str, ...] = ("tune",),
             note: dict | None = None) -> RunContext:
    """Create the run folder, or find it again: an existing run is continued only when its recorded config would
    compute the same results and its bound inputs hold the same content (else `ResumeRefused`, naming the keys or
    inputs), checked against the run folder and the train root. Takes the run's lease (`RunInUse` while another
    driver holds it) unless `owned_by` names the parent run whose driver owns this one. Records the attempt.

    `root`/`run_id`: a sub-run's folder and id (a study or sweep trial), instead of `<output_dir>/<run id>`.
    `ignore`: config sections not compared (a run ignores `tune`; a sweep compares it). `note`: extra fields of
    the `started` event."""
    storage.configure(cfg.storage)
    cfg = resolve_outputs(cfg)
    bindings = identity.content_bindings(cfg)
    fingerprint = identity.run_fingerprint(cfg, bindings)
    run_id = run_id or run_id_for(cfg, kind, bindings)
    root = storage.normalize(root) if root else storage.join(cfg.output_dir, run_id)
    run = RunContext(run_id=run_id, root=root, train_root=train_root_for(cfg, root, run_id), cfg=cfg, kind=kind,
                     fingerprint=fingerprint, bindings=dict(bindings), owned_by=owned_by, hint=hint)
    cfg_uri = run.path(CONFIG)
    if storage.exists(cfg_uri):
        saved = load_config(cfg_uri)
        identity.check_same_run(saved, cfg, cfg_uri, ignore=ignore, hint=hint)
        recorded = (identity.read_identity(run.path(IDENTITY)) or {}).get("bindings", {})
        identity.check_bindings(recorded, bindings, root, cfg, hint)
        run.bindings = {**recorded, **{k: v for k, v in bindings.items() if v}}
        _check_moved_training_state(saved, run)
        attempts = read_attempts(root)
        run.finished = next((a for a in reversed(attempts) if a.get("event") == "finished"), None)
        run.attempt_no = 1 + sum(a.get("event") == "started" for a in attempts)
    check_train_root(run)
    if run.finished:
        return run
    if owned_by is None:
        run.leases.append(Lease.acquire(root, run_id))
    try:
        storage.write_text(cfg_uri, dump_config(cfg))
        run.write_identity(root)
        run.attempt("started", kind=kind, pid=os.getpid(), host=socket.gethostname(), **(note or {}))
    except BaseException:
        run.close()
        raise
    if not run.is_sub_run:
        verb = "resuming" if run.attempt_no > 1 else "run"
        print(f"[longctx] {verb} {run_id}: {run.root}"
              + (f" (attempt {run.attempt_no})" if run.attempt_no > 1 else ""), flush=True)
    return run


def _check_moved_training_state(saved: JobConfig, run: RunContext) -> None:
    """A changed train.storage_path would leave the run's checkpoints behind and restart it from step 0: refused
    when the old location holds training state (a checkpoint or the final model)."""
    old = train_root_for(saved, run.root, run.run_id)
    if old == run.train_root:
        return
    step = latest_intact_step(old)
    done = storage.is_committed(storage.join(old, FINAL_MODEL))
    if step or done:
        what = "its final model" if done else f"a checkpoint at step {step}"
        raise ResumeRefused(
            f"train.storage_path changed ({saved.train.storage_path!r} -> {run.cfg.train.storage_path!r}), but the "
            f"run's training state is under {old} ({what}): continuing here would start again from step 0. Restore "
            f"train.storage_path to resume, move {old} to {run.train_root} first, or start a new run (another "
            f"run_name).")


def check_train_root(run: RunContext) -> None:
    """The config and bindings recorded beside the checkpoints must fit the run (whichever run folder wrote
    them: a new output_dir with the same run_name and train.storage_path reaches the same checkpoints)."""
    rec = identity.read_identity(storage.join(run.train_root, IDENTITY))
    if rec is None:
        return
    where = storage.join(run.train_root, CONFIG)
    identity.check_same_run(load_config(where), run.cfg, where, hint=run.hint)
    identity.check_bindings(rec.get("bindings", {}), run.bindings, run.train_root, run.cfg, run.hint)
    other = rec.get("run_root")
    if other and storage.normalize(other) != run.root:
        print(f"[longctx] the training state under {run.train_root} was started by the run folder {other}; "
              f"continuing it from {run.root}", flush=True)


def claim_train_root(run: RunContext) -> None:
    """Before training: check the train root again, record the run's config and identity beside the checkpoints,
    and take the train root's lease when it is outside the run folder (train.storage_path)."""
    check_train_root(run)
    if not run.is_sub_run and not run.train_root.startswith(run.root.rstrip("/") + "/"):
        run.leases.append(Lease.acquire(run.train_root, run.run_id))
    storage.write_text(storage.join(run.train_root, CONFIG), dump_config(run.cfg))
    run.write_identity(run.train_root)
