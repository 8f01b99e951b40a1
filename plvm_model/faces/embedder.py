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


class DlibEmbedder:
    """dlib ``face_recognition_model_v1`` on chips aligned by dlib's 5-point shape predictor.

    ``flip`` averages the descriptors of the chip and its mirror image; ``num_jitters``
    averages over that many randomly jittered copies (dlib's own option, deterministic seed).
    """

    dim = 128
    space = "dlib-resnet-v1"

    def __init__(self, num_jitters: int = 0, flip: bool = False, padding: float = 0.25) -> None:
        import dlib

        models = face_models_dir()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.num_jitters = num_jitters
        self.flip = flip
        self.padding = padding
        self.name = f"dlib-resnet-v1(jitter={num_jitters},flip={int(flip)})"

    def chips(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """150x150 aligned face chips, the network's input."""
        image = np.ascontiguousarray(image)
        chips = []
        for face in faces:
            x1, y1, x2, y2 = face.box
            rect = self._dlib.rectangle(round(x1), round(y1), round(x2), round(y2))
            shape = self._shape(image, rect)
            chips.append(self._dlib.get_face_chip(image, shape, size=150, padding=self.padding))
        return chips

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        chips = self.chips(image, faces)
        batch = chips + [np.ascontiguousarray(c[:, ::-1]) for c in chips] if self.flip else chips
        vectors = np.asarray(self._net.compute_face_descriptor(batch, self.num_jitters), np.float32)
        if self.flip:
            vectors = (vectors[: len(chips)] + vectors[len(chips) :]) / 2
        return vectors


def make_embedder(kind: str, **options: Any) -> FaceEmbedder:
    """The embedder named ``kind`` with its options (the ``faces.embedder`` config section)."""
    if kind == "dlib":
        return DlibEmbedder(**options)
    raise ValueError(f"unknown face embedder {kind!r}; available: dlib")
