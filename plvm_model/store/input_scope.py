"""Which URIs a run may read as photos: the allowed roots (``input.allowed``) and the folders never read.

Every URI is compared in its normalised spelling (``storage.normalize``), with its scheme: a
local path and its ``file://`` URI are one place, ``..`` is resolved before the comparison, and
``s3://b/x`` is never ``/b/x``. A root holds itself and what lies below it at a path-segment
boundary: ``/data/photos`` holds ``/data/photos/a.jpg`` but not ``/data/photos2/a.jpg``. An
``http(s)`` URL is compared without its query and fragment, and must lie inside a root both as
written and as a lenient server reads it (percent-decoded, a backslash as ``/``: ``%2e%2e`` is ``..``).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from plvm_model.store import storage


def _places(uri: str) -> list[str]:
    """``uri`` as the place or places it may name: ``scheme://path``, normalised (an http(s) URL twice)."""
    kind = storage.scheme(uri).lower()
    if kind in ("http", "https"):
        parts = urlsplit(uri)
        base = f"{kind}://{parts.netloc.lower()}"
        decoded = unquote(parts.path).replace("\\", "/")  # as a lenient server reads it
        return [storage.normalize(f"{base}/{path.lstrip('/')}") for path in (parts.path, decoded)]
    uri = storage.normalize(uri)
    return [f"{kind}://{uri.split('://', 1)[1] if '://' in uri else uri}"]


def _holder(folders: tuple[tuple[str, str], ...], places: list[str]) -> str | None:
    """The first of ``folders`` ((as given, place) pairs) that holds every one of ``places``, as given."""
    for given, folder in folders:
        prefix = folder if folder.endswith("/") else f"{folder}/"
        if all(place == folder or place.startswith(prefix) for place in places):
            return given
    return None


class InputScope:
    """The roots a run's photos must lie in (each holds itself and what lies below it), and the folders (the
    output's) that are never input; ``origin`` says where the roots come from, for messages."""

    def __init__(self, roots: tuple[str, ...], origin: str, never: tuple[str, ...] = ()) -> None:
        self.roots, self.origin = roots, origin
        self._roots = tuple((root, _places(root)[0]) for root in roots)  # a root is taken as written
        self._never = tuple((folder, _places(folder)[0]) for folder in never)

    def excluded(self, uri: str) -> str | None:
        """The folder that is never input and holds ``uri``, if one does."""
        return _holder(self._never, _places(uri))

    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` may not be read, or None if it may."""
        places = _places(uri)
        folder = _holder(self._never, places)
        if folder is not None:
            return f"{uri} is inside the output folder {folder}, which is never input"
        if _holder(self._roots, places) is not None:
            return None
        return f"{uri} is outside the allowed inputs [{', '.join(self.roots)}] ({self.origin})"
