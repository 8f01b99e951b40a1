"""Face descriptors: dlib's 128-d ResNet with its 5-point aligner (both ship in face_recognition_models).

The embedder sits behind :class:`FaceEmbedder` so that a stronger model can be dropped in:
it only has to turn faces found by the detector into fixed-length vectors compared by
Euclidean distance.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from plvm_model.faces.alignment import CHIP_SIZE, landmark_chip
from plvm_model.faces.detector import Face


class FaceEmbedder(Protocol):
    name: str
    space: str
    """Names the descriptor space: descriptors of one space are comparable, whatever the options."""
    dim: int

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """One float32 descriptor per face, shape (len(faces), dim)."""
        ...


@cache
def face_models_dir() -> Path:
    """The folder of dlib model files inside the installed face_recognition_models package.

    The package's own import helper needs ``pkg_resources`` (gone from current setuptools),
    so its files are found through the import system instead.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "face_recognition_models is not installed: it carries dlib's face descriptor and "
            "landmark models (pip install face_recognition_models)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


ALIGNMENTS = ("dlib", "landmarks", "both")


class DlibEmbedder:
    """dlib ``face_recognition_model_v1`` on aligned 150 px chips.

    ``alignment``: ``dlib`` (its 5-point shape predictor on the detector's box, as dlib
    intends), ``landmarks`` (a similarity transform of MTCNN's own five points, see
    :mod:`plvm_model.faces.alignment`) or ``both``. ``flip`` adds each chip's mirror image.
    The descriptor is the mean over these chips; ``num_jitters`` is dlib's own averaging
    over randomly jittered copies.
    """

    dim = 128
    space = "dlib-resnet-v1"

    def __init__(
        self, num_jitters: int = 0, flip: bool = True, padding: float = 0.25, alignment: str = "both"
    ) -> None:
        import dlib

        if alignment not in ALIGNMENTS:
            raise ValueError(f"face alignment must be one of {ALIGNMENTS}, not {alignment!r}")
        models = face_models_dir()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.num_jitters = num_jitters
        self.flip = flip
        self.padding = padding
        self.alignment = alignment
        self.name = f"dlib-resnet-v1(align={alignment},flip={int(flip)},jitter={num_jitters})"

    def chips(self, image: np.ndarray, face: Face) -> list[np.ndarray]:
        """The face's 150x150 chips: the network's input, before mirroring."""
        chips = []
        if self.alignment in ("dlib", "both"):
            x1, y1, x2, y2 = face.box
            shape = self._shape(image, self._dlib.rectangle(round(x1), round(y1), round(x2), round(y2)))
            chips.append(self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=self.padding))
        if self.alignment in ("landmarks", "both"):
            chips.append(landmark_chip(image, face.landmarks))
        return chips

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        image = np.ascontiguousarray(image)
        per_face = [self.chips(image, face) for face in faces]
        if self.flip:
            per_face = [chips + [np.ascontiguousarray(c[:, ::-1]) for c in chips] for chips in per_face]
        batch = [chip for chips in per_face for chip in chips]
        vectors = np.asarray(self._net.compute_face_descriptor(batch, self.num_jitters), np.float32)
        return vectors.reshape(len(faces), -1, self.dim).mean(axis=1)


EMBEDDERS: dict[str, type] = {"dlib": DlibEmbedder}


def embedder_class(kind: str) -> type:
    """The embedder class named ``kind``; its ``space`` names the descriptors it writes, without loading it."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown face embedder {kind!r}; available: {', '.join(EMBEDDERS)}")
    return EMBEDDERS[kind]


def make_embedder(kind: str, **options: Any) -> FaceEmbedder:
    """The embedder named ``kind`` with its options (the ``embed`` config section)."""
    return embedder_class(kind)(**options)
