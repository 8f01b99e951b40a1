"""Enrollment: a named person added to (or extended in) a user's concept bank.

PLVM (the default) needs no training; MyVLM (``--method myvlm``, :meth:`Enroller.enroll_myvlm`)
trains the person's concept vector from a few captioned photos, with LLaVA frozen
(``plvm_model.myvlm``), and stores it with the photos' face descriptors, the keys its
recognition head (the face matcher) compares faces with.

For PLVM, each reference photo goes through the caption pipeline's own read, decode, detect and
embed operators (in this process: a few photos need no cluster). The reference face gives
the concept a face descriptor; the first reference photo also gives its soft tokens
(DINOv2 + Aligner), which captioning reads from the bank and never recomputes. The bank
is changed only after every reference photo was accepted, by committing its next version.

Two enrollments into one user's bank do not lose either's person: each reads the newest
version N and commits N+1 with an exclusive create (compare-and-swap). The one that finds
N+1 taken reads it, applies its change again (its faces and soft tokens are computed once)
and commits N+2, up to :data:`COMMIT_ATTEMPTS` times, then refuses with :class:`BankError`.
"""

from __future__ import annotations

import logging
import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

import numpy as np

from operators.rows import row_pixels, to_table, working_faces
from pipelines.config import Config
from pipelines.people import change_people, cluster_vectors, paths_of, user_of
from pipelines.stage_lists import face_stages
from pipelines.runner.loop import InProcess
from plvm_model.concept_token import mentions
from plvm_model.concepts import ConceptEncoder
from plvm_model.faces import Face, embedder_class
from plvm_model.injection import PromptTemplate
from plvm_model.store.banks import Bank, BankStore, Concept
from plvm_model.store.errors import BankError, InputError
from plvm_model.store.ids import new_run_id, validate_user_id
from plvm_model.store.people import PeopleStore
from plvm_model.store.storage import read_json_file

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 10
"""Commits an enrollment tries before it refuses: each one lost means another enrollment committed."""

DOMINANCE = 2.0
"""A face at least this many times larger than every other one is the reference face."""

FacePolicy = Literal["largest", "centre"]
"""How the reference face of a photo with several is chosen when no index is given:
``largest``, a face at least :data:`DOMINANCE` times larger than every other one, else the
photo is refused; ``centre``, the face whose box centre is nearest the photo's centre."""


Change = tuple[Concept, int, bool]
"""What a change made of a bank: the concept, the photos it gained, whether it is new."""


class EnrollError(InputError):
    """A refused enrollment: nothing was written."""


@dataclass
class EnrollResult:
    user_id: str
    name: str
    concept_id: str
    references: int
    """Reference photos of the concept, in all."""
    added: int
    """Reference photos added now (a photo enrolled before is not added again)."""
    created: bool
    bank: str
    """The bank's file of this version."""
    version: int
    """The version of the bank holding the concept now."""
    method: str = "plvm"


def validate_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else name
    if not name or len(name) > 100 or any(not ch.isprintable() for ch in name) or any(c in name for c in "<>{}"):
        raise EnrollError(f"invalid concept name {name!r}: 1-100 printable characters, without < > {{ }}")
    return name


def choose_face(
    faces: list[Face],
    size: tuple[int, int],
    path: str,
    face_index: int | None = None,
    policy: FacePolicy = "largest",
) -> int:
    """The index of the reference face among ``faces`` (left to right), or :class:`EnrollError`.

    ``size`` is the photo's (width, height) in the pixels of the faces' boxes. ``face_index``,
    when given, overrides ``policy``.
    """
    if not faces:
        raise EnrollError(f"{path}: no face found in the reference photo")
    if face_index is not None:
        if not 0 <= face_index < len(faces):
            raise EnrollError(f"{path}: --face {face_index} is out of range; the photo has {len(faces)} faces")
        return face_index
    if len(faces) == 1:
        return 0
    if policy == "centre":
        cx, cy = size[0] / 2, size[1] / 2
        return min(range(len(faces)), key=lambda i: _centre_offset(faces[i], cx, cy))
    by_area = sorted(range(len(faces)), key=lambda i: faces[i].area, reverse=True)
    if faces[by_area[0]].area >= DOMINANCE * faces[by_area[1]].area:
        return by_area[0]
    boxes = "; ".join(f"{i}: box {[round(v) for v in f.box]}" for i, f in enumerate(faces))
    raise EnrollError(
        f"{path}: {len(faces)} faces of similar size and no way to choose ({boxes}); "
        "pass --face N (0 = leftmost) or --face-policy centre, or use a photo of the person alone"
    )


def _centre_offset(face: Face, cx: float, cy: float) -> float:
    """Squared distance from the centre of ``face``'s box to (cx, cy)."""
    x1, y1, x2, y2 = face.box
    return ((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2


class Enroller:
    """Enrollment with the face stages and the concept encoder loaded once, for many concepts."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = BankStore(config.bank, config.storage)
        self.models = config.model_paths()
        self.space = embedder_class(config.embed.kind).space
        """The face descriptors' space, recorded in the bank."""
        self.faces = InProcess(face_stages(config))
        self._encoder: ConceptEncoder | None = None
        self._trainer = None
        """The MyVLM trainer (a frozen LLaVA), loaded on first use."""

    @property
    def encoder(self) -> ConceptEncoder:
        if self._encoder is None:
            self._encoder = ConceptEncoder(
                self.models.dinov2,
                self.models.aligner,
                self.models.aligner_shape,
                reference=self.models.aligner_reference,
                device=self.config.models.device,
                random_weights=self.models.random_weights,
            )
        return self._encoder

    def reference_faces(self, paths: list[str]) -> list[dict]:
        """Each reference photo's row after the read, decode, detect, align and embed operators."""
        rows = self.faces(to_table([{"path": p, "user_id": None} for p in paths], ["path", "user_id"])).to_pylist()
        for row in rows:
            if row["error"]:
                raise EnrollError(f"reference photo refused: {row['error']}")
        return rows

    def enroll(
        self,
        user_id: str,
        name: str,
        images: list[str],
        face_index: int | None = None,
        face_policy: FacePolicy = "largest",
    ) -> EnrollResult:
        """Add ``name`` with the reference photos ``images`` to ``user_id``'s bank.

        Each photo's reference face is its face ``face_index`` if given, else the one ``face_policy``
        chooses. The change is committed as the bank's next version; if another enrollment committed
        that version first, the change is applied again to the new version (see the module).
        """
        validate_user_id(user_id)
        name = validate_name(name)
        if not images:
            raise EnrollError("give at least one reference photo")
        _check_policy(face_policy)
        bank = self._load(user_id)  # a damaged bank raises here, before any work
        concept = bank.find(name)
        images = [p for p in images if concept is None or p not in concept.references]
        faces = _ReferenceFaces(self, self.reference_faces(images), face_index, face_policy) if images else None
        if faces is None:
            return self._commit(bank, name, lambda bank: (concept, 0, False))
        return self._commit(bank, name, lambda bank: faces.add_to(bank, name))

    def enroll_myvlm(
        self,
        user_id: str,
        name: str,
        images: list[str],
        captions: dict[str, str],
        face_index: int | None = None,
        face_policy: FacePolicy = "largest",
    ) -> EnrollResult:
        """Add ``name`` to ``user_id``'s bank as a MyVLM concept: its vector trained on ``images``, each with its
        caption (``captions``: file name -> caption naming the person), and their faces as its recognition keys."""
        validate_user_id(user_id)
        name = validate_name(name)
        texts = training_captions(images, captions, name)
        _check_policy(face_policy)
        bank = self._load(user_id)
        _refuse_existing(bank, name)
        faces = _ReferenceFaces(self, self.reference_faces(images), face_index, face_policy)
        run = self.train_myvlm(name, [row_pixels(row) for row in faces.rows], texts)
        concept = Concept.myvlm(name, faces.descriptors, run.vector, self._trainer.identity, list(faces.paths))

        def add(bank: Bank) -> Change:
            _refuse_existing(bank, name)
            bank.concepts.append(concept)
            return concept, len(faces.paths), True

        return self._commit(bank, name, add)

    def enroll_cluster(self, user_id: str, name: str, output_uri: str, cluster_id: int) -> EnrollResult:
        """Enroll ``name`` (PLVM) from the open cluster ``cluster_id`` of ``output_uri``'s suggested people: the
        cluster's best face's photo is the Aligner's reference photo, and its ``people.keys`` best faces (spread over
        the cluster, best first) are the match keys. The cluster is then marked enrolled. Under the user's bank
        lease; a name the bank holds is refused (``plvm people merge --name`` adds a cluster to a person)."""
        user_id, name = user_of(user_id), validate_name(name)
        store = PeopleStore(self.config.people.root(output_uri), self.config.storage)
        where = store.location(user_id)
        run_id = new_run_id()
        with self.store.lease(user_id, run_id, "enroll --from-cluster", self.config.output.lease_expiry_s):
            bank = self._load(user_id)
            if bank.find(name) is not None:
                raise EnrollError(f"{name!r} is already enrolled for user {user_id!r}: plvm people merge OUTPUT "
                                  f"{cluster_id} --name {name!r} adds the cluster's faces to them")  # fmt: skip
            cluster = store.load(user_id, self.space).open_cluster(cluster_id, where)
            vectors, chosen = cluster_vectors(self.config, output_uri, user_id, cluster)
            paths = paths_of(self.config, output_uri, user_id, [cluster.faces[i] for i in chosen])
            row = self.reference_faces(paths[:1])[0]
            found = working_faces(row)
            if not found:
                raise EnrollError(f"{paths[0]}: the cluster's best face is no longer found in its photo")
            got = np.asarray([f["embedding"] for f in row["faces"]], np.float32)
            face = int(np.linalg.norm(got - vectors[chosen[0]], axis=1).argmin())
            soft_tokens, head_weight = self.encoder.encode(row_pixels(row), found[face])
            concept = Concept(name, vectors[chosen], soft_tokens, head_weight, paths)

            def add(bank: Bank) -> Change:
                if bank.find(name) is not None:
                    raise EnrollError(f"{name!r} was enrolled for user {user_id!r} meanwhile")
                bank.concepts.append(concept)
                return concept, len(paths), True

            result = self._commit(bank, name, add)

            def enrolled(people) -> None:
                mine = people.open_cluster(cluster_id, where)
                mine.status, mine.concept_id = "enrolled", concept.concept_id

            change_people(self.config, output_uri, user_id, enrolled)
        return result

    def train_myvlm(self, name: str, images: list[np.ndarray], captions: list[str]):
        """MyVLM's training of ``name``'s vector on the photos and captions, with a progress bar of the loss."""
        import torch
        from tqdm import tqdm

        from plvm_model.myvlm import Example, MyVLMTrainer

        settings = self.config.myvlm
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if self._trainer is None:
            self._trainer = MyVLMTrainer(
                self.models.llava,
                template=PromptTemplate(**self.config.generate.template.model_dump()),
                image_aspect=self.config.generate.image_aspect,
                concept_style=self.config.generate.concept_style,
                dtype=settings.dtype,
                device=settings.device,
                random_weights=self.models.random_weights,
            )
        unknown = self._trainer.unknown_words(name)
        if unknown:
            raise EnrollError(
                f"the LLaVA's tokenizer cannot write {' '.join(unknown)!r} of the name {name!r} (only as its unknown "
                "token): a MyVLM concept must be named in words the model can say"
            )
        bar = tqdm(total=settings.steps, desc=f"training {name!r}", unit="step", file=sys.stderr, disable=None)

        def report(step: int, loss: float, regulariser: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", reg=f"{regulariser:.4f}", refresh=False)
            bar.update()

        try:
            return self._trainer.train(
                [Example(image, caption) for image, caption in zip(images, captions)],
                name,
                **settings.model_dump(exclude={"dtype", "device", "threads"}),
                on_step=report,
            )
        finally:
            bar.close()

    def _commit(self, bank: Bank, name: str, change: Callable[[Bank], Change]) -> EnrollResult:
        """Apply ``change`` (-> the concept, photos added, whether it is new) to ``bank`` and commit it as the next
        version; if another enrollment committed that version first, to the new version (see the module)."""
        user_id = bank.user_id
        for _ in range(COMMIT_ATTEMPTS):
            concept, added, created = change(bank)
            if not added or self.store.commit(bank):
                return EnrollResult(
                    user_id=user_id,
                    name=name,
                    concept_id=concept.concept_id,
                    references=len(concept.references),
                    added=added,
                    created=created,
                    bank=bank.location,
                    version=bank.version,
                    method=concept.method,
                )
            log.warning("version %d of %s's bank was committed by another writer; applying %r to it",
                        bank.version + 1, user_id, name)  # fmt: skip
            bank = self._load(user_id)
        raise BankError(
            f"the concept bank {self.store.location(user_id)} changed {COMMIT_ATTEMPTS} times while {name!r} was "
            "being enrolled, each time before this enrollment could commit; nothing was written: enroll again"
        )

    def _load(self, user_id: str) -> Bank:
        """The user's newest bank (a new one if none), refused if enrolled with another embedder or Aligner."""
        space, aligner = self.space, self.models.aligner_identity
        bank = self.store.load(user_id) or Bank(user_id=user_id, embedder=space, aligner=aligner)
        bank.check_compatible(embedder=space, aligner=aligner, where=f" at {self.config.bank}")
        return bank


class _ReferenceFaces:
    """The reference faces of some photos, ready to be added to a bank (again, if a commit lost a race)."""

    def __init__(self, enroller: Enroller, rows: list[dict], face_index: int | None, face_policy: FacePolicy) -> None:
        self.enroller, self.rows = enroller, rows
        self.chosen = [
            choose_face(working_faces(row), (row["pixels_width"], row["pixels_height"]), row["path"], face_index, face_policy)
            for row in rows
        ]
        self.paths: list[str] = [row["path"] for row in rows]
        self.descriptors = np.asarray([row["faces"][i]["embedding"] for row, i in zip(rows, self.chosen)], np.float32)
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """The soft tokens and head weight of the first photo's reference face (computed once)."""
        if self._tokens is None:
            first = self.rows[0]
            self._tokens = self.enroller.encoder.encode(row_pixels(first), working_faces(first)[self.chosen[0]])
        return self._tokens

    def add_to(self, bank: Bank, name: str) -> tuple[Concept, int, bool]:
        """``bank``'s concept ``name`` (new if it has none) with these faces as references, how many it gained
        (a photo that is a reference already is not added again), and whether it is new."""
        concept = bank.find(name)
        if concept is not None and concept.method != "plvm":
            raise EnrollError(f"{name!r} is a {concept.method} concept of user {bank.user_id!r}: choose another name")
        if concept is None:
            soft_tokens, head_weight = self.tokens()
            concept = Concept(name, self.descriptors, soft_tokens, head_weight, list(self.paths))
            bank.concepts.append(concept)
            return concept, len(self.paths), True
        new = [i for i, path in enumerate(self.paths) if path not in concept.references]
        if new:
            concept.face_descriptors = np.concatenate([concept.face_descriptors, self.descriptors[new]])
            concept.references = [*concept.references, *(self.paths[i] for i in new)]
            concept.updated_at = datetime.now(UTC)
        return concept, len(new), False


def _check_policy(face_policy: str) -> None:
    if face_policy not in get_args(FacePolicy):
        raise EnrollError(f"unknown face policy {face_policy!r}: one of {', '.join(get_args(FacePolicy))}")


def _refuse_existing(bank: Bank, name: str) -> None:
    """A MyVLM concept is trained once, from all its photos: a name the bank holds is refused."""
    found = bank.find(name)
    if found is not None:
        raise EnrollError(
            f"{name!r} is already a {found.method} concept of user {bank.user_id!r}: a MyVLM concept is trained once "
            "from all its photos; choose another name"
        )


def read_captions(path: str) -> dict[str, str]:
    """The JSON object of ``path``: each training photo's file name -> its caption."""
    captions = read_json_file(path, "captions file", EnrollError)
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise EnrollError(f"captions file {path} must hold one JSON object: photo file name -> caption")
    return captions


def training_captions(images: list[str], captions: dict[str, str], name: str) -> list[str]:
    """Each image's caption (by file name), refused unless every image has one that names ``name`` and every
    caption has its image."""
    if not images:
        raise EnrollError("give at least one training photo")
    files = [posixpath.basename(p.rstrip("/")) for p in images]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise EnrollError(f"training photos with the same file name: {', '.join(twice)} (captions are keyed by it)")
    missing = [f for f in files if f not in captions]
    if missing:
        raise EnrollError(f"the captions file has no caption for {', '.join(missing)}")
    unused = sorted(set(captions) - set(files))
    if unused:
        raise EnrollError(f"the captions file has captions for photos not given: {', '.join(unused)}")
    unnamed = [f for f in files if not mentions(captions[f], name)]
    if unnamed:
        raise EnrollError(f"the captions of {', '.join(unnamed)} do not name {name!r}: each caption names the person")
    return [captions[f] for f in files]


def enroll(
    config: Config,
    user_id: str,
    name: str,
    images: list[str],
    face_index: int | None = None,
    face_policy: FacePolicy = "largest",
) -> EnrollResult:
    """Add ``name`` with the reference photos ``images`` to ``user_id``'s bank."""
    validate_user_id(user_id)
    validate_name(name)
    return Enroller(config).enroll(user_id, name, images, face_index, face_policy)

