"""The output's row format: its columns and their types, the kinds of row error, and the exception that carries
one.

Every output part of a caption run (``plvm_model.store.output_table``) has :func:`output_schema`. A row whose
``error`` is set names the photo or manifest row and has one of the :class:`ErrorKind` values in ``error_kind``.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

FACE_OUTPUT = [
    pa.field("box", pa.list_(pa.float32(), 4)),
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),
    pa.field("concept", pa.string()),
    pa.field("concept_id", pa.string()),
    pa.field("distance", pa.float32()),
    pa.field("relative_distance", pa.float32()),
]
"""A face of an output row: box (x1, y1, x2, y2) and landmarks in pixels of the upright photo, and its name."""
EMBEDDING = pa.field("embedding", pa.list_(pa.float32()))
"""A face's descriptor (in the output only with ``output.face_embeddings``)."""
ANSWER = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])

OUTPUT_TYPES: dict[str, pa.DataType] = {
    "path": pa.string(),
    "user_id": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "faces": pa.list_(pa.struct(FACE_OUTPUT)),
    "concepts": pa.list_(pa.string()),
    "caption": pa.string(),
    "answers": pa.list_(ANSWER),
    "model": pa.string(),
    "engine": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}
"""The columns of the output files, in order, with their types."""
OUTPUT = tuple(OUTPUT_TYPES)


def output_schema(face_embeddings: bool = False) -> pa.Schema:
    """The schema of the output Parquet files (see docs/output.md for each column's meaning)."""
    face = pa.list_(pa.struct(FACE_OUTPUT + ([EMBEDDING] if face_embeddings else [])))
    return pa.schema([pa.field(c, face if c == "faces" else t) for c, t in OUTPUT_TYPES.items()])


class ErrorKind(StrEnum):
    """Every value of a row's ``error_kind``. Input faults stay as they are written; system
    failures are retryable (``plvm caption --retry-errors``) and count against ``run.max_failed_fraction``."""

    MISSING_FILE = "missing_file"
    EMPTY_FILE = "empty_file"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT_IMAGE = "corrupt_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    BAD_MANIFEST_ROW = "bad_manifest_row"
    OUTSIDE_INPUT_SCOPE = "outside_input_scope"
    INVALID_USER = "invalid_user"
    UNKNOWN_USER = "unknown_user"
    EMPTY_BANK = "empty_bank"
    BANK_ERROR = "bank_error"
    ENGINE_TIMEOUT = "engine_timeout"
    STAGE_FAILED = "stage_failed"

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]

    @property
    def retryable(self) -> bool:
        """A failure of the system, not of the photo: the same photo may succeed on another try."""
        return self in (ErrorKind.ENGINE_TIMEOUT, ErrorKind.STAGE_FAILED)


_MEANINGS = {
    ErrorKind.MISSING_FILE: "the listed file does not exist",
    ErrorKind.EMPTY_FILE: "the file has 0 bytes",
    ErrorKind.TOO_LARGE: "the file is larger than `read.max_bytes` (not read)",
    ErrorKind.NOT_AN_IMAGE: "the bytes are not an image format Pillow knows",
    ErrorKind.TRUNCATED: "the image data ends early",
    ErrorKind.CORRUPT_IMAGE: "the image data is damaged",
    ErrorKind.DECOMPRESSION_BOMB: "the image claims more than `decode.max_pixels` pixels (not decoded)",
    ErrorKind.BAD_MANIFEST_ROW: "a manifest row without a path or user, or with a wrong number of fields",
    ErrorKind.OUTSIDE_INPUT_SCOPE: "the path is outside `input.allowed` or inside the output folder (never opened)",
    ErrorKind.INVALID_USER: "the user id is not a safe path segment",
    ErrorKind.UNKNOWN_USER: "the user has no concept bank",
    ErrorKind.EMPTY_BANK: "the user's bank has no concepts",
    ErrorKind.BANK_ERROR: "the user's bank cannot serve this run: made with another face embedder or Aligner, "
    "or its pinned version became unreadable during the run",
    ErrorKind.ENGINE_TIMEOUT: "the engine gave no answer within `generate.timeout_s` (retryable)",
    ErrorKind.STAGE_FAILED: "a stage raised an unexpected exception on this photo, tolerated because "
    "`run.max_failed_fraction` > 0 (retryable)",
}


RETRYABLE = tuple(str(kind) for kind in ErrorKind if kind.retryable)
"""The ``error_kind`` values that ``--retry-errors`` writes again."""

BANK_ERRORS = tuple(str(kind) for kind in (ErrorKind.UNKNOWN_USER, ErrorKind.EMPTY_BANK, ErrorKind.BANK_ERROR))
"""The ``error_kind`` values of rows that a change of the user's bank can clear (``plvm rematch`` names their
indexed faces again, as it does rows without an error)."""


class RowError(Exception):
    """An input fault of one photo: it ends that row's processing and is reported in its ``error``."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
