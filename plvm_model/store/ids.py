"""The identifiers of stored state: user ids (safe path segments), run ids, and the key of a batch of photos."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


def validate_user_id(user_id: str) -> str:
    """``user_id`` if it is safe as one path segment: letters, digits, ``_ . @ -``, at most 128."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id) or ".." in user_id:
        raise ValueError(
            f"invalid user id {user_id!r}: use 1-128 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return user_id


def new_run_id() -> str:
    """A run's id: its start time (UTC, so ids sort by age) and a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def key_of(text: str) -> str:
    """A short stable key of ``text``: the first 20 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def batch_key(positions: Iterable[int]) -> str:
    """The key of a batch of photos by their input positions (the listing's ``index``), whatever their order: the
    part a batch writes is named by it, so a batch that Ray retries writes the same part again, never a copy."""
    return key_of(",".join(map(str, sorted(positions))))
