"""Recognition evaluation: the harness's arithmetic, and the default's figures on the sample people."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_config, photo
from pipelines.cli import run
from pipelines.evaluation.recognition import (
    Decision,
    RecognitionResult,
    best_threshold,
    cross_validate,
    recognition,
    roc_auc,
    says_yes,
)
from test_enroll import side_by_side


def decision(person: str, photo: str, positive: bool, score: float | None) -> Decision:
    return Decision(person, photo, positive, predicted=False, distance=score, score=score)


def test_best_threshold_is_the_middle_of_the_widest_perfect_gap():
    decisions = [decision("a", f"p{i}", True, s) for i, s in enumerate((0.2, 0.3, 0.4))]
    decisions += [decision("a", f"n{i}", False, s) for i, s in enumerate((0.8, 0.9, None))]
    assert best_threshold(decisions) == pytest.approx(0.6)


def test_roc_auc_counts_the_pairs_a_positive_wins_ties_half():
    assert roc_auc([-0.2, -0.3], [-0.8, -0.9]) == 1.0 and roc_auc([-0.5], [-0.5]) == 0.5
    # -0.1 beats all four negatives; -0.4 beats -0.9 and -inf and ties -0.4: (4 + 2.5) / 8
    assert roc_auc([-0.1, -0.4], [-0.2, -0.4, -0.9, -math.inf]) == pytest.approx(6.5 / 8)
    # a photo without a face (-inf) loses to every scored one and ties the other: (0 + 0.5 + 1) / 4
    assert roc_auc([-math.inf, -0.3], [-math.inf, -0.2]) == pytest.approx(1.5 / 4)
    assert math.isnan(roc_auc([], [-0.2])) and math.isnan(roc_auc([-0.2], []))


def test_cross_validation_chooses_each_threshold_without_the_held_out_person():
    people = ("ann", "bob", "cid")
    decisions = []
    for enrolled in people:
        for owner in people:
            for i in range(3):
                positive = enrolled == owner
                # bob's own photos look far from him: a threshold learnt on the others misses them
                score = (0.9 if owner == "bob" else 0.3) if positive else 1.2
                decisions.append(decision(enrolled, f"{owner}/{i}.jpg", positive, score))
    result = RecognitionResult("single", 0, 0, 0, 9, 18, 1.0, 1.0, decisions=decisions)
    cv = cross_validate(result)
    assert cv.thresholds["bob"] == pytest.approx((0.3 + 1.2) / 2)
    assert cv.thresholds["ann"] == pytest.approx((0.9 + 1.2) / 2)
    # in-sample a threshold of 1.05 answers everything right; held out, bob's photos are missed
    assert cv.positive_accuracy == pytest.approx(6 / 9) and cv.negative_accuracy == pytest.approx(1.0)


def test_default_recognition_on_the_sample_people_beats_the_published_figures(tmp_path, yollava, tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "eval", "recognition", str(yollava), "--cv", "--report", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["protocol"] == "single" and (figures["n_positive"], figures["n_negative"]) == (50, 200)
    assert figures["weighted_accuracy"] >= 0.99, done.stdout
    assert figures["positive_accuracy"] >= 0.98 and figures["negative_accuracy"] >= 0.98, done.stdout
    assert "leave-one-person-out" in done.stdout
    page = (tmp_path / "index.html").read_text()
    assert page.count("<figure>") == figures["errors"]


def test_bank_protocol_identifies_each_face_among_everyone(tmp_path, yollava, tiny_models, ray_local):
    result = recognition(make_config(tmp_path), yollava, protocol="bank")
    assert result.protocol == "bank" and result.n_positive == 50 and result.n_negative == 200
    assert result.weighted_accuracy >= 0.98


def eval_folder(root: Path) -> Path:
    """An evaluation folder: thao, willinvietnam and viruss with three photos each, viruss's reference showing
    him between two strangers of his size; broken, with a reference that is not an image and no photos."""
    for person in ("thao", "willinvietnam", "viruss"):
        (root / person).mkdir(parents=True)
        for name in ("0.jpg", "1.jpg", "2.jpg"):
            shutil.copy(photo(person, name), root / person / name)
        if person != "viruss":
            shutil.copy(photo(person, "ref_img.jpg"), root / person / "ref_img.jpg")
    refs = [photo("phuc-map", "ref_img.jpg"), photo("viruss", "ref_img.jpg"), photo("thuytien", "ref_img.jpg")]
    side_by_side(refs, 400, str(root / "viruss" / "ref_img.jpg"))
    (root / "broken").mkdir()
    (root / "broken" / "ref_img.jpg").write_text("not a photo")
    return root


@pytest.mark.parametrize("policy", ["largest", "centre"])
def test_people_whose_reference_cannot_be_enrolled_are_skipped(
    policy, tmp_path, yollava, tiny_models, ray_local, capsys
):
    folder = eval_folder(tmp_path / "set")
    assert run(["eval", "recognition", str(folder), "--face-policy", policy]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(printed.strip().splitlines()[-1])
    skipped = {s["person"]: s["reason"] for s in figures["skipped"]}
    assert figures["face_policy"] == policy
    assert "broken/ref_img.jpg" in skipped.pop("broken")
    if policy == "largest":
        assert "3 faces of similar size" in skipped.pop("viruss")
        # thao and willinvietnam are scored; viruss's photos stay negatives for both
        assert (figures["n_positive"], figures["n_negative"]) == (6, 2 * 6)
    else:
        # the centred face is viruss's: his own photos are recognised
        assert (figures["n_positive"], figures["n_negative"]) == (9, 3 * 6)
    assert not skipped
    assert figures["positive_accuracy"] == 1.0 and figures["negative_accuracy"] == 1.0, printed
    for person in [s["person"] for s in figures["skipped"]]:
        assert f"  skipped {person}: " in printed


def test_the_models_yes_or_no_is_its_first_yes_or_no():
    assert says_yes("Yes, Thao is on the left.") and says_yes("yes")
    assert not says_yes("No. yes") and not says_yes("a man and a woman") and not says_yes("yesterday")


def test_the_model_judges_every_pair_with_the_concept_injected(tmp_path, yollava, tiny_models, ray_local, capsys):
    folder = tmp_path / "set"
    for person in ("thao", "willinvietnam"):
        (folder / person).mkdir(parents=True)
        for name in ("ref_img.jpg", "0.jpg", "1.jpg"):
            shutil.copy(photo(person, name), folder / person / name)
    config = make_config(tmp_path, generate={"max_new_tokens": 4, "questions": []})
    result = recognition(config, folder, judge="model")
    assert result.judge == "model" and (result.n_positive, result.n_negative) == (4, 4)
    pairs = {(d.person, Path(d.photo).parent.name, Path(d.photo).name) for d in result.decisions}
    assert pairs == {(p, o, n) for p in ("thao", "willinvietnam") for o in ("thao", "willinvietnam")
                     for n in ("0.jpg", "1.jpg")}  # fmt: skip
    for d in result.decisions:
        assert d.answer and d.predicted == says_yes(d.answer) and d.distance is None
    by_photo = {}
    for d in result.decisions:
        by_photo.setdefault(d.photo, set()).add(d.answer)
    assert any(len(answers) == 2 for answers in by_photo.values()), "the injected concept changes the answer"

    file = tmp_path / "config.yaml"
    file.write_text(json.dumps(config.model_dump(mode="json")))
    assert run(["eval", "recognition", str(folder), "--judge", "model", "--config", str(file)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(printed.strip().splitlines()[-1])
    assert figures["judge"] == "model" and figures["errors"] == len(result.errors())
    assert "the model's yes or no (Is <sks> in this photo?)" in printed
    assert run(["eval", "recognition", str(folder), "--judge", "model", "--cv", "--config", str(file)]) == 2
    assert "need --judge face" in capsys.readouterr().err
