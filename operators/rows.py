"""The row contract: the columns a photo's row carries between stages, and the column helpers that stages share.

Every stage takes and returns a ``pyarrow.Table`` whose columns are drawn from
``COLUMNS``, so every block has the same types whatever its content (an all-null
``error`` column is still a string column). A row whose ``error`` is set passes through
the later stages untouched. Only *input faults* (:class:`RowError`) become row errors in a
stage; any other exception is a failure of the system, which the stage loop handles
(``pipelines.runner``). The output's own columns and the kinds of row error are the stored format's
(``plvm_model.store.output_schema``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plvm_model.faces import Face
from plvm_model.injection import ConceptTokens
from plvm_model.store.output_schema import EMBEDDING, FACE_OUTPUT, OUTPUT_TYPES, ErrorKind, RowError

FACE = pa.struct([*FACE_OUTPUT[:3], EMBEDDING, *FACE_OUTPUT[3:]])
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

PERSON = pa.struct([pa.field("concept_id", pa.string()), pa.field("name", pa.string()), pa.field("face", pa.int32())])
"""A person in a photo, as a dataset item's truth has them: the concept, and the face the matcher gave their name
(its position in ``faces``; -1 when no face has it)."""

CHOICE = pa.struct([pa.field("letter", pa.string()), pa.field("text", pa.string())])
ITEM = pa.struct(
    [
        pa.field("id", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("truth", pa.string()),
        pa.field("person", pa.string()),
        pa.field("concept_id", pa.string()),
        pa.field("present", pa.bool_()),
        pa.field("box", pa.list_(pa.float32())),
        pa.field("choices", pa.list_(CHOICE)),
        pa.field("correct", pa.string()),
        pa.field("sks_question", pa.string()),
    ]
)
"""A dataset item of a photo (``operators.items``): a question and its answer, with where the answer came from
(``truth``), the person asked about, and per kind a box (grounding) or options (multiple choice)."""

CROP = pa.struct([pa.field("concept_id", pa.string()), pa.field("face", pa.int32()), pa.field("data", pa.binary())])
"""A named face cut from its photo, as JPEG bytes."""

COLUMNS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "path": OUTPUT_TYPES["path"],
    "user_id": OUTPUT_TYPES["user_id"],
    "data": pa.binary(),
    "content_hash": pa.string(),
    "indexed": pa.bool_(),
    "width": OUTPUT_TYPES["width"],
    "height": OUTPUT_TYPES["height"],
    "pixels": pa.binary(),
    "pixels_width": pa.int32(),
    "pixels_height": pa.int32(),
    "faces": pa.list_(FACE),
    "chips": pa.list_(pa.list_(pa.binary())),
    "concepts": OUTPUT_TYPES["concepts"],
    "injected": pa.list_(INJECTED),
    "questions": pa.list_(pa.string()),
    "stats": pa.map_(pa.string(), pa.float64()),
    "part_start": pa.int64(),
    "part_rows": pa.int64(),
    "shard": pa.string(),
    "bank_version": pa.int32(),
    "captioned_hash": pa.string(),
    "split": pa.string(),
    "truth": pa.string(),
    "people": pa.list_(PERSON),
    "items": pa.list_(ITEM),
    "image": pa.binary(),
    "image_name": pa.string(),
    "crops": pa.list_(CROP),
    **{c: OUTPUT_TYPES[c] for c in ("caption", "answers", "model", "engine", "error", "error_kind")},
}
"""Every column a row may carry, with its type."""

STATS = "stats"
"""The column of the stages' counters: each batch's counts (``<stage>.<counter>``) in one of its rows, null in the
others, so that they travel with the rows (a batch that Ray retries replaces its counts with its rows) and add up
at the end."""


def stats_of(table: pa.Table) -> Counter:
    """The sum of the counters in ``table``'s stats column (none if it has none)."""
    total: Counter = Counter()
    if STATS in table.column_names:
        for counts in table.column(STATS).to_pylist():
            for key, value in counts or ():
                total[key] += value
    return total


def with_stats(table: pa.Table, counts: Counter) -> pa.Table:
    """``table`` with ``counts`` added to its stats column, all of them in its first row (unchanged if it has no
    stats column, or no row)."""
    if STATS not in table.column_names or not table.num_rows:
        return table
    merged = stats_of(table)
    merged.update(counts)
    column = pa.array([list(merged.items())] + [None] * (table.num_rows - 1), COLUMNS[STATS])
    return table.set_column(table.schema.get_field_index(STATS), STATS, column)


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
    """A face index's ``faces`` column (``plvm_model.store.face_index.FACE``) as rows' faces (:data:`FACE`), column by
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
