"""Verified checkpoints: which checkpoints a run has, which of them are intact, and Ray's snapshot kept loadable.

Every rank writes `manifest.rankNNNNN.json` (sha256 and size of each file it wrote) into its checkpoint folder
before the checkpoint is reported to Ray Train, which copies every rank's folder into the same
`checkpoint_<step>` prefix. A restore lists the train folder itself (Ray's snapshot is not the only record: a
checkpoint reported just before a death is on disk but may never have been registered), newest first, and takes
the first one whose every manifest is present and every listed file matches; a damaged one is skipped with one
line naming what is wrong. Only when none is intact does the run stop, naming each one and its damage.

    problems = verify_checkpoint(folder, rank=0, world=1)   # [] when intact; else what is missing/torn/altered
    refs = list_checkpoints(train_root)                     # newest first
    note = repair_ray_snapshot(train_root)                  # a snapshot Ray could not load is moved aside

Checkpoints written before manifests existed (`trainer_state.json` without `format`) are accepted unverified.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator

from longctx import storage

FORMAT = 2
"""`format` in trainer_state.json of a checkpoint with manifests (none: written before them, unverified)."""
TRAINER_STATE = "trainer_state.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of the run's checkpoints (what `ray.train.get_checkpoint` restores)."""
_MANIFEST = re.compile(r"^manifest\.rank(\d{5})\.json$")
_CHECKPOINT = re.compile(r"^checkpoint_(\d{8,})(?:-(\d+))?$")


def manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:05d}.json"


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    name: str
    """Folder name under the train root: `checkpoint_<step:08d>`, `-<n>` added when that name was taken."""
    uri: str


# ------------------------------------------------------------------------------------------------- writing
def write_manifest(folder: str, rank: int, world: int, step: int) -> dict:
    """Hash every file this rank wrote under `folder` into its manifest (written last, atomically)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if _MANIFEST.match(rel):
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": storage.sha256_file(path)}
    manifest = {"format": FORMAT, "step": int(step), "rank": int(rank), "world_size": int(world), "files": files}
    tmp = os.path.join(folder, f".{manifest_name(rank)}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, sort_keys=True)
    os.replace(tmp, os.path.join(folder, manifest_name(rank)))
    return manifest


def fresh_dir_name(train_root: str, step: int) -> str:
    """`checkpoint_<step>`, or with `-2`, `-3` ... when a folder of that name is there (a damaged checkpoint a
    resume fell back from): a new checkpoint never lands on top of another one's files."""
    base = f"checkpoint_{int(step):08d}"
    name, n = base, 1
    while storage.exists(storage.join(train_root, name)):
        n += 1
        name = f"{base}-{n}"
    return name


# ------------------------------------------------------------------------------------------------- listing
def _child_names(uri: str) -> list[str]:
    if storage.is_s3(uri):
        fs, path = storage.fsspec_fs(uri)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return []
    return os.listdir(uri) if os.path.isdir(uri) else []


def list_checkpoints(train_root: str) -> list[CheckpointRef]:
    """Every `checkpoint_<step>[-n]` folder under `train_root`, newest first (by step, then by n)."""
    found = []
    for name in _child_names(train_root):
        m = _CHECKPOINT.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2) or 1), name))
    return [CheckpointRef(step, name, storage.join(train_root, name)) for step, _, name in sorted(found, reverse=True)]


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """The checkpoint folder as a local path: itself when local, else downloaded for the duration (by Ray
    Train's `Checkpoint.as_directory`, which workers on one node share)."""
    if not storage.is_s3(uri):
        yield uri
        return
    import ray.train  # deferred: the driver-side helpers of this module need no Ray

    fs, path = storage.pyarrow_fs(uri)
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(ray.train.Checkpoint(path=path, filesystem=fs).as_directory())
        except (OSError, ValueError) as e:  # gone or unreadable: not a checkpoint to restore
            raise storage.StorageError(f"{uri}: {type(e).__name__}: {e}") from None
        yield folder


# ----------------------------------------------------------------------------------------------- verifying
def read_state(folder: str) -> dict:
    """trainer_state.json of a local checkpoint folder; ValueError naming what is wrong."""
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"no {TRAINER_STATE}")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{TRAINER_STATE} unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{TRAINER_STATE} holds no step")
    return state


def _read_manifest(folder: str, rank: int) -> dict:
    path = os.path.join(folder, manifest_name(rank))
    if not os.path.isfile(path):
        raise ValueError(f"no {manifest_name(rank)} (rank {rank}'s files never arrived)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        return {"world_size": int(manifest["world_size"]), "files": dict(manifest["files"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_name(rank)} unreadable ({type(e).__name__})") from None


def _check_files(folder: str, manifest: dict) -> list[str]:
    problems = []
    for rel, want in sorted(manifest["files"].items()):
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"{rel} missing")
        elif os.path.getsize(path) != want["bytes"]:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, {want['bytes']} written (torn)")
        elif storage.sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} altered (sha256 differs from its manifest)")
    return problems


def verify_checkpoint(folder: str, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with a local checkpoint folder ([] when intact), checking the share of rank `rank` of
    `world` ranks: the manifests of the ranks that wrote it with index % world == rank (rank 0 also checks
    trainer_state.json). `rank=0, world=1` checks everything. A legacy checkpoint (no `format`, no manifest)
    passes unverified."""
    if not os.path.isdir(folder):
        return ["the folder is missing"]
    problems = []
    state = None
    try:
        state = read_state(folder)
    except ValueError as e:
        if rank == 0:
            problems.append(str(e))
    has_manifests = any(_MANIFEST.match(n) for n in os.listdir(folder))
    if state is not None and "format" not in state and not has_manifests:
        return []  # written before checkpoints carried manifests: nothing to verify against
    try:
        saved_world = _read_manifest(folder, 0)["world_size"]
    except ValueError as e:
        return [*problems, str(e)]
    for r in range(rank, saved_world, world):
        try:
            problems += _check_files(folder, _read_manifest(folder, r))
        except ValueError as e:
            problems.append(str(e))
    return problems


def describe(problems: list[str], limit: int = 3) -> str:
    return "; ".join(problems[:limit]) + (f" (+{len(problems) - limit} more)" if len(problems) > limit else "")


# ------------------------------------------------------------------------------------------ Ray's snapshot
def snapshot_problem(train_root: str) -> str | None:
    """Why Ray Train could not load the run's checkpoint snapshot (torn, empty, another Ray version, naming a
    checkpoint folder that is gone), or None when it can (or there is none)."""
    import ray  # deferred: heavy import, used only here

    uri = storage.join(train_root, RAY_SNAPSHOT)
    if not storage.exists(uri):
        return None
    try:
        snap = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as e:
        return f"unreadable ({type(e).__name__})"
    if not isinstance(snap, dict) or not isinstance(snap.get("checkpoint_results"), list):
        return "not a checkpoint manager snapshot"
    if snap.get("ray_version") != ray.__version__:
        return f"written by Ray {snap.get('ray_version')}, this is Ray {ray.__version__}"
    names = [r.get("checkpoint_dir_name") for r in snap["checkpoint_results"] if isinstance(r, dict)]
    latest = snap.get("latest_checkpoint_result") or {}
    names.append(latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None)
    for name in dict.fromkeys(n for n in names if n is not None):
        if not isinstance(name, str) or not storage.exists(storage.join(train_root, name)):
            return f"names {name!r}, which is gone"
    return None


def repair_ray_snapshot(train_root: str) -> str | None:
    """Move a snapshot Ray Train could not load aside (`checkpoint_manager_snapshot.json.unloadable-<time>`), so
    the run starts and restores from our own listing instead of failing every rerun; returns the line saying so."""
    problem = snapshot_problem(train_root)
    if problem is None:
        return None
    src = storage.join(train_root, RAY_SNAPSHOT)
    dest = f"{src}.unloadable-{int(time.time())}"
    if storage.is_s3(src):
        fs, path = storage.fsspec_fs(src)
        _, dest_path = storage.fsspec_fs(dest)
        fs.copy(path, dest_path)
        fs.rm_file(path)
    else:
        os.replace(src, dest)
    return (f"[train] Ray Train's checkpoint snapshot {src} is {problem}: moved aside to {dest.rsplit('/', 1)[-1]}; "
            "the checkpoints are found by listing the train folder")


def _sizes(uri: str) -> dict[str, int]:
    """{relative path: bytes} of every file under a checkpoint folder (local or s3://), from one listing."""
    if storage.is_s3(uri):
        fs, path = storage.fsspec_fs(uri)
        prefix = path.rstrip("/")
        found = fs.find(prefix, detail=True)
        return {p[len(prefix) + 1:]: int(i.get("size") or 0) for p, i in found.items()
                if i.get("type") != "directory" and p.startswith(prefix + "/")}
    out = {}
    for root, _, names in os.walk(uri):
        for name in names:
            p = os.path.join(root, name)
            out[os.path.relpath(p, uri).replace(os.sep, "/")] = os.path.getsize(p)
    return out


def looks_complete(uri: str) -> bool:
    """From one listing, no hashing: trainer_state.json and every rank's manifest are there and every file the
    manifests list has its size (a checkpoint whose upload was cut short does not); legacy checkpoints pass."""
    sizes = _sizes(uri)
    if TRAINER_STATE not in sizes:
        return False
    try:
        state = json.loads(storage.read_text(storage.join(uri, TRAINER_STATE)))
        if "format" not in state and not any(_MANIFEST.match(n) for n in sizes):
            return True
        world = int(json.loads(storage.read_text(storage.join(uri, manifest_name(0))))["world_size"])
        for r in range(world):
            files = json.loads(storage.read_text(storage.join(uri, manifest_name(r))))["files"]
            if any(sizes.get(rel) != want["bytes"] for rel, want in files.items()):
                return False
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, storage.StorageError, FileNotFoundError):
        return False
    return True


def latest_intact_step(train_root: str) -> int | None:
    """Step of the newest checkpoint that `looks_complete` (what a rerun most likely resumes from; the workers
    also check every file's sha256 and fall back further when one differs)."""
    for ref in list_checkpoints(train_root):
        if looks_complete(ref.uri):
            return ref.step
    return None
