"""Choosing the concepts a photo's prompt injects: the closest matches, in left-to-right order, capped."""

from __future__ import annotations

import logging

import numpy as np

from plvm_model.store.banks import BankSource
from operators.prompt import ChooseConcepts, PromptConfig
from operators.rows import injected_tokens
from operators.rows import to_table
from plvm_model.store.banks import Concept, BankStore, Bank


def test_the_closest_concepts_are_injected_left_to_right_and_the_cap_is_logged(tmp_path, caplog):
    rng = np.random.default_rng(0)
    concepts = [
        Concept(name, rng.normal(size=(1, 128)).astype(np.float32), rng.normal(size=(17, 8)).astype(np.float32),
                rng.normal(size=8).astype(np.float32), [f"/{name}.jpg"])
        for name in ("Mike", "Susan", "Tom")
    ]  # fmt: skip
    BankStore(str(tmp_path)).save(Bank("ann", "dlib-resnet-v1", "aligner-x", concepts))
    faces = [  # left to right: Tom (far match), Susan, Mike (closest)
        {"box": [10, 0, 20, 10], "concept": "Tom", "concept_id": concepts[2].concept_id, "distance": 0.5},
        {"box": [30, 0, 40, 10], "concept": "Susan", "concept_id": concepts[1].concept_id, "distance": 0.4},
        {"box": [50, 0, 60, 10], "concept": "Mike", "concept_id": concepts[0].concept_id, "distance": 0.3},
        {"box": [70, 0, 80, 10], "concept": None, "concept_id": None, "distance": 0.9},
    ]
    batch = to_table([{"path": "/p.jpg", "user_id": "ann", "faces": faces}], ["path", "user_id", "faces"])
    with caplog.at_level(logging.INFO, logger="operators.prompt"):
        out = ChooseConcepts(PromptConfig(max_concepts=2), BankSource(str(tmp_path)), aligner="aligner-x")(batch)
    (row,) = out.to_pylist()
    tokens = injected_tokens(row)
    assert [t.name for t in tokens] == ["Susan", "Mike"], "the two closest, as they stand left to right"
    np.testing.assert_array_equal(tokens[1].soft_tokens, concepts[0].soft_tokens)
    np.testing.assert_array_equal(tokens[0].head_weight, concepts[1].head_weight)
    assert "3 concepts recognised, injecting the 2 closest" in caplog.text and "leaving out Tom" in caplog.text

    other = ChooseConcepts(PromptConfig(), BankSource(str(tmp_path)), aligner="aligner-y")(batch).to_pylist()[0]
    assert other["error_kind"] == "bank_error" and "enrolled with Aligner 'aligner-x'" in other["error"]
