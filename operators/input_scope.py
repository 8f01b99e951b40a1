"""Which URIs a run may read as photos: the allowed roots (``input.allowed``) and the folders never read.

Every URI is compared in its normalised spelling (``storage.normalize``), with its scheme: a
local path and its ``file://`` URI are one place, ``..`` is resolved before the comparison, and
``s3://b/x`` is never ``/b/x``. A root holds itself and what lies below it at a path-segment
boundary: ``/data/photos`` holds ``/data/photos/a.jpg`` but not ``/data/photos2/a.jpg``. An
``http(s)`` URL is compared without its query and fragment, and must lie inside a root both as
written and percent-decoded (a server may decode ``%2e%2e`` to ``..``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from plvm_model import storage


def _places(uri: str) -> list[str]:
    """``uri`` as the place or places it may name: ``scheme://path``, normalised (an http(s) URL twice)."""
    kind = storage.scheme(uri).lower()
    if kind in ("http", "https"):
        parts = urlsplit(uri)
        base = f"{kind}://{parts.netloc.lower()}"
        return [storage.normalize(f"{base}/{path.lstrip('/')}") for path in (parts.path, unquote(parts.path))]
    uri = storage.normalize(uri)
    return [f"{kind}://{uri.split('://', 1)[1] if '://' in uri else uri}"]


def within(uri: str, root: str) -> bool:
    """Whether ``uri`` is ``root`` or lies below it (see the module's docstring)."""
    folder = _places(root)[0]  # a root is taken as written
    prefix = folder if folder.endswith("/") else f"{folder}/"
    return all(place == folder or place.startswith(prefix) for place in _places(uri))


@dataclass(frozen=True)
class InputScope:
    """The roots a run's photos must lie in, and the folders (the output's) that are never input."""

    roots: tuple[str, ...]
    origin: str
    """Where the roots come from, for messages: ``input.allowed``, or the default that stood in for it."""
    never: tuple[str, ...] = ()

    def excluded(self, uri: str) -> str | None:
        """The folder of :attr:`never` that holds ``uri``, if one does."""
        return next((folder for folder in self.never if within(uri, folder)), None)

    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` may not be read, or None if it may."""
        folder = self.excluded(uri)
        if folder is not None:
            return f"{uri} is inside the output folder {folder}, which is never input"
        if any(within(uri, root) for root in self.roots):
            return None
        return f"{uri} is outside the allowed inputs [{', '.join(self.roots)}] ({self.origin})"
