"""A dataset folder being built: its plan, the shards committed so far, and the files that make it complete.

A build (``plvm dataset``) holds the folder's lease (``plvm_model.store.lease``, as a caption run holds its
output's) and works in ``_build/``:

- ``_build/plan.json``: what the build makes (its source table's version, users, options); a resumed build must
  have the same plan;
- ``_build/staging/<key>.<n>/``: what a shard's task wrote, not yet in the dataset;
- ``_build/done/<key>.json``: a shard the driver committed: its files were moved into place (the ``hf`` parts to
  their names, the JSON formats' records to ``_build/fragments/``), then this record was written. A shard without
  its record is done again, and its files take the same names: nothing is written twice.

The photos, crops and the PLVM layout's copies are named by their content and written whole (a temporary sibling,
renamed) by the tasks themselves. At the end the JSON lists are assembled from the fragments, shard by shard in
the source's order, and ``manifest.json`` is written last: a folder without it is not a complete dataset.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from plvm_model.store import storage
from plvm_model.store.lease import LEASE, Lease, ensure_held

BUILD = "_build"
MANIFEST = "manifest.json"
CARD = "README.md"
_LEASE_FILES = (LEASE, "_lease.lock")


@dataclass(frozen=True)
class Shard:
    """What a shard's task wrote: its key, its staging folder, the files there (paths in the dataset), the photos it
    read and the stages' counts."""

    shard: str
    staged: str
    files: list[str]
    rows: int
    stats: list[tuple[str, float]] | None = None


class DatasetFolder:
    """The dataset folder ``uri`` (a local path or an fsspec URI)."""

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.fs, self.root = storage.filesystem(uri, storage_options)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def lease(self, run_id: str, expiry_s: float) -> Lease:
        return Lease.take(self.fs, self.root, self.uri, run_id, "dataset", expiry_s)

    def state(self) -> str:
        """``empty`` (or absent), ``complete`` (it has a manifest), ``building`` (a build's plan, no manifest), or
        ``foreign``: files that no build wrote."""
        if not self.fs.exists(self.root):
            return "empty"
        if self.fs.exists(self.path(MANIFEST)):
            return "complete"
        if self.fs.exists(self.path(f"{BUILD}/plan.json")):
            return "building"
        names = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}
        return "empty" if names <= set(_LEASE_FILES) else "foreign"

    def clear(self) -> None:
        """Remove the dataset (``--overwrite``); the lease stays."""
        for path in self.fs.ls(self.root, detail=False):
            if posixpath.basename(path.rstrip("/")) not in _LEASE_FILES:
                self.fs.rm(path, recursive=True)

    def read_json(self, relative: str):
        try:
            return json.loads(self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            return None

    def write(self, relative: str, data: bytes) -> None:
        """Write a file of the dataset whole (readers see it complete or not at all)."""
        storage.write_atomic(self.fs, self.path(relative), data)

    def write_json(self, relative: str, value) -> None:
        self.write(relative, json.dumps(value, indent=1).encode())

    def plan(self) -> dict | None:
        return self.read_json(f"{BUILD}/plan.json")

    def set_plan(self, plan: dict) -> None:
        self.write_json(f"{BUILD}/plan.json", plan)

    def done(self) -> dict[str, dict]:
        """The committed shards' records, by key."""
        folder = self.path(f"{BUILD}/done")
        if not self.fs.exists(folder):
            return {}
        records = {}
        for path in self.fs.ls(folder, detail=False):
            if path.endswith(".json"):
                record = json.loads(self.fs.cat_file(path))
                records[record["shard"]] = record
        return records

    def staging(self, key: str, attempt: str) -> str:
        """Where a task stages shard ``key`` (``attempt``: unique to the try, so that two tries never mix)."""
        return self.path(f"{BUILD}/staging/{key}.{attempt}")

    def commit(self, shard: Shard, run_id: str, replaces: Iterable[str]) -> dict:
        """Move ``shard``'s staged files into place, then record it done; the record. ``replaces``: the files an
        earlier try of the shard may have moved into place without being recorded; they go first, so that no file
        of another try stays beside this one's."""
        ensure_held(self.fs, self.root, self.uri, run_id, f"shard {shard.shard}")
        for relative in replaces:
            if self.fs.exists(self.path(relative)):
                self.fs.rm(self.path(relative))
        for relative in shard.files:
            target = self.path(relative)
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.mv(posixpath.join(shard.staged, relative), target)
        record = asdict(shard) | {"staged": None}
        self.write_json(f"{BUILD}/done/{shard.shard}.json", record)
        return record

    def assemble(self, relative: str, fragments: Iterable[str]) -> int:
        """Write the JSON list ``relative`` from the JSON lines of ``fragments`` (in order), one at a time; the
        records written."""
        count = 0
        tmp = self.path(f"{BUILD}/{posixpath.basename(relative)}.tmp")
        with self.fs.open(tmp, "wb") as out:
            out.write(b"[")
            for name in fragments:
                for line in self.fs.cat_file(self.path(name)).splitlines():
                    if line.strip():
                        out.write((b",\n" if count else b"\n") + line)
                        count += 1
            out.write(b"\n]\n")
        self.fs.mv(tmp, self.path(relative))
        return count

    def finish(self, manifest: dict, card: str) -> None:
        """Make the dataset complete: the card, then the manifest (last), then the build's own files go."""
        self.write(CARD, card.encode())
        self.write_json(MANIFEST, manifest)
        self.fs.rm(self.path(BUILD), recursive=True)
