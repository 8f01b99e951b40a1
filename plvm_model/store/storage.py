"""Files at any fsspec URI (local paths, ``s3://``, ``gs://``, ...), with per-scheme options.

Options come from the config's ``storage`` section, e.g. ``{"s3": {"endpoint_url": ...,
"key": ..., "secret": ...}}``; credentials left out are found by the filesystem's own
chain (environment, profile, instance metadata).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from plvm_model.store.errors import ConfigError, InputError, InputNotFound, PlvmError

StorageOptions = dict[str, dict[str, Any]]


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    return url_to_fs(uri, **(options or {}).get(scheme(uri), {}))


_OBJECT_STORE_KEYS = {"endpoint_url": "AWS_ENDPOINT_URL", "key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
                      "token": "AWS_SESSION_TOKEN"}  # fmt: skip


def object_store_options(uri: str, options: StorageOptions | None = None) -> dict[str, str]:
    """The config's fsspec options for ``uri`` as the ``deltalake`` package (Rust's object_store) takes them.

    Only S3's are translated (``endpoint_url``, ``key``, ``secret``, ``token``, ``client_kwargs.region_name``); an
    option it cannot take is a :class:`ConfigError` naming it, never dropped. Renames need no locking provider
    (``AWS_S3_ALLOW_UNSAFE_RENAME``): one process at a time writes an output, the holder of its lease.
    """
    given = dict((options or {}).get(scheme(uri), {}))
    if scheme(uri) == "file":
        return {}
    if scheme(uri) not in ("s3", "s3a"):
        raise ConfigError(f"an output on {scheme(uri)} cannot be written as a Delta table here (local disks and S3 can)")
    out = {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    client = dict(given.pop("client_kwargs", {}))
    if "region_name" in client:
        out["AWS_REGION"] = str(client.pop("region_name"))
    given |= {f"client_kwargs.{k}": v for k, v in client.items()}
    for key, value in given.items():
        if key not in _OBJECT_STORE_KEYS:
            raise ConfigError(f"storage.{scheme(uri)}.{key}: not an option the output's Delta log writer takes "
                              f"(it takes {', '.join(_OBJECT_STORE_KEYS)} and client_kwargs.region_name)")  # fmt: skip
        out[_OBJECT_STORE_KEYS[key]] = str(value)
    if out.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"
    return out


def gone(uris: list[str], options: StorageOptions | None = None) -> set[str]:
    """Those of ``uris`` (files) that do not exist: one listing per folder, a request per object store prefix
    rather than per file; where folders cannot be listed (http), a request per file."""
    folders: dict[str, list[str]] = {}
    for uri in uris:
        folders.setdefault(posixpath.dirname(uri), []).append(uri)
    missing = set()
    for folder, members in folders.items():
        fs, where = filesystem(folder, options)
        if scheme(folder) in ("http", "https"):
            missing |= {uri for uri in members if not fs.exists(filesystem(uri, options)[1])}
            continue
        try:
            present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(where, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing |= {uri for uri in members if posixpath.basename(uri) not in present}
    return missing


def join(uri: str, *parts: str) -> str:
    """``uri`` with path segments appended (``/``-separated for every scheme)."""
    if "://" in uri:
        head, path = uri.split("://", 1)
        return f"{head}://{posixpath.join(path, *parts)}"
    return posixpath.join(uri, *parts)


def unstrip(uri: str, path: str) -> str:
    """A path returned by a filesystem call, with ``uri``'s scheme put back for use as a URI."""
    return f"{scheme(uri)}://{path}" if "://" in uri else path


def normalize(uri: str) -> str:
    """The one spelling of a path or URI a user gave, so that a file has one name: ``.`` and ``..`` resolved.

    A local path (or ``file://`` URI) is made absolute, from the current directory: folder and
    glob listings are absolute already (fsspec's local filesystem makes them so), Ray workers
    read the paths from another current directory, and the output keeps them for readers
    anywhere. ``..`` is resolved as the operating system resolves it (after a symlinked folder,
    it is the parent of the link's target), so the result names the file the spelling named;
    repeated ``/`` are one. Other URIs keep their scheme and bucket, and their path loses its
    dot segments as RFC 3986 removes them (``s3://b/a/../c.jpg`` is ``s3://b/c.jpg``; nothing
    climbs above the bucket); repeated ``/`` stay, as ``a//b`` and ``a/b`` are different keys
    in an object store. (An object whose key has a ``.`` or ``..`` segment can be listed, since
    listings come from the store, but not named this way.)
    """
    if "://" not in uri:
        return _local_path(uri)
    head, rest = uri.split("://", 1)
    if head == "file":
        return f"file://{_local_path(rest)}"
    bucket, slash, path = rest.partition("/")
    return f"{head}://{bucket}{slash}{_remove_dot_segments(path)}"


def _local_path(path: str) -> str:
    resolved = "/" if path.startswith("/") else os.getcwd()
    for part in path.split("/"):
        if part == "..":
            resolved = posixpath.dirname(os.path.realpath(resolved))
        elif part not in ("", "."):
            resolved = posixpath.join(resolved, part)
    return resolved


def _remove_dot_segments(path: str) -> str:
    kept: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    return "/".join(kept)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part.

    The bytes go to a temporary sibling first, then take the final name (a rename on local
    disks; on object stores an object appears whole when its upload completes).
    """
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if no file has that name yet; False (nothing written) if one has.

    Of several writers racing to create the same name, exactly one wins, and readers see the
    file whole or not at all: on local disks the bytes go to a temporary sibling that is then
    hard-linked to ``path`` (``link`` fails if the name exists); on S3 a conditional put
    (``If-None-Match: *``). A filesystem with neither refuses the ``x`` mode, so the guarantee
    is never silently lost.
    """
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def read_json_file(path: str | Path, what: str, invalid: type[PlvmError] = InputError) -> Any:
    """The JSON value in ``path``; :class:`InputNotFound` if it does not exist, ``invalid`` if it is not JSON
    (both naming it as ``what``, e.g. "captions file")."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputNotFound(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"{what} {path} is not valid JSON: {error}") from None
