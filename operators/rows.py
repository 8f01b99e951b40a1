"""The row contract: the columns a photo's row carries between stages, the output schema, the
kinds of row error, and the column helpers that stages share.

Every stage takes and returns a ``pyarrow.Table`` whose columns are drawn from
:data:`COLUMNS`, so every block has the same types whatever its content (an all-null
``error`` column is still a string column). A row whose ``error`` is set passes through
the later stages untouched. Only *input faults* (:class:`RowError`) become row errors in a
stage; any other exception is a failure of the system, which the stage loop handles
(``pipelines.stages``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plvm_model.faces import Face
from plvm_model.injection import ConceptTokens

_FACE_OUTPUT = [
    pa.field("box", pa.list_(pa.float32(), 4)),
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),
    pa.field("concept", pa.string()),
    pa.field("concept_id", pa.string()),
    pa.field("distance", pa.float32()),
    pa.field("relative_distance", pa.float32()),
]
EMBEDDING = pa.field("embedding", pa.list_(pa.float32()))
FACE = pa.struct([*_FACE_OUTPUT[:3], EMBEDDING, *_FACE_OUTPUT[3:]])
"""A face: box (x1, y1, x2, y2) and landmarks in pixels of the original photo (after EXIF rotation)."""

INJECTED = pa.struct(
    [
        pa.field("concept_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("soft_tokens", pa.binary()),
        pa.field("head_weight", pa.binary()),
        pa.field("hidden", pa.int32()),
        pa.field("method", pa.string()),
    ]
)
"""A concept chosen for a photo's prompt, with its float32 vectors as read from the bank (a MyVLM concept's
``soft_tokens`` is its one vector, without a head weight)."""
ANSWER = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])

COLUMNS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "path": pa.string(),
    "user_id": pa.string(),
    "data": pa.binary(),
    "content_hash": pa.string(),
    "indexed": pa.bool_(),
    "width": pa.int32(),
    "height": pa.int32(),
    "pixels": pa.binary(),
    "pixels_width": pa.int32(),
    "pixels_height": pa.int32(),
    "faces": pa.list_(FACE),
    "chips": pa.list_(pa.list_(pa.binary())),
    "concepts": pa.list_(pa.string()),
    "injected": pa.list_(INJECTED),
    "caption": pa.string(),
    "answers": pa.list_(ANSWER),
    "model": pa.string(),
    "engine": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}
"""Every column a row may carry, with its type."""

LISTING = ("index", "path", "user_id", "error", "error_kind")
"""The columns of the input listing, which the first stage receives."""
OUTPUT = ("path", "user_id", "width", "height", "faces", "concepts", "caption", "answers", "model", "engine",
          "error", "error_kind")  # fmt: skip
"""The columns of the output files, in order."""


def output_schema(face_embeddings: bool = False) -> pa.Schema:
    """The schema of the output Parquet files (see the README for each column's meaning)."""
    face = pa.struct(_FACE_OUTPUT + ([EMBEDDING] if face_embeddings else []))
    return pa.schema([pa.field(c, pa.list_(face) if c == "faces" else COLUMNS[c]) for c in OUTPUT])


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


def to_table(rows: list[dict[str, Any]], columns: Iterable[str]) -> pa.Table:
    schema = pa.schema([pa.field(c, COLUMNS[c]) for c in columns])
    return pa.Table.from_pylist(rows, schema=schema)


def output_columns(batch: pa.Table, add: Iterable[str] = (), drop: Iterable[str] = ()) -> list[str]:
    """The batch's columns without ``drop``, plus ``add``, in :data:`COLUMNS` order."""
    keep = (set(batch.column_names) | set(add)) - set(drop)
    return [c for c in COLUMNS if c in keep]


def fail(row: dict[str, Any], kind: ErrorKind, message: str) -> None:
    row["error"], row["error_kind"] = message, str(kind)


def map_rows(
    batch: pa.Table,
    process: Callable[[dict[str, Any]], None],
    add: Iterable[str] = (),
    drop: Iterable[str] = (),
) -> pa.Table:
    """Apply ``process`` to each error-free row of ``batch``; the result has ``add`` and lacks ``drop``.

    A :class:`RowError` becomes that row's error; any other exception propagates.
    """
    rows = batch.to_pylist()
    for row in rows:
        if row.get("error") is None:
            try:
                process(row)
            except RowError as error:
                fail(row, error.kind, f"{row.get('path')}: {error}")
    return to_table(rows, output_columns(batch, [*add, "error", "error_kind"], drop))


def as_row_faces(faces: pa.ChunkedArray) -> pa.ChunkedArray:
    """A face index's ``faces`` column (``plvm_model.face_index.FACE``) as rows' faces (:data:`FACE`), column by
    column, without a Python object per face: each descriptor becomes the face's ``embedding``, the naming
    fields are null."""
    chunks = []
    for chunk in faces.chunks:
        items = chunk.values
        given = dict(zip((f.name for f in items.type), items.flatten()))
        given["embedding"] = given.pop("descriptor")
        children = [given[f.name].cast(f.type) if f.name in given else pa.nulls(len(items), f.type) for f in FACE]
        struct = pa.StructArray.from_arrays(children, fields=list(FACE))
        mask = chunk.is_null() if chunk.null_count else None
        chunks.append(pa.ListArray.from_arrays(chunk.offsets, struct, mask=mask))
    return pa.chunked_array(chunks, pa.list_(FACE))


def face_vectors(faces: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Every face's ``embedding`` in a ``faces`` column, those that have one, as the rows of an (n, ``dim``)
    float32 matrix (column by column)."""
    vectors = pc.struct_field(pc.list_flatten(faces), "embedding")
    vectors = vectors.filter(pc.fill_null(pc.greater(pc.list_value_length(vectors), 0), False))
    return np.asarray(pc.list_flatten(vectors), np.float32).reshape(-1, dim)


def row_pixels(row: dict) -> np.ndarray:
    """The working copy of a decoded row as an (H, W, 3) uint8 array (a view of the row's bytes)."""
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixels_height"], row["pixels_width"], 3)


def embedded(row: dict) -> bool:
    """Whether every face of the row has its embedding: it has none, or they came from the face index."""
    return all(face.get("embedding") is not None for face in row["faces"] or [])


def face_record(face: Face) -> dict[str, Any]:
    """A face as a row's ``faces`` item (see :data:`FACE`)."""
    return {"box": list(face.box), "score": face.score, "landmarks": [list(p) for p in face.landmarks]}


def working_faces(row: dict) -> list[Face]:
    """The row's faces in pixels of its working copy."""
    scale = row["pixels_width"] / row["width"]
    return [
        Face(tuple(r["box"]), r["score"], tuple(tuple(p) for p in r["landmarks"])).scaled(scale) for r in row["faces"]
    ]


def injected_tokens(row: dict) -> list[ConceptTokens]:
    """The row's injected concepts as :class:`ConceptTokens`, in prompt order."""
    out = []
    for item in row["injected"] or []:
        soft = np.frombuffer(item["soft_tokens"], np.float32).reshape(-1, item["hidden"])
        head = np.frombuffer(item["head_weight"], np.float32) if item["head_weight"] else None
        out.append(ConceptTokens(item["name"], soft, head, item["method"]))
    return out


def injected_record(concept) -> dict[str, Any]:
    """A bank concept as a row's ``injected`` item (see :data:`INJECTED`)."""
    tokens = concept.tokens()
    head = tokens.head_weight if tokens.head_weight is not None else np.zeros(0, np.float32)
    return {
        "concept_id": concept.concept_id,
        "name": concept.name,
        "soft_tokens": np.ascontiguousarray(tokens.soft_tokens, np.float32).tobytes(),
        "head_weight": np.ascontiguousarray(head, np.float32).tobytes(),
        "hidden": concept.hidden,
        "method": tokens.method,
    }
