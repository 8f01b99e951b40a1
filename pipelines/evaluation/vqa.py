"""Multiple-choice VQA about enrolled people, in PLVM's question format.

Each item names a reference photo (``ref_img``), optionally a photo asked about
(``query_img``; without one the question is about the person, asked over the reference
photo), a ``question`` in which ``<sks>`` stands for the person, its ``multiple_choice``
options and the ``correct_answer`` letter. The person is enrolled from the reference (by
the real enrollment code, named after the reference's folder), the photos go through the
pipeline's face stages and the match stage, and the question goes to the configured engine
with the person's concept injected; the model's choice is the first option letter it
names (or the option whose text it writes). A question about where the person stands is
answered from the matched face's box when one is found.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.config import Config
from pipelines.enroll import Enroller
from pipelines.evaluation.stages import Question, ask, face_table, match_as
from plvm_model.concept_token import CONCEPT_TOKEN
from plvm_model.store.errors import InputError, InputNotFound
from plvm_model.store.storage import read_json_file

POSITION_QUESTION = re.compile(r"\b(where|position|located|which side)\b", re.IGNORECASE)
_WORDS = {
    "left": lambda x, y: 1 - x,
    "right": lambda x, y: x,
    "middle": lambda x, y: 1 - abs(x - 0.5) * 2,
    "center": lambda x, y: 1 - abs(x - 0.5) * 2,
    "centre": lambda x, y: 1 - abs(x - 0.5) * 2,
    "top": lambda x, y: 1 - y,
    "bottom": lambda x, y: y,
}


@dataclass
class Item:
    reference: str
    photo: str
    question: str
    choices: dict[str, str]
    answer: str


@dataclass
class VQAResult:
    accuracy: float
    n: int
    by_source: dict[str, list[int]] = field(default_factory=dict)
    """source ("model", "face box", or "unreadable photo") -> [right, asked]."""
    answers: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "by_source": self.by_source}


def load_items(questions: str | Path, root: str | Path | None = None) -> list[Item]:
    """The items of a PLVM question file.

    Image paths are taken from ``root``; without one, from the file's folder or, as in PLVM's
    own files (``validation_recognition/...`` inside ``validation_recognition/``), its parent.
    """
    path = Path(questions)
    raw_items = read_json_file(path, "question file")
    if not isinstance(raw_items, list) or not raw_items:
        raise InputError(f"{path}: expected a non-empty JSON list of questions")
    for number, raw in enumerate(raw_items, 1):
        missing = [k for k in ("ref_img", "question", "multiple_choice", "correct_answer") if k not in raw]
        if missing:
            raise InputError(f"{path} item {number} lacks {', '.join(missing)}")
        if raw["correct_answer"] not in raw["multiple_choice"]:
            raise InputError(f"{path} item {number}: correct_answer {raw['correct_answer']!r} is not an option")
    bases = [Path(root)] if root else [path.parent, path.parent.parent]
    base = next((b for b in bases if (b / raw_items[0]["ref_img"]).exists()), bases[0])
    items = [
        Item(str(base / raw["ref_img"]), str(base / raw.get("query_img", raw["ref_img"])), raw["question"],
             dict(raw["multiple_choice"]), raw["correct_answer"])
        for raw in raw_items
    ]  # fmt: skip
    for item in items:
        for image in (item.reference, item.photo):
            if not Path(image).exists():
                raise InputNotFound(f"{image} (named in {path}) does not exist; give the images' --root")
    return items


def prompt_for(item: Item, name: str, concept_style: str) -> str:
    """The question with its options; ``<sks>`` stays the concept token in ``plvm`` style, else becomes ``name``."""
    options = " ".join(f"{letter}. {text}" for letter, text in sorted(item.choices.items()))
    question = item.question if concept_style == "plvm" else item.question.replace(CONCEPT_TOKEN, name)
    return f"{question}\nOptions: {options}\nAnswer with the option's letter."


def model_choice(text: str, choices: dict[str, str]) -> str | None:
    """The option the model's text names: its first standalone option letter, else the first option text it contains."""
    letters = "".join(sorted(choices))
    found = re.search(rf"\b([{letters}])\b", text)
    if found:
        return found.group(1)
    lowered = text.lower()
    hits = [(lowered.find(t.lower()), k) for k, t in choices.items() if t.lower() in lowered]
    return min(hits)[1] if hits else None


def position_choice(box: list[float], width: int, height: int, choices: dict[str, str]) -> str | None:
    """The option whose position words (left, right, middle, top, bottom) best fit the face's centre."""
    x, y = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    scores = {}
    for letter, text in choices.items():
        words = [w for w in re.findall(r"[a-z]+", text.lower()) if w in _WORDS]
        if words:
            scores[letter] = float(np.mean([_WORDS[w](x, y) for w in words]))
    return max(scores, key=scores.get) if scores else None


def vqa(config: Config, questions: str | Path, root: str | Path | None = None) -> VQAResult:
    """Answer and score every question of a PLVM question file (see the module's docstring)."""
    items = load_items(questions, root)
    references = sorted({i.reference for i in items})
    names = {ref: Path(ref).parent.name or "sks" for ref in references}
    users = {ref: f"vqa-{n}" for n, ref in enumerate(references)}
    with tempfile.TemporaryDirectory(prefix="plvm-vqa-") as banks:
        config = config.model_copy(update={"bank": banks})
        enroller = Enroller(config)
        for ref in references:
            enroller.enroll(users[ref], names[ref], [ref])
        faces = face_table(config, sorted({i.photo for i in items}))
        space = enroller.space
        matched = {}
        for ref in references:
            for row in match_as(config, faces, users[ref], space)[0]:
                matched[(ref, row["path"])] = row
        concepts = {ref: enroller.store.load(users[ref]).concepts[0] for ref in references}

    answers: list[dict] = [{} for _ in items]
    questions, asked = [], []
    for n, item in enumerate(items):
        row = matched[(item.reference, item.photo)]
        if row["error"]:
            answers[n] = {"choice": None, "source": "unreadable photo", "text": row["error"]}
            continue
        face = next((f for f in row["faces"] or [] if f.get("concept")), None)
        if face is not None and POSITION_QUESTION.search(item.question):
            choice = position_choice(face["box"], row["width"], row["height"], item.choices)
            if choice is not None:
                answers[n] = {"choice": choice, "source": "face box", "text": None}
                continue
        question = prompt_for(item, names[item.reference], config.generate.concept_style)
        questions.append(Question(item.photo, concepts[item.reference], question))
        asked.append(n)
    for n, answer in zip(asked, ask(config, questions) if questions else []):
        if answer.error is not None:
            answers[n] = {"choice": None, "source": "unreadable photo", "text": answer.error}
        else:
            answers[n] = {"choice": model_choice(answer.text, items[n].choices), "source": "model", "text": answer.text}
    tally = Counter()
    for item, answer in zip(items, answers):
        answer["right"] = answer["choice"] == item.answer
        tally[(answer["source"], answer["right"])] += 1
    sources = dict.fromkeys(["model", "face box", *(a["source"] for a in answers)])
    by_source = {s: [tally[(s, True)], tally[(s, True)] + tally[(s, False)]] for s in sources}
    rows = [{**asdict(item), **answer} for item, answer in zip(items, answers)]
    return VQAResult(sum(a["right"] for a in answers) / len(items), len(items), by_source, rows)
