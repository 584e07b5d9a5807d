"""One place that turns URIs into filesystems: local paths, `file://`, `s3://`, and `builtin:` (shipped assets).

Everything that reads or writes data, checkpoints or reports goes through here, so the S3 endpoint is chosen
once: `storage.endpoint_url` from config, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. (NOTE: pyarrow 26's
`S3FileSystem()` ignores AWS_ENDPOINT_URL while `FileSystem.from_uri` honours it; we pass the endpoint
explicitly to both pyarrow and s3fs.)

Atomic publish: `publish_dir(dest)` stages a directory and makes it visible all at once. Locally the staged
folder is renamed into place (an overwrite is one atomic exchange). On S3 (atomic per object, not per prefix)
files are written under the fresh prefix and a `_COMMITTED` marker listing every file with its sha256 is written
last; readers call `require_committed` and never trust a prefix without it. An S3 overwrite uploads the new files
under a generation folder (`dest/gen-<time>-<hex>/`) that cannot collide with the old ones, switches readers to
it with one PUT of the marker (`"root": "gen-..."`), and only then deletes the old files: at every instant the
marker names one complete dataset. Readers therefore take file names from the marker (`committed_root`,
`published_path`, `expand`, `local_dir`), never from a listing; objects a crashed overwrite left behind are
invisible to them and removed by the next publish or `longctx data clean --prefix` (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

COMMIT_MARKER = "_COMMITTED"
GENERATION = re.compile(r"^gen-\d{8}T\d{6}-[0-9a-f]{8}$")
"""Name of the folder an S3 overwrite uploads into (`root` in the marker)."""
PUBLISH_HOOKS: list = []
"""Callables `hook(stage, dest)` run at each stage of an S3 publish ("orphans_removed", "uploaded", "switched",
"retiring", "done"): tests hold or kill a publish at a precise point with them. Empty in production."""
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A URI cannot be resolved, read or published; the message names the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """An object or file that is not there; the message names it."""


class StorageIOError(StorageError):
    """Reading an object kept failing after every retry (an outage, not bad data); the message names it."""


class NotARegularFile(OSError):
    """A local corpus path is a FIFO, device, socket or folder: never opened for reading (it could block or
    never end, like a link to /dev/zero)."""


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
        import s3fs

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
    import fsspec

    return fsspec.filesystem("file"), uri


def _to_uri(uri_like: str, path: str) -> str:
    return "s3://" + path if is_s3(uri_like) else path


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


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
    return [_to_uri(norm, p) for p in files]


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
    import fnmatch

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
    marker = _marker_at(fs, base)
    if marker is None or "files" not in marker:  # no marker, or a hand-made one that lists nothing: list
        return None
    found = [f"{base}/{key}" for rel, key in _committed_keys(marker, "s3://" + base).items()
             if not pattern or _match_parts(pattern, rel.split("/"))]
    if not pattern or _match_parts(pattern, [COMMIT_MARKER]):
        found.append(f"{base}/{COMMIT_MARKER}")
    return found


# --------------------------------------------------------------------------------- reads with retries
# Errors that say the data is what it is: retrying cannot help, the caller decides (quarantine or fail).
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, NotARegularFile,
              StorageError)


_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV, errno.ELOOP,
                     errno.ENAMETOOLONG, errno.EINVAL, errno.ENOTDIR, errno.EISDIR}


def is_transient(exc: BaseException) -> bool:
    """True for failures of the medium (connection refused/reset/cut, timeouts, EIO, throttling) that a retry
    may cure; False for a missing object, a permission error or a bad file type."""
    if isinstance(exc, _PERMANENT) or getattr(exc, "errno", None) in _PERMANENT_ERRNOS:
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    module = type(exc).__module__ or ""
    # botocore/aiobotocore/aiohttp/urllib3 raise their own classes for connection and streaming failures
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs"))


def retry_io(fn, what: str, opts: StorageOptions | None = None):
    """fn() retried on transient errors with doubling backoff (StorageOptions.read_retries/retry_*), each retry
    logged; when they run out, StorageIOError naming `what` (the object) and the last error."""
    opts = opts or options()
    wait, t0 = opts.retry_backoff_s, time.monotonic()
    for attempt in range(opts.read_retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not is_transient(e):
                raise
            if attempt == opts.read_retries:
                raise StorageIOError(
                    f"{what}: read failed {attempt + 1} times over {time.monotonic() - t0:.1f}s "
                    f"(storage.read_retries={opts.read_retries}); last error: {type(e).__name__}: {e}") from e
            log.warning("%s: %s: %s; retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1,
                        opts.read_retries, wait)
            time.sleep(wait)
            wait = min(wait * 2, opts.retry_max_backoff_s)
    raise AssertionError("unreachable")


def _require_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "folder" if stat.S_ISDIR(st.st_mode) else "special file")
        raise NotARegularFile(f"{path}: a {kind}, not a regular file")


def _open_local_regular(path: str):
    # NOTE: stat first (a socket cannot even be opened), then open with O_NONBLOCK so that a FIFO swapped in
    # meanwhile returns at once instead of waiting for a writer, and fstat the descriptor so the check holds for
    # what is actually read.
    _require_regular(path, os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


class RetryingReader(io.RawIOBase):
    """A seekable read-only file over a local path or an S3 object that survives outages: a failed read is
    retried (`retry_io`) by reopening the object and seeking back to where it stood, so a stream read resumes
    byte-exact. Local paths must be regular files (`NotARegularFile` otherwise). `size` is the object size."""

    def __init__(self, uri: str, opts: StorageOptions | None = None):
        super().__init__()
        self.uri, self._opts = normalize(uri), opts or options()
        self._pos, self._f = 0, None
        self.size = retry_io(self._open, self.uri, self._opts)

    def _open(self) -> int:
        self._drop()
        if is_s3(self.uri):
            # one retry policy, ours: configurable and logged (s3fs + botocore would add up to ~20 s of their own)
            fs, path = fsspec_fs(self.uri, self._opts, client_retries=False)
            f = fs.open(path, "rb")
            size = f.size
        else:
            f, size = _open_local_regular(self.uri)
        if self._pos:
            f.seek(self._pos)
        self._f = f
        return size

    def _drop(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        if self._f is not None:
            try:
                self._f.seek(self._pos)
            except Exception:  # noqa: BLE001 - the next read reopens at _pos
                self._drop()
        return self._pos

    def readinto(self, b) -> int:
        def attempt() -> bytes:
            if self._f is None:
                self._open()
            try:
                return self._f.read(len(b))
            except Exception:
                self._drop()  # reopen at _pos on the next attempt
                raise

        data = retry_io(attempt, self.uri, self._opts)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    try:
        return fs.cat_file(path)  # one GET (open() would HEAD first)
    except FileNotFoundError:
        raise StorageNotFound(f"{uri}: not found") from None


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


def _listing(uri: str) -> tuple[object, str, dict[str, dict]]:
    """(fs, prefix path, {relative key: {"size", "etag"}}) of every object under an s3:// prefix, keys checked.
    Every object, committed or not: readers use `_committed_listing`."""
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


def _committed_listing(uri: str) -> tuple[object, str, dict[str, dict]]:
    """`_listing`, and where the prefix holds a `_COMMITTED` marker only what it commits: {local relative path:
    {"size", "etag", "key"}} with `key` the object's key under the prefix (`gen-.../x` after an overwrite). The
    marker itself is kept for a plain layout (as before) and left out for a generation layout (its `root` would
    not hold for the local copy). Objects of a crashed overwrite are never part of it."""
    fs, prefix, entries = _listing(uri)
    if COMMIT_MARKER not in entries:
        return fs, prefix, {rel: {**e, "key": rel} for rel, e in entries.items()}
    marker = _marker_at(fs, prefix)
    if marker is None:  # deleted between the listing and the read: not committed any more
        raise StorageError(f"{uri}: no {COMMIT_MARKER} marker: the output is incomplete")
    if "files" not in marker:  # a hand-made marker that lists nothing: everything under the prefix, as listed
        return fs, prefix, {rel: {**e, "key": rel} for rel, e in entries.items()}
    out = {}
    for rel, key in _committed_keys(marker, uri).items():
        if key not in entries:
            raise StorageNotFound(f"{uri}/{key}: listed in {COMMIT_MARKER} but not in the bucket (the prefix was "
                                  "overwritten while it was read, or damaged)")
        out[rel] = {**entries[key], "key": key}
    if not _root_of(marker, uri):
        out[COMMIT_MARKER] = {**entries[COMMIT_MARKER], "key": COMMIT_MARKER}
    return fs, prefix, out


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder from a URI to a local folder (S3) or return the local path as is. Every key is checked
    (`safe_relpath`) before anything is written: one hostile key fails the whole download. A committed prefix
    yields exactly its committed files (`_committed_listing`)."""
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"{uri}: not a folder")
        return uri
    fs, prefix, entries = _committed_listing(uri)
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

    A committed prefix contributes only its committed files (`_committed_listing`: never the leftovers of a
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
    fs, prefix, entries = _committed_listing(uri)
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


def _manifest_of(local_dir: str) -> dict:
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    return {"files": files}


# ------------------------------------------------------------------------------ committed generations
def _parse_marker(data: bytes, where: str) -> dict:
    try:
        marker = json.loads(data)
    except ValueError as e:
        raise StorageError(f"{where}: not a valid {COMMIT_MARKER} marker ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        raise StorageError(f"{where}: not a valid {COMMIT_MARKER} marker (no 'files' mapping)")
    return marker


def _marker_at(fs, folder: str) -> dict | None:
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


def _root_of(marker: dict, uri: str) -> str:
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


def _committed_keys(marker: dict, uri: str) -> dict[str, str]:
    """{file as the marker names it: its object key under the prefix} (`gen-.../file` after an S3 overwrite)."""
    root = _root_of(marker, uri)
    return {rel: f"{root}/{rel}" if root else rel for rel in _marker_files(marker, uri)}


def _new_generation() -> str:
    """A fresh generation folder name (matches GENERATION; never collides with an earlier one)."""
    return f"gen-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def committed_root(uri: str, marker: dict | None = None) -> str:
    """The folder holding the committed files of published folder `uri`: `uri` itself, or `uri/gen-...` after an
    S3 overwrite. StorageError when `uri` is not committed."""
    uri = normalize(uri)
    if marker is None:
        marker = require_committed(uri)
    root = _root_of(marker, uri)
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


def _stage(stage: str, dest: str) -> None:
    for hook in PUBLISH_HOOKS:
        hook(stage, dest)


def remove_orphans(uri: str, marker: dict | None = None) -> list[str]:
    """Delete what crashed S3 overwrites left under a committed prefix: generation folders (`gen-*`) the marker
    does not commit (an upload that never switched) and files the marker lists as `retired` (a switch whose
    deletions did not finish). Nothing else is touched (other objects may belong to someone else); a prefix
    without a marker is left alone. Returns the URIs removed. Local folders have no orphans (an overwrite is
    one rename)."""
    uri = normalize(uri)
    if not is_s3(uri):
        return []
    marker = marker if marker is not None else read_marker(uri)
    if marker is None:
        return []
    root = _root_of(marker, uri)
    retired = set()
    for key in marker.get("retired") or []:
        safe_relpath(key, uri)
        retired.add(key)
    fs, prefix, entries = _listing(uri)
    live = set(_committed_keys(marker, uri).values()) | {COMMIT_MARKER}
    orphans = sorted(k for k in entries if k not in live and (
        k in retired or (GENERATION.match(k.split("/", 1)[0]) and k.split("/", 1)[0] != root and "/" in k)))
    if orphans:
        fs.rm([f"{prefix}/{k}" for k in orphans])
        log.warning("%s: removed %d objects left by an interrupted overwrite", uri, len(orphans))
    return [f"{uri}/{k}" for k in orphans]


def _publish_s3(staging: str, dest: str, marker: dict, overwrite: bool) -> None:
    """Upload a staged folder to an S3 prefix. Fresh prefix: files at their names, marker last. Overwrite of a
    committed prefix: new files under a fresh generation folder, ONE PUT of the marker switches readers to it,
    then the old files (listed in the new marker as `retired`) are deleted; a crash at any point leaves the old
    or the new dataset committed, and what it leaves behind is removed by `remove_orphans`."""
    fs, path = fsspec_fs(dest)
    path = path.rstrip("/")
    marker_uri = join(dest, COMMIT_MARKER)
    current = read_marker(dest)
    if current is None:
        if overwrite and fs.exists(path):
            fs.rm(path, recursive=True)  # not committed: nothing there that a reader may use
        upload_dir(staging, dest)
        _stage("uploaded", dest)
        write_json(marker_uri, marker)  # last: the prefix is complete once this exists
        _stage("done", dest)
        return
    if not overwrite:
        raise StorageError(f"{dest}: already published (pass overwrite=True or choose a fresh location)")
    remove_orphans(dest, current)
    _stage("orphans_removed", dest)
    gen = _new_generation()
    upload_dir(staging, join(dest, gen))
    _stage("uploaded", dest)
    retired = list(_committed_keys(current, dest).values())
    write_json(marker_uri, {**marker, "root": gen, "retired": retired})  # the switch: one atomic PUT
    _stage("switched", dest)
    keys = [f"{path}/{k}" for k in retired]
    half = len(keys) // 2
    for i, chunk in enumerate((keys[:half], keys[half:])):
        if chunk:
            fs.rm(chunk)
        if i == 0:
            _stage("retiring", dest)
    _stage("done", dest)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # e.g. EINVAL on a filesystem without exchange: the caller falls back


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


def remove_tree(uri: str) -> None:
    """Remove a local folder or every object under an s3:// prefix (missing: nothing to do)."""
    uri = normalize(uri)
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = fsspec_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


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
        remove_orphans(dest, current)
    root = "" if current is None and not fs.exists(path) else _new_generation()
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
                retired = list(_committed_keys(current, dest).values())
                marker["retired"] = retired
        write_json(join(dest, COMMIT_MARKER), marker)  # last: the switch (or the commit), one PUT
        if retired:
            fs.rm([f"{path}/{k}" for k in retired])
    except BaseException:
        if not exists(join(dest, COMMIT_MARKER)) or read_marker(dest) == current:
            remove_tree(staging)
        raise


@contextlib.contextmanager
def publish_dir(dest: str, overwrite: bool = False, shared: bool = False) -> Iterator[str]:
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
    """
    from longctx import cleanup

    dest = normalize(dest)
    recover_overwrite(dest)
    if exists(join(dest, COMMIT_MARKER)) and not overwrite:
        raise StorageError(f"{dest}: already published (pass overwrite=True or choose a fresh location)")
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
        marker = _manifest_of(staging)
        if is_s3(dest):
            _publish_s3(staging, dest, marker, overwrite)
        else:
            with open(os.path.join(staging, COMMIT_MARKER), "w") as f:
                json.dump(marker, f, indent=2)
            if os.path.exists(dest):
                if not overwrite:
                    raise StorageError(f"{dest}: exists but is not a committed output; remove it or choose another path")
                if not _exchange(staging, dest):  # staging now holds the old copy and is removed below
                    trash = dest.rstrip("/") + f".old-{uuid.uuid4().hex[:8]}"
                    os.replace(dest, trash)
                    os.replace(staging, dest)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, dest)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _private_group(gid: int) -> bool:
    """A user-private group (named like this user, no other members; umask 002 systems): group-writable is fine."""
    try:
        import grp
        import pwd

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
        if st.st_mode & 0o020 and not _private_group(st.st_gid):
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


def is_committed(uri: str) -> bool:
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
    _root_of(marker, normalize(uri))
    return marker
