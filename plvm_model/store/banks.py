"""The concept bank: each user's named people, as immutable versioned Parquet files at any fsspec URI.

``BANK/<user_id>/concepts.v000007.parquet`` is version 7 of the user's bank, one row per concept::

    name              string       as the captions will say it
    concept_id        string       stable id (12 hex digits)
    method            string       ``plvm`` (Aligner soft tokens) or ``myvlm`` (a learned vector)
    face_descriptors  list<list<float32>>   one descriptor per reference face
    soft_tokens       list<list<float32>>   PLVM: (num_queries, hidden) Aligner output, computed at enrollment
    head_weight       list<float32>         PLVM: (hidden,) the name token's output-head row
    vector            list<float32>         MyVLM: (hidden,) the concept vector trained at enrollment
    vector_model      string       MyVLM: the LLaVA the vector was trained for (``myvlm.llava_identity``)
    references        list<string>          URIs of the reference photos
    rejected          list<list<float32>>   descriptors of faces the owner said are not this person
    created_at, updated_at  timestamp[us, UTC]
    checksum          string       SHA-256 of the concept (see :meth:`Concept.checksum`)

and, in the file's schema metadata, ``plvm.schema_version``, ``plvm.user_id``,
``plvm.version`` (the file's version), ``plvm.embedder`` (the descriptor space),
``plvm.aligner`` (the soft-token space) and ``plvm.checksum`` (of the metadata and the
concepts' checksums). A PLVM concept leaves ``vector`` empty, a MyVLM one ``soft_tokens`` and
``head_weight``; one bank may hold both. A version is never rewritten: a change is committed as the next
version (see :class:`BankStore`), which appears whole or not at all. A file is verified
when read: checksums, finite vectors, shapes that agree. Files of schema version 2 (before
MyVLM) are read as banks of PLVM concepts. The single file of schema version 1,
``BANK/<user_id>/concepts.parquet``, is still read (without checksums) until the user's
first new version.
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

from plvm_model.injection import ConceptTokens
from plvm_model.store import storage
from plvm_model.store.errors import BankError
from plvm_model.store.ids import validate_user_id
from plvm_model.store.lease import Lease
from plvm_model.store.output_schema import ErrorKind, RowError

SCHEMA_VERSION = 4
"""Versioned files with checksums, PLVM or MyVLM concepts and their rejected faces; version 3 (without rejected
faces), version 2 (PLVM only) and version 1 (the single file :data:`LEGACY_FILE`) are still read."""
PLVM_ONLY_SCHEMAS = ("1", "2")
"""Schema versions written before MyVLM: every concept in them is a PLVM one."""
METHODS = ("plvm", "myvlm")
"""How a concept reaches the LLM: PLVM's soft tokens after ``NAME is``, or MyVLM's vector after the image."""
LEGACY_FILE = "concepts.parquet"
_VERSION_FILE = re.compile(r"concepts\.v(.*)\.parquet")

SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("concept_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("face_descriptors", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("soft_tokens", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("head_weight", pa.list_(pa.float32()), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("vector_model", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
        pa.field("rejected", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("checksum", pa.string(), nullable=False),
    ]
)


def version_file(version: int) -> str:
    """The name of a bank's file of ``version`` in its user's folder."""
    return f"concepts.v{version:06d}.parquet"


@dataclass
class Concept:
    name: str
    face_descriptors: np.ndarray
    """(references, dim) float32."""
    soft_tokens: np.ndarray
    """PLVM: (num_queries, hidden); MyVLM: (0, hidden)."""
    head_weight: np.ndarray
    """PLVM: (hidden,); MyVLM: (0,)."""
    references: list[str]
    concept_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    method: str = "plvm"
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """MyVLM: (hidden,) the trained concept vector (stored as trained; L2-normalised where it is used)."""
    vector_model: str = ""
    """MyVLM: the identity of the LLaVA the vector was trained for (:func:`plvm_model.myvlm.llava_identity`)."""
    rejected: np.ndarray | None = None
    """(faces, dim) float32: descriptors of faces the owner said are not this person (``plvm people reject``),
    never named it; None: none."""

    @property
    def rejections(self) -> np.ndarray:
        """The rejected faces' descriptors, (0, dim) when there are none."""
        if self.rejected is None:
            return np.zeros((0, self.face_descriptors.shape[-1]), np.float32)
        return np.asarray(self.rejected, np.float32)

    @classmethod
    def myvlm(cls, name: str, face_descriptors: np.ndarray, vector: np.ndarray, vector_model: str,
              references: list[str]) -> Concept:  # fmt: skip
        """A MyVLM concept: its training photos' face descriptors (the recognition head's keys) and its vector."""
        hidden = len(vector)
        empty = np.zeros((0, hidden), np.float32), np.zeros(0, np.float32)
        return cls(name, face_descriptors, *empty, references, method="myvlm", vector=vector, vector_model=vector_model)

    @property
    def hidden(self) -> int:
        """The width of the LLM input space its vectors live in."""
        return self.vector.shape[0] if self.method == "myvlm" else self.soft_tokens.shape[-1]

    def tokens(self) -> ConceptTokens:
        if self.method == "myvlm":
            return ConceptTokens(self.name, self.vector[None, :], None, method="myvlm")
        return ConceptTokens(self.name, self.soft_tokens, self.head_weight)

    def checksum(self) -> str:
        """SHA-256 of the concept's name, id, references and vectors (as float32, with their shapes); for a MyVLM
        concept also of its method, vector and the vector's model (a PLVM concept's is as schema 2 made it); of its
        rejected faces when it has any."""
        digest = hashlib.sha256()
        texts = (self.name, self.concept_id, *self.references)
        arrays = [self.face_descriptors, self.soft_tokens, self.head_weight]
        if self.method != "plvm":
            texts, arrays = (*texts, self.method, self.vector_model), [*arrays, self.vector]
        if len(self.rejections):
            texts, arrays = (*texts, "rejected"), [*arrays, self.rejections]
        for text in texts:
            digest.update(text.encode() + b"\0")
        for array in arrays:
            array = np.ascontiguousarray(array, "<f4")
            digest.update(repr(array.shape).encode() + array.tobytes())
        return digest.hexdigest()


@dataclass
class Bank:
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

        Every concept has a known method and at least one descriptor, all of one length; PLVM
        concepts soft tokens of one shape (queries, hidden) and a head weight of ``hidden``
        values; MyVLM concepts a vector of ``hidden`` values and the model it was trained for;
        one ``hidden`` for all; names are unique.
        """
        first = self.concepts[0] if self.concepts else None
        plvm = next((c for c in self.concepts if c.method == "plvm"), None)
        names: set[str] = set()
        for c in self.concepts:
            where = f"concept {c.name!r} of user {self.user_id!r} in {self.location or 'a new bank'}"
            if c.method not in METHODS:
                raise BankError(f"{where} has method {c.method!r}, not one of {', '.join(METHODS)}")
            arrays = {"face descriptors": c.face_descriptors, "soft tokens": c.soft_tokens,
                      "head weight": c.head_weight, "vector": c.vector, "rejected faces": c.rejections}  # fmt: skip
            for what, array in arrays.items():
                if not np.isfinite(array).all():
                    raise BankError(f"{where} has {what} that are not finite numbers (NaN or infinite)")
            if c.face_descriptors.ndim != 2 or not len(c.face_descriptors) or c.soft_tokens.ndim != 2:
                raise BankError(f"{where} has malformed descriptors or soft tokens")
            if len(c.rejections) and c.rejections.shape[1:] != c.face_descriptors.shape[1:]:
                raise BankError(f"{where} has rejected faces of length {c.rejections.shape[1]}, not that of its "
                                f"descriptors ({c.face_descriptors.shape[1]})")  # fmt: skip
            if c.method == "plvm":
                shapes = (c.face_descriptors.shape[1], c.soft_tokens.shape, c.head_weight.shape)
                expected = (first.face_descriptors.shape[1], plvm.soft_tokens.shape, plvm.soft_tokens.shape[1:])
                if shapes != expected or c.vector.size:
                    raise BankError(
                        f"{where} has descriptors of length {shapes[0]}, soft tokens {shapes[1]} and a head weight "
                        f"{shapes[2]}; the bank's first concepts make them {expected}"
                    )
            elif c.vector.ndim != 1 or not c.vector.size or c.soft_tokens.size or c.head_weight.size:
                raise BankError(f"{where} is a MyVLM concept without one vector, or with soft tokens")
            elif not c.vector_model:
                raise BankError(f"{where} is a MyVLM concept without the model its vector was trained for")
            elif c.face_descriptors.shape[1] != first.face_descriptors.shape[1]:
                raise BankError(
                    f"{where} has descriptors of length {c.face_descriptors.shape[1]}; the bank's first concept "
                    f"{first.name!r} makes them {first.face_descriptors.shape[1]}"
                )
            if c.hidden != first.hidden:
                raise BankError(
                    f"{where} is for an LLM of hidden size {c.hidden}, the bank's first concept {first.name!r} for "
                    f"{first.hidden}"
                )
            if c.name in names:
                raise BankError(f"{where} is in the bank twice")
            names.add(c.name)

    def check_servable(self, llava: str) -> None:
        """Raise :class:`BankError` naming the first MyVLM concept trained for another LLaVA than ``llava``
        (its identity): its vector means nothing to another model."""
        for c in self.concepts:
            if c.method == "myvlm" and c.vector_model != llava:
                raise BankError(
                    f"MyVLM concept {c.name!r} of user {self.user_id!r} in {self.location} was trained for the LLaVA "
                    f"{c.vector_model!r}; this run's engine serves {llava!r}: enroll it again with --method myvlm "
                    "for this model"
                )


class BankStore:
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

    def lease(self, user_id: str, run_id: str, command: str, expiry_s: float) -> Lease:
        """The lease of the user's bank folder (``BANK/<user_id>/_lease.json``, as an output's): the commands that
        change what the bank says of its people beyond adding to it (``plvm forget``, ``plvm people merge|reject``,
        ``plvm enroll --from-cluster``) hold it, so that two of them on one bank never run at once."""
        return Lease.take(self.fs, self.folder(user_id), self.location(user_id), run_id, command, expiry_s)

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

    def load(self, user_id: str, version: int | None = None) -> Bank | None:
        """The user's bank at ``version`` (the newest if None), or None if the user has none (or had
        none: version 0). A damaged file, or a pinned version that is gone, raises :class:`BankError`."""
        if version == 0:
            return None
        files = self.versions(user_id)
        newest = max(files, default=None)
        wanted = newest if version is None else version
        if wanted in files:
            return self._read(user_id, files[wanted], version_file(wanted), wanted)
        legacy = self.legacy(user_id)
        if legacy is not None and (wanted is None or legacy.version == wanted):
            return legacy
        if wanted is None:
            return None
        raise BankError(f"version {wanted} of the concept bank {self.location(user_id)} is gone")

    def legacy(self, user_id: str) -> Bank | None:
        """The user's single file of schema version 1, if there is one."""
        return self._read(user_id, f"{self.folder(user_id)}/{LEGACY_FILE}", LEGACY_FILE, None)

    def rewrite(self, bank: Bank) -> None:
        """Write ``bank`` over its own version's file, whole or not at all: only ``plvm forget`` does, to purge a
        person from every version."""
        bank.validate()
        storage.write_atomic(self.fs, f"{self.folder(bank.user_id)}/{version_file(bank.version)}", encode(bank))

    def _read(self, user_id: str, path: str, name: str, version: int | None) -> Bank | None:
        where = self.location(user_id, name)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise BankError(f"concept bank file {where} is a folder, not a bank file") from None
        return decode(data, user_id, where, version)

    def commit(self, bank: Bank) -> bool:
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

    def save(self, bank: Bank) -> None:
        """:meth:`commit`, or :class:`BankError` if another writer wrote that version first."""
        if not self.commit(bank):
            raise BankError(
                f"version {bank.version + 1} of the concept bank {self.location(bank.user_id)} was written by "
                "another writer meanwhile: load the bank again and apply the change to it"
            )


def _bank_checksum(user_id: str, version: str, embedder: str, aligner: str, concepts: list[str]) -> str:
    """SHA-256 of the bank's metadata and its concepts' checksums, in order."""
    return hashlib.sha256("\0".join([user_id, version, embedder, aligner, *concepts]).encode()).hexdigest()


def encode(bank: Bank) -> bytes:
    """The bank's file, with its checksums (as written: :meth:`BankStore.commit` validates it first)."""
    checksums = [c.checksum() for c in bank.concepts]
    rows = {
        "name": [c.name for c in bank.concepts],
        "concept_id": [c.concept_id for c in bank.concepts],
        "method": [c.method for c in bank.concepts],
        "face_descriptors": [np.asarray(c.face_descriptors, np.float32).tolist() for c in bank.concepts],
        "soft_tokens": [np.asarray(c.soft_tokens, np.float32).tolist() for c in bank.concepts],
        "head_weight": [np.asarray(c.head_weight, np.float32).tolist() for c in bank.concepts],
        "vector": [np.asarray(c.vector, np.float32).tolist() for c in bank.concepts],
        "vector_model": [c.vector_model for c in bank.concepts],
        "references": [list(c.references) for c in bank.concepts],
        "rejected": [c.rejections.tolist() for c in bank.concepts],
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


def decode(data: bytes, user_id: str, where: str, version: int | None = None) -> Bank:
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
    if schema not in (("1",) if legacy else (*PLVM_ONLY_SCHEMAS[1:], "3", str(SCHEMA_VERSION))):
        raise BankError(f"concept bank {where} has schema version {schema!r}; this program reads {SCHEMA_VERSION}")
    plvm_only = schema in PLVM_ONLY_SCHEMAS
    added = ("method", "vector", "vector_model")
    names = [f.name for f in SCHEMA if not (legacy and f.name == "checksum") and not (plvm_only and f.name in added)
             and not (f.name == "rejected" and schema != str(SCHEMA_VERSION))]  # fmt: skip
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise BankError(f"concept bank {where} lacks the columns {missing}")
    if meta.get("plvm.user_id") != user_id:
        raise BankError(f"concept bank {where} belongs to user {meta.get('plvm.user_id')!r}, not {user_id!r}")
    written = meta.get("plvm.version", "")
    if not (written.isascii() and written.isdigit()) or (not legacy and int(written) != version):
        raise BankError(f"concept bank {where} has version {written!r} in its metadata, not {version or 'an integer'}")
    bank = Bank(user_id, meta.get("plvm.embedder", ""), meta.get("plvm.aligner", ""), [], int(written), where)
    for row in table.select(names).to_pylist():
        try:
            vector = np.asarray(row.get("vector") or [], np.float32)
            soft_tokens = np.asarray(row["soft_tokens"], np.float32)
            rejected = np.asarray(row.get("rejected") or [], np.float32)
            concept = Concept(
                name=row["name"],
                concept_id=row["concept_id"],
                method=row.get("method", "plvm"),
                face_descriptors=np.asarray(row["face_descriptors"], np.float32),
                soft_tokens=soft_tokens if soft_tokens.size else soft_tokens.reshape(0, len(vector)),
                head_weight=np.asarray(row["head_weight"], np.float32),
                vector=vector,
                vector_model=row.get("vector_model", ""),
                references=row["references"],
                rejected=rejected if rejected.size else None,
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


BankVersions = dict[str, int]
"""user_id -> the version of the user's bank a run reads (0: the user had no bank at its start)."""


@dataclass(frozen=True)
class BankSource:
    """Where the stages read the users' banks: the banks' root, its storage options, and the versions the run
    pinned (a user not in ``versions`` is read at its newest)."""

    uri: str
    storage_options: storage.StorageOptions | None = None
    versions: BankVersions = field(default_factory=dict)


class BankCache:
    """Users' banks, loaded on first use; a usable bank or a :class:`RowError` for each user.

    ``embedder_space`` and ``aligner``, when given, are checked against the bank's. A user is
    read at the version ``source`` pinned (a bank enrolled during the run is left to the next
    run).
    """

    def __init__(self, source: BankSource, embedder_space: str | None = None, aligner: str | None = None) -> None:
        self.bank = BankStore(source.uri, source.storage_options)
        self.embedder_space = embedder_space
        self.aligner = aligner
        self.versions = source.versions
        self._cache: dict[str, Bank | RowError] = {}

    def _load(self, user_id: str) -> Bank | RowError:
        try:
            bank = self.bank.load(user_id, self.versions.get(user_id))
        except BankError as error:
            return RowError(ErrorKind.BANK_ERROR, str(error))
        if bank is None:
            where = self.bank.location(user_id)
            return RowError(ErrorKind.UNKNOWN_USER, f"user {user_id!r} has no concept bank at {where}")
        if not bank.concepts:
            return RowError(ErrorKind.EMPTY_BANK, f"the concept bank of user {user_id!r} has no concepts")
        try:
            bank.check_compatible(embedder=self.embedder_space, aligner=self.aligner)
        except BankError as error:
            return RowError(ErrorKind.BANK_ERROR, str(error))
        return bank

    def get(self, user_id: str) -> Bank:
        if user_id not in self._cache:
            self._cache[user_id] = self._load(user_id)
        found = self._cache[user_id]
        if isinstance(found, RowError):
            raise found
        return found
