"""Files at any fsspec URI (local paths, ``s3://``, ``gs://``, ...), with per-scheme options.

Options come from the config's ``storage`` section, e.g. ``{"s3": {"endpoint_url": ...,
"key": ..., "secret": ...}}``; credentials left out are found by the filesystem's own
chain (environment, profile, instance metadata).
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

StorageOptions = dict[str, dict[str, Any]]


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    return url_to_fs(uri, **(options or {}).get(scheme(uri), {}))


def join(uri: str, *parts: str) -> str:
    """``uri`` with path segments appended (``/``-separated for every scheme)."""
    if "://" in uri:
        head, path = uri.split("://", 1)
        return f"{head}://{posixpath.join(path, *parts)}"
    return posixpath.join(uri, *parts)


def unstrip(uri: str, path: str) -> str:
    """A path returned by a filesystem call, with ``uri``'s scheme put back for use as a URI."""
    return f"{scheme(uri)}://{path}" if "://" in uri else path


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
