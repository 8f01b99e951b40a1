"""The concept bank: each user's named people, as immutable versioned Parquet files at any fsspec URI.

``BANK/<user_id>/concepts.v000007.parquet`` is version 7 of the user's bank, one row per concept::

    name              string       as the captions will say it
    concept_id        string       stable id (12 hex digits)
    face_descriptors  list<list<float32>>   one descriptor per reference face
    soft_tokens       list<list<float32>>   (num_queries, hidden) Aligner output, computed at enrollment
    head_weight       list<float32>         (hidden,) the name token's output-head row
    references        list<string>          URIs of the reference photos
    created_at, updated_at  timestamp[us, UTC]
    checksum          string       SHA-256 of the concept (see :meth:`Concept.checksum`)

and, in the file's schema metadata, ``plvm.schema_version``, ``plvm.user_id``,
``plvm.version`` (the file's version), ``plvm.embedder`` (the descriptor space),
``plvm.aligner`` (the soft-token space) and ``plvm.checksum`` (of the metadata and the
concepts' checksums). A version is never rewritten: a change is committed as the next
version (see :class:`ConceptBank`), which appears whole or not at all. A file is verified
when read: checksums, finite vectors, shapes that agree. The single file of schema version
1, ``BANK/<user_id>/concepts.parquet``, is still read (without checksums) until the
user's first new version.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plvm_model import storage
from plvm_model.errors import BankError
from plvm_model.injection import ConceptTokens

SCHEMA_VERSION = 2
"""Versioned files with checksums; version 1 was the single file :data:`LEGACY_FILE`, still read."""
LEGACY_FILE = "concepts.parquet"
_VERSION_FILE = re.compile(r"concepts\.v(.*)\.parquet")
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
        pa.field("checksum", pa.string(), nullable=False),
    ]
)


def version_file(version: int) -> str:
    """The name of a bank's file of ``version`` in its user's folder."""
    return f"concepts.v{version:06d}.parquet"


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

    def checksum(self) -> str:
        """SHA-256 of the concept's name, id, references and vectors (as float32, with their shapes)."""
        digest = hashlib.sha256()
        for text in (self.name, self.concept_id, *self.references):
            digest.update(text.encode() + b"\0")
        for array in (self.face_descriptors, self.soft_tokens, self.head_weight):
            array = np.ascontiguousarray(array, "<f4")
            digest.update(repr(array.shape).encode() + array.tobytes())
        return digest.hexdigest()


@dataclass
class UserBank:
    user_id: str
    embedder: str
    aligner: str
    concepts: list[Concept] = field(default_factory=list)
    version: int = 0
    """0 for a bank not written yet; each commit writes the next version."""
    location: str = ""
    """The file it was read from (for messages)."""

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

    def check_descriptor_size(self, size: int, embedder: str) -> None:
        """Raise :class:`BankError` naming the first concept whose face descriptors are not ``size`` long."""
        for concept in self.concepts:
            if concept.face_descriptors.shape[1] != size:
                raise BankError(
                    f"concept {concept.name!r} of user {self.user_id!r} in {self.location} has face descriptors of "
                    f"length {concept.face_descriptors.shape[1]}; this run's face embedder {embedder!r} makes {size}"
                )

    def validate(self) -> None:
        """Raise :class:`BankError` naming the concept if a vector is not finite or the shapes disagree.

        Every concept has at least one descriptor, all of one length; soft tokens of one shape
        (queries, hidden) for all; a head weight of ``hidden`` values; names are unique.
        """
        first = self.concepts[0] if self.concepts else None
        names: set[str] = set()
        for c in self.concepts:
            where = f"concept {c.name!r} of user {self.user_id!r} in {self.location or 'a new bank'}"
            arrays = {"face descriptors": c.face_descriptors, "soft tokens": c.soft_tokens, "head weight": c.head_weight}
            for what, array in arrays.items():
                if not np.isfinite(array).all():
                    raise BankError(f"{where} has {what} that are not finite numbers (NaN or infinite)")
            if c.face_descriptors.ndim != 2 or not len(c.face_descriptors) or c.soft_tokens.ndim != 2:
                raise BankError(f"{where} has malformed descriptors or soft tokens")
            shapes = (c.face_descriptors.shape[1], c.soft_tokens.shape, c.head_weight.shape)
            expected = (first.face_descriptors.shape[1], first.soft_tokens.shape, first.soft_tokens.shape[1:])
            if shapes != expected:
                raise BankError(
                    f"{where} has descriptors of length {shapes[0]}, soft tokens {shapes[1]} and a head weight "
                    f"{shapes[2]}; the bank's first concept {first.name!r} makes them {expected}"
                )
            if c.name in names:
                raise BankError(f"{where} is in the bank twice")
            names.add(c.name)


class ConceptBank:
    """All users' banks under one root URI: each user's a folder of immutable versions.

    ``BANK/<user_id>/concepts.v000007.parquet`` is version 7. A commit writes the next
    version with :func:`storage.create_exclusive`, so of two writers that read the same
    version exactly one commits; the other reads the new version and applies its change
    again (compare-and-swap). Readers take the newest version, or the one a run pinned.
    """

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.fs, self.root = storage.filesystem(uri, storage_options)

    def folder(self, user_id: str) -> str:
        return f"{self.root.rstrip('/')}/{validate_user_id(user_id)}"

    def location(self, user_id: str, name: str = "") -> str:
        """The URI of the user's bank folder, or of the file ``name`` in it."""
        return storage.join(self.uri, validate_user_id(user_id), *([name] if name else []))

    def versions(self, user_id: str) -> dict[int, str]:
        """The user's versions and their files, as listed now; :class:`BankError` for a folder that is not a bank's."""
        folder = self.folder(user_id)
        self.fs.invalidate_cache(folder)  # a commit may have come since the last listing
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        if any(e["name"].rstrip("/") == folder and e["type"] != "directory" for e in entries):
            raise BankError(f"concept bank {self.location(user_id)} is a file, not a user's bank folder")
        found = {}
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            match = _VERSION_FILE.fullmatch(name)
            if match is None:
                continue
            where = self.location(user_id, name)
            if not (match[1].isascii() and match[1].isdigit()):
                raise BankError(f"concept bank file {where} is not named with an integer version")
            if entry["type"] == "directory":
                raise BankError(f"concept bank file {where} is a folder, not a bank file")
            found[int(match[1])] = entry["name"]
        return found

    def load(self, user_id: str, version: int | None = None) -> UserBank | None:
        """The user's bank at ``version`` (the newest if None), or None if the user has none (or had
        none: version 0). A damaged file, or a pinned version that is gone, raises :class:`BankError`."""
        if version == 0:
            return None
        files = self.versions(user_id)
        newest = max(files, default=None)
        wanted = newest if version is None else version
        if wanted in files:
            return self._read(user_id, files[wanted], version_file(wanted), wanted)
        legacy = self._read(user_id, f"{self.folder(user_id)}/{LEGACY_FILE}", LEGACY_FILE, None)
        if legacy is not None and (wanted is None or legacy.version == wanted):
            return legacy
        if wanted is None:
            return None
        raise BankError(f"version {wanted} of the concept bank {self.location(user_id)} is gone")

    def _read(self, user_id: str, path: str, name: str, version: int | None) -> UserBank | None:
        where = self.location(user_id, name)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise BankError(f"concept bank file {where} is a folder, not a bank file") from None
        return decode(data, user_id, where, version)

    def commit(self, bank: UserBank) -> bool:
        """Write ``bank`` as version ``bank.version + 1`` unless another writer has: True (and
        ``bank.version`` advanced) if this call wrote it. A bank with bad vectors raises :class:`BankError`."""
        bank.validate()
        version = bank.version + 1
        name = version_file(version)
        data = encode(replace(bank, version=version))
        if not storage.create_exclusive(self.fs, f"{self.folder(bank.user_id)}/{name}", data):
            return False
        bank.version, bank.location = version, self.location(bank.user_id, name)
        return True

    def save(self, bank: UserBank) -> None:
        """:meth:`commit`, or :class:`BankError` if another writer wrote that version first."""
        if not self.commit(bank):
            raise BankError(
                f"version {bank.version + 1} of the concept bank {self.location(bank.user_id)} was written by "
                "another writer meanwhile: load the bank again and apply the change to it"
            )


def _bank_checksum(user_id: str, version: str, embedder: str, aligner: str, concepts: list[str]) -> str:
    """SHA-256 of the bank's metadata and its concepts' checksums, in order."""
    return hashlib.sha256("\0".join([user_id, version, embedder, aligner, *concepts]).encode()).hexdigest()


def encode(bank: UserBank) -> bytes:
    """The bank's file, with its checksums (as written: :meth:`ConceptBank.commit` validates it first)."""
    checksums = [c.checksum() for c in bank.concepts]
    rows = {
        "name": [c.name for c in bank.concepts],
        "concept_id": [c.concept_id for c in bank.concepts],
        "face_descriptors": [np.asarray(c.face_descriptors, np.float32).tolist() for c in bank.concepts],
        "soft_tokens": [np.asarray(c.soft_tokens, np.float32).tolist() for c in bank.concepts],
        "head_weight": [np.asarray(c.head_weight, np.float32).tolist() for c in bank.concepts],
        "references": [list(c.references) for c in bank.concepts],
        "created_at": [c.created_at for c in bank.concepts],
        "updated_at": [c.updated_at for c in bank.concepts],
        "checksum": checksums,
    }
    version = str(bank.version)
    metadata = {
        "plvm.schema_version": str(SCHEMA_VERSION),
        "plvm.user_id": bank.user_id,
        "plvm.version": version,
        "plvm.embedder": bank.embedder,
        "plvm.aligner": bank.aligner,
        "plvm.checksum": _bank_checksum(bank.user_id, version, bank.embedder, bank.aligner, checksums),
    }
    table = pa.table(rows, schema=SCHEMA.with_metadata(metadata))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def decode(data: bytes, user_id: str, where: str, version: int | None = None) -> UserBank:
    """The bank in ``data`` (the file ``where`` of ``user_id``, named as ``version``; None for the legacy
    file), verified: its checksums, finite vectors and consistent shapes, else :class:`BankError`."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as error:  # pyarrow raises several types for damaged files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BankError(f"concept bank {where} is damaged and cannot be read: {first}") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    schema = meta.get("plvm.schema_version")
    legacy = version is None
    if schema != str(1 if legacy else SCHEMA_VERSION):
        raise BankError(f"concept bank {where} has schema version {schema!r}; this program reads {SCHEMA_VERSION}")
    names = [f.name for f in SCHEMA if not (legacy and f.name == "checksum")]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise BankError(f"concept bank {where} lacks the columns {missing}")
    if meta.get("plvm.user_id") != user_id:
        raise BankError(f"concept bank {where} belongs to user {meta.get('plvm.user_id')!r}, not {user_id!r}")
    written = meta.get("plvm.version", "")
    if not (written.isascii() and written.isdigit()) or (not legacy and int(written) != version):
        raise BankError(f"concept bank {where} has version {written!r} in its metadata, not {version or 'an integer'}")
    bank = UserBank(user_id, meta.get("plvm.embedder", ""), meta.get("plvm.aligner", ""), [], int(written), where)
    for row in table.select(names).to_pylist():
        try:
            concept = Concept(
                name=row["name"],
                concept_id=row["concept_id"],
                face_descriptors=np.asarray(row["face_descriptors"], np.float32),
                soft_tokens=np.asarray(row["soft_tokens"], np.float32),
                head_weight=np.asarray(row["head_weight"], np.float32),
                references=row["references"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
        except (ValueError, TypeError):  # ragged or missing vectors
            raise BankError(f"concept {row['name']!r} of user {user_id!r} in {where} has malformed vectors") from None
        if not legacy and concept.checksum() != row["checksum"]:
            raise BankError(
                f"concept {concept.name!r} of user {user_id!r} in {where} fails its checksum: the file was changed "
                "or damaged after it was written"
            )
        bank.concepts.append(concept)
    if not legacy and meta.get("plvm.checksum") != _bank_checksum(
        user_id, written, bank.embedder, bank.aligner, table.column("checksum").to_pylist()
    ):
        raise BankError(f"concept bank {where} fails its checksum: its metadata or concepts were changed")
    bank.validate()
    return bank
