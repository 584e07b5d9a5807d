"""The commit marker and what readers see through it: `_COMMITTED`, its generations, committed listings.

A published folder is committed once its `_COMMITTED` marker exists; the marker lists every file with its size and
sha256 (`manifest_of`) and, after an S3 overwrite, the generation folder that holds them (`"root": "gen-..."`,
`committed_root`). Readers take file names from the marker (`committed_root`, `published_path`, `expand`,
`committed_listing`, `read_committed`), never from a listing, so objects a crashed overwrite left behind are
invisible to them. The writers are in `longctx.storage.publish`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import time
import uuid

from longctx.storage.objects import read_bytes, sha256_file
from longctx.storage.uri import (StorageError, StorageNotFound, exists, fsspec_fs, is_s3, join, listing, normalize,
                                 safe_relpath, to_uri)

COMMIT_MARKER = "_COMMITTED"
GENERATION = re.compile(r"^gen-\d{8}T\d{6}-[0-9a-f]{8}$")
"""Name of the folder an S3 overwrite uploads into (`root` in the marker)."""
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ markers
def _parse_marker(data: bytes, where: str) -> dict:
    try:
        marker = json.loads(data)
    except ValueError as e:
        raise StorageError(f"{where}: not a valid {COMMIT_MARKER} marker ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        raise StorageError(f"{where}: not a valid {COMMIT_MARKER} marker (no 'files' mapping)")
    return marker


def marker_at(fs, folder: str) -> dict | None:
    """The marker of an S3 folder (fsspec path), None when there is none; one GET."""
    try:
        data = fs.cat_file(f"{folder.rstrip('/')}/{COMMIT_MARKER}")
    except FileNotFoundError:
        return None
    return _parse_marker(data, f"s3://{folder.rstrip('/')}/{COMMIT_MARKER}")


def read_marker(uri: str) -> dict | None:
    """The `_COMMITTED` marker of a published folder, None when it has none (not committed)."""
    try:
        data = read_bytes(join(uri, COMMIT_MARKER))
    except (StorageNotFound, NotADirectoryError):
        return None
    return _parse_marker(data, join(uri, COMMIT_MARKER))


def root_of(marker: dict, uri: str) -> str:
    """The generation folder a marker commits ("" for files directly under the prefix); a root that is no
    generation name (a hand-edited or hostile marker pointing elsewhere) is refused."""
    root = marker.get("root") or ""
    if root and not (isinstance(root, str) and GENERATION.match(root)):
        raise StorageError(f"{uri}/{COMMIT_MARKER}: root {root!r} is not a generation folder name (gen-...)")
    return root


def _marker_files(marker: dict, uri: str) -> list[str]:
    files = list(marker.get("files", {}))
    for rel in files:
        safe_relpath(rel, uri)
    return files


def committed_keys(marker: dict, uri: str) -> dict[str, str]:
    """{file as the marker names it: its object key under the prefix} (`gen-.../file` after an S3 overwrite)."""
    root = root_of(marker, uri)
    return {rel: f"{root}/{rel}" if root else rel for rel in _marker_files(marker, uri)}


def new_generation() -> str:
    """A fresh generation folder name (matches GENERATION; never collides with an earlier one)."""
    return f"gen-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def committed_gaps(marker: dict, uri: str, entries: dict[str, dict]) -> list[str]:
    """What the generation a marker commits lacks in a listing (`listing(uri)[2]`): each file it lists that is
    missing or of another size than recorded, as "key: missing" / "key: N bytes, marker says M"; [] when
    complete."""
    gaps = []
    for rel, key in committed_keys(marker, uri).items():
        info = marker["files"][rel]
        want = info.get("bytes") if isinstance(info, dict) else None
        if key not in entries:
            gaps.append(f"{key}: missing")
        elif isinstance(want, int) and entries[key]["size"] != want:
            gaps.append(f"{key}: {entries[key]['size']} bytes, marker says {want}")
    return gaps


def committed_root(uri: str, marker: dict | None = None) -> str:
    """The folder holding the committed files of published folder `uri`: `uri` itself, or `uri/gen-...` after an
    S3 overwrite. StorageError when `uri` is not committed."""
    uri = normalize(uri)
    if marker is None:
        marker = require_committed(uri)
    root = root_of(marker, uri)
    return join(uri, root) if root else uri


def published_path(uri: str, *parts: str) -> str:
    """Where `parts` of published folder `uri` live: under its committed generation when an S3 overwrite put them
    there, else `uri/parts` (local folders, plain S3 layouts, folders without a marker)."""
    uri = normalize(uri)
    if not is_s3(uri):
        return join(uri, *parts)
    marker = read_marker(uri)
    return join(committed_root(uri, marker), *parts) if marker is not None else join(uri, *parts)


def _missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and "does not exist" in str(exc))


def read_committed(uri: str, fn, attempts: int = 4, marker: dict | None = None):
    """fn(root) against the committed generation of `uri` (root as from `committed_root`). If an object it reads
    is gone because an overwrite switched the marker to a newer generation meanwhile (and deleted the old one),
    fn runs again on the new generation, so a reader gets the whole old or the whole new dataset and never an
    error. A missing object while the marker stayed the same is damage: raised as it is. `marker`: the one the
    caller has just read (saves a request)."""
    uri = normalize(uri)
    for attempt in range(attempts):
        if attempt or marker is None:
            marker = require_committed(uri)
        try:
            return fn(committed_root(uri, marker))
        except Exception as e:  # noqa: BLE001 - only a vanished object under a switched marker is retried
            if not _missing(e) or attempt == attempts - 1 or read_marker(uri) == marker:
                raise
            log.info("%s: overwritten while being read (%s); reading the new generation", uri, e)
    raise AssertionError("unreachable")


def is_committed(uri: str) -> bool:
    """Whether `uri` holds a `_COMMITTED` marker (one request; the marker is not read)."""
    return exists(join(uri, COMMIT_MARKER))


def require_committed(uri: str) -> dict:
    """The commit marker of a published directory; a clear error when it is missing (half-written). Its files
    live under `committed_root(uri, marker)`."""
    recover_overwrite(normalize(uri))
    marker = read_marker(uri)
    if marker is None:
        raise StorageError(
            f"{uri}: no {COMMIT_MARKER} marker: the output is incomplete (a writer failed or is still running)"
        )
    root_of(marker, normalize(uri))
    return marker


def recover_overwrite(dest: str) -> bool:
    """Undo a crash between the two renames of a non-atomic overwrite: when `dest` is missing and a committed
    `dest.old-*` copy is there, put it back. Returns True when it restored one."""
    dest = dest.rstrip("/")
    if is_s3(dest) or os.path.exists(dest):
        return False
    parent, base = os.path.split(dest)
    try:
        olds = sorted(n for n in os.listdir(parent or ".") if n.startswith(base + ".old-"))
    except OSError:
        return False
    for name in olds:
        old = os.path.join(parent, name)
        if os.path.exists(os.path.join(old, COMMIT_MARKER)):
            try:
                os.rename(old, dest)
                log.warning("%s: restored the previous output from %s (an overwrite was interrupted)", dest, old)
                return True
            except OSError:
                return os.path.exists(dest)
    return False


def manifest_of(local_dir: str) -> dict:
    """The marker of a staged local folder: every file under it with its size and sha256."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    return {"files": files}


# ------------------------------------------------------------------------------------ committed listings
def expand(uri: str, suffixes: tuple[str, ...] | None = None, hidden: bool = False) -> list[str]:
    """Files under a URI: a file, a folder (recursive) or a glob; sorted, hidden/underscore files skipped
    unless `hidden`."""
    norm = normalize(uri)
    fs, path = fsspec_fs(norm)
    found = _expand_committed(fs, path) if is_s3(norm) else None
    if found is None:
        found = _expand_listed(fs, path, uri)
    files = sorted(p for p in found if hidden or not os.path.basename(p).startswith(("_", ".")))
    if suffixes:
        files = [p for p in files if p.endswith(suffixes)]
    return [to_uri(norm, p) for p in files]


def _expand_listed(fs, path: str, uri: str) -> list[str]:
    """Files of a glob, folder or file, as the store lists them."""
    if any(ch in path for ch in "*?["):
        return fs.glob(path)
    if fs.isdir(path):
        return [p for p in fs.find(path) if not fs.isdir(p)]
    if fs.exists(path):
        return [path]
    raise StorageError(f"{uri}: no such file, folder or prefix")


def _glob_split(path: str) -> tuple[str, list[str]]:
    """(folder before the first wildcard component, the pattern's remaining components)."""
    parts = path.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:i]), parts[i:]
    return "/".join(parts), []


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def _expand_committed(fs, path: str) -> list[str] | None:
    """Files of an S3 folder (or a glob inside one) that holds a `_COMMITTED` marker, taken from the marker (the
    committed generation's files and the marker itself), so that objects of a crashed overwrite are never listed;
    None when the folder holds no marker (the caller lists it)."""
    base, pattern = _glob_split(path)
    marker = marker_at(fs, base)
    if marker is None or "files" not in marker:  # no marker, or a hand-made one that lists nothing: list
        return None
    found = [f"{base}/{key}" for rel, key in committed_keys(marker, "s3://" + base).items()
             if not pattern or _match_parts(pattern, rel.split("/"))]
    if not pattern or _match_parts(pattern, [COMMIT_MARKER]):
        found.append(f"{base}/{COMMIT_MARKER}")
    return found


def committed_listing(uri: str) -> tuple[object, str, dict[str, dict]]:
    """`listing`, and where the prefix holds a `_COMMITTED` marker only what it commits: {local relative path:
    {"size", "etag", "key"}} with `key` the object's key under the prefix (`gen-.../x` after an overwrite). The
    marker itself is kept for a plain layout (as before) and left out for a generation layout (its `root` would
    not hold for the local copy). Objects of a crashed overwrite are never part of it."""
    fs, prefix, entries = listing(uri)
    if COMMIT_MARKER not in entries:
        return fs, prefix, {rel: {**e, "key": rel} for rel, e in entries.items()}
    marker = marker_at(fs, prefix)
    if marker is None:  # deleted between the listing and the read: not committed any more
        raise StorageError(f"{uri}: no {COMMIT_MARKER} marker: the output is incomplete")
    if "files" not in marker:  # a hand-made marker that lists nothing: everything under the prefix, as listed
        return fs, prefix, {rel: {**e, "key": rel} for rel, e in entries.items()}
    out = {}
    for rel, key in committed_keys(marker, uri).items():
        if key not in entries:
            raise StorageNotFound(f"{uri}/{key}: listed in {COMMIT_MARKER} but not in the bucket (the prefix was "
                                  "overwritten while it was read, or damaged)")
        out[rel] = {**entries[key], "key": key}
    if not root_of(marker, uri):
        out[COMMIT_MARKER] = {**entries[COMMIT_MARKER], "key": COMMIT_MARKER}
    return fs, prefix, out

