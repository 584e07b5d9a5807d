"""One owner per run: a lease file with the driver's host, pid and heartbeat, and appends that lose no line.

    lease = Lease.acquire("runs/long-pt-3f9c1a2b7e", run_id="long-pt-3f9c1a2b7e")   # RunInUse if a live driver
    ...                                                                                # holds it
    lease.release()
    append_line("runs/long-pt-3f9c1a2b7e/attempts.jsonl", '{"event": "started"}')

A lease (`lease.json`) is live while its driver's heartbeat is fresh (written every `HEARTBEAT_S` by a daemon
thread) and, on the same host, while its pid exists. A second driver is refused while the lease is live; a stale
lease (its pid gone, or no heartbeat for `STALE_AFTER_S`) is taken over with a message. The driver that holds a
lease may open the run again (a rerun inside one process is the same owner).

Local folders: the read-decide-write of `acquire` runs under an exclusive `flock` on the run folder, and appends
are one `write()` of the whole line on an `O_APPEND` descriptor, also under `flock`: two processes appending at
once lose nothing. Object storage (s3://) has neither appends nor locks: an append rewrites the object, and a
takeover is a plain overwrite read back once to see who won. There the lease is what keeps writes single: only
the driver that holds it writes the run's files (sub-runs of a study or sweep are written by their parent's
driver or by the one Tune process of their trial).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from longctx import storage
from longctx.config import ConfigError

log = logging.getLogger("longctx")

LEASE_FILE = "lease.json"
HEARTBEAT_S = 10.0
"""How often the holder rewrites its heartbeat."""
STALE_AFTER_S = 60.0
"""A lease whose heartbeat is older than this is stale (the only test across hosts, where a pid means nothing)."""


class RunInUse(ConfigError):
    """Another live driver holds the run's lease; the message names its host, pid and last heartbeat."""


@contextlib.contextmanager
def _local_lock(folder: str):
    """An exclusive flock on the folder itself (local folders; a no-op on s3://): no lock file is left behind."""
    if storage.is_s3(folder):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def append_line(uri: str, line: str) -> None:
    """Append one line to a text file: atomic locally (one write on O_APPEND under flock), a rewrite on s3://
    (single writer: the lease holder)."""
    uri = storage.normalize(uri)
    data = (line.rstrip("\n") + "\n").encode()
    if storage.is_s3(uri):
        old = storage.read_bytes(uri) if storage.exists(uri) else b""
        storage.write_bytes(uri, old + data)
        return
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    fd = os.open(uri, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(uri: str) -> dict | None:
    try:
        rec = json.loads(storage.read_text(uri))
    except (storage.StorageNotFound, FileNotFoundError):
        return None
    except ValueError:  # a torn lease file (its writer died mid-write): nobody holds it
        return {}
    return rec if isinstance(rec, dict) else {}


def holder_state(rec: dict, now: float | None = None) -> str:
    """'mine' (this process), 'live' (another driver) or 'stale' (free to take over) for a lease record."""
    now = time.time() if now is None else now
    host, pid = rec.get("host"), rec.get("pid")
    if host == socket.gethostname() and pid == os.getpid():
        return "mine"
    age = now - float(rec.get("heartbeat") or 0)
    if age > STALE_AFTER_S:
        return "stale"
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return "stale"
    return "live" if rec else "stale"


_HELD: dict[str, "Lease"] = {}
"""Leases this process holds, by folder: opening a run again in the same process shares its lease."""


class Lease:
    """The lease of one folder, held by this process; `release` ends it (after as many releases as acquires)."""

    def __init__(self, folder: str, record: dict):
        self.folder = storage.normalize(folder)
        self.uri = storage.join(self.folder, LEASE_FILE)
        self.record = record
        self.holders = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, folder: str, run_id: str) -> "Lease":
        """Take the folder's lease: refuse (RunInUse) while another driver's is live, take over a stale one with
        a message, start the heartbeat."""
        folder = storage.normalize(folder)
        held = _HELD.get(folder)
        if held is not None and not held._stop.is_set():
            held.holders += 1
            return held
        uri = storage.join(folder, LEASE_FILE)
        now = time.time()
        record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "owner": uuid.uuid4().hex,
                  "started": round(now, 3), "heartbeat": round(now, 3)}
        with _local_lock(folder):
            old = _read(uri)
            state = holder_state(old, now) if old is not None else None
            if state == "live":
                raise RunInUse(
                    f"{folder} is in use by another driver (host {old.get('host')}, pid {old.get('pid')}, heartbeat "
                    f"{now - float(old.get('heartbeat') or 0):.0f}s ago): two drivers would write the same run. Wait "
                    f"for it to end or stop it; a lease without a heartbeat for {STALE_AFTER_S:.0f}s is taken over")
            if state == "stale" and old:
                age = now - float(old.get("heartbeat") or 0)
                print(f"[longctx] taking over the stale lease of {folder} (host {old.get('host')}, pid "
                      f"{old.get('pid')}, last heartbeat {age:.0f}s ago)", flush=True)
            storage.write_text(uri, json.dumps(record))
        if storage.is_s3(folder):  # no lock on object storage: read back once to see whose write won
            time.sleep(0.2)
            won = _read(uri) or {}
            if won.get("owner") != record["owner"]:
                raise RunInUse(f"{folder}: another driver (host {won.get('host')}, pid {won.get('pid')}) took the "
                               f"run's lease at the same moment")
        lease = _HELD[folder] = cls(folder, record)
        lease._start()
        return lease

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="longctx-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with _local_lock(self.folder):
                    current = _read(self.uri)
                    if not current or current.get("owner") != self.record["owner"]:
                        current = current or {}
                        log.warning("%s: the run's lease was taken over by host %s pid %s; this driver no longer "
                                    "owns the run", self.folder, current.get("host"), current.get("pid"))
                        return
                    self.record["heartbeat"] = round(time.time(), 3)
                    storage.write_text(self.uri, json.dumps(self.record))
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried; only staleness follows from it
                log.warning("%s: lease heartbeat failed (%s)", self.folder, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this driver's."""
        self.holders -= 1
        if self.holders > 0 or self._stop.is_set():
            return
        self._stop.set()
        if _HELD.get(self.folder) is self:
            del _HELD[self.folder]
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with _local_lock(self.folder):
            current = _read(self.uri)
            if current and current.get("owner") == self.record["owner"]:
                _remove(self.uri)


def _remove(uri: str) -> None:
    if storage.is_s3(uri):
        fs, path = storage.fsspec_fs(uri)
        fs.rm_file(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)
