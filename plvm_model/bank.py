"""The concept bank: each user's named people, as one Parquet file per user at any fsspec URI.

``BANK/<user_id>/concepts.parquet`` holds one row per concept::

    name              string       as the captions will say it
    concept_id        string       stable id (12 hex digits)
    face_descriptors  list<list<float32>>   one descriptor per reference face
    soft_tokens       list<list<float32>>   (num_queries, hidden) Aligner output, computed at enrollment
    head_weight       list<float32>         (hidden,) the name token's output-head row
    references        list<string>          URIs of the reference photos
    created_at, updated_at  timestamp[us, UTC]

and, in the file's schema metadata, ``plvm.schema_version``, ``plvm.user_id``,
``plvm.version`` (incremented by every write, so caches key on it), ``plvm.embedder``
(the descriptor space) and ``plvm.aligner`` (the soft-token space). A write goes to a
temporary object first, so a crash never leaves half a bank.
"""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plvm_model import storage
from plvm_model.errors import BankError
from plvm_model.injection import ConceptTokens

SCHEMA_VERSION = 1
FILE_NAME = "concepts.parquet"
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")

SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("concept_id", pa.string(), nullable=False),
        pa.field("face_descriptors", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("soft_tokens", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("head_weight", pa.list_(pa.float32()), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def validate_user_id(user_id: str) -> str:
    """``user_id`` if it is safe as one path segment: letters, digits, ``_ . @ -``, at most 128."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id) or ".." in user_id:
        raise ValueError(
            f"invalid user id {user_id!r}: use 1-128 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return user_id


@dataclass
class Concept:
    name: str
    face_descriptors: np.ndarray
    """(references, dim) float32."""
    soft_tokens: np.ndarray
    head_weight: np.ndarray
    references: list[str]
    concept_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def tokens(self) -> ConceptTokens:
        return ConceptTokens(self.name, self.soft_tokens, self.head_weight)


@dataclass
class UserBank:
    user_id: str
    embedder: str
    aligner: str
    concepts: list[Concept] = field(default_factory=list)
    version: int = 0

    def find(self, name: str) -> Concept | None:
        return next((c for c in self.concepts if c.name == name), None)

    def check_compatible(self, embedder: str | None = None, aligner: str | None = None, where: str = "") -> None:
        """Raise :class:`BankError` if the bank was enrolled with another face embedder or Aligner."""
        for what, ours, theirs in (("face embedder", embedder, self.embedder), ("Aligner", aligner, self.aligner)):
            if ours is not None and ours != theirs:
                raise BankError(
                    f"the concept bank of user {self.user_id!r}{where} was enrolled with {what} {theirs!r}, "
                    f"this run uses {ours!r}: enroll the concepts again with this configuration"
                )


class ConceptBank:
    """All users' banks under one root URI."""

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.fs, self.root = storage.filesystem(uri, storage_options)

    def path(self, user_id: str) -> str:
        return f"{self.root.rstrip('/')}/{validate_user_id(user_id)}/{FILE_NAME}"

    def location(self, user_id: str) -> str:
        return storage.join(self.uri, validate_user_id(user_id), FILE_NAME)

    def load(self, user_id: str) -> UserBank | None:
        """The user's bank, or None if the user has none. A damaged file raises :class:`BankError`."""
        path = self.path(user_id)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return _decode(data, user_id, self.location(user_id))

    def save(self, bank: UserBank) -> None:
        """Write the bank whole, as version ``bank.version + 1``."""
        bank.version += 1
        storage.write_atomic(self.fs, self.path(bank.user_id), _encode(bank))


def _encode(bank: UserBank) -> bytes:
    rows = {
        "name": [c.name for c in bank.concepts],
        "concept_id": [c.concept_id for c in bank.concepts],
        "face_descriptors": [np.asarray(c.face_descriptors, np.float32).tolist() for c in bank.concepts],
        "soft_tokens": [np.asarray(c.soft_tokens, np.float32).tolist() for c in bank.concepts],
        "head_weight": [np.asarray(c.head_weight, np.float32).tolist() for c in bank.concepts],
        "references": [list(c.references) for c in bank.concepts],
        "created_at": [c.created_at for c in bank.concepts],
        "updated_at": [c.updated_at for c in bank.concepts],
    }
    metadata = {
        "plvm.schema_version": str(SCHEMA_VERSION),
        "plvm.user_id": bank.user_id,
        "plvm.version": str(bank.version),
        "plvm.embedder": bank.embedder,
        "plvm.aligner": bank.aligner,
    }
    table = pa.table(rows, schema=SCHEMA.with_metadata(metadata))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _decode(data: bytes, user_id: str, where: str) -> UserBank:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as error:  # pyarrow raises several types for damaged files
        raise BankError(f"concept bank {where} is damaged and cannot be read: {error}") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    version = meta.get("plvm.schema_version")
    if version != str(SCHEMA_VERSION):
        raise BankError(f"concept bank {where} has schema version {version!r}; this program reads {SCHEMA_VERSION}")
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise BankError(f"concept bank {where} lacks the columns {missing}")
    if meta.get("plvm.user_id") != user_id:
        raise BankError(f"concept bank {where} belongs to user {meta.get('plvm.user_id')!r}, not {user_id!r}")
    concepts = []
    for row in table.select(SCHEMA.names).to_pylist():
        descriptors = np.asarray(row["face_descriptors"], np.float32)
        soft = np.asarray(row["soft_tokens"], np.float32)
        if descriptors.ndim != 2 or soft.ndim != 2 or len(descriptors) == 0:
            raise BankError(f"concept {row['name']!r} in {where} has malformed descriptors or soft tokens")
        concepts.append(
            Concept(
                name=row["name"],
                concept_id=row["concept_id"],
                face_descriptors=descriptors,
                soft_tokens=soft,
                head_weight=np.asarray(row["head_weight"], np.float32),
                references=row["references"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
        )
    return UserBank(
        user_id=user_id,
        embedder=meta.get("plvm.embedder", ""),
        aligner=meta.get("plvm.aligner", ""),
        concepts=concepts,
        version=int(meta.get("plvm.version", "0")),
    )
