"""Face detection and 5-point landmarks with facenet-pytorch's MTCNN (weights ship in its wheel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Face:
    """One detected face, in pixel coordinates of the image it was detected on."""

    box: tuple[float, float, float, float]
    """x1, y1, x2, y2."""
    score: float
    landmarks: tuple[tuple[float, float], ...]
    """Five (x, y) points: left eye, right eye, nose, left and right mouth corner."""

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def scaled(self, factor: float) -> Face:
        """The same face in an image ``factor`` times as large."""
        return Face(
            box=tuple(v * factor for v in self.box),  # type: ignore[arg-type]
            score=self.score,
            landmarks=tuple((x * factor, y * factor) for x, y in self.landmarks),
        )


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image (H, W, 3), ordered left to right."""
        ...


class MTCNNDetector:
    """MTCNN on a copy of the image resized so that its long side is at most ``long_side``.

    Detection at full resolution of multi-megapixel photos is several times slower and finds
    the same faces; boxes and landmarks are returned in the coordinates of the image given.
    """

    name = "mtcnn"

    def __init__(
        self,
        long_side: int = 1024,
        min_face_size: int = 20,
        score_threshold: float = 0.9,
        stage_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        device: str = "cpu",
    ) -> None:
        from facenet_pytorch import MTCNN

        self.long_side = long_side
        self.min_face_size = min_face_size
        self.score_threshold = score_threshold
        self._mtcnn = MTCNN(
            min_face_size=min_face_size,
            thresholds=list(stage_thresholds),
            keep_all=True,
            post_process=False,
            device=device,
        )

    def detect(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        scale = min(1.0, self.long_side / max(height, width))
        pil = Image.fromarray(image)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            pil = pil.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        if min(pil.size) < self.min_face_size:
            return []  # smaller than the smallest face MTCNN looks for (its image pyramid would be empty)
        boxes, probs, points = self._mtcnn.detect(pil, landmarks=True)
        if boxes is None:
            return []
        faces = []
        for box, prob, pts in zip(boxes, probs, points):
            if prob is None or prob < self.score_threshold:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            box_clipped = (max(0.0, x1), max(0.0, y1), min(pil.width, x2), min(pil.height, y2))
            if box_clipped[2] <= box_clipped[0] or box_clipped[3] <= box_clipped[1]:
                continue
            face = Face(
                box=box_clipped,
                score=float(prob),
                landmarks=tuple((float(x), float(y)) for x, y in pts),
            )
            faces.append(face.scaled(1.0 / scale) if scale < 1.0 else face)
        return sorted(faces, key=lambda f: f.box[0])
