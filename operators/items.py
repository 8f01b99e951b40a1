"""Dataset stage 3, items: a captioned photo's questions with known answers, for ``plvm dataset``.

Who is in the photo (its *truth*) is the face matcher's names in the output's row (``truth: matcher``) or, for
a photo a human truth file lists (``--truth``, in ``plvm eval captions``' format), that file's names of people
the user enrolled (``truth: file``). Only the user's own people, at the bank version the row was named with,
are ever named or asked about. From the truth come the items (``operators.rows.ITEM``):

- ``caption``: the output's caption, kept only when the enrolled people it names are exactly those present;
- ``recognition``: "Is NAME in this photo?" for each person present (yes), and for up to ``negatives`` of the
  user's other people, drawn with the seed (no): a photo of nobody enrolled gives negatives only;
- ``choice``: the same question with options Yes and No, and "Which person is NAME?" in a photo of two or three
  faces side by side, the options shuffled with the seed (PLVM's ``query_ques.json`` items);
- ``grounding``: "Where is NAME?" answered with the box of the face the matcher named NAME, as
  ``[x1, y1, x2, y2]``, fractions of the upright photo's width and height, ``box_decimals`` decimals;
- ``vqa``: the configured questions with the model's answers (``truth: model``: model output, not truth).

A photo gives no item when the face index does not hold its path (``not_indexed``), when its bytes are no longer
those the row describes (``changed_since_captioned``), or, split by person, when its people fall in two splits.
The photo's split comes from its content hash (or its people's keys), so it stays as the archive grows.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from operators.base import Resources, RowStage, Stage, StageConfig
from plvm_model.concept_token import CONCEPT_TOKEN, mentions
from plvm_model.store.dataset_formats import FORMATS
from plvm_model.store.errors import ConfigError
from plvm_model.store.ids import key_of

_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LETTERS = "ABC"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SIDES = {2: ("the person on the left", "the person on the right"),
         3: ("the person on the left", "the person in the middle", "the person on the right")}  # fmt: skip
"""The options of "Which person is NAME?" by the number of faces, left to right."""


def check_formats(formats: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``formats`` if each is known (:data:`FORMATS`), without repeats; else :class:`ConfigError` naming it."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown dataset format {fmt!r} (the formats: {', '.join(FORMATS)})")
    if not formats:
        raise ConfigError(f"no dataset format given (the formats: {', '.join(FORMATS)})")
    return tuple(dict.fromkeys(formats))


def check_splits(splits: dict[str, float]) -> dict[str, float]:
    """``splits`` if each name is a safe folder name, each fraction is above 0 and they sum to 1; else
    :class:`ConfigError` saying which."""
    for name, share in splits.items():
        if not _SPLIT_NAME.fullmatch(name):
            raise ConfigError(f"split name {name!r}: use letters, digits, '_' or '-'")
        if not share > 0:
            raise ConfigError(f"split {name}={share}: a fraction must be above 0")
    total = sum(splits.values())
    if not splits or abs(total - 1) > 1e-6:
        shown = ",".join(f"{k}={v:g}" for k, v in splits.items())
        raise ConfigError(f"split fractions {shown or '(none)'} sum to {total:g}, not 1")
    return splits


def parse_splits(text: str) -> dict[str, float]:
    """``train=0.8,val=0.1,test=0.1`` as {name: fraction}, checked (:func:`check_splits`)."""
    splits: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, share = part.partition("=")
        try:
            splits[name.strip()] = float(share)
        except ValueError:
            raise ConfigError(f"--split {text}: {part!r} is not NAME=FRACTION") from None
    return check_splits(splits)


class DatasetConfig(StageConfig):
    """``plvm dataset``: what a dataset holds and how it is cut."""

    formats: tuple[str, ...] = Field(FORMATS, description=f"The formats written (`--format`): {', '.join(FORMATS)}.")
    splits: dict[str, float] = Field(
        {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Split names and fractions (`--split train=0.8,val=0.1,test=0.1`), which sum to 1.",
    )
    split_by: Literal["photo", "person"] = Field(
        "photo",
        description="`photo`: each photo's split from its content hash; `person`: each person's from their "
        "concept, and a photo goes with its people (one whose people fall in two splits is left out).",
    )
    seed: int = Field(0, description="Seed of the negatives drawn and of the options' order (`--seed`).")
    negatives: int = Field(
        2, ge=0, description="Recognition negatives per photo: the user's other enrolled people (`--negatives`)."
    )
    photos_per_shard: int = Field(
        64, ge=1, description="Output rows per shard: one task's work and the unit of commit (a crash loses less)."
    )
    box_decimals: int = Field(3, ge=1, le=6, description="Decimals of a grounding box's fractions.")
    crop_margin: float = Field(
        0.25, ge=0, le=2, description="A face crop's margin around the face box, as a share of its width and height."
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        return check_formats(formats)

    @field_validator("splits")
    @classmethod
    def _fractions(cls, splits: dict[str, float]) -> dict[str, float]:
        return check_splits(splits)


def split_of(key: str, splits: dict[str, float]) -> str:
    """The split of ``key`` (a content hash, or a person's key): a uniform draw from its SHA-256 against the
    fractions, the splits taken by name (so however they were listed), so it depends on nothing else."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for name, share in sorted(splits.items()):
        total += share
        if draw < total:
            return name
    return name


def person_key(user_id: str, concept_id: str) -> str:
    return f"{user_id}/{concept_id}"


@dataclass(frozen=True)
class Roster:
    """The people each user had enrolled at each bank version the source's rows were named with:
    (user, version) -> {name: concept_id}."""

    people: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)

    def of(self, user_id: str, version: int) -> dict[str, str]:
        return self.people.get((user_id, version), {})


def normalised_box(box: list[float], width: int, height: int, decimals: int) -> list[float]:
    """A box in pixels as fractions of the photo's width and height, clipped to [0, 1]."""
    scale = (width, height, width, height)
    return [round(min(max(v / s, 0.0), 1.0), decimals) for v, s in zip(box, scale)]


def sides(faces: list[dict]) -> dict[int, str] | None:
    """The side of each face of a photo of two or three faces clearly side by side (their centres farther apart
    than the narrower face is wide): face position -> option text; None otherwise."""
    if len(faces) not in SIDES:
        return None
    centres = sorted(((f["box"][0] + f["box"][2]) / 2, i) for i, f in enumerate(faces))
    narrowest = min(f["box"][2] - f["box"][0] for f in faces)
    if any(b[0] - a[0] < narrowest for a, b in zip(centres, centres[1:])):
        return None
    return {i: text for (_, i), text in zip(centres, SIDES[len(faces)])}


class Items(RowStage):
    """An output row (with its bytes' hash) -> split, truth, people and items (see the module)."""

    needs = ("path", "user_id", "width", "height", "faces", "concepts", "caption", "answers", "content_hash",
             "captioned_hash", "bank_version")  # fmt: skip
    adds = ("split", "truth", "people", "items")

    def __init__(self, config: DatasetConfig, roster: Roster, caption_question: str | None,
                 truth: dict[str, list[str]] | None = None) -> None:  # fmt: skip
        self.config, self.roster, self.caption_question, self.truth = config, roster, caption_question, truth or {}

    def process(self, row: dict) -> None:
        row["items"], row["people"] = [], []
        if row["captioned_hash"] is None or row["captioned_hash"] != row["content_hash"]:
            why = "not_indexed" if row["captioned_hash"] is None else "changed_since_captioned"
            self.stat_update(f"dropped:{why}")
            return
        enrolled = self.roster.of(row["user_id"], row["bank_version"])
        named = {face["concept"]: i for i, face in enumerate(row["faces"] or []) if face.get("concept")}
        listed = self.truth.get(row["path"])
        if listed is None:
            row["truth"], present = "matcher", [n for n in row["concepts"] or [] if n in enrolled]
        else:
            row["truth"], present = "file", [n for n in dict.fromkeys(listed) if n in enrolled]
            self.stat_update("truth:unenrolled_names", len(set(listed) - set(present)))
        row["people"] = [{"concept_id": enrolled[n], "name": n, "face": named.get(n, -1)} for n in present]
        row["split"] = self.split(row)
        if row["split"] is None:
            self.stat_update("dropped:people_in_two_splits")
            return
        others = [n for n in sorted(enrolled) if n not in present and self.same_split(row, enrolled[n])]
        row["items"] = ItemMaker(row, self.config, enrolled, others, self).items(self.caption_question)

    def split(self, row: dict) -> str | None:
        """The photo's split: by its content hash, or its people's (None: they fall in two)."""
        if self.config.split_by == "photo" or not row["people"]:
            return split_of(row["content_hash"], self.config.splits)
        found = {split_of(person_key(row["user_id"], p["concept_id"]), self.config.splits) for p in row["people"]}
        return found.pop() if len(found) == 1 else None

    def same_split(self, row: dict, concept_id: str) -> bool:
        """Whether a person may be asked about in the row's split (split by person: only that split's people)."""
        return self.config.split_by == "photo" or split_of(person_key(row["user_id"], concept_id),
                                                           self.config.splits) == row["split"]  # fmt: skip


class ItemMaker:
    """The items of one photo, numbered per kind; its own random draws, seeded by the seed, user and content."""

    def __init__(self, row: dict, config: DatasetConfig, enrolled: dict[str, str], others: list[str],
                 stage: Items) -> None:  # fmt: skip
        self.row, self.config, self.enrolled, self.others, self.stage = row, config, enrolled, others, stage
        self.rng = random.Random(f"{config.seed}/{row['user_id']}/{row['content_hash']}")
        self.prefix = f"{row['content_hash'][:16]}-{key_of(row['path'])[:6]}"
        self.counts: dict[str, int] = {}

    def item(self, kind: str, question: str, answer: str, person: str | None = None, **rest) -> dict:
        n = self.counts[kind] = self.counts.get(kind, -1) + 1
        truth = "model" if kind == "vqa" else self.row["truth"]
        return {"id": f"{self.prefix}-{kind}-{n}", "kind": kind, "question": question, "answer": answer,
                "truth": truth, "person": person, "concept_id": self.enrolled.get(person) if person else None,
                **rest}  # fmt: skip

    def choice(self, question: str, options: list[str], right: str, person: str) -> dict:
        """A multiple-choice item: ``options`` shuffled, lettered A, B[, C]."""
        shuffled = self.rng.sample(options, len(options))
        choices = [{"letter": letter, "text": text} for letter, text in zip(LETTERS, shuffled)]
        correct = LETTERS[shuffled.index(right)]
        lines = "\n".join(f"{c['letter']}. {c['text']}" for c in choices)
        return self.item("choice", f"{question.format(person)}\n{lines}\n{CHOICE_INSTRUCTION}", correct, person,
                         choices=choices, correct=correct, sks_question=question.format(CONCEPT_TOKEN))  # fmt: skip

    def items(self, caption_question: str | None) -> list[dict]:
        row, people = self.row, self.row["people"]
        present = [p["name"] for p in people]
        out = self.caption(caption_question, present)
        negatives = self.rng.sample(self.others, min(self.config.negatives, len(self.others)))
        asked = [(name, True) for name in present] + [(name, False) for name in negatives]
        for name, there in asked:
            answer = f"Yes, {name} is in this photo." if there else f"No, {name} is not in this photo."
            out.append(self.item("recognition", f"Is {name} in this photo?", answer, name, present=there))
        for name, there in asked:
            out.append(self.choice("Is {} in this photo?", ["Yes", "No"], "Yes" if there else "No", name))
        side = sides(row["faces"] or [])
        for person in (p for p in people if side and p["face"] >= 0):
            out.append(self.choice("Which person is {}?", list(SIDES[len(side)]), side[person["face"]], person["name"]))
        for person in (p for p in people if p["face"] >= 0):
            box = normalised_box(row["faces"][person["face"]]["box"], row["width"], row["height"],
                                 self.config.box_decimals)  # fmt: skip
            name = person["name"]
            question = (f"Where is {name} in this photo? Answer with the bounding box of {name}'s face as "
                        "[x1, y1, x2, y2], fractions of the photo's width and height.")  # fmt: skip
            out.append(self.item("grounding", question, "[" + ", ".join(f"{v:g}" for v in box) + "]", name, box=box))
        for qa in row["answers"] or []:
            if qa["answer"]:
                out.append(self.item("vqa", qa["question"], qa["answer"]))
        return out

    def caption(self, question: str | None, present: list[str]) -> list[dict]:
        """The caption item, when the caption names exactly the enrolled people present (the reason counted)."""
        caption = self.row["caption"]
        if not caption or not question:
            self.stage.stat_update("captions:dropped:no_caption")
            return []
        said = {name for name in self.enrolled if mentions(caption, name)}
        if said - set(present):
            self.stage.stat_update("captions:dropped:names_someone_absent")
            return []
        if set(present) - said:
            self.stage.stat_update("captions:dropped:misses_someone_present")
            return []
        self.stage.stat_update("captions:kept")
        return [self.item("caption", question, caption)]


def stage(config: DatasetConfig, roster: Roster, caption_question: str | None, truth: dict[str, list[str]] | None,
          tasks: Resources) -> Stage:  # fmt: skip
    return Stage.of("items", Items, (config, roster, caption_question, truth), tasks)
