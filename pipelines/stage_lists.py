"""The pipelines as lists of steps, built from the run's config: each composition runs one of them, or a part.

- :func:`face_stages`: read, decode, detect, align, embed: every face of every photo, with its descriptor
  (enrollment runs them in process; evaluation on Ray);
- :func:`naming_stages`: those, the cohort barrier and match: every face named (evaluation, the benchmarks);
- :func:`caption_stages`: the caption run: read, index lookup, the decode for the faces, detect and align joined
  in the detect actor (the pixels never leave it), embed, index, the cohort barrier over the face index, match,
  then :func:`answering_stages`;
- :func:`answering_stages`: prompt, the decode for the LLM, generate, write (also what a rematch sends the photos
  whose names changed through, after :func:`read`, in :func:`llm_stages`);
- :func:`asking_stages`: read, decode, generate, for rows that carry their own concepts and questions (the
  evaluation's model judge and VQA);
- :func:`dataset_stages`: a dataset build's, joined into one call per slice of the source output: its rows, their
  bytes, their items, their files, the shard written.

Each step is a descriptor (``operators.base.Stage`` or ``Barrier``); ``pipelines.runner`` applies them.
"""

from __future__ import annotations

from dataclasses import replace

from operators import (align, cohort, decode, detect, embed, generate, index, index_lookup, items, match, output_rows,
                       photo_files, prompt, read, shards, write)  # fmt: skip
from operators.base import Step, joined
from pipelines.config import Config, ModelPaths
from pipelines.pinned import PinnedIndex
from plvm_model.faces import embedder_class
from plvm_model.store.banks import BankSource, BankVersions
from plvm_model.store.face_index import IndexSource


def face_stages(config: Config) -> list[Step]:
    """read -> decode -> detect -> align -> embed: every face of every photo, with its descriptor."""
    tasks = config.tasks
    return [
        read.stage(config.read, config.storage, tasks),
        *joined_face_stages(config, for_faces=False),
        embed.stage(config.embed),
    ]


def joined_face_stages(config: Config, for_faces: bool) -> list[Step]:
    """decode, detect and align, joined into one call of the detect actor: a photo's pixels never leave it."""
    tasks = config.tasks
    return joined(
        decode.stage(config.decode, tasks, for_faces=for_faces), detect.stage(config.detect),
        align.stage(config.embed, tasks),
    )  # fmt: skip


def face_stages_without_pixels(config: Config) -> list[Step]:
    """The face stages, the last of them declaring that the pixels go: they leave at their last reader (the align
    stage, inside the detect actor), for a composition that reads none."""
    *steps, last = face_stages(config)
    return [*steps, replace(last, drops=(*last.drops, "pixels"))]


def naming_stages(config: Config, banks: BankVersions | None = None) -> list[Step]:
    """The face stages, the cohort barrier (with cohort normalization) and the match stage: faces named
    (against the users' banks at the versions ``banks`` pins, the newest for other users)."""
    space = embedder_class(config.embed.kind).space
    source = BankSource(config.bank, config.storage, banks or {})
    barrier = [cohort.barrier(config.match, source, space)]
    return [
        *face_stages(config),
        *(barrier if config.match.normalization == "cohort" else []),
        match.stage(config.match, source, space, config.tasks),
    ]


def caption_stages(
    config: Config, models: ModelPaths, run_id: str, parts: int, pinned: PinnedIndex, banks: BankVersions | None = None
) -> list[Step]:
    """The whole caption pipeline, in order; ``parts`` is how many output files the run writes, ``pinned`` the
    face index it looks photos up in and adds to, ``banks`` the versions of the users' banks it reads."""
    tasks = config.tasks
    space = embedder_class(config.embed.kind).space
    source = BankSource(config.bank, config.storage, banks or {})
    barrier = [cohort.barrier(config.match, source, space, pinned.cohort)]
    return [
        read.stage(config.read, config.storage, tasks),
        index_lookup.stage(pinned.source, tasks),
        *joined_face_stages(config, for_faces=True),
        embed.stage(config.embed),
        index.stage(pinned.source, config.output.uri, run_id, tasks),
        *(barrier if config.match.normalization == "cohort" else []),
        match.stage(config.match, source, space, tasks),
        *answering_stages(config, models, run_id, parts, source),
    ]


def answering_stages(config: Config, models: ModelPaths, run_id: str, parts: int, banks: BankSource) -> list[Step]:
    """After the faces are named: prompt -> decode -> generate -> write (the caption run's last stages)."""
    tasks = config.tasks
    return [
        prompt.stage(config.prompt, banks, models.aligner_identity, tasks),
        decode.stage(config.decode, tasks),  # the photos the barrier (or the index) left without pixels
        generate.stage(config.generate, models.llava, models.random_weights),
        write.stage(config.output, run_id, config.storage, tasks, parts),
    ]


def llm_stages(config: Config, models: ModelPaths, run_id: str, parts: int, banks: BankVersions) -> list[Step]:
    """For photos whose faces are already named (a rematch): read, then the caption pipeline's answering stages."""
    source = BankSource(config.bank, config.storage, banks)
    answering = answering_stages(config, models, run_id, parts, source)
    return [read.stage(config.read, config.storage, config.tasks), *answering]


def asking_stages(config: Config) -> list[Step]:
    """read -> decode -> generate, for rows that carry their own ``injected`` concepts and ``questions``."""
    models = config.model_paths()
    return [
        read.stage(config.read, config.storage, config.tasks),
        decode.stage(config.decode, config.tasks),
        generate.stage(config.generate, models.llava, models.random_weights),
    ]


def dataset_stages(config: Config, out_uri: str, users: tuple[str, ...], runs: dict[str, dict[str, int]],
                   index: IndexSource, plan: str, roster: items.Roster, truth: dict[str, list[str]] | None,
                   references: dict[str, str], folders: dict[str, str]) -> list[Step]:  # fmt: skip
    """A slice of the source output (``users``' rows, named with the bank versions ``runs`` read) -> its shard of
    the dataset at ``out_uri``: the stages joined into one call per slice, so that a shard holds exactly its slice's
    photos, and one slice's photos at a time are in memory."""
    tasks, dataset = config.tasks, config.dataset
    return joined(
        output_rows.stage(users, runs, index, plan, config.storage, tasks),
        read.stage(config.read, config.storage, tasks),
        items.stage(dataset, roster, config.generate.caption, truth, tasks),
        photo_files.stage(dataset, config.decode, tasks),
        shards.stage(out_uri, config.storage, dataset.formats, references, folders, tasks),
    )
