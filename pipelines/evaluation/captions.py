"""MyVLM's caption metric: do a caption run's captions name the people in each photo, and only them?

For each person, *recall* is the share of the photos the person is in whose caption names
them (MyVLM's recall of the concept identifier); *false mentions* is the share of the photos
the person is not in whose caption names them anyway. Overall, recall is over all (photo,
person present) pairs, and the false-mention rate is the share of captions that name at
least one person who is not in the photo. A caption names a person when it holds the name
as a whole word (case ignored).

Who is in a photo (the truth) is read from ``--truth`` (a JSON object: photo path, as the
output's ``path`` column writes it -> list of names); without it, it is the people the face
matcher recognised in the row (its ``concepts``), which measures the captions given the
recognition, not the recognition itself. The people scored are every name of the truth and
every recognised name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

from plvm_model.concept_token import mentions
from plvm_model.store import storage
from plvm_model.store.errors import InputError
from plvm_model.store.output_table import caption_rows
from plvm_model.store.storage import read_json_file


@dataclass
class PersonScore:
    present: int = 0
    """Photos the person is in."""
    named: int = 0
    """Of those, photos whose caption names them."""
    absent: int = 0
    """Photos the person is not in."""
    falsely_named: int = 0
    """Of those, photos whose caption names them."""

    @property
    def recall(self) -> float | None:
        return self.named / self.present if self.present else None

    @property
    def false_mentions(self) -> float | None:
        return self.falsely_named / self.absent if self.absent else None


@dataclass
class CaptionScores:
    truth: str
    """``file PATH`` or ``recognised`` (the face matcher's names)."""
    photos: int
    """Photos scored: rows with a caption (and, with a truth file, listed in it)."""
    recall: float | None
    false_mention_rate: float | None
    people: dict[str, PersonScore] = field(default_factory=dict)
    without_caption: int = 0
    """Rows with an error or no caption, not scored."""
    not_in_truth: int = 0
    """Rows with a caption whose photo the truth file does not list, not scored."""

    def summary(self) -> dict:
        people = {
            name: {**asdict(score), "recall": score.recall, "false_mentions": score.false_mentions}
            for name, score in self.people.items()
        }
        return {**asdict(self), "people": people}


def score_captions(table: pa.Table, truth: dict[str, list[str]] | None, source: str) -> CaptionScores:
    """The scores of the output rows in ``table`` (``path``, ``concepts``, ``caption``) against ``truth`` (None:
    each row's recognised people)."""
    rows = table.select(["path", "concepts", "caption"]).to_pylist()
    captioned = [r for r in rows if r["caption"]]
    scored = [r for r in captioned if truth is None or r["path"] in truth]
    present = {r["path"]: set(r["concepts"] or []) if truth is None else set(truth[r["path"]]) for r in scored}
    names = sorted(set().union(*present.values(), *(r["concepts"] or [] for r in rows)))
    people = {name: PersonScore() for name in names}
    pairs = named_pairs = wrong_captions = 0
    for row in scored:
        there = present[row["path"]]
        wrong = False
        for name, score in people.items():
            said = mentions(row["caption"], name)
            if name in there:
                score.present += 1
                score.named += said
            else:
                score.absent += 1
                score.falsely_named += said
                wrong = wrong or said
        pairs += len(there)
        named_pairs += sum(mentions(row["caption"], name) for name in there)
        wrong_captions += wrong
    return CaptionScores(
        truth=source,
        photos=len(scored),
        recall=named_pairs / pairs if pairs else None,
        false_mention_rate=wrong_captions / len(scored) if scored else None,
        people=people,
        without_caption=len(rows) - len(captioned),
        not_in_truth=len(captioned) - len(scored),
    )


def read_truth(path: str) -> dict[str, list[str]]:
    """The truth file: a JSON object, photo path -> the names of the people in it."""
    truth = read_json_file(path, "truth file")
    good = isinstance(truth, dict) and all(
        isinstance(names, list) and all(isinstance(n, str) for n in names) for names in truth.values()
    )
    if not good:
        raise InputError(f"truth file {path} must hold one JSON object: photo path -> list of names")
    return truth


def evaluate_captions(
    results: str, truth_path: str | None, storage_options: storage.StorageOptions | None
) -> CaptionScores:
    """The scores of a caption run's output (a folder or one Parquet file)."""
    table = caption_rows(results, storage_options)
    if truth_path is None:
        return score_captions(table, None, "recognised")
    return score_captions(table, read_truth(truth_path), f"file {truth_path}")
