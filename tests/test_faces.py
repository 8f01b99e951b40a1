"""Face detection, embedding and matching with the real MTCNN and dlib weights on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import photo
from plvm_model.faces import DlibEmbedder, MTCNNDetector
from plvm_model.faces.matching import Match, assign, distance_matrix


def load(path: str) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


@pytest.fixture(scope="module")
def models():
    return MTCNNDetector(), DlibEmbedder()


def test_one_face_on_each_reference_with_landmarks_inside_the_box(yollava, models):
    detector, _ = models
    for person in ("thao", "viruss", "willinvietnam"):
        image = load(photo(person, "ref_img.jpg"))
        faces = detector.detect(image)
        assert len(faces) == 1, person
        x1, y1, x2, y2 = faces[0].box
        assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
        assert faces[0].score > 0.95
        for x, y in faces[0].landmarks:
            assert x1 <= x <= x2 and y1 <= y <= y2


def test_detection_coordinates_follow_the_original_image(yollava, models):
    """Detection runs on a downscaled copy; the boxes come back in the input's pixels."""
    detector, _ = models
    image = load(photo("thao", "ref_img.jpg"))
    big = np.asarray(Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2)))
    small_box = np.array(detector.detect(image)[0].box)
    big_box = np.array(detector.detect(big)[0].box)
    assert np.allclose(big_box, small_box * 2, atol=0.05 * (small_box[2] - small_box[0]) * 2)


def test_same_person_is_closer_than_another_person(yollava, models):
    detector, embedder = models

    def descriptor(person: str, name: str) -> np.ndarray:
        image = load(photo(person, name))
        faces = detector.detect(image)
        largest = max(faces, key=lambda f: f.area)
        return embedder.embed(image, [largest])[0]

    ref = descriptor("thao", "ref_img.jpg")
    same = [np.linalg.norm(ref - descriptor("thao", f"{i}.jpg")) for i in range(3)]
    other = [np.linalg.norm(ref - descriptor("viruss", f"{i}.jpg")) for i in range(3)]
    assert max(same) < min(other)
    assert max(same) < 0.6


def test_flip_averaging_is_symmetric_and_close_to_plain(yollava, models):
    detector, _ = models
    plain, flipped = DlibEmbedder(alignment="dlib", flip=False), DlibEmbedder(alignment="dlib", flip=True)
    image = load(photo("viruss", "ref_img.jpg"))
    faces = detector.detect(image)
    a, b = plain.embed(image, faces)[0], flipped.embed(image, faces)[0]
    assert a.shape == b.shape == (128,)
    assert 0 < np.linalg.norm(a - b) < 0.2
    assert plain.embed(image, []).shape == (0, 128)


def test_assignment_is_one_to_one_and_respects_the_threshold():
    concepts = [np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[5.0, 5.0], [0.0, 0.2]])]
    faces = np.array([[0.05, 0.0], [0.1, 0.0], [9.0, 9.0]])
    d = distance_matrix(faces, concepts)
    assert d.shape == (3, 3)
    assert d[0, 2] == pytest.approx(np.hypot(0.05, 0.2)), "a concept's distance is to its nearest reference"
    matches = assign(d, threshold=0.5)
    assigned = [m.concept for m in matches]
    # both near faces would take concept 0; one-to-one gives the other one concept 2 instead
    assert sorted(assigned[:2]) == [0, 2]
    assert assigned[2] is None and matches[2].distance == pytest.approx(d[2].min())
    assert all(m.concept is None for m in assign(d, threshold=0.01))
    assert assign(distance_matrix(faces, []), 0.5) == [Match(None, None)] * 3


def test_landmark_alignment_agrees_with_dlibs_and_both_average(yollava, models):
    detector, both_flipped = models
    image = load(photo("thuytien", "ref_img.jpg"))
    faces = detector.detect(image)
    by_landmarks = DlibEmbedder(alignment="landmarks", flip=False).embed(image, faces)[0]
    both = DlibEmbedder(alignment="both", flip=False).embed(image, faces)[0]
    plain = DlibEmbedder(alignment="dlib", flip=False).embed(image, faces)[0]
    assert np.linalg.norm(both_flipped.embed(image, faces)[0] - both) < 0.1, "the default: both, and mirrored"
    assert 0 < np.linalg.norm(plain - by_landmarks) < 0.25, "the two alignments see the same face"
    assert np.linalg.norm(both - (plain + by_landmarks) / 2) < 0.1
    with pytest.raises(ValueError, match="alignment must be one of"):
        DlibEmbedder(alignment="eyes")


def test_similarity_transform_recovers_a_known_transform():
    from plvm_model.faces.alignment import CHIP_TEMPLATE, similarity_transform

    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = CHIP_TEMPLATE @ (scale * rotation).T + shift
    matrix = similarity_transform(CHIP_TEMPLATE, moved)
    assert np.allclose(matrix[:, :2], scale * rotation) and np.allclose(matrix[:, 2], shift)


def test_an_image_smaller_than_a_face_has_no_faces(models):
    detector, _ = models
    assert detector.detect(np.zeros((8, 6, 3), np.uint8)) == []
    assert detector.detect(np.full((19, 300, 3), 128, np.uint8)) == []


def test_cohort_scale_is_a_lower_tail_mean_beyond_the_self_cut():
    from plvm_model.faces.matching import cohort_scale

    reference = np.zeros((1, 2), np.float32)
    cohort = np.array([[0.1, 0], [0.3, 0], [0.6, 0], [0.7, 0], [0.8, 0], [0.9, 0]], np.float32)
    assert cohort_scale(reference, cohort, min_distance=0.55, fraction=0.5) == pytest.approx((0.6 + 0.7) / 2)
    assert cohort_scale(reference, cohort, min_distance=0.55, fraction=0.01) == pytest.approx(0.6), "at least one"
    assert cohort_scale(reference, cohort, min_distance=0.95, fraction=0.5) is None, "no cohort beyond the cut"
    assert cohort_scale(reference, cohort[:0], min_distance=0.0, fraction=0.5) is None
