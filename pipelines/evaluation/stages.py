"""What the evaluations run through the runner, as the caption run does: the photos' faces (:func:`face_table`),
those faces named as one user's (:func:`match_as`), and the engine asked questions about photos with a concept
injected (:func:`ask`: the model judge and VQA)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from operators.cohort import cohort_scales
from operators.match import MatchFaces
from operators.rows import injected_record, to_table
from pipelines.config import Config
from pipelines.runner.execute import execute
from pipelines.runner.failures import as_run_failure, results
from pipelines.stage_lists import asking_stages, face_stages_without_pixels
from plvm_model.store.banks import BankSource, Concept


def face_table(config: Config, paths: list[str]) -> pa.Table:
    """The photos' rows after the pipeline's read, decode, detect, align and embed stages (on Ray)."""
    import ray

    listing = to_table([{"path": p, "user_id": "eval"} for p in paths], ["path", "user_id"])
    steps = face_stages_without_pixels(config)
    ds = execute(listing, steps, config.ray, config.run, config.tasks.batch_size)
    with as_run_failure():
        return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def match_as(config: Config, faces: pa.Table, user: str, space: str) -> tuple[list[dict], dict]:
    """The match stage's rows for ``faces`` taken as ``user``'s photos (against ``config.bank``), and its cohort scales."""
    batch = faces.set_column(
        faces.schema.get_field_index("user_id"), "user_id", pa.array([user] * faces.num_rows, pa.string())
    )
    banks = BankSource(config.bank, config.storage)
    scales = cohort_scales(batch, config.match, banks, embedder_space=space) if config.match.rule().cohort else {}
    return MatchFaces(config.match, banks, embedder_space=space, scales=scales)(batch).to_pylist(), scales


@dataclass(frozen=True)
class Question:
    """A question about a photo, with a person's concept injected (``<sks>`` in it, in ``plvm`` style, is theirs)."""

    photo: str
    concept: Concept
    text: str


@dataclass(frozen=True)
class Answer:
    text: str | None
    """The model's answer; None when the photo could not be read."""
    error: str | None
    """Why the photo could not be read (its row's error)."""
    width: int
    height: int


def ask(config: Config, questions: list[Question]) -> list[Answer]:
    """The configured engine's answers to ``questions``, in order: the photos read and decoded, and the engine
    asked, by the caption run's own stages (its actor, its batches, its error policy)."""
    rows = [{"index": i, "path": q.photo, "user_id": "eval", "injected": [injected_record(q.concept)],
             "questions": [q.text]} for i, q in enumerate(questions)]  # fmt: skip
    listing = to_table(rows, ["index", "path", "user_id", "injected", "questions", "error", "error_kind"])
    config = config.model_copy(update={"generate": config.generate.model_copy(update={"caption": None})})
    ds = execute(listing, asking_stages(config), config.ray, config.run, config.tasks.batch_size)
    answered = sorted(results(ds.select_columns(["index", "answers", "width", "height", "error"])),
                      key=lambda row: row["index"])  # fmt: skip
    return [
        Answer(row["answers"][0]["answer"] if row["answers"] else None, row["error"], row["width"] or 0,
               row["height"] or 0)
        for row in answered
    ]  # fmt: skip
