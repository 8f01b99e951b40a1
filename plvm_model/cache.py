"""The local cache of built models (tiny test models, vLLM's text-only exports)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$PLVM_CACHE``, else ``~/.cache/plvm``."""
    return Path(os.environ.get("PLVM_CACHE", Path.home() / ".cache" / "plvm")).expanduser()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(folder)`` unless already complete.

    The build goes to a temporary sibling folder that is renamed at the end, so concurrent
    builders (several Ray workers on one machine) never see half a model.
    """
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
