"""Retrying IO of one object: reads that survive outages (`retry_io`, `RetryingReader`), atomic writes, checksums.

A transient failure of the medium (a reset connection, a timeout, EIO, throttling) is retried with doubling
backoff, each retry logged (`storage.read_retries` / `retry_*`); a missing object, a permission error or a local
path that is not a regular file is not (the caller decides: quarantine or fail). A local write lands in a temp
file renamed into place; an S3 object is atomic already.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import stat
import tempfile
import time

from longctx.storage.uri import StorageError, StorageNotFound, StorageOptions, fsspec_fs, is_s3, normalize, options

log = logging.getLogger(__name__)


class StorageIOError(StorageError):
    """Reading an object kept failing after every retry (an outage, not bad data); the message names it."""


class NotARegularFile(OSError):
    """A local corpus path is a FIFO, device, socket or folder: never opened for reading (it could block or
    never end, like a link to /dev/zero)."""


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
