"""One place that turns URIs into filesystems: local paths, `file://`, `s3://`, and `builtin:` (shipped assets).

Everything that reads or writes data, checkpoints or reports goes through here, so the S3 endpoint is chosen
once: `storage.endpoint_url` from config, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. (NOTE: pyarrow 26's
`S3FileSystem()` ignores AWS_ENDPOINT_URL while `FileSystem.from_uri` honours it; we pass the endpoint
explicitly to both pyarrow and s3fs.)

Atomic publish: `publish_dir(dest)` stages a directory and makes it visible all at once. Locally the staged
folder is renamed into place. On S3 (atomic per object, not per prefix) files are written under the fresh
prefix and a `_COMMITTED` marker listing every file with its sha256 is written last; readers call
`require_committed` and never trust a prefix without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

COMMIT_MARKER = "_COMMITTED"


class StorageError(RuntimeError):
    """A URI cannot be resolved, read or published; the message names the URI."""


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings resolved from config and environment (never credentials)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, cfg=None) -> "StorageOptions":
        endpoint = getattr(cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        region = getattr(cfg, "region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        return cls(endpoint_url=endpoint or None, region=region or None)


_DEFAULT_OPTIONS: StorageOptions | None = None


def configure(cfg=None) -> StorageOptions:
    """Set the process-wide storage options from a StorageConfig (jobs call this once at start)."""
    global _DEFAULT_OPTIONS
    _DEFAULT_OPTIONS = StorageOptions.resolve(cfg)
    if _DEFAULT_OPTIONS.endpoint_url:
        # Ray Data / Ray Train workers and pyarrow's from_uri read the environment: keep them on the same
        # endpoint as this process (an endpoint is not a secret).
        os.environ.setdefault("AWS_ENDPOINT_URL", _DEFAULT_OPTIONS.endpoint_url)
    return _DEFAULT_OPTIONS


def options() -> StorageOptions:
    return _DEFAULT_OPTIONS or StorageOptions.resolve()


# ------------------------------------------------------------------------------------------------- URIs
def assets_dir() -> Path:
    """Folder of the shipped assets (sample corpus, tiny tokenizer and model)."""
    return Path(str(resources.files("longctx") / "assets"))


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def normalize(uri: str | os.PathLike) -> str:
    """`builtin:x` -> absolute asset path; `file://x` -> x; local paths made absolute; s3:// kept."""
    uri = str(uri)
    if uri.startswith("builtin:"):
        rel = uri[len("builtin:") :].lstrip("/")
        path = assets_dir() / rel
        if not path.exists():
            raise StorageError(f"{uri}: no such shipped asset (looked in {assets_dir()})")
        return str(path)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_s3(uri):
        return "s3://" + uri.split("://", 1)[1]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file://, s3:// or builtin:)")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


def pyarrow_fs(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI; S3 gets the configured endpoint."""
    uri = normalize(uri)
    if is_s3(uri):
        opts = opts or options()
        kwargs = {}
        if opts.endpoint_url:
            scheme, _, host = opts.endpoint_url.partition("://")
            kwargs["endpoint_override"] = host or opts.endpoint_url
            kwargs["scheme"] = scheme if host else "https"
        if opts.region:
            kwargs["region"] = opts.region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    return pafs.LocalFileSystem(), uri


def fsspec_fs(uri: str, opts: StorageOptions | None = None):
    """(fsspec filesystem, path) for a URI; for code that wants file-like objects (gzip, zstd, json)."""
    uri = normalize(uri)
    if is_s3(uri):
        import s3fs

        opts = opts or options()
        client_kwargs = {}
        if opts.endpoint_url:
            client_kwargs["endpoint_url"] = opts.endpoint_url
        if opts.region:
            client_kwargs["region_name"] = opts.region
        return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True), uri[len("s3://") :]
    import fsspec

    return fsspec.filesystem("file"), uri


def _to_uri(uri_like: str, path: str) -> str:
    return "s3://" + path if is_s3(uri_like) else path


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def expand(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files under a URI: a file, a folder (recursive) or a glob; sorted, hidden/underscore files skipped."""
    norm = normalize(uri)
    fs, path = fsspec_fs(norm)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if not fs.isdir(p)]
    elif fs.exists(path):
        found = [path]
    else:
        raise StorageError(f"{uri}: no such file, folder or prefix")
    files = sorted(p for p in found if not os.path.basename(p).startswith(("_", ".")))
    if suffixes:
        files = [p for p in files if p.endswith(suffixes)]
    return [_to_uri(norm, p) for p in files]


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically: local via a temp file + rename; S3 objects are atomic already."""
    uri = normalize(uri)
    if is_s3(uri):
        fs, path = fsspec_fs(uri)
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(uri) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------- directories
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


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder from a URI to a local folder (S3) or return the local path as is."""
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"{uri}: not a folder")
        return uri
    fs, path = fsspec_fs(uri)
    files = [p for p in fs.find(path) if not fs.isdir(p)]
    if not files:
        raise StorageError(f"{uri}: empty or missing prefix")
    os.makedirs(local_dir, exist_ok=True)
    for p in files:
        rel = p[len(path.rstrip("/")) + 1 :]
        dest = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(p, dest)
    return local_dir


def local_dir(uri: str) -> str:
    """A local folder with the contents of `uri`: local paths as they are, s3:// prefixes downloaded once per
    machine into a cache (LONGCTX_CACHE, default <tmp>/longctx-cache/dirs/<hash>) and reused. One cache for every
    caller: a model folder that is also the data tokenizer is downloaded once.

    The download lands in a private temp folder that is renamed into place complete, so concurrent processes
    (Ray workers on one node) never read a half-downloaded model or tokenizer.
    """
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"{uri}: folder does not exist")
        return uri
    root = os.environ.get("LONGCTX_CACHE", os.path.join(tempfile.gettempdir(), "longctx-cache"))
    dest = os.path.join(root, "dirs", hashlib.sha256(uri.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(dest, ".complete")):
        tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        download_dir(uri, tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _manifest_of(local_dir: str) -> dict:
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    return {"files": files}


@contextlib.contextmanager
def publish_dir(dest: str, overwrite: bool = False) -> Iterator[str]:
    """Stage a directory, then publish it atomically at `dest` with a `_COMMITTED` marker.

    Yields a local staging folder. On normal exit the folder is published; on an exception nothing is
    published and the staging folder is removed. Readers that call `require_committed(dest)` never see a
    half-written result.
    """
    dest = normalize(dest)
    if exists(join(dest, COMMIT_MARKER)) and not overwrite:
        raise StorageError(f"{dest}: already published (pass overwrite=True or choose a fresh location)")
    if is_s3(dest):
        staging = tempfile.mkdtemp(prefix="longctx-publish-")
    else:
        os.makedirs(os.path.dirname(dest.rstrip("/")) or ".", exist_ok=True)
        staging = os.path.join(os.path.dirname(dest.rstrip("/")), f".staging-{uuid.uuid4().hex[:12]}")
        os.makedirs(staging)
    try:
        yield staging
        marker = _manifest_of(staging)
        if is_s3(dest):
            fs, path = fsspec_fs(dest)
            if overwrite and fs.exists(path):
                fs.rm(path, recursive=True)
            upload_dir(staging, dest)
            write_json(join(dest, COMMIT_MARKER), marker)  # last: the prefix is complete once this exists
        else:
            with open(os.path.join(staging, COMMIT_MARKER), "w") as f:
                json.dump(marker, f, indent=2)
            if os.path.exists(dest):
                if not overwrite:
                    raise StorageError(f"{dest}: exists but is not a committed output; remove it or choose another path")
                trash = dest.rstrip("/") + f".old-{uuid.uuid4().hex[:8]}"
                os.replace(dest, trash)
                os.replace(staging, dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, dest)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def is_committed(uri: str) -> bool:
    return exists(join(uri, COMMIT_MARKER))


def require_committed(uri: str) -> dict:
    """The commit marker of a published directory; a clear error when it is missing (half-written)."""
    marker = join(uri, COMMIT_MARKER)
    if not exists(marker):
        raise StorageError(
            f"{uri}: no {COMMIT_MARKER} marker: the output is incomplete (a writer failed or is still running)"
        )
    return json.loads(read_text(marker))
