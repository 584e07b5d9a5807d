"""Nothing left behind: work folders named after the process that owns them, and a sweep that removes the ones
whose owner is dead (a killed `prepare`, an OOM-killed worker).

Every temporary folder longctx creates (token caches, S3 publish staging, `.staging-*` next to a local output)
carries its owner in its name: `<prefix><pid>.<start time>-<random>`. The pid alone could be reused by another
process; the pair (pid, start time from /proc) cannot. `work_dir()` sweeps dead siblings before it creates a new
folder, so the next run cleans up after a killed one; `longctx data clean` does the same on demand.

    work = work_dir("tokens")            # <tmp>/longctx-tokens-<pid>.<start>-<rand>, dead siblings removed
    removed = remove_dead()              # what `longctx data clean` runs
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid

# longctx-tokens-/-stream-/-stats-/-publish- under the temp folder; .staging- next to a local output
WORK_PREFIXES = ("longctx-tokens-", "longctx-stream-", "longctx-stats-", "longctx-publish-")
STAGING_PREFIX = ".staging-"
_OWNER = re.compile(r"^(?P<prefix>.*?-)(?P<pid>\d+)\.(?P<start>\d+)-[0-9a-f]+$")


def start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot, /proc/PID/stat field 22); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        if not os.path.isdir("/proc"):  # no procfs (macOS): fall back to "is the pid alive"
            try:
                os.kill(pid, 0)
                return 0
            except ProcessLookupError:
                return None
            except PermissionError:
                return 0
        return None


def owner_tag() -> str:
    """`<pid>.<start time>` of this process."""
    pid = os.getpid()
    return f"{pid}.{start_time(pid) or 0}"


def owned_name(prefix: str) -> str:
    return f"{prefix}{owner_tag()}-{uuid.uuid4().hex[:8]}"


def is_dead(name: str) -> bool:
    """True when `name` is an owned folder name whose process no longer runs (other names: False, kept)."""
    m = _OWNER.match(name)
    if not m:
        return False
    start = start_time(int(m["pid"]))
    return start is None or (start != 0 and int(m["start"]) not in (0, start))


def remove_dead(folders: list[str] | None = None, prefixes: tuple[str, ...] = WORK_PREFIXES + (STAGING_PREFIX,)
                ) -> list[str]:
    """Remove folders of dead owners under `folders` (default: the temp folder); returns what was removed."""
    removed = []
    for folder in folders or [tempfile.gettempdir()]:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.startswith(prefixes) and is_dead(name) and os.path.isdir(path) and not os.path.islink(path):
                if os.stat(path).st_uid != os.getuid():
                    continue  # another user's: not ours to judge
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def work_dir(kind: str, parent: str | None = None) -> str:
    """A fresh private folder `<parent or tmp>/longctx-<kind>-<owner>-<rand>`, after removing dead siblings."""
    parent = parent or tempfile.gettempdir()
    prefix = f"longctx-{kind}-"
    remove_dead([parent], (prefix,))
    path = os.path.join(parent, owned_name(prefix))
    os.makedirs(path, mode=0o700)
    return path
