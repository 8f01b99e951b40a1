"""Face descriptors: dlib's 128-d ResNet with its 5-point aligner (both ship in face_recognition_models).

The embedder sits behind :class:`FaceEmbedder` so that a stronger model can be dropped in:
it only has to turn faces found by the detector into fixed-length vectors compared by
Euclidean distance. It does so in two steps, as facenet-pytorch's MTCNN hands aligned crops
to its ResNet: :meth:`FaceEmbedder.chips` cuts each face's aligned chips out of the photo
(cheap, needs the photo), :meth:`FaceEmbedder.describe` runs the network on them (costly,
needs only the chips), so that a pipeline can pass small chips instead of whole photos
between the two.
"""

from __future__ import annotations

import importlib.util
from functools import cache, cached_property
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
    chip_shape: tuple[int, ...]
    """The shape of every chip (uint8)."""

    def chips(self, image: np.ndarray, face: Face) -> list[np.ndarray]:
        """The face's aligned chips in an RGB uint8 image (H, W, 3): the network's input."""
        ...

    def describe(self, chips: list[list[np.ndarray]]) -> np.ndarray:
        """One float32 descriptor per face from its chips, shape (len(chips), dim)."""
        ...

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """One float32 descriptor per face, shape (len(faces), dim): :meth:`describe` of their :meth:`chips`."""
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
    chip_shape = (CHIP_SIZE, CHIP_SIZE, 3)

    def __init__(self, num_jitters: int = 0, flip: bool = True, padding: float = 0.25, alignment: str = "both") -> None:
        import dlib

        if alignment not in ALIGNMENTS:
            raise ValueError(f"face alignment must be one of {ALIGNMENTS}, not {alignment!r}")
        face_models_dir()  # the package is there: a stage without it fails to start, before any photo
        self._dlib = dlib
        self.num_jitters = num_jitters
        self.flip = flip
        self.padding = padding
        self.alignment = alignment
        self.name = f"dlib-resnet-v1(align={alignment},flip={int(flip)},jitter={num_jitters})"

    @cached_property
    def _shape(self):
        """dlib's 5-point shape predictor (loaded by the first chip: a process that only describes never does)."""
        return self._dlib.shape_predictor(str(face_models_dir() / "shape_predictor_5_face_landmarks.dat"))

    @cached_property
    def _net(self):
        """dlib's descriptor network (loaded by the first description: a process that only cuts chips never does)."""
        model = face_models_dir() / "dlib_face_recognition_resnet_model_v1.dat"
        return self._dlib.face_recognition_model_v1(str(model))

    def chips(self, image: np.ndarray, face: Face) -> list[np.ndarray]:
        """The face's 150x150 chips: the network's input, before mirroring."""
        image = np.ascontiguousarray(image)
        chips = []
        if self.alignment in ("dlib", "both"):
            x1, y1, x2, y2 = face.box
            shape = self._shape(image, self._dlib.rectangle(round(x1), round(y1), round(x2), round(y2)))
            chips.append(self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=self.padding))
        if self.alignment in ("landmarks", "both"):
            chips.append(landmark_chip(image, face.landmarks))
        return chips

    def describe(self, chips: list[list[np.ndarray]]) -> np.ndarray:
        if not chips:
            return np.zeros((0, self.dim), np.float32)
        if self.flip:
            chips = [face + [np.ascontiguousarray(c[:, ::-1]) for c in face] for face in chips]
        batch = [chip for face in chips for chip in face]
        vectors = np.asarray(self._net.compute_face_descriptor(batch, self.num_jitters), np.float32)
        return vectors.reshape(len(chips), -1, self.dim).mean(axis=1)

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        return self.describe([self.chips(image, face) for face in faces])


EMBEDDERS: dict[str, type] = {"dlib": DlibEmbedder}


def embedder_class(kind: str) -> type:
    """The embedder class named ``kind``; its ``space`` names the descriptors it writes, without loading it."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown face embedder {kind!r}; available: {', '.join(EMBEDDERS)}")
    return EMBEDDERS[kind]


def make_embedder(kind: str, **options: Any) -> FaceEmbedder:
    """The embedder named ``kind`` with its options (the ``embed`` config section)."""
    return embedder_class(kind)(**options)
