"""URIs and filesystems: local paths, `file://`, `s3://` and `builtin:` (shipped assets) turned into filesystems.

The S3 endpoint is chosen here once: `storage.endpoint_url` from config, else AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL. (NOTE: pyarrow 26's `S3FileSystem()` ignores AWS_ENDPOINT_URL while `FileSystem.from_uri`
honours it; we pass the endpoint explicitly to both pyarrow and s3fs.) Also here: listing a prefix, deleting
objects by exact key (`delete_keys`: never a pattern), removing a folder or prefix, and the check that a local
folder is private.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A URI cannot be resolved, read or published; the message names the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """An object or file that is not there; the message names it."""


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings resolved from config and environment (never credentials)."""

    endpoint_url: str | None = None
    region: str | None = None
    read_retries: int = 6
    retry_backoff_s: float = 0.5
    retry_max_backoff_s: float = 8.0

    @classmethod
    def resolve(cls, cfg=None) -> "StorageOptions":
        endpoint = getattr(cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        region = getattr(cfg, "region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        retry = {k: getattr(cfg, k) for k in ("read_retries", "retry_backoff_s", "retry_max_backoff_s")
                 if getattr(cfg, k, None) is not None}
        return cls(endpoint_url=endpoint or None, region=region or None, **retry)


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


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path as a URI of the same kind as `uri_like` (`s3://` put back for S3)."""
    return "s3://" + path if is_s3(uri_like) else path


def safe_relpath(key: str, root: str = "") -> str:
    """A relative object key as a local relative path, or StorageError when it would leave its root: an absolute
    key, an empty segment (`a//b`), `.`/`..`, a backslash or NUL. Keys come from storage that anyone with write
    access to a prefix controls; joined unchecked, `tok/../../x` or `tok//etc/x` would write outside the cache."""
    parts = key.split("/")
    if (not key or key.startswith("/") or "\\" in key or "\x00" in key
            or any(p in ("", ".", "..") for p in parts)):
        raise StorageError(f"{root + '/' if root else ''}{key!r}: object key would leave its folder "
                           "(absolute, empty, '.' or '..' segment); refusing to map it to a local path")
    return os.path.join(*parts)


# ------------------------------------------------------------------------------------------ filesystems
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


_S3FS: dict[tuple, object] = {}


def fsspec_fs(uri: str, opts: StorageOptions | None = None, client_retries: bool = True):
    """(fsspec filesystem, path) for a URI; for code that wants file-like objects (gzip, zstd, json).
    `client_retries=False`: s3fs and botocore try once, for callers that retry themselves (`retry_io`); such a
    filesystem is made fresh each time (no pooled connection from before an outage).

    The others are made once per process and endpoint: building an S3 client costs 0.1-0.4 s of CPU (botocore
    loads its service model), a request on a made one 5-20 ms. Listings are never cached (`use_listings_cache`
    off): `exists` and `ls` ask the store every time, which the commit protocol relies on."""
    uri = normalize(uri)
    if is_s3(uri):
        import s3fs  # deferred: 0.6 s to import (aiobotocore), needed only for s3:// URIs

        opts = opts or options()
        client_kwargs = {}
        if opts.endpoint_url:
            client_kwargs["endpoint_url"] = opts.endpoint_url
        if opts.region:
            client_kwargs["region_name"] = opts.region
        key = (os.getpid(), opts.endpoint_url, opts.region)
        fs = _S3FS.get(key) if client_retries else None
        if fs is None:
            extra = {} if client_retries else {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
            fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False,
                                   **extra)
            if client_retries:
                _S3FS[key] = fs
            else:
                fs.retries = 1
        return fs, uri[len("s3://") :]
    import fsspec  # deferred: 0.13 s to import, and most local callers never need it (CLI start-up)

    return fsspec.filesystem("file"), uri


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def listing(uri: str) -> tuple[object, str, dict[str, dict]]:
    """(fs, prefix path, {relative key: {"size", "etag"}}) of every object under an s3:// prefix, keys checked.
    Every object, committed or not: readers use `committed_listing`."""
    fs, path = fsspec_fs(uri)
    prefix = path.rstrip("/")
    found = fs.find(prefix, detail=True)
    entries: dict[str, dict] = {}
    for p, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        if not p.startswith(prefix + "/"):
            raise StorageError(f"{uri}: listing returned {p!r}, outside the prefix")
        rel = p[len(prefix) + 1:]
        safe_relpath(rel, uri)
        entries[rel] = {"size": int(info.get("size") or 0), "etag": str(info.get("ETag") or "").strip('"')}
    return fs, prefix, entries


def delete_keys(fs, prefix: str, keys: list[str], uri: str = "") -> None:
    """Delete the objects `prefix/key` of an S3 filesystem by exact key, in batches of 1000 (one DeleteObjects
    request each). Never by pattern: s3fs `rm` expands `*`, `?` and `[...]`, so a key like `*` or `part[1].bin`
    handed to it deletes whatever matches (a live file, the marker just written). StorageError names the keys
    the store refused."""
    bucket, _, base = prefix.rstrip("/").partition("/")
    full = [f"{base}/{k}" if base else k for k in keys]
    for i in range(0, len(full), 1000):
        out = fs.call_s3("delete_objects", Bucket=bucket,
                         Delete={"Objects": [{"Key": k} for k in full[i:i + 1000]], "Quiet": True})
        if out.get("Errors"):
            bad = [f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip() for e in out["Errors"]]
            raise StorageError(f"{uri or 's3://' + prefix}: could not delete {len(bad)} objects: {'; '.join(bad[:5])}")


def remove_tree(uri: str) -> None:
    """Remove a local folder or every object under an s3:// prefix (`uri/...`, by exact key; the object named
    exactly like the prefix, if any, is not under it and stays). Missing: nothing to do."""
    uri = normalize(uri)
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = fsspec_fs(uri)
    prefix = path.rstrip("/")
    with contextlib.suppress(FileNotFoundError):
        keys = [p[len(prefix) + 1:] for p, info in fs.find(prefix, detail=True).items()
                if p.startswith(prefix + "/") and info.get("type") != "directory"]
        if keys:
            delete_keys(fs, prefix, keys, uri)


# ---------------------------------------------------------------------------------------- local folders
def private_group(gid: int) -> bool:
    """A user-private group (named like this user, no other members; umask 002 systems): group-writable is fine."""
    try:
        import grp  # deferred: POSIX-only modules

        g = grp.getgrgid(gid)
        me = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return False
    return g.gr_name == me and set(g.gr_mem) <= {me}


def require_private(uri: str, why: str) -> None:
    """Refuse a local folder that someone else could have written into: any file or folder under it that is
    world-writable, writable by a group other than the user's private one, or owned by another user (root
    excepted), or an ancestor that is world-writable without
    the sticky bit (anyone could replace the folder). Used before reading what is unpickled (Ray Tune's
    tuner.pkl). s3:// cannot be checked from here (bucket policies are not visible): the docs say who may write."""
    uri = normalize(uri)
    if is_s3(uri) or not os.path.exists(uri):
        return
    me = os.getuid()

    def bad(path: str, st: os.stat_result) -> str | None:
        if stat.S_ISLNK(st.st_mode):
            return None
        if st.st_uid not in (me, 0):
            return f"{path} is owned by uid {st.st_uid}"
        if st.st_mode & 0o002:
            return f"{path} is writable by others ({oct(st.st_mode & 0o777)})"
        if st.st_mode & 0o020 and not private_group(st.st_gid):
            return f"{path} is writable by its group {st.st_gid} ({oct(st.st_mode & 0o777)})"
        return None

    problems = []
    for root, dirs, files in os.walk(uri):
        for name in [""] + dirs + files:
            p = os.path.join(root, name) if name else root
            if (msg := bad(p, os.lstat(p))) is not None:
                problems.append(msg)
    parent = os.path.dirname(os.path.realpath(uri))
    while True:
        st = os.stat(parent)
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            problems.append(f"{parent} (an ancestor) is world-writable without the sticky bit")
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    if problems:
        raise StorageError(f"{uri}: refusing to {why}: others could have written into it: {'; '.join(problems[:5])}."
                           f" Make it writable only by you (chmod -R go-w) or start a fresh sweep elsewhere.")
