"""What the tool wrote outside an output from its rows: reports, and datasets. Each export is recorded in the output
as ``OUTPUT/_exports/<id>.json`` (``kind``, ``uri``, ``users``, ``created``), so that ``plvm forget`` finds every
copy of a person's name and face that the tool made, and removes it (a report or dataset is made again from the
output afterwards). A command that writes photos, crops or names of an output's rows anywhere records it here with
:func:`record`; the record holds no name.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass

from plvm_model.store import storage
from plvm_model.store.ids import key_of

FOLDER = "_exports"


@dataclass(frozen=True)
class Export:
    kind: str
    """``report``, ``dataset``, ..."""
    uri: str
    """The folder (or file) written."""
    users: list[str]
    """The users whose rows it shows."""
    created: float


def record(output_uri: str, storage_options: storage.StorageOptions | None, kind: str, uri: str,
           users: list[str]) -> None:  # fmt: skip
    """Record that ``uri`` holds an export of ``kind`` made from ``users``' rows of the output ``output_uri``."""
    fs, root = storage.filesystem(output_uri, storage_options)
    export = Export(kind, uri, sorted(set(users)), time.time())
    path = posixpath.join(root, FOLDER, f"{kind}-{key_of(uri)}.json")
    storage.write_atomic(fs, path, json.dumps(asdict(export), indent=1).encode())


def exports(output_uri: str, storage_options: storage.StorageOptions | None = None) -> dict[str, Export]:
    """The exports recorded in ``output_uri``: record path -> export."""
    fs, root = storage.filesystem(output_uri, storage_options)
    folder = posixpath.join(root, FOLDER)
    if not fs.exists(folder):
        return {}
    return {path: Export(**json.loads(fs.cat_file(path))) for path in sorted(fs.glob(posixpath.join(folder, "*.json")))}


def remove(output_uri: str, storage_options: storage.StorageOptions | None, user: str) -> list[str]:
    """Remove every recorded export that shows ``user``'s rows, and its record; the URIs removed."""
    fs, _ = storage.filesystem(output_uri, storage_options)
    removed = []
    for path, export in exports(output_uri, storage_options).items():
        if user not in export.users:
            continue
        target_fs, target = storage.filesystem(export.uri, storage_options)
        if target_fs.exists(target):
            target_fs.rm(target, recursive=True)
        fs.rm(path)
        removed.append(export.uri)
    return removed
