"""The download cache: s3:// folders copied into this user's private cache and reused while their listing holds.

`local_dir` is the one way a model, tokenizer or dataset folder on S3 becomes a local folder: every key is checked
(`safe_relpath`) before anything is written, a committed prefix contributes only its committed files, and an entry
is trusted only when its recorded listing (keys, ETags, sizes) equals the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid

from longctx.storage.commit import committed_listing
from longctx.storage.objects import retry_io
from longctx.storage.uri import StorageError, is_s3, normalize, safe_relpath


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder from a URI to a local folder (S3) or return the local path as is. Every key is checked
    (`safe_relpath`) before anything is written: one hostile key fails the whole download. A committed prefix
    yields exactly its committed files (`committed_listing`)."""
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"{uri}: not a folder")
        return uri
    fs, prefix, entries = committed_listing(uri)
    _download_entries(uri, fs, prefix, entries, local_dir)
    return local_dir


def _download_entries(uri: str, fs, prefix: str, entries: dict[str, dict], local_dir: str) -> None:
    if not entries:
        raise StorageError(f"{uri}: empty or missing prefix")
    root = os.path.realpath(local_dir)
    os.makedirs(root, exist_ok=True)
    for rel, e in entries.items():
        dest = os.path.join(root, safe_relpath(rel, uri))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.commonpath([root, os.path.realpath(os.path.dirname(dest))]) != root:
            raise StorageError(f"{uri}/{rel}: local path {dest} is outside {root}")
        key = e.get("key", rel)
        retry_io(lambda: fs.get_file(f"{prefix}/{key}", dest), f"{uri}/{key}")


CACHE_MANIFEST = ".longctx-manifest.json"


def cache_root() -> str:
    """This user's download cache: LONGCTX_CACHE, default <tmp>/longctx-cache-<uid>; created 0700 and refused
    when another user owns it (a folder in a shared /tmp could be planted by anyone)."""
    root = os.environ.get("LONGCTX_CACHE") or os.path.join(tempfile.gettempdir(), f"longctx-cache-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StorageError(f"{root}: the download cache must be a folder owned by this user (uid {os.getuid()}), "
                           "not a link or another user's folder; set LONGCTX_CACHE to a private folder")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)  # ours but open to others: make it private
    return root


def local_dir(uri: str) -> str:
    """A local folder with the contents of `uri`: local paths as they are, s3:// prefixes downloaded into this
    user's private cache (`cache_root()`) and reused while the prefix is unchanged. One cache for every caller: a
    model folder that is also the data tokenizer is downloaded once.

    A committed prefix contributes only its committed files (`committed_listing`: never the leftovers of a
    crashed overwrite). An entry is keyed by URI + listing (every key with its ETag and size) and trusted only when the manifest
    recorded in it equals the current listing and its files have the recorded sizes: a replaced object (new
    ETag) is downloaded again, a planted or damaged entry is not used. Costs one LIST request per call. The
    download lands in a temp folder renamed into place complete, so concurrent processes (Ray workers on one
    node) never read half a model.
    """
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"{uri}: folder does not exist")
        return uri
    fs, prefix, entries = committed_listing(uri)
    if not entries:
        raise StorageError(f"{uri}: empty or missing prefix")
    manifest = {"uri": uri, "files": entries}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    parent = os.path.join(cache_root(), "dirs", hashlib.sha256(uri.encode()).hexdigest()[:16])
    dest = os.path.join(parent, digest)
    if _cache_entry_matches(dest, manifest):
        return dest
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        _download_entries(uri, fs, prefix, entries, tmp)
        with open(os.path.join(tmp, CACHE_MANIFEST), "w") as f:
            json.dump(manifest, f, sort_keys=True)
        if os.path.exists(dest) and not _cache_entry_matches(dest, manifest):
            shutil.rmtree(dest, ignore_errors=True)  # a damaged or planted entry under the right name
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race; its copy is checked below
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _cache_entry_matches(dest, manifest):
        raise StorageError(f"{uri}: the cached copy at {dest} does not match the listing it was downloaded from")
    for old in os.listdir(parent):  # earlier versions of this prefix (objects since replaced)
        if old != digest and ".tmp-" not in old:
            shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
    return dest


def _cache_entry_matches(dest: str, manifest: dict) -> bool:
    try:
        with open(os.path.join(dest, CACHE_MANIFEST)) as f:
            if json.load(f) != manifest:
                return False
        return all(os.path.getsize(os.path.join(dest, safe_relpath(rel))) == e["size"]
                   for rel, e in manifest["files"].items())
    except (OSError, ValueError, StorageError):
        return False
