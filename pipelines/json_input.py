"""A JSON file given on the command line (VQA questions, training captions, caption truth), read with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plvm_model.store.errors import InputError, InputNotFound, PlvmError


def read_json_file(path: str | Path, what: str, invalid: type[PlvmError] = InputError) -> Any:
    """The JSON value in ``path``; :class:`InputNotFound` if it does not exist, ``invalid`` if it is not JSON
    (both naming it as ``what``, e.g. "captions file")."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputNotFound(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"{what} {path} is not valid JSON: {error}") from None
