"""Commit and publish: a folder staged, then made visible all at once with a `_COMMITTED` marker, and the
cleanup of what interrupted S3 overwrites left (`remove_orphans`).

`publish_dir(dest)` stages a directory and makes it visible all at once. Locally the staged folder is renamed into
place (an overwrite is one atomic exchange). On S3 (atomic per object, not per prefix) files are written under the
fresh prefix and a `_COMMITTED` marker listing every file with its sha256 is written last; readers call
`require_committed` and never trust a prefix without it. An S3 overwrite uploads the new files under a generation
folder (`dest/gen-<time>-<hex>/`) that cannot collide with the old ones, switches readers to it with one PUT of the
marker (`"root": "gen-..."`), and only then deletes the old files: at every instant the marker names one complete
dataset. Objects a crashed overwrite left behind are invisible to readers (`longctx.storage.commit`) and removed by
the next publish or `longctx data clean --prefix` (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import uuid
from typing import Iterator

from longctx import cleanup
from longctx.storage.commit import (COMMIT_MARKER, GENERATION, committed_gaps, committed_keys, committed_root,
                                    manifest_of, new_generation, read_marker, recover_overwrite, root_of)
from longctx.storage.objects import read_text, write_json
from longctx.storage.uri import (StorageError, delete_keys, exists, fsspec_fs, is_s3, join, listing, normalize,
                                 remove_tree, safe_relpath)

PUBLISH_HOOKS: list = []
"""Callables `hook(stage, dest)` run at each stage of an S3 publish ("orphans_removed", "uploaded", "switched",
"retiring", "done"): tests hold or kill a publish at a precise point with them. Empty in production."""
log = logging.getLogger(__name__)


def _stage(stage: str, dest: str) -> None:
    for hook in PUBLISH_HOOKS:
        hook(stage, dest)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to a URI (no commit marker; use publish_dir for that)."""
    uri = normalize(uri)
    if not is_s3(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return
    fs, path = fsspec_fs(uri)
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, f"{path.rstrip('/')}/{rel}")


def check_destination(dest: str, overwrite: bool = False, kind: str | None = None) -> None:
    """Refuse a destination `publish_dir` must not write, naming it: publish_dir calls this before staging and
    again just before the swap, and callers call it before any costly work (a corpus read) to fail early.

    * committed (`_COMMITTED`) and `overwrite` off: "already published";
    * committed and `kind` given, but the folder's manifest.json names another kind (or the folder has none, a
      model for instance): refused, the other kind named (a dataset never replaces a model or another kind of
      dataset);
    * a local path that exists and is not committed (the user's own folder, a run folder, a file): refused even
      with `overwrite`, which replaces only what longctx published (an empty folder is replaced);
    * an s3:// prefix with objects but no marker: allowed; nothing there is deleted: the publish goes into a
      generation folder beside them (`_publish_s3`)."""
    dest = normalize(dest)
    recover_overwrite(dest)
    marker = read_marker(dest)
    if marker is not None:
        if not overwrite:
            raise StorageError(f"{dest}: already published (pass overwrite=True or choose a fresh location)")
        if kind is not None and (found := committed_kind(dest, marker)) != kind:
            what = f"a committed {found}" if found else "a committed folder with no manifest.json kind (not a dataset)"
            raise StorageError(f"{dest}: holds {what}, not a {kind}; refusing to replace it (remove it yourself or "
                               "choose another path)")
        return
    if is_s3(dest) or not os.path.lexists(dest):
        return
    if overwrite and os.path.isdir(dest) and not os.path.islink(dest) and not os.listdir(dest):
        return
    what = "a folder" if os.path.isdir(dest) else "a file"
    raise StorageError(f"{dest}: {what} that is not a committed output (no {COMMIT_MARKER}); longctx replaces only "
                       "what it published, even with overwrite: remove it yourself or choose another path")


def committed_kind(uri: str, marker: dict) -> str | None:
    """The `kind` field of a committed folder's manifest.json (datasets carry one); None when there is none."""
    try:
        manifest = json.loads(read_text(join(committed_root(uri, marker), "manifest.json")))
    except (FileNotFoundError, ValueError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) else None


def remove_orphans(uri: str, marker: dict | None = None, damaged: str = "raise") -> list[str]:
    """Delete what crashed S3 overwrites left under a committed prefix: generation folders (`gen-*`) the marker
    does not commit (an upload that never switched) and files the marker lists as `retired` (a switch whose
    deletions did not finish), each by exact key. Nothing else is touched (other objects may belong to someone
    else); a prefix without a marker is left alone. Returns the URIs removed. Local folders have no orphans (an
    overwrite is one rename).

    Only when the generation the marker commits is there and complete (every file it lists, at its size): a
    marker whose `root` names a missing or damaged generation would otherwise have the only real copy deleted.
    Then nothing is removed and `damaged="raise"` raises StorageError naming the missing files (`longctx data
    clean`), `damaged="keep"` logs it (a publish about to replace the damaged dataset)."""
    uri = normalize(uri)
    if not is_s3(uri):
        return []
    marker = marker if marker is not None else read_marker(uri)
    if marker is None:
        return []
    root = root_of(marker, uri)
    retired = set()
    for key in marker.get("retired") or []:
        safe_relpath(key, uri)
        retired.add(key)
    fs, prefix, entries = listing(uri)
    gaps = committed_gaps(marker, uri, entries)
    if gaps:
        msg = (f"{uri}: the committed generation {root or '(files at the top of the prefix)'} is incomplete "
               f"({len(gaps)} files: {'; '.join(gaps[:3])}); removing nothing, since other generations may hold "
               "the only complete copy")
        if damaged == "raise":
            raise StorageError(msg)
        log.warning("%s", msg)
        return []
    live = set(committed_keys(marker, uri).values()) | {COMMIT_MARKER}
    orphans = sorted(k for k in entries if k not in live and (
        k in retired or (GENERATION.match(k.split("/", 1)[0]) and k.split("/", 1)[0] != root and "/" in k)))
    if orphans:
        delete_keys(fs, prefix, orphans, uri)
        log.warning("%s: removed %d objects left by an interrupted overwrite", uri, len(orphans))
    return [f"{uri}/{k}" for k in orphans]


def _publish_s3(staging: str, dest: str, marker: dict, overwrite: bool) -> None:
    """Upload a staged folder to an S3 prefix. Fresh prefix: files at their names, marker last. Overwrite of a
    committed prefix: new files under a fresh generation folder, ONE PUT of the marker switches readers to it,
    then the old files (listed in the new marker as `retired`) are deleted by exact key; a crash at any point
    leaves the old or the new dataset committed, and what it leaves behind is removed by `remove_orphans`. A
    prefix that holds objects but no marker (not ours to delete) gets the new files in a generation folder
    beside them."""
    fs, path = fsspec_fs(dest)
    path = path.rstrip("/")
    marker_uri = join(dest, COMMIT_MARKER)
    current = read_marker(dest)
    if current is None:
        root = new_generation() if fs.exists(path) else ""
        if root:
            log.warning("%s: holds objects that no %s marker lists; they are left as they are and the new files "
                        "go to %s/", dest, COMMIT_MARKER, root)
        upload_dir(staging, join(dest, root) if root else dest)
        _stage("uploaded", dest)
        write_json(marker_uri, {**marker, "root": root} if root else marker)  # last: complete once this exists
        _stage("done", dest)
        return
    if not overwrite:
        raise StorageError(f"{dest}: already published (pass overwrite=True or choose a fresh location)")
    remove_orphans(dest, current, damaged="keep")
    _stage("orphans_removed", dest)
    gen = new_generation()
    upload_dir(staging, join(dest, gen))
    _stage("uploaded", dest)
    retired = list(committed_keys(current, dest).values())
    write_json(marker_uri, {**marker, "root": gen, "retired": retired})  # the switch: one atomic PUT
    _stage("switched", dest)
    half = len(retired) // 2
    for i, chunk in enumerate((retired[:half], retired[half:])):
        if chunk:
            delete_keys(fs, path, chunk, dest)
        if i == 0:
            _stage("retiring", dest)
    _stage("done", dest)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # e.g. EINVAL on a filesystem without exchange: the caller falls back


@contextlib.contextmanager
def _publish_s3_shared(dest: str, overwrite: bool) -> Iterator[str]:
    """publish_dir(shared=True) for an s3:// destination: the staging location is on S3 itself, where every node
    can write, and nothing is copied on publish. A fresh prefix stages at `dest` (files at their names, marker
    last); otherwise (an overwrite of a committed prefix, or uncommitted objects already there) it stages in a
    fresh generation folder that one PUT of the marker commits, as `_publish_s3` does (old files retired, then
    deleted). A failure removes what was staged."""
    fs, path = fsspec_fs(dest)
    path = path.rstrip("/")
    current = read_marker(dest)
    if current is not None:
        remove_orphans(dest, current, damaged="keep")
    root = "" if current is None and not fs.exists(path) else new_generation()
    staging = join(dest, root) if root else dest
    try:
        yield staging
        spath = f"{path}/{root}" if root else path
        found = fs.find(spath, detail=True) if fs.exists(spath) else {}
        files = {k[len(spath) + 1:]: {"bytes": int(v.get("size") or 0)} for k, v in sorted(found.items())}
        files.pop(COMMIT_MARKER, None)
        marker: dict = {"files": files}
        retired: list[str] = []
        if root:
            marker["root"] = root
            if current is not None:
                retired = list(committed_keys(current, dest).values())
                marker["retired"] = retired
        write_json(join(dest, COMMIT_MARKER), marker)  # last: the switch (or the commit), one PUT
        if retired:
            delete_keys(fs, path, retired, dest)
    except BaseException:
        if not exists(join(dest, COMMIT_MARKER)) or read_marker(dest) == current:
            remove_tree(staging)
        raise


@contextlib.contextmanager
def publish_dir(dest: str, overwrite: bool = False, shared: bool = False, kind: str | None = None) -> Iterator[str]:
    """Stage a directory, then publish it atomically at `dest` with a `_COMMITTED` marker.

    Yields a local staging folder. On normal exit the folder is published; on an exception nothing is
    published and the staging folder is removed. Readers that call `require_committed(dest)` never see a
    half-written result. Staging folders carry their owner process in their name (longctx.cleanup), so those of
    killed runs are removed by the next publish next to them or by `longctx data clean`.

    A local overwrite swaps the new folder in with one atomic exchange (Linux), so either the old or the new
    output is visible at every instant; elsewhere old -> `dest.old-*`, new -> dest, and a crash between the two
    is undone by `recover_overwrite` on the next publish or read. An S3 overwrite uploads into a new generation
    folder and switches the marker to it (`_publish_s3`): readers resolve files through the marker
    (`committed_root`, `published_path`, `read_committed`).

    `shared=True`: the staging location must be writable from every node of the cluster (pass-2 tasks write
    shards there): for an s3:// destination it is then on S3 itself and yielded as a URI (`_publish_s3_shared`);
    a local destination stages next to itself as always (on a cluster, a local destination must be a shared
    folder).

    What `overwrite` may replace is checked before staging and again before the swap (`check_destination`):
    only a committed output (of the same `kind`, the manifest.json field of a dataset, when given); never a
    local folder longctx did not publish, and never an object under an uncommitted S3 prefix.
    """
    dest = normalize(dest)
    check_destination(dest, overwrite, kind)
    if shared and is_s3(dest):
        with _publish_s3_shared(dest, overwrite) as staging:
            yield staging
        return
    if is_s3(dest):
        staging = cleanup.work_dir("publish")
    else:
        parent = os.path.dirname(dest.rstrip("/")) or "."
        os.makedirs(parent, exist_ok=True)
        cleanup.remove_dead([parent], (cleanup.STAGING_PREFIX,))
        staging = os.path.join(parent, cleanup.owned_name(cleanup.STAGING_PREFIX))
        os.makedirs(staging)
    try:
        yield staging
        marker = manifest_of(staging)
        if is_s3(dest):
            _publish_s3(staging, dest, marker, overwrite)
        else:
            with open(os.path.join(staging, COMMIT_MARKER), "w") as f:
                json.dump(marker, f, indent=2)
            check_destination(dest, overwrite, kind)  # again: the folder may have changed while we staged
            if os.path.lexists(dest):
                if not exchange(staging, dest):  # staging now holds the old copy and is removed below
                    trash = dest.rstrip("/") + f".old-{uuid.uuid4().hex[:8]}"
                    os.replace(dest, trash)
                    os.replace(staging, dest)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, dest)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
