"""A lease on an output folder: one run (or repair) at a time writes into it.

The lease is ``OUTPUT/_lease.json``: the holder's run id, command, host, pid, start time,
last heartbeat and expiry. A run takes it before it looks at the output, refreshes the
heartbeat from a thread every quarter of the expiry, and removes it at its end (also when it
fails); a killed run leaves it to go stale. A lease is stale when its heartbeat is older
than its expiry, or when its holder ran on this host and its process is gone.

Every change is a compare-and-swap on the lease's version, so that of several processes
acting on the same lease exactly one succeeds:

- on S3 the version is the object's ETag: creating is a put with ``If-None-Match: *``,
  taking over, heartbeats and release are a put or delete with ``If-Match: <ETag>``;
- on local disks the version is the lease's bytes, and every read and change happens under
  an exclusive ``flock`` on ``OUTPUT/_lease.lock`` (held for the few milliseconds of one
  read-compare-write), the new bytes taking the name by an atomic rename.

A taker that finds a stale lease replaces exactly the version it judged stale; if another
taker was first, the version has changed and it looks again (and finds a live lease). A
holder whose heartbeat finds another version has lost the lease: :meth:`Lease.check` then
raises :class:`LeaseLost`, and the run stops instead of writing beside the new holder.
Heartbeat times are the holders' clocks: hosts that share an output need clocks that agree
to well within the expiry (NTP).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Protocol, Self

import fsspec

from plvm_model.store import storage
from plvm_model.store.errors import ConfigError, LeaseLost, OutputLocked

log = logging.getLogger(__name__)

LEASE = "_lease.json"
Version = bytes | str
"""What a compare-and-swap compares: the lease's bytes (local disk) or its ETag (S3)."""


@dataclass(frozen=True)
class Holder:
    """What a lease says about the process that holds it."""

    run_id: str
    command: str
    host: str
    pid: int
    started: float
    heartbeat: float
    expiry_s: float

    @classmethod
    def me(cls, run_id: str, command: str, expiry_s: float) -> Holder:
        now = time.time()
        return cls(run_id, command, socket.gethostname(), os.getpid(), now, now, expiry_s)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> Holder:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as error:
            raise OutputLocked(f"{where} is not a lease this program wrote ({error}): remove it if no run is "
                               "writing into the output") from error  # fmt: skip

    def stale(self) -> str | None:
        """Why the lease may be taken over, or None while its holder may still be at work."""
        age = time.time() - self.heartbeat
        if age > self.expiry_s:
            return f"its heartbeat is {age:.0f} s old, over its expiry of {self.expiry_s:g} s"
        if self.host == socket.gethostname() and not _running(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def __str__(self) -> str:
        return (f"run {self.run_id} (plvm {self.command}) on host {self.host}, pid {self.pid}, "
                f"heartbeat {time.time() - self.heartbeat:.0f} s ago")  # fmt: skip


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class LeaseFile(Protocol):
    """One lease object with versioned, race-free changes."""

    def read(self) -> tuple[bytes, Version] | None:
        """The lease's bytes and version, or None when there is none."""

    def create(self, data: bytes) -> Version | None:
        """Write the lease if there is none; its version, or None if one exists."""

    def replace(self, data: bytes, version: Version) -> Version | None:
        """Write the lease if it is still at ``version``; the new version, or None if it changed or is gone."""

    def delete(self, version: Version) -> bool:
        """Remove the lease if it is still at ``version``."""


class LocalLeaseFile:
    """A lease on a local (or POSIX-locking network) disk: every step under ``flock`` of a sibling lock file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.lock = posixpath.join(posixpath.dirname(path), "_lease.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, Version] | None:
        with self._locked():
            data = self._read()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> Version | None:
        with self._locked():
            if not storage.create_exclusive(self.fs, self.path, data):
                return None
        return data

    def replace(self, data: bytes, version: Version) -> Version | None:
        with self._locked():
            if self._read() != version:
                return None
            storage.write_atomic(self.fs, self.path, data)
        return data

    def delete(self, version: Version) -> bool:
        with self._locked():
            if self._read() != version:
                return False
            os.remove(self.path)
        return True


class S3LeaseFile:
    """A lease on S3 (or a store that honours ``If-Match`` and ``If-None-Match``): the ETag is the version."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, Version] | None:
        try:  # the ETag first: if the lease changes in between, a change conditioned on this ETag fails
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            return self.fs.cat_file(self.path), etag
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Version | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: Version) -> Version | None:
        return self._put(data, IfMatch=version)

    def _put(self, data: bytes, **condition: str) -> Version | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as error:
            if _condition_failed(error):
                return None
            raise

    def delete(self, version: Version) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as error:
            if _condition_failed(error):
                return False
            raise
        return True


def _condition_failed(error: OSError) -> bool:
    """Whether s3fs's error is a failed condition (412), a concurrent conditional write (409) or a missing key."""
    if isinstance(error, FileNotFoundError | FileExistsError):
        return True
    code = getattr(error.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def lease_file(fs: fsspec.AbstractFileSystem, path: str) -> LeaseFile:
    """The lease object at ``path`` on ``fs``; only filesystems with race-free changes are accepted."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        return LocalLeaseFile(fs, path)
    if protocols & {"s3", "s3a"}:
        return S3LeaseFile(fs, path)
    raise ConfigError(f"an output on {'/'.join(sorted(protocols))} cannot be leased (local disks and S3 can): "
                      "give output.uri on one of them")  # fmt: skip


class Lease:
    """A lease this process holds, kept fresh by a heartbeat thread until :meth:`release`.

    Use :meth:`take`, as a context manager: the lease is released when the block ends.
    """

    def __init__(self, file: LeaseFile, where: str, holder: Holder, version: Version) -> None:
        self.file, self.where, self.holder, self.version = file, where, holder, version
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {where}", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, fs: fsspec.AbstractFileSystem, root: str, uri: str, run_id: str, command: str,
             expiry_s: float) -> Lease:  # fmt: skip
        """The lease of the output folder ``root`` (``uri`` as the user named it) for ``run_id``.

        Raises :class:`OutputLocked` naming the holder when a live lease exists; takes over a stale one.
        """
        where = storage.join(uri, LEASE)
        file = lease_file(fs, posixpath.join(root, LEASE))
        for _ in range(10):  # each turn loses only to a taker that changed the lease in between
            mine = Holder.me(run_id, command, expiry_s)
            version = file.create(mine.encode())
            if version is not None:
                return cls(file, where, mine, version)
            found = file.read()
            if found is None:  # released in between: try again
                continue
            holder = Holder.decode(found[0], where)
            reason = holder.stale()
            if reason is None:
                raise OutputLocked(f"{uri} is being written by {holder}; wait for it to end, or if that "
                                   f"process is gone, for its lease to expire ({holder.expiry_s:g} s after its "
                                   f"last heartbeat), then run again")  # fmt: skip
            version = file.replace(mine.encode(), found[1])
            if version is not None:
                log.warning("took over the stale lease of %s: %s", uri, f"{holder}; {reason}")
                return cls(file, where, mine, version)
        raise OutputLocked(f"{uri}: could not take its lease, other runs keep changing {where}")

    def _beat(self) -> None:
        interval = self.holder.expiry_s / 4
        while not self._stop.wait(interval):
            beat = replace(self.holder, heartbeat=time.time())
            try:
                version = self.file.replace(beat.encode(), self.version)
            except OSError as error:  # the store did not answer: try again until the lease would expire
                if time.time() - self.holder.heartbeat > self.holder.expiry_s:
                    self.lost = f"its heartbeat could not be written for {self.holder.expiry_s:g} s ({error})"
                    return
                log.warning("heartbeat of %s failed, trying again: %s", self.where, error)
                continue
            if version is None:
                found = self.file.read()
                try:
                    now = "nobody" if found is None else str(Holder.decode(found[0], self.where))
                except OutputLocked as error:
                    now = str(error)
                self.lost = f"another process changed it; it is now held by {now}"
                return
            self.holder, self.version = beat, version

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the heartbeat found the lease taken by another process."""
        if self.lost is not None:
            raise LeaseLost(f"run {self.holder.run_id} lost the lease {self.where}: {self.lost}; it stops writing "
                            "(check the output with plvm repair once the other run has ended)")  # fmt: skip

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (unless it was lost: then it is another's)."""
        self._stop.set()
        self._thread.join()
        if self.lost is None and not self.file.delete(self.version):
            log.warning("the lease %s was changed by another process before this run released it", self.where)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_by(fs: fsspec.AbstractFileSystem, root: str, run_id: str) -> bool:
    """Whether the lease of the output folder ``root`` names ``run_id``."""
    found = lease_file(fs, posixpath.join(root, LEASE)).read()
    return found is not None and json.loads(found[0]).get("run_id") == run_id


def ensure_held(fs: fsspec.AbstractFileSystem, root: str, uri: str, run_id: str, what: str) -> None:
    """Raise :class:`LeaseLost` unless ``run_id`` holds the lease of the output folder ``root`` (``uri``): the check
    before ``what`` (a part of the output or of the face index) is committed, so that a run whose lease was taken
    over commits nothing beside the new holder."""
    if not held_by(fs, root, run_id):
        raise LeaseLost(f"run {run_id} no longer holds the lease of {uri}; {what} not committed")
