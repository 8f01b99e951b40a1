"""Measure where MTCNN's five points fall in dlib's 150 px face chips (``alignment.CHIP_TEMPLATE``).

    .venv/bin/python scripts/fit_chip_template.py [PHOTOS_DIR]

For every confident, near-frontal, large face of the photos (default: the sample set), the
face is aligned by dlib's 5-point predictor as the descriptor expects, and MTCNN's points
are mapped into that chip; the template is their median, made left-right symmetric. No
identities are used. It also
prints how close the descriptors of the two alignments of the same face are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dlib
import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plvm_model.faces import DlibEmbedder, MTCNNDetector  # noqa: E402
from plvm_model.faces.alignment import CHIP_SIZE, landmark_chip  # noqa: E402


def yaw(landmarks) -> float:
    """Nose offset from the eye midpoint along the eye axis, in eye distances (0: frontal)."""
    (lx, ly), (rx, ry), (nx, ny) = landmarks[:3]
    eyes = np.hypot(rx - lx, ry - ly) + 1e-6
    return float(((nx - (lx + rx) / 2) * (rx - lx) + (ny - (ly + ry) / 2) * (ry - ly)) / eyes**2)


def to_chip(details, points) -> np.ndarray:
    """Image points in the chip's pixel coordinates (the inverse of dlib's chip mapping)."""
    rect = details.rect
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    scale = (rect.right() - rect.left()) / (CHIP_SIZE - 1)
    c, s = np.cos(details.angle), np.sin(details.angle)
    inverse = np.array([[c, s], [-s, c]]) / scale
    return (np.asarray(points) - centre) @ inverse.T + (CHIP_SIZE - 1) / 2


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "yollava-humans")
    detector, embedder = MTCNNDetector(), DlibEmbedder()
    points, pairs = [], []
    for path in sorted(folder.rglob("*.jpg")):
        image = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        for face in detector.detect(image):
            if face.score < 0.99 or abs(yaw(face.landmarks)) > 0.1 or face.area < 80 * 80:
                continue
            x1, y1, x2, y2 = face.box
            shape = embedder._shape(image, dlib.rectangle(round(x1), round(y1), round(x2), round(y2)))
            points.append(to_chip(dlib.get_face_chip_details(shape, CHIP_SIZE, 0.25), face.landmarks))
            pairs.append((image, face))
    template = np.median(np.array(points), axis=0)
    # Faces are symmetric: average the template with its mirror image (left and right swapped).
    mirrored = template[[1, 0, 2, 4, 3]] * [-1, 1] + [CHIP_SIZE - 1, 0]
    template = (template + mirrored) / 2
    print(f"{len(points)} faces; template (x, y) in a {CHIP_SIZE} px chip, made symmetric:")
    print(np.array2string(template, precision=2, separator=", "))
    gaps = []
    for image, face in pairs[:20]:
        a = embedder.embed(image, [face])[0]
        b = np.asarray(embedder._net.compute_face_descriptor(landmark_chip(image, face.landmarks, template)))
        gaps.append(np.linalg.norm(a - b))
    print(f"descriptor distance, dlib chip vs landmark chip of the same face: median {np.median(gaps):.3f}")


if __name__ == "__main__":
    main()
