"""Cohort scales: gathered in the driver for a run that fits, grouped by user on Ray for a larger one; the same figures."""

from __future__ import annotations

import numpy as np
import pytest

from plvm_model.store.banks import BankSource
from operators.match import MatchConfig, MatchFaces
from operators.cohort import cohort_scales
from operators.rows import to_table
from plvm_model.store.banks import Concept, BankStore, Bank
from plvm_model.faces.matching import cohort_scale


def _concept(name: str, vector: np.ndarray) -> Concept:
    return Concept(name, vector[None].astype(np.float32), np.zeros((17, 8), np.float32), np.zeros(8, np.float32), [])


@pytest.fixture
def run(tmp_path):
    """Two users' banks and 40 photos of theirs, each face near one of their concepts or a stranger."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 128)) * 0.1
    store = BankStore(str(tmp_path))
    banks = {
        "ann": Bank("ann", "test-space", "none", [_concept("Mike", centres[0]), _concept("Sue", centres[1])]),
        "bob": Bank("bob", "test-space", "none", [_concept("Mike", centres[2])]),
    }
    for bank in banks.values():
        store.save(bank)
    rows = []
    for i in range(40):
        user = ("ann", "bob")[i % 2]
        who = centres[rng.integers(0, 4)] if i % 3 else rng.normal(size=128) * 0.1
        face = {"box": [0, 0, 10, 10], "score": 0.99, "landmarks": [[0, 0]] * 5,
                "embedding": (who + rng.normal(size=128) * 0.02).astype(np.float32).tolist()}  # fmt: skip
        rows.append({"path": f"{user}/{i}.jpg", "user_id": user, "faces": [face] if i % 7 else []})
    return str(tmp_path), banks, to_table(rows, ["path", "user_id", "faces"])


def test_scales_are_the_same_gathered_or_grouped_and_follow_the_definition(run, ray_local):
    import ray.data

    uri, banks, table = run
    config = MatchConfig()
    ds = ray.data.from_arrow([table.slice(i, 5) for i in range(0, table.num_rows, 5)]).materialize()
    source = BankSource(uri)
    in_driver = cohort_scales(table, config, source, embedder_space="test-space")
    gathered = cohort_scales(ds, config, source, embedder_space="test-space")
    grouped = cohort_scales(ds, config.model_copy(update={"cohort_gather_mb": 0}), source, embedder_space="test-space")
    assert len(in_driver) == 3
    assert gathered == pytest.approx(in_driver) and grouped == pytest.approx(in_driver)

    # ann's Mike: the cohort is ann's other concept and every face of ann's photos
    ann = [row["faces"] for row in table.to_pylist() if row["user_id"] == "ann"]
    faces = np.array([f["embedding"] for photo in ann for f in photo], np.float32)
    mike, sue = banks["ann"].concepts
    expected = cohort_scale(
        mike.face_descriptors, np.concatenate([sue.face_descriptors, faces]), config.cohort_min_distance,
        config.cohort_fraction,
    )  # fmt: skip
    assert in_driver[("ann", mike.concept_id)] == pytest.approx(expected)

    # the match stage names faces by distance / scale
    matched = MatchFaces(config, source, embedder_space="test-space", scales=in_driver)(table).to_pylist()
    for row in matched:
        for face in row["faces"]:
            if face["concept"] is not None:
                assert face["relative_distance"] <= config.relative_threshold


def test_a_face_near_a_rejected_face_of_a_concept_is_never_named_it(tmp_path):
    rng = np.random.default_rng(5)
    mike, stranger = rng.normal(size=(2, 128)).astype(np.float32) * 0.05
    concept = _concept("Mike", mike)
    store = BankStore(str(tmp_path))
    store.save(Bank("ann", "test-space", "none", [concept]))
    faces = [{"box": [0, 0, 10, 10], "score": 0.99, "landmarks": [[0, 0]] * 5, "embedding": v.tolist()}
             for v in (mike + 0.001, stranger, mike + 0.01)]  # fmt: skip
    rows = to_table([{"path": f"{i}.jpg", "user_id": "ann", "faces": [f]} for i, f in enumerate(faces)],
                    ["path", "user_id", "faces"])  # fmt: skip
    config = MatchConfig(normalization="none", threshold=1.5)
    named = MatchFaces(config, BankSource(str(tmp_path)))(rows).column("concepts").to_pylist()
    assert named == [["Mike"], ["Mike"], ["Mike"]], "everyone is near Mike at this threshold"
    bank = store.load("ann")
    bank.concepts[0].rejected = np.asarray([faces[0]["embedding"]], np.float32)
    store.save(bank)
    named = MatchFaces(config, BankSource(str(tmp_path)))(rows).column("concepts").to_pylist()
    assert named == [[], ["Mike"], ["Mike"]], "the rejected face only (and faces within match.rejected_radius)"
    forgotten = to_table([{"path": "f.jpg", "user_id": "ann", "faces": [{**faces[1], "embedding": []}]}],
                         ["path", "user_id", "faces"])  # fmt: skip
    assert MatchFaces(config, BankSource(str(tmp_path)))(forgotten).column("concepts").to_pylist() == [[]]
