"""Storage: one place that turns URIs into filesystems and publishes folders atomically; its public API.

Everything that reads or writes data, checkpoints or reports goes through `from longctx import storage;
storage.join(...)`. The package is split by concern, each module saying what it owns:

    uri.py       URIs and filesystems: local, file://, s3://, builtin:; the S3 endpoint; listings; exact-key deletes
    objects.py   retrying IO of one object: reads that survive outages, atomic writes, checksums
    commit.py    the `_COMMITTED` marker and what readers see through it (generations, committed listings)
    cache.py     the download cache: s3:// folders as local folders, reused while their listing holds
    publish.py   commit and publish: atomic publish of a staged folder, S3 overwrites, orphan removal

The dependencies run one way: uri <- objects <- commit <- cache, publish. Helpers one module lends another
(`commit.root_of`, `commit.committed_keys`, `publish.exchange`, ...) are public in their module and not
re-exported here.
"""

from longctx.storage.cache import CACHE_MANIFEST, cache_root, download_dir, local_dir
from longctx.storage.commit import (COMMIT_MARKER, GENERATION, committed_root, expand, is_committed, manifest_of,
                                    published_path, read_committed, read_marker, recover_overwrite, require_committed)
from longctx.storage.objects import (NotARegularFile, RetryingReader, StorageIOError, is_transient, read_bytes,
                                     read_text, retry_io, sha256_file, write_bytes, write_json, write_text)
from longctx.storage.publish import PUBLISH_HOOKS, check_destination, publish_dir, remove_orphans, upload_dir
from longctx.storage.uri import (StorageError, StorageNotFound, StorageOptions, assets_dir, configure, exists,
                                 fsspec_fs, is_s3, join, listing, normalize, options, private_group, pyarrow_fs,
                                 remove_tree, require_private, safe_relpath)

__all__ = [
    "CACHE_MANIFEST", "COMMIT_MARKER", "GENERATION", "PUBLISH_HOOKS", "NotARegularFile", "RetryingReader",
    "StorageError", "StorageIOError", "StorageNotFound", "StorageOptions", "assets_dir", "cache_root",
    "check_destination", "committed_root", "configure", "download_dir", "exists", "expand", "fsspec_fs",
    "is_committed", "is_s3", "is_transient", "join", "listing", "local_dir", "manifest_of", "normalize", "options",
    "private_group", "publish_dir", "published_path", "pyarrow_fs", "read_bytes", "read_committed", "read_marker",
    "read_text", "recover_overwrite", "remove_orphans", "remove_tree", "require_committed", "require_private",
    "retry_io", "safe_relpath", "sha256_file", "upload_dir", "write_bytes", "write_json", "write_text",
]
