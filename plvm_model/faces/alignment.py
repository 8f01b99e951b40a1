"""Face chips aligned from MTCNN's own five landmarks.

dlib's descriptor network expects 150-pixel chips in which the face sits where dlib's own
alignment puts it. :data:`CHIP_TEMPLATE` says where MTCNN's five points (eye centres, nose
tip, mouth corners) fall in such a chip; a face is aligned by the least-squares similarity
transform of its MTCNN points onto the template. On held-out people this second alignment
carries information dlib's 5-point predictor misses (profiles, small faces), and the mean of
the descriptors of both chips separates people better than either
(``scripts/fit_chip_template.py`` measures the template; docs/evaluation.md gives the figures).
"""

from __future__ import annotations

import numpy as np

CHIP_SIZE = 150
CHIP_TEMPLATE = np.array(
    [[47.25, 45.56], [101.75, 45.56], [74.5, 79.39], [49.52, 104.06], [99.48, 104.06]], np.float64
)
"""MTCNN's points in a 150 px dlib chip (padding 0.25): the symmetric median over near-frontal faces of
the sample set, measured by ``scripts/fit_chip_template.py``."""


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (scale, rotation, translation) that best maps ``source`` points onto ``target``.

    Least squares over the point pairs (Umeyama's closed form), without reflection.
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    u, singular, vt = np.linalg.svd(centred_t.T @ centred_s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = (singular * np.diag(sign)).sum() / (centred_s**2).sum(1).mean()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def landmark_chip(image: np.ndarray, landmarks, template: np.ndarray = CHIP_TEMPLATE) -> np.ndarray:
    """The 150x150 chip of the face whose MTCNN ``landmarks`` best match ``template``."""
    import dlib

    chip_to_image = similarity_transform(template, np.asarray(landmarks, np.float64))
    scale = float(np.hypot(chip_to_image[0, 0], chip_to_image[1, 0]))
    angle = float(np.arctan2(chip_to_image[1, 0], chip_to_image[0, 0]))
    centre = (CHIP_SIZE - 1) / 2
    cx, cy = chip_to_image @ np.array([centre, centre, 1.0])
    half = scale * centre
    details = dlib.chip_details(
        dlib.drectangle(cx - half, cy - half, cx + half, cy + half), dlib.chip_dims(CHIP_SIZE, CHIP_SIZE), angle
    )
    return dlib.extract_image_chip(np.ascontiguousarray(image), details)
