"""``plvm eval vqa``: PLVM's multiple-choice format, position questions from the face box, the rest by the model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import make_config, photo
from pipelines.cli import run
from pipelines.evaluation.vqa import load_items, model_choice, position_choice

SIDES = {"A": "left", "B": "middle", "C": "right"}


def test_choices_are_read_from_letters_option_text_and_face_position():
    choices = {"A": "black", "B": "brown hair", "C": "blue"}
    assert model_choice("B. brown hair", choices) == "B"
    assert model_choice("It looks brown hair to me", choices) == "B"
    assert model_choice("no idea", choices) is None
    corners = {"A": "top-left", "B": "top-right", "C": "middle"}
    assert position_choice([10, 10, 50, 50], 400, 300, corners) == "A"
    assert position_choice([350, 20, 390, 60], 400, 300, corners) == "B"
    assert position_choice([180, 30, 220, 70], 400, 300, corners) == "C"


def test_question_files_are_checked(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"ref_img": "a.jpg", "question": "Is <sks> here?", "multiple_choice": {"A": "yes"}}]))
    with pytest.raises(ValueError, match="item 1 lacks correct_answer"):
        load_items(bad)
    bad.write_text(json.dumps([{"ref_img": "a.jpg", "question": "?", "multiple_choice": {"A": "y"}, "correct_answer": "B"}]))
    with pytest.raises(ValueError, match="'B' is not an option"):
        load_items(bad)
    bad.write_text(json.dumps([{"ref_img": "a.jpg", "question": "?", "multiple_choice": {"A": "y"}, "correct_answer": "A"}]))
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        load_items(bad)


def _placed(source: str, side: str, out) -> str:
    """The photo pasted at the left or right end of a canvas three times its width."""
    image = Image.open(source).convert("RGB")
    canvas = Image.new("RGB", (image.width * 3, image.height), (128, 128, 128))
    canvas.paste(image, (0 if side == "left" else image.width * 2, 0))
    canvas.save(out)
    return out.name


def test_eval_vqa_answers_positions_from_the_matched_face_and_asks_the_model_the_rest(
    tmp_path, yollava, tiny_models, ray_local, capsys
):
    thao = tmp_path / "thao"
    thao.mkdir()
    Image.open(photo("thao", "ref_img.jpg")).save(thao / "ref_img.jpg")
    left = _placed(photo("thao", "2.jpg"), "left", thao / "left.jpg")
    right = _placed(photo("thao", "3.jpg"), "right", thao / "right.jpg")
    Image.open(photo("viruss", "1.jpg")).save(thao / "someone-else.jpg")
    (thao / "broken.jpg").write_bytes(open(photo("thao", "4.jpg"), "rb").read()[:300])
    where = "Where is the position of <sks> in this photo?"
    items = [
        {"ref_img": "thao/ref_img.jpg", "query_img": f"thao/{left}", "question": where, "multiple_choice": SIDES,
         "correct_answer": "A"},
        {"ref_img": "thao/ref_img.jpg", "query_img": f"thao/{right}", "question": where, "multiple_choice": SIDES,
         "correct_answer": "C"},
        # <sks> is not in this photo: no matched face, so the model is asked
        {"ref_img": "thao/ref_img.jpg", "query_img": "thao/someone-else.jpg", "question": where,
         "multiple_choice": SIDES, "correct_answer": "B"},
        {"ref_img": "thao/ref_img.jpg", "question": "Is <sks> a man or a woman?",
         "multiple_choice": {"A": "man", "B": "woman"}, "correct_answer": "B"},
        {"ref_img": "thao/ref_img.jpg", "query_img": "thao/broken.jpg", "question": where, "multiple_choice": SIDES,
         "correct_answer": "A"},
    ]  # fmt: skip
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(items))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(make_config(tmp_path).model_dump(mode="json")))
    answers = tmp_path / "answers.jsonl"

    assert run(["eval", "vqa", str(questions), "--config", str(config), "--answers", str(answers)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert summary["n"] == 5 and len(rows) == 5
    assert [r["source"] for r in rows] == ["face box", "face box", "model", "model", "unreadable photo"]
    assert [r["choice"] for r in rows[:2]] == ["A", "C"], "the face box places Thao left, then right"
    assert rows[4]["choice"] is None and "broken.jpg" in rows[4]["text"]
    for row in rows[2:4]:
        assert row["text"], "the model wrote an answer"
        assert row["choice"] in (None, *row["choices"])
        assert "Thao" not in row["question"] and row["right"] == (row["choice"] == row["answer"])
    assert summary["by_source"] == {
        "model": [sum(r["right"] for r in rows[2:4]), 2],
        "face box": [2, 2],
        "unreadable photo": [0, 1],
    }
    assert summary["accuracy"] == pytest.approx(sum(r["right"] for r in rows) / 5)
